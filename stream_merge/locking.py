"""The output-folder lock: a guard against two runs on one host stepping on each other, never the thing
correctness rests on (flock is a no-op on some shared file systems; unique temp names and atomic renames keep
the output right there, see `fileio`).

The lock is a `flock` on OUT itself, so no lock file is ever created, left behind or unlinked (unlinking a
lock file on exit races with a run that just opened it). A plain merge and `finalize` take it exclusively;
each `--worker I/N` takes it shared (workers run side by side, but never beside a plain merge of the same
OUT, issue 14 item 10), plus an exclusive lock on its own file in the journal folder, so the same worker
started twice on one host is refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError
from .journal import SHARDS_DIR
from .platform_support import check_platform, fcntl

log = logging.getLogger("stream_merge")


def _flock(fd: int, exclusive: bool, out: Path, who: str) -> None:
    assert fcntl is not None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputError(f"another stream-merge ({who}) is writing to this output folder", file=str(out),
                          fix="wait for it to finish, or use another -o") from None
    except OSError as exc:  # a file system without flock: go on, correctness does not depend on it
        log.info("cannot lock %s (%s); going on without the lock", out, exc.strerror)


def worker_lock_name(worker: str) -> str:
    return f"worker-{worker.replace('/', '-of-').replace(' ', '')}.lock"


@contextlib.contextmanager
def out_lock(out: Path, worker: str | None = None) -> Iterator[None]:
    """Hold OUT's lock for a run: exclusive without `worker`, shared plus the worker's own lock with it.
    Fails fast (OutputError) when a conflicting run holds it."""
    check_platform()
    fds: list[int] = []
    try:
        fds.append(os.open(out, os.O_RDONLY))
        _flock(fds[0], worker is None, out, "a merge or a worker" if worker is None else "a merge without --worker")
        if worker is not None:
            (out / SHARDS_DIR).mkdir(exist_ok=True)
            fds.append(os.open(out / SHARDS_DIR / worker_lock_name(worker), os.O_CREAT | os.O_RDWR, 0o644))
            _flock(fds[1], True, out, f"--worker {worker}")
        yield
    finally:
        for fd in fds:
            os.close(fd)
