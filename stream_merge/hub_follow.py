"""Hash a download while it is being written, so that checking a shard's sha256 costs no time after it.

huggingface_hub writes each download sequentially into a fresh partial file (`<...>.<etag>.<uuid>.incomplete`)
and renames it once complete; it checks only the size. `PartialFollower` finds the partial file that appears
in the folder after it starts, and reads and hashes it as it grows (from the page cache) on its own thread.
When the download returns, `verdict` reads the rest and claims a result only when the file it hashed is the
very file the download produced (same inode, the expected size); in any other case (no partial found, a retry
that started a new file, another process's file) it hashes the final file as before. The hash itself is never
trusted blindly: a match is a full sha256 of the final file's bytes, only computed earlier.

The follower also lets the merge read the shard while it downloads (`hub_stream`): `wait_for(end)` returns once
the first `end` bytes have been hashed (they are in the file and final, as huggingface_hub only appends), and
`streamed` says, after the verdict, whether the digest that matched is the one of those very bytes.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from types import TracebackType

from .hub_cache import RemoteFile, digest_matches

_READ = 8 * 1024 * 1024
_POLL_S = 0.02


class PartialFollower:
    """Follows the partial file of `entry` that appears in `folder` after construction (see the module)."""

    def __init__(self, folder: Path, entry: RemoteFile) -> None:
        self.folder, self.entry = folder, entry
        self._pattern = f"*{entry.etag}.*.incomplete"
        self._before = set(self._candidates())
        self._stop = threading.Event()
        self._fd: int | None = None
        self._fd_lock = threading.Lock()  # `dup` never sees a descriptor number that `close` has freed
        self._hash = hashlib.sha256()
        self._done = 0
        self._error: BaseException | None = None
        self._grew = threading.Condition()
        self._finished = False      # closed: `_done` grows no more
        self.opened = threading.Event()  # the partial file was found and opened
        self.streamed = False       # the verdict's match is the sha256 of the bytes `wait_for` handed out
        self._thread = threading.Thread(target=self._run, name="stream-merge-hash", daemon=True)
        self._thread.start()

    def _candidates(self) -> list[Path]:
        try:
            return list(self.folder.glob(self._pattern))
        except OSError:
            return []

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._fd is None:
                    new = [p for p in self._candidates() if p not in self._before]
                    if len(new) == 1:
                        try:
                            self._fd = os.open(new[0], os.O_RDONLY)
                            self.opened.set()
                        except OSError:
                            self._before.add(new[0])  # gone already (a failed attempt): look again
                    self._stop.wait(_POLL_S)
                    continue
                if not self._read_some():
                    self._stop.wait(_POLL_S)
        except BaseException as exc:  # noqa: BLE001 - the verdict then falls back to hashing the file
            self._error = exc

    def _read_some(self) -> bool:
        assert self._fd is not None
        buf = os.read(self._fd, _READ)
        if buf:
            self._hash.update(buf)
            with self._grew:
                self._done += len(buf)
                self._grew.notify_all()
        return bool(buf)

    def dup(self) -> int | None:
        """A new descriptor of the partial file (valid after the rename and after `close`), or None once the
        follower is closed (its number may then name another file: the download is over, read the result)."""
        with self._fd_lock:
            return None if self._fd is None else os.dup(self._fd)

    def wait_for(self, end: int, abandoned: threading.Event) -> bool:
        """Wait until the first `end` bytes have arrived and been hashed; False when they never will (the download
        ended short or failed) or `abandoned` is set."""
        with self._grew:
            while self._done < end:
                if self._finished or abandoned.is_set():
                    return False
                self._grew.wait(_POLL_S * 5)
        return True

    def verdict(self, path: Path) -> tuple[bool, str]:
        """`digest_matches(path, entry)`, from the hash made while downloading when it covers this very file."""
        self._stop.set()
        self._thread.join()
        try:
            if self._fd is not None and self._error is None and os.fstat(self._fd).st_ino == path.stat().st_ino:
                while self._read_some():
                    pass
                if self._done == self.entry.size == path.stat().st_size and self.entry.sha256:
                    got = self._hash.hexdigest()
                    if got == self.entry.sha256:
                        self.streamed = True
                        return True, got
        except OSError:
            pass
        return digest_matches(path, self.entry)  # anything unusual: the plain check

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        with self._grew:
            self._finished = True
            self._grew.notify_all()
        with self._fd_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> PartialFollower:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
