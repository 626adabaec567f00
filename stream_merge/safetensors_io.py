"""safetensors on disk: strict header parsing and byte-range reads (atomic writing lives in `fileio`).

We parse headers ourselves (8-byte little-endian length + JSON) so that planning reads a few KiB per shard
and every malformed file is caught with a message naming it, before anything is written. Tensor data is
read with positioned reads into reusable buffers, or through short-lived maps of one block (`view`): a map
skips the kernel's copy into our buffer (faster than pread for read + convert; see the README's Performance) and is
unmapped as soon as the block is done, so RSS stays at a few blocks whatever the shard size.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import struct
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path

from typing import TYPE_CHECKING

from .errors import CheckpointFormatError

try:
    import fcntl
except ImportError:  # Windows: no leases (and merges are refused there at start)
    fcntl = None  # type: ignore[assignment]
from .records import DTYPE_BITS, DTYPE_SIZES, ShardHeader, TensorInfo, numel, tensor_nbytes

if TYPE_CHECKING:  # torch is imported by the first tensor read: planning (headers) never needs it
    import torch

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library itself enforces



def _sniff(head: bytes) -> str | None:
    """Name what a non-safetensors file most likely is, from its first bytes."""
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer file, not the real weights (run `git lfs pull` or download the file again)"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a PyTorch .bin/.pt checkpoint renamed to .safetensors?)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a Python pickle (a PyTorch .bin checkpoint renamed to .safetensors?)"
    return None


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate tensor name {k!r} in the header")
        out[k] = v
    return out


def _bad(label: str, what: str, tensor: str | None = None) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"not a valid safetensors file: {what}", file=label, tensor=tensor,
        fix="re-download or re-export this file; stream-merge never repairs inputs",
    )


def parse_header(head: bytes, file_size: int, label: str) -> ShardHeader:
    """Validate and parse a safetensors header. `head` must hold at least the first 8 + N bytes (or the
    whole file when it is shorter); `label` names the file in errors."""
    if file_size < 8:
        kind = _sniff(head)
        raise _bad(label, kind or f"only {file_size} bytes (truncated or empty)")
    (n,) = struct.unpack("<Q", head[:8])
    try:
        return _parse(head, n, file_size, label)
    except CheckpointFormatError:
        # Only now guess what else the file is: a valid header's length bytes can look like a pickle's magic.
        kind = _sniff(head[:64])
        if kind:
            raise _bad(label, f"the file is {kind}") from None
        raise


def _parse(head: bytes, n: int, file_size: int, label: str) -> ShardHeader:
    if n == 0:
        raise _bad(label, "header length is 0 (zero-filled or corrupt file)")
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise _bad(label, f"header claims {n} bytes but the file has {file_size} (truncated or not safetensors)")
    raw = head[8:8 + n]
    if len(raw) < n:
        raise ValueError("parse_header needs the whole header")
    try:
        text = raw.decode("utf-8")
        if not text.startswith("{"):
            raise ValueError("the header is not a JSON object")
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(label, f"unreadable header JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise _bad(label, "the header is not a JSON object")
    metadata = obj.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise _bad(label, "__metadata__ must map strings to strings")
    tensors = []
    for name, entry in obj.items():
        if not name or any(unicodedata.category(c) == "Cc" for c in name):
            raise _bad(label, f"tensor name {name!r} is empty or holds control characters")
        if not isinstance(entry, dict):
            raise _bad(label, "header entry is not an object", name)
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_BITS:
            raise _bad(label, f"unknown dtype {dtype!r}", name)
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise _bad(label, f"bad shape {shape!r}", name)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]):
            raise _bad(label, f"bad data_offsets {offsets!r}", name)
        if offsets[1] - offsets[0] != tensor_nbytes(dtype, tuple(shape)):
            raise _bad(label, f"data_offsets {offsets} do not fit shape {shape} of {dtype}", name)
        tensors.append(TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1]))
    data_len = file_size - 8 - n
    pos = 0
    for t in sorted(tensors, key=lambda t: (t.start, t.end)):
        if t.start != pos:
            what = "overlaps the previous tensor" if t.start < pos else f"leaves a gap of {t.start - pos} bytes"
            raise _bad(label, f"data_offsets {[t.start, t.end]} {what}", t.name)
        pos = t.end
    if pos > data_len:
        raise _bad(label, f"tensor data needs {pos} bytes but the file holds {data_len} (truncated)")
    if pos < data_len:
        raise _bad(label, f"{data_len - pos} unexpected trailing bytes after the last tensor")
    return ShardHeader(file=label, size=file_size, header_len=n, tensors=tuple(tensors), metadata=metadata)


def read_header_file(path: Path, label: str | None = None) -> ShardHeader:
    """Read only the header of a local safetensors file."""
    label = label or path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                if 0 < n <= min(MAX_HEADER_BYTES, size - 8):
                    head += f.read(n)
                else:
                    head += f.read(56)
    except FileNotFoundError:
        raise CheckpointFormatError("file not found", file=str(path), fix="check the path") from None
    except OSError as exc:
        raise CheckpointFormatError(f"cannot read file ({exc.strerror})", file=str(path)) from None
    header = parse_header(head, size, label)
    return header


def header_bytes(entries: Sequence[tuple[str, str, tuple[int, ...], int, int]],
                 metadata: Mapping[str, str] | None) -> bytes:
    """Serialise a header exactly as the safetensors library does: compact JSON, `__metadata__` first,
    padded with spaces to a multiple of 8. `entries` are (name, dtype, shape, start, end) in header order."""
    obj: dict[str, object] = {}
    if metadata:
        obj["__metadata__"] = dict(metadata)
    for name, dtype, shape, start, end in entries:
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _take_lease(fd: int) -> bool:
    """A read lease on `fd` where the process is set up for it (see `platform_support.guard_base_files`) and the file system
    and ownership allow it; False otherwise (then only the per-block checks guard the maps)."""
    if fcntl is None or not hasattr(fcntl, "F_SETLEASE") or signal.getsignal(signal.SIGIO) != signal.SIG_IGN:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:  # open for writing elsewhere, not our file, or a file system without leases
        return False
    return True


class ShardReader:
    """Positioned reads from one safetensors file (thread-safe: os.preadv on a shared fd)."""

    def __init__(self, path: Path, header: ShardHeader) -> None:
        self.path = path
        self.header = header
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise CheckpointFormatError(f"cannot open ({exc.strerror})", file=str(path)) from None
        st = os.fstat(self._fd)
        self._identity = (st.st_dev, st.st_ino, st.st_mtime_ns)
        if st.st_size != header.size:
            os.close(self._fd)
            raise CheckpointFormatError(
                f"file changed since planning ({header.size} -> {st.st_size} bytes)", file=str(path),
                fix="do not modify inputs during a merge; re-run")
        self._leased = _take_lease(self._fd)

    def check_unchanged(self) -> None:
        """Raise a clear error if the file was truncated, rewritten or replaced since it was opened. Called
        before every map and read: a map of a file that shrank would fault (SIGBUS) on first touch, and one
        rewritten in place would merge other bytes than the plan saw."""
        try:
            st = os.fstat(self._fd)
            now = os.stat(self.path)
        except OSError as exc:
            what = f"it can no longer be read ({exc.strerror})"
        else:
            if st.st_size != self.header.size:
                what = f"truncated or extended: {self.header.size} -> {st.st_size} bytes"
            elif (now.st_dev, now.st_ino) != self._identity[:2]:
                what = "replaced by another file"
            elif st.st_mtime_ns != self._identity[2]:
                what = "rewritten in place (its modification time changed)"
            elif self._leased and fcntl.fcntl(self._fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK:
                # the lease is being broken: another process waits to truncate or write this file
                what = "another process is truncating it or opening it for writing"
            else:
                return
        raise CheckpointFormatError(f"base file changed during the merge: {what}", file=str(self.path),
                                    fix="do not modify or replace base files while a merge runs; re-run to resume")

    def raw_header(self) -> bytes:
        """The file's own 8-byte length + header bytes, for output shards whose header is unchanged."""
        buf = bytearray(self.header.data_offset)
        self._pread(0, memoryview(buf))
        return bytes(buf)

    def read_into(self, data_offset: int, buf: memoryview) -> None:
        """Fill `buf` from the data section at `data_offset`."""
        self._pread(self.header.data_offset + data_offset, buf)

    def view(self, data_offset: int, nbytes: int) -> memoryview:
        """`nbytes` of the data section at `data_offset` as a view of a private map of just that range
        (writable, so torch and ctypes take it; nothing is ever written). Give it back with `unmap`."""
        if nbytes <= 0:
            return memoryview(bytearray(0))
        pos = self.header.data_offset + data_offset
        start = pos - pos % mmap.ALLOCATIONGRANULARITY
        if pos + nbytes > self.header.size:
            raise CheckpointFormatError("unexpected end of file while reading", file=str(self.path))
        self._ready(pos, pos + nbytes)
        try:
            m = mmap.mmap(self._fd, pos + nbytes - start, offset=start, access=mmap.ACCESS_COPY)
        except (OSError, ValueError):
            self.check_unchanged()  # names what changed (it shrank right now), else a plain read error
            raise CheckpointFormatError("cannot map the file for reading", file=str(self.path)) from None
        return memoryview(m)[pos - start:pos - start + nbytes]

    def _ready(self, start: int, end: int) -> None:
        """Called before bytes [start, end) of the file are read or mapped: here, the file must be as planned
        (`hub_stream.StreamedShardReader` waits for the bytes of a download instead)."""
        self.check_unchanged()

    def confirm(self) -> None:
        """Called once an output shard is written from this reader, before it is published: the bytes read
        are final (nothing to check for a complete file; a streamed download raises `RedoFromFile` when not)."""

    def abandon(self) -> None:
        """The reads in progress are no longer wanted (an output shard failed or was interrupted): a reader
        that waits for bytes stops waiting. Nothing to do for a complete file."""

    def _pread(self, pos: int, buf: memoryview) -> None:
        self._ready(pos, pos + len(buf))
        done = 0
        while done < len(buf):
            got = os.preadv(self._fd, [buf[done:]], pos + done)
            if got == 0:
                self.check_unchanged()
                raise CheckpointFormatError("unexpected end of file while reading", file=str(self.path))
            done += got

    def read_rows(self, info: TensorInfo, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [r0, r1) of a tensor (along dim 0) as a CPU tensor of its dtype: a new one, or `out` (contiguous,
        of that dtype and shape: reused scratch, so that a block read allocates nothing)."""
        import torch

        from .torch_dtypes import TORCH_DTYPES

        row_elems = numel(info.shape[1:])
        itemsize = DTYPE_SIZES[info.dtype]
        nbytes = (r1 - r0) * row_elems * itemsize
        if out is None:
            buf = bytearray(nbytes)
            t = torch.frombuffer(buf, dtype=TORCH_DTYPES[info.dtype]) if buf else torch.empty(
                0, dtype=TORCH_DTYPES[info.dtype])
            out = t.reshape((r1 - r0, *info.shape[1:])) if info.shape else t.reshape(())
        if nbytes:
            self.read_into(info.start + r0 * row_elems * itemsize,
                           memoryview(out.reshape(-1).view(torch.uint8).numpy()))
        return out

    def read_tensor(self, info: TensorInfo) -> torch.Tensor:
        if not info.shape:
            return self.read_rows(TensorInfo(info.name, info.dtype, (1,), info.start, info.end), 0, 1).reshape(())
        return self.read_rows(info, 0, info.shape[0])

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unmap(view: memoryview) -> None:
    """Release a `ShardReader.view` and unmap it (left to the garbage collector if something still uses it)."""
    m = view.obj
    try:
        view.release()
        if isinstance(m, mmap.mmap):
            m.close()
    except BufferError:
        pass

