"""Refuse at start, with exit 2, an address-space limit too small to load torch.

Under `ulimit -v` most allocation failures reach Python as MemoryError or an errno and the CLI reports them
as "not enough memory" (`errors.memory_error`). Loading torch's shared libraries is the exception: below a
threshold that depends on the torch build, the dynamic loader or a library's static initialiser aborts the
process (std::bad_alloc) or calls exit(1) itself (OpenBLAS), which no Python code can catch. So, before
torch is imported, the limit is compared with what loading it maps: the sizes of its shared libraries,
plus what the process already maps and a margin for the first buffers and threads.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

try:
    import resource
except ImportError:  # Windows: no rlimits (a merge is refused there, see platform_support)
    resource = None  # type: ignore[assignment]

from .errors import NotEnoughMemoryError

MARGIN = 160 * 2**20  # numpy/OpenBLAS buffers, thread stacks, Python objects while importing


def _mapped_bytes() -> int:
    """The address space this process maps now (0 where /proc is not available)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _torch_library_bytes() -> int:
    """Total size of torch's shared libraries, found without importing torch (0 if torch is not found)."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return 0
    if spec is None or not spec.submodule_search_locations:
        return 0
    total = 0
    for folder in spec.submodule_search_locations:
        for lib in (Path(folder) / "lib").glob("*.so*"):
            try:
                total += lib.stat().st_size
            except OSError:
                pass
    return total


def check_address_space() -> None:
    """Raise NotEnoughMemoryError when `ulimit -v` (RLIMIT_AS) leaves too little room to import torch."""
    if resource is None:
        return
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return
    libraries = _torch_library_bytes()
    if not libraries:
        return
    need = _mapped_bytes() + libraries + MARGIN
    if soft < need:
        mib = 2**20
        raise NotEnoughMemoryError(
            f"not enough memory: the address-space limit (ulimit -v) is {soft // mib} MiB, and loading torch "
            f"alone maps about {need // mib} MiB", fix=f"raise the limit well above that (e.g. ulimit -v {need // 512})")
