"""Sequential file writes that bypass the page cache (O_DIRECT), with a buffered fallback.

A merge writes every output byte once and never reads it back, so caching the output only costs: the kernel
copies each byte into a fresh page-cache page, ext4 tracks it as delayed allocation, a flusher thread writes
it back, and when memory fills up, reclaim evicts the base shards we are about to read. Measured on the
project's 2-core machine: buffered writes of 2 GiB took 0.6 to 7 CPU-seconds (the high end under reclaim),
O_DIRECT writes 0.2 s at the same disk speed. The catch: O_DIRECT needs the memory address, the file offset
and the length aligned to the device's block size. So bytes are gathered into aligned staging buffers and
written in large aligned blocks by an I/O thread (two buffers: one fills while the other is on its way to
the disk); the last partial block goes through the page cache, so nothing is written past the real size.

File systems without O_DIRECT (tmpfs, some FUSE and network mounts) refuse it at open or at the first write;
the sink then falls back to plain buffered writes of the same bytes.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

ALIGN = 4096                 # a multiple of every common logical block size (512, 4096)
STAGING_BYTES = 16 << 20     # per write call (x2 buffers): large calls keep the disk streaming


class FileSink:
    """Append-only writer to a new file; `direct` tries O_DIRECT first. One thread calls write/finish."""

    def __init__(self, path: Path, direct: bool = True, staging_bytes: int = STAGING_BYTES) -> None:
        self.path = path
        self.size = 0  # bytes accepted so far
        self._fill = 0  # bytes in the current staging buffer
        self._written = 0  # bytes handed to the disk (a multiple of ALIGN while direct)
        self._bufs: list[mmap.mmap] = []
        self._addr: dict[int, int] = {}  # id(staging buffer) -> its address, for memmove
        self._io: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None
        self._lock = threading.Lock()  # close() never unmaps a buffer that a raw memmove is writing into
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        self.direct = direct and hasattr(os, "O_DIRECT")
        if self.direct:
            try:
                self.fd = os.open(path, flags | os.O_DIRECT, 0o644)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct = False  # the file system does not do O_DIRECT
        if not self.direct:
            self.fd = os.open(path, flags, 0o644)
            return
        size = max(ALIGN, staging_bytes // ALIGN * ALIGN)
        self._bufs = [mmap.mmap(-1, size), mmap.mmap(-1, size)]  # anonymous maps are page-aligned
        self._addr = {id(b): ctypes.addressof(ctypes.c_char.from_buffer(b)) for b in self._bufs}

    def write(self, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data).cast("B")
        self.size += mv.nbytes
        if not self._bufs:
            _write_all(self.fd, mv)
            return
        cap = len(self._bufs[0])
        src = _address(mv)
        done = 0
        while done < len(mv):
            n = min(len(mv) - done, cap - self._fill)
            with self._lock:
                if not self._bufs:
                    raise ValueError("write to a closed FileSink")
                if src is not None:  # memmove through ctypes releases the GIL for the copy
                    ctypes.memmove(self._addr[id(self._bufs[0])] + self._fill, src + done, n)
                else:
                    self._bufs[0][self._fill:self._fill + n] = mv[done:done + n]
            self._fill += n
            done += n
            if self._fill == cap:
                self._submit(cap)
                if not self._bufs:
                    _write_all(self.fd, mv[done:])
                    return

    def _submit(self, n: int) -> None:
        """Hand the first n bytes of the current buffer to the I/O thread and fill the other one meanwhile."""
        self._wait()
        if not self._bufs:  # fell back to buffered writes: _wait wrote the staged bytes too
            return
        buf = self._bufs[0]
        if self._io is None:
            self._io = ThreadPoolExecutor(1, thread_name_prefix="stream-merge-io")
        self._pending = self._io.submit(self._pwrite, buf, n, self._written)
        self._written += n
        self._bufs.reverse()
        self._fill = 0

    def _pwrite(self, buf: mmap.mmap, n: int, pos: int) -> None:
        view = memoryview(buf)[:n]
        err: OSError | None = None
        try:
            _pwrite_all(self.fd, view, pos)
        except OSError as exc:
            # a fresh error, raised below: the original's traceback would keep views of the buffer alive
            err = OSError(exc.errno, exc.strerror)
        finally:
            view.release()
        if err is not None:
            if err.errno == errno.EINVAL and pos == 0:
                raise _Refused()  # the first write: nothing of it reached the file
            raise err

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except _Refused:
            # O_DIRECT accepted at open but refused at the first write: go on buffered. The refused bytes are
            # still in the other buffer (it is only reused after this wait).
            self._clear_direct()
            first = bytes(self._bufs[1][:self._written])
            staged = bytes(self._bufs[0][:self._fill])
            self._release()
            _write_all(self.fd, memoryview(first))
            _write_all(self.fd, memoryview(staged))

    def finish(self) -> None:
        """Write what is staged and wait for the disk. The aligned part goes direct; the last partial block
        (< ALIGN bytes) goes through the page cache, so nothing is written past the file's real size."""
        rest = b""
        if self._bufs and self._fill:
            aligned = self._fill // ALIGN * ALIGN
            rest = bytes(self._bufs[0][aligned:self._fill])
            self._fill = aligned
            if aligned:
                self._submit(aligned)
        self._wait()
        self._release()
        if rest:
            if self.direct:
                self._clear_direct()
                _pwrite_all(self.fd, memoryview(rest), self._written)
            else:  # fell back while waiting: the file offset is right after the bytes written so far
                _write_all(self.fd, memoryview(rest))

    def _clear_direct(self) -> None:
        import fcntl

        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def _release(self) -> None:
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None
        with self._lock:
            self._addr = {}
            for b in self._bufs:
                try:
                    b.close()
                except BufferError:  # a view still exists somewhere: the map goes when it does
                    pass
            self._bufs = []
            self._fill = 0

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        """Release everything (also after an error; a pending write is waited for, its error dropped)."""
        if self._pending is not None:
            self._pending.exception()
            self._pending = None
        self._release()
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class _Refused(Exception):
    """O_DIRECT refused at the first write (EINVAL)."""


def _address(mv: memoryview) -> int | None:
    """The address of a writable contiguous buffer (None for read-only ones such as bytes)."""
    if mv.readonly or not mv.contiguous or not mv.nbytes:
        return None
    return ctypes.addressof(ctypes.c_char.from_buffer(mv))


def _pwrite_all(fd: int, mv: memoryview, pos: int) -> None:
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:], pos + done)


def _write_all(fd: int, mv: memoryview) -> None:
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]
