"""The torch-free ground floor of every file stream-merge writes: atomic publishing, fsync, hashing, and the
owner names that make temp files safe to share an output folder with other processes.

Every file is written to a temp file in its final folder, fsynced and renamed into place (`AtomicFile`), so a
reader sees the old file or the whole new one. Temp files carry their owner in their name (`OWNER`: a short
hash of the host name, the process id and a per-process random nonce) plus a random suffix, so names never
collide across the hosts and pods that share one OUT (issue 12 items 10 and 12: two pods can both be PID 1),
and a later run can tell a dead run's leftovers from a live run's files without any lock. Each temp file is
removed by the object that created it; `remove_dead_temps` only removes what provably belongs to a process
of this host that no longer runs. Imports only the standard library, `direct_io` (which does too) and
xxhash (the XXH3-128 every output shard records).
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import socket
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import xxhash

from .direct_io import FileSink
from .errors import OutputError

TMP_PREFIX = ".stream-merge-tmp."
NAME_MAX = 255  # bytes per file name on every file system we write to (ext4, xfs, btrfs, APFS, NFS, tmpfs)


def _host_tag() -> str:
    """Where our pids mean something: the host name, the kernel's boot id and the pid namespace (containers
    on one node can share a host name and each run as PID 1; their processes never look dead to each other)."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(os.readlink(path) if path.endswith("/pid") else open(path).read().strip())
        except OSError:
            pass
    return f"{zlib.crc32(chr(0).join(parts).encode('utf-8', 'surrogateescape')):08x}"


_NONCE = secrets.token_hex(3)  # told apart from an earlier process that had our pid (a restarted pod is PID 1 again)


def _new_nonce() -> None:
    global _NONCE
    _NONCE = secrets.token_hex(3)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_nonce)  # a forked child is another owner


def owner_tag() -> str:
    """This process as a name part: `<host hash>-<pid>-<nonce>` (no dots, so names split unambiguously)."""
    return f"{_host_tag()}-{os.getpid()}-{_NONCE}"


def owner_is_dead(owner: str) -> bool:
    """Whether the process `owner` names provably no longer runs: it ran in this host's pid namespace and its
    pid is gone, or the pid is ours now (so that earlier process ended). An owner elsewhere is never dead."""
    parts = owner.split("-")
    if len(parts) != 3 or parts[0] != _host_tag() or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return parts[2] != _NONCE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: a live process of another user
        return False
    return False


def temp_name(final_name: str, owner: str | None = None) -> str:
    """A temp file name beside `final_name`: prefix, as much of the final name as fits NAME_MAX, owner,
    random suffix. Even a final name of NAME_MAX bytes gets a valid temp name."""
    tail = f".{owner or owner_tag()}.{secrets.token_hex(4)}"
    room = NAME_MAX - len(TMP_PREFIX.encode()) - len(tail.encode())
    stem = final_name
    while len(stem.encode("utf-8", "surrogateescape")) > room:
        stem = stem[:-1]
    return f"{TMP_PREFIX}{stem}{tail}"


def temp_owner(name: str) -> str | None:
    """The owner part of one of our temp file names (None for any other name)."""
    if not name.startswith(TMP_PREFIX):
        return None
    parts = name.rsplit(".", 2)
    return parts[1] if len(parts) == 3 else None


def remove_dead_temps(folders: Iterable[Path]) -> list[str]:
    """Remove temp files that processes of this host left when they were killed (never a live process's,
    never another host's); returns the names removed."""
    removed = []
    for folder in folders:
        try:
            names = os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            owner = temp_owner(name)
            if owner is not None and owner_is_dead(owner):
                try:
                    os.unlink(folder / name)
                    removed.append(name)
                except FileNotFoundError:
                    pass
    return removed


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in `path` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except PermissionError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_file_note(path: Path, key: str, data: bytes) -> bool:
    """Attach `data` to a file as an extended attribute `user.<key>` (metadata, not content: the file's bytes
    stay the same); False where the platform or file system has none."""
    try:
        os.setxattr(path, f"user.{key}", data)  # type: ignore[attr-defined]
        return True
    except (AttributeError, OSError):
        return False


def file_note(path: Path, key: str) -> bytes | None:
    """The extended attribute `set_file_note` attached (None when absent or unsupported)."""
    try:
        return os.getxattr(path, f"user.{key}")  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return None


def _file_hash(path: Path, h: Any, chunk: int, on_bytes: Callable[[int], None] | None) -> str:
    """Feed a file to hasher `h`, read in chunks into one reused buffer; `on_bytes(n)` after each chunk."""
    buf = bytearray(chunk)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(mv):
            h.update(mv[:n])
            if on_bytes is not None:
                on_bytes(n)
    return h.hexdigest()


def file_sha256(path: Path, chunk: int = 16 * 1024 * 1024, on_bytes: Callable[[int], None] | None = None) -> str:
    """sha256 of a file; `on_bytes(n)` after each chunk read (progress)."""
    return _file_hash(path, hashlib.sha256(), chunk, on_bytes)


def file_xxh3_128(path: Path, chunk: int = 16 * 1024 * 1024, on_bytes: Callable[[int], None] | None = None) -> str:
    """XXH3-128 of a file (hex): the digest every output shard records, ten times cheaper than sha256, so a
    merge pays next to nothing for it."""
    return _file_hash(path, xxhash.xxh3_128(), chunk, on_bytes)


def recorded_digest(entry: dict[str, Any]) -> tuple[str, str] | None:
    """The strongest digest a shard record holds, as (field, hex): sha256 when recorded (pushes and --checksums),
    else xxh3_128 (every merge since it became the default), else None (records of older versions)."""
    for key in ("sha256", "xxh3_128"):
        if entry.get(key):
            return key, entry[key]
    return None


def file_digest(path: Path, key: str, on_bytes: Callable[[int], None] | None = None) -> str:
    """The file's digest of the kind `recorded_digest` names ("sha256" or "xxh3_128")."""
    return (file_sha256 if key == "sha256" else file_xxh3_128)(path, on_bytes=on_bytes)


HASH_THREAD_MIN = 1 << 20  # writes this big are hashed on a thread of their own while the bytes go to disk


class AtomicFile:
    """Write a file through a temp file in the same folder; `commit` fsyncs and renames it into place.

    The size and XXH3-128 (always: at ~16 GB/s it is free) and, with `digest`, the sha256 (the Hub's LFS oid,
    ten times dearer, so only when a push or --checksums needs it) of everything written are tracked, so
    nothing re-reads the output. A large write is hashed on a second thread while the same bytes are copied to
    the disk (hashlib, xxhash and the sink release the GIL), so the digests cost the writer little beyond what
    the disk already makes it wait; `write` returns once both are done, so the caller may reuse its buffer.
    Leaving the context without commit removes the temp file: the object that created it owns it.
    """

    def __init__(self, final: Path, digest: bool = True, direct: bool = False) -> None:
        self.final = final
        self.direct = direct  # O_DIRECT for big files written once (see direct_io)
        self.tmp = final.parent / temp_name(final.name)
        self.hash = hashlib.sha256() if digest else None
        self.xxh = xxhash.xxh3_128()
        self.size = 0
        self._f: Any = None  # created by __enter__ or the first write, so an interrupt cannot strand it
        self._hasher: ThreadPoolExecutor | None = None

    def _open(self) -> None:
        try:
            self._f = FileSink(self.tmp, direct=self.direct)
        except OSError as exc:
            what = "the file name is too long for this file system" if exc.errno == errno.ENAMETOOLONG \
                else exc.strerror
            raise OutputError(f"cannot create a file in the output folder ({what})", file=str(self.final),
                              fix="choose another output folder (or shorter file names)") from None
        except BaseException:  # Ctrl-C right after the file was created
            self.tmp.unlink(missing_ok=True)
            raise

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._f is None:
            self._open()
        mv = memoryview(data).cast("B")
        hashing: Future[None] | None = None
        if mv.nbytes >= HASH_THREAD_MIN:
            if self._hasher is None:
                self._hasher = ThreadPoolExecutor(1, thread_name_prefix="stream-merge-hash")
            hashing = self._hasher.submit(self._update, mv)
        else:
            self._update(mv)
        self.size += mv.nbytes
        try:
            self._f.write(mv)
        except OSError as exc:
            raise self._write_error(exc) from None
        finally:
            if hashing is not None:
                hashing.result()  # the caller may reuse `data` once it is hashed and written

    def _write_error(self, exc: OSError) -> OutputError:
        hint = {errno.ENOSPC: "free disk space (or choose another -o), then re-run to resume",
                errno.EDQUOT: "raise your disk quota or free space, then re-run to resume",
                errno.EFBIG: "the file system or a ulimit -f caps the file size; lift it, then re-run to resume",
                errno.ENAMETOOLONG: "the file name is too long for this file system; choose another -o"}
        return OutputError(f"cannot write the output file ({exc.strerror or exc})", file=str(self.final),
                           fix=hint.get(exc.errno or 0, "check the output disk, then re-run to resume"))

    def _update(self, mv: memoryview) -> None:
        self.xxh.update(mv)
        if self.hash is not None:
            self.hash.update(mv)

    def hexdigest(self) -> str | None:
        """The sha256 of the bytes written; None when it was not asked for (`digest=False`)."""
        return self.hash.hexdigest() if self.hash is not None else None

    def xxh3_128(self) -> str:
        """The XXH3-128 (hex) of the bytes written; always computed."""
        return self.xxh.hexdigest()

    def _stop_hasher(self) -> None:
        if self._hasher is not None:
            self._hasher.shutdown(wait=True)
            self._hasher = None

    def commit(self) -> tuple[int, str | None]:
        """fsync the temp file, rename it to the final name, fsync the folder; returns (size, sha256)."""
        if self._f is None:
            self._open()
        self._stop_hasher()
        try:
            self._f.finish()
            os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self.tmp, self.final)
            fsync_dir(self.final.parent)
        except OSError as exc:
            raise self._write_error(exc) from None
        return self.size, self.hexdigest()

    def abort(self) -> None:
        """Close and remove the temp file (idempotent)."""
        self._stop_hasher()
        try:
            if self._f is not None:
                self._f.close()
        finally:
            try:
                self.tmp.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "AtomicFile":
        if self._f is None:
            self._open()
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if self.tmp.exists():
            self.abort()


def write_file_atomic(path: Path, data: bytes) -> str:
    """Publish a small file atomically; returns its sha256 (hashed from `data`, not by the writer: only the
    shards' writers start a sha256, and only when asked)."""
    with AtomicFile(path, digest=False) as f:
        f.write(data)
        f.commit()
    return hashlib.sha256(data).hexdigest()
