"""Ctrl-C and SIGTERM that always stop a merge.

Python delivers a signal by raising in whatever the main thread runs at that moment. When that is a weakref
callback or a `__del__` (torch and the standard library run many), the KeyboardInterrupt is "ignored": printed
as a traceback on stderr and dropped, and the merge ran to the end as if nothing was asked. So the CLI's
handler also records the request; `check()` raises it again at the merge's safe points (each buffer handed to
the writer, each shard), and a KeyboardInterrupt dropped that way is not printed.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

_requested = threading.Event()


def _handler(signum: int, frame: FrameType | None) -> None:
    _requested.set()
    raise KeyboardInterrupt()


def install() -> Callable[[], None]:
    """Handle SIGINT and SIGTERM as above (main thread only); returns the function that gives the previous
    handlers back and forgets the request."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old_int = signal.signal(signal.SIGINT, _handler)
    old_term = signal.signal(signal.SIGTERM, _handler)
    old_hook = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and _requested.is_set():
            return  # check() raises it again where it can stop the merge
        old_hook(unraisable)

    sys.unraisablehook = hook

    def restore() -> None:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        sys.unraisablehook = old_hook
        _requested.clear()

    return restore


def check() -> None:
    """Raise KeyboardInterrupt on the main thread when an interrupt was asked for (and possibly dropped)."""
    if _requested.is_set() and threading.current_thread() is threading.main_thread():
        raise KeyboardInterrupt()
