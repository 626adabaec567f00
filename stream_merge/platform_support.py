"""What differs between the platforms stream-merge runs on (Linux and macOS; issue 12 item 20).

Windows has neither `fcntl` (the output-folder lock) nor `resource`; a merge there is refused in one line at
start instead of failing on an import. macOS has no O_DIRECT (`direct_io` falls back to buffered writes) and
reports `ru_maxrss` in bytes where Linux reports KiB.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from .errors import ConfigError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


def check_platform() -> None:
    """Refuse, before any side effect, a platform without POSIX file locking (Windows)."""
    if fcntl is None or sys.platform.startswith(("win", "cygwin")):
        raise ConfigError(f"stream-merge merges on Linux and macOS only (this is {sys.platform}: no POSIX file "
                          "locking)", fix="run it on Linux or macOS, or under WSL2")


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes (0 where the platform does not say)."""
    try:
        import resource
    except ImportError:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def guard_base_files() -> Any:
    """Let shard readers hold a read lease on their base file (Linux), so that another process that truncates
    or opens it for writing waits until the reader has stopped, and the reader names the file instead of
    faulting (SIGBUS) on a map of bytes that are gone. The kernel announces such a lease break with SIGIO,
    whose default action ends the process: only a process that calls this (the CLI, from its main thread)
    ignores SIGIO and so takes leases; library callers keep the size/identity checks alone. Returns the
    previous SIGIO handler for the caller to restore (None where leases are not available)."""
    if fcntl is not None and hasattr(fcntl, "F_SETLEASE") and hasattr(signal, "SIGIO"):
        return signal.signal(signal.SIGIO, signal.SIG_IGN)
    return None
