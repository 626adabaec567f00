"""PyTorch `.bin` checkpoints (torch.save's zip format) read as byte ranges, without torch.load.

torch.save (torch >= 1.6) writes an uncompressed (STORED) zip: `<name>/data.pkl` pickles the state dict, each
tensor a call to `torch._utils._rebuild_tensor_v2/_v3` on a *persistent id* naming a storage, whose bytes are the
member `<name>/data/<key>`. So a contiguous tensor is one byte range of the file: its storage member's data
offset plus `storage_offset * itemsize`. We unpickle `data.pkl` with a restricted Unpickler that only knows the
globals torch.save writes for a state dict (the idea of `torch.load(weights_only=True)`; anything else is refused
by name and never called) and builds no tensors: it records storage key, dtype, offset, shape and stride.
The zip's central directory and each storage's local header give the absolute offsets. The result is a
`ShardHeader` whose tensor offsets are absolute (its data section starts at 0), so every existing reader (local
maps, Hub range reads) reads a `.bin` shard like a safetensors one. It is what
`torch.load(mmap=True, weights_only=True)` does, without torch, and over HTTP range requests as well.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointFormatError
from .records import DTYPE_SIZES, ShardHeader, TensorInfo, numel

ReadRange = Callable[[int, int], bytes]  # bytes [start, end) of the file

ZIP_MAGIC = b"PK\x03\x04"
MAX_PICKLE_BYTES = 256 * 1024 * 1024  # a state dict's data.pkl is a few MB even for huge models
LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zip local file header (30 bytes)
LEGACY_FIX = "re-save it with torch.save(state_dict, f) (torch>=1.6) or convert it to safetensors"

# torch dtype name (as pickled: `torch.<name>`) -> safetensors dtype code
DTYPE_NAMES: Mapping[str, str] = {
    "float64": "F64", "double": "F64", "float32": "F32", "float": "F32", "float16": "F16", "half": "F16",
    "bfloat16": "BF16", "int64": "I64", "long": "I64", "int32": "I32", "int": "I32", "int16": "I16",
    "short": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "uint16": "U16", "uint32": "U32",
    "uint64": "U64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}
# legacy typed storage classes (`torch.<X>Storage`, what _rebuild_tensor_v2 pickles) -> dtype code
STORAGE_NAMES: Mapping[str, str] = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL",
}


@dataclass(frozen=True)
class _StorageType:
    dtype: str | None  # None: UntypedStorage (bytes; the tensor's dtype comes with it)


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str | None
    numel: int  # elements of `dtype`, or bytes when untyped


@dataclass(frozen=True)
class _Dtype:
    code: str


@dataclass(frozen=True)
class TensorRecord:
    """One tensor of a state dict as data.pkl describes it (no data)."""

    storage: _Storage
    dtype: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and v >= 0 for v in value):
        raise ValueError(f"bad {what} {value!r}")
    return tuple(value)


def _record(storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None) -> TensorRecord:
    if not isinstance(storage, _Storage) or not isinstance(offset, int) or offset < 0:
        raise ValueError("a tensor whose storage is not a torch.save storage")
    code = dtype or storage.dtype
    if code is None:
        raise ValueError("a tensor on an untyped storage without a dtype")
    return TensorRecord(storage, code, offset, _ints(size, "size"), _ints(stride, "stride"))


def _rebuild_v2(storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any) -> TensorRecord:
    return _record(storage, offset, size, stride, None)


def _rebuild_v3(storage: Any, offset: Any, size: Any, stride: Any, _grad: Any, _hooks: Any, dtype: Any,
                *_rest: Any) -> TensorRecord:
    if not isinstance(dtype, _Dtype):
        raise ValueError(f"bad dtype {dtype!r}")
    return _record(storage, offset, size, stride, dtype.code)


def _rebuild_parameter(data: Any, *_rest: Any) -> Any:
    return data  # an nn.Parameter is its data for a merge


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """`_codecs.encode`, which protocol-2 pickles use for bytes objects: harmless (a str to bytes)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise ValueError("bad _codecs.encode call")
    return text.encode(encoding)


def _global(module: str, name: str) -> Any:
    """The stand-in for one of the globals torch.save writes for a state dict, or None (refused)."""
    fixed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch", "UntypedStorage"): _StorageType(None),
        ("torch.storage", "UntypedStorage"): _StorageType(None),
        ("_codecs", "encode"): _encode,
    }
    if (module, name) in fixed:
        return fixed[module, name]
    if module in ("torch", "torch.cuda") and name in STORAGE_NAMES:
        return _StorageType(STORAGE_NAMES[name])
    if module == "torch" and name in DTYPE_NAMES:
        return _Dtype(DTYPE_NAMES[name])
    return None


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a state dict into TensorRecords; any global outside `_global` is refused, never imported."""

    def __init__(self, data: bytes, label: str) -> None:
        super().__init__(io.BytesIO(data))
        self.label = label

    def find_class(self, module: str, name: str) -> Any:
        found = _global(module, name)
        if found is None:
            raise CheckpointFormatError(
                f"data.pkl calls {module}.{name}, which a state dict saved by torch.save never does; refused "
                "without running it (a pickle can run any code)", file=self.label,
                fix="only load checkpoints you trust; convert this one to safetensors where it was made")
        return found

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0):
            raise ValueError(f"unknown persistent id {pid!r:.80}")
        return _Storage(pid[2], pid[1].dtype, pid[4])


def parse_state_dict(data: bytes, label: str) -> dict[str, TensorRecord]:
    """The tensors of a torch.save'd state dict pickle, in its order. Raises CheckpointFormatError."""
    try:
        obj = _StateDictUnpickler(data, label).load()
    except CheckpointFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - any malformed pickle is the file's fault
        raise CheckpointFormatError(f"data.pkl is not a state dict torch.save wrote ({type(exc).__name__}: "
                                    f"{str(exc)[:120]})", file=label, fix=LEGACY_FIX) from None
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"the pickle holds a {type(obj).__name__}, not a state dict", file=label,
                                    fix="save model.state_dict(), or convert the checkpoint to safetensors")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, TensorRecord):
            raise CheckpointFormatError(
                f"entry {str(key)[:80]!r} is a {type(value).__name__}, not a tensor (a training checkpoint "
                "rather than a state dict?)", file=label,
                fix="save only model.state_dict(), or convert the checkpoint to safetensors")
        if not _well_formed(value):  # BUILD opcodes can rewrite any object's fields after it was made
            raise CheckpointFormatError("data.pkl describes a tensor with malformed fields", file=label,
                                        tensor=key, fix=LEGACY_FIX)
    return obj


def _well_formed(rec: TensorRecord) -> bool:
    s = rec.storage
    ints = (*rec.shape, *rec.stride, rec.offset, s.numel)
    return (isinstance(s, _Storage) and isinstance(s.key, str) and (s.dtype is None or s.dtype in DTYPE_SIZES)
            and rec.dtype in DTYPE_SIZES and isinstance(rec.shape, tuple) and isinstance(rec.stride, tuple)
            and all(type(v) is int and v >= 0 for v in ints))


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, step = [], 1
    for d in reversed(shape):
        out.append(step)
        step *= d
    return tuple(reversed(out))


def is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """torch's rule: row-major strides, where dimensions of size 1 may have any stride."""
    if len(stride) != len(shape):
        return False
    return numel(shape) == 0 or all(d == 1 or s == c for d, s, c in zip(shape, stride, contiguous_strides(shape)))


class RangeFile(io.RawIOBase):
    """A read-only, seekable file over `read(start, end)`, so `zipfile` can read a zip it never downloads."""

    def __init__(self, read: ReadRange, size: int) -> None:
        self._read, self._size, self._pos = read, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = max(0, pos if whence == 0 else self._pos + pos if whence == 1 else self._size + pos)
        return self._pos

    def readinto(self, buf: Any) -> int:
        end = min(self._size, self._pos + len(buf))
        if end <= self._pos:
            return 0
        got = self._read(self._pos, end)
        buf[:len(got)] = got
        self._pos += len(got)
        return len(got)


def _bad(label: str, what: str, tensor: str | None = None, fix: str = "download the file again, or convert the "
         "checkpoint to safetensors") -> CheckpointFormatError:
    return CheckpointFormatError(f"not a readable torch.save checkpoint: {what}", file=label, tensor=tensor, fix=fix)


def _check_magic(head: bytes, size: int, label: str) -> None:
    """Only the zip format can be read by byte ranges; name what else the file is."""
    if head.startswith(ZIP_MAGIC):
        return
    if head.startswith(b"version https://git-lfs"):
        raise _bad(label, "a Git LFS pointer file, not the real weights", fix="run `git lfs pull` or download again")
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        raise CheckpointFormatError("legacy torch.save format (a bare pickle, not a zip archive): its tensors "
                                    "cannot be read without loading the whole file", file=label, fix=LEGACY_FIX)
    raise _bad(label, f"no zip signature at its start ({size} bytes; truncated, empty or another format)")


def _open_zip(read: ReadRange, size: int, label: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BufferedReader(RangeFile(read, size), 1 << 16))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, struct.error) as exc:
        raise _bad(label, f"its zip directory is missing or damaged ({exc}); truncated?") from None


def _archive_prefix(zf: zipfile.ZipFile, label: str) -> str:
    """`<name>/`: the one top-level folder holding data.pkl, as torch.load requires."""
    found = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(found) != 1:
        raise _bad(label, f"{'no' if not found else 'several'} <name>/data.pkl in the zip archive (a zip file, but "
                          "not one torch.save wrote)")
    return found[0][:-len("data.pkl")]


def _read_member(zf: zipfile.ZipFile, name: str, label: str, limit: int) -> bytes:
    info = zf.getinfo(name)
    if info.file_size > limit:
        raise _bad(label, f"{name} is {info.file_size} bytes (more than {limit})")
    try:
        return zf.read(info)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError, RuntimeError) as exc:
        raise _bad(label, f"cannot read {name} ({exc}); truncated or corrupt?") from None


def _check_byteorder(zf: zipfile.ZipFile, prefix: str, label: str) -> None:
    if prefix + "byteorder" not in zf.NameToInfo:
        return  # torch < 1.12 wrote no byteorder record: little-endian
    order = _read_member(zf, prefix + "byteorder", label, 64)
    if order != b"little":
        raise CheckpointFormatError(f"the checkpoint is {order.decode('ascii', 'replace')!r}-endian; stream-merge "
                                    "reads little-endian checkpoints only", file=label,
                                    fix="re-save it on a little-endian machine, or convert it to safetensors there")


def _data_start(read: ReadRange, info: zipfile.ZipInfo, size: int, label: str) -> int:
    """Absolute offset of a STORED member's bytes: its local header's own name and extra lengths (torch pads
    the local extra field to align the data, so the central directory's lengths do not tell)."""
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:
        raise _bad(label, f"storage {info.filename} is compressed or encrypted (torch.save stores them plain, so "
                          "they can be read in place)", fix="re-save it with torch.save, or convert it to safetensors")
    head = read(info.header_offset, min(size, info.header_offset + LOCAL_HEADER.size))
    if len(head) < LOCAL_HEADER.size or head[:4] != ZIP_MAGIC:
        raise _bad(label, f"bad local header of {info.filename}; truncated or corrupt?")
    fields = LOCAL_HEADER.unpack(head)
    start = info.header_offset + LOCAL_HEADER.size + fields[-2] + fields[-1]
    if start + info.file_size > size:
        raise _bad(label, f"storage {info.filename} ends after the end of the file; truncated?")
    return start


def _tensor_info(name: str, rec: TensorRecord, storages: Mapping[str, tuple[int, int]],
                 label: str) -> TensorInfo:
    """The tensor as an absolute byte range of the file, after checking it is all there and contiguous."""
    if not name or name == "__metadata__" or not name.isprintable():
        raise _bad(label, f"tensor name {name!r} cannot be a safetensors name", tensor=name)
    if rec.dtype not in DTYPE_SIZES:
        raise _bad(label, f"dtype {rec.dtype} is not supported", tensor=name)
    if not is_contiguous(rec.shape, rec.stride):
        raise CheckpointFormatError(
            f"tensor is not contiguous (shape {list(rec.shape)}, stride {list(rec.stride)}): it is not one byte "
            "range of the file", file=label, tensor=name,
            fix="re-save with torch.save({k: v.contiguous() for k, v in state_dict.items()}, f), or convert to "
                "safetensors")
    item = DTYPE_SIZES[rec.dtype]
    member_start, member_size = storages[rec.storage.key]
    storage_bytes = rec.storage.numel * (DTYPE_SIZES[rec.storage.dtype] if rec.storage.dtype else 1)
    begin, nbytes = rec.offset * item, numel(rec.shape) * item
    if begin + nbytes > min(member_size, storage_bytes):
        raise _bad(label, f"its storage {rec.storage.key} holds {min(member_size, storage_bytes)} bytes, fewer than "
                          f"the tensor's {nbytes} at byte {begin}; truncated or corrupt?", tensor=name)
    return TensorInfo(name, rec.dtype, rec.shape, member_start + begin, member_start + begin + nbytes)


def read_pickle_header(read: ReadRange, size: int, label: str) -> ShardHeader:
    """A torch.save zip checkpoint's tensors as a ShardHeader of absolute byte ranges (data section at 0),
    reading only the zip directory, data.pkl and one local header per storage. Raises CheckpointFormatError
    naming `label` (and the tensor) for the legacy format, big-endian, compressed or short storages,
    non-contiguous tensors and any global a state dict does not need."""
    _check_magic(read(0, min(size, 64)), size, label)
    with _open_zip(read, size, label) as zf:
        prefix = _archive_prefix(zf, label)
        _check_byteorder(zf, prefix, label)
        records = parse_state_dict(_read_member(zf, prefix + "data.pkl", label, MAX_PICKLE_BYTES), label)
        storages: dict[str, tuple[int, int]] = {}
        for rec in records.values():
            key = rec.storage.key
            if key not in storages:
                info = zf.NameToInfo.get(prefix + "data/" + key)
                if info is None:
                    raise _bad(label, f"data.pkl names storage {key!r}, which the archive does not hold")
                storages[key] = (_data_start(read, info, size, label), info.file_size)
        tensors = tuple(_tensor_info(name, rec, storages, label) for name, rec in records.items())
    return ShardHeader(file=label, size=size, header_len=0, tensors=tensors, metadata={"format": "pt"},
                       data_start=0)


def read_pickle_file(path: Path, label: str) -> ShardHeader:
    """`read_pickle_header` of a local file (positioned reads on one descriptor)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CheckpointFormatError(f"cannot open ({exc.strerror})", file=str(path)) from None
    try:
        return read_pickle_header(lambda start, end: os.pread(fd, end - start, start), os.fstat(fd).st_size, label)
    finally:
        os.close(fd)
