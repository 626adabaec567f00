"""Rows of base tensors stored in another shard than the one being merged.

An fp8 block-scaled weight and its `weight_scale_inv` may live in different shards (DeepSeek-V3's own
checkpoints do this). The merge of one shard then needs, block by block, the partner's rows from another
file: read them with one positioned read (local file) or one HTTP range request (Hub) per block, so memory
stays about one block and no other shard has to be downloaded whole.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .errors import CheckpointFormatError
from .records import DTYPE_SIZES, ShardHeader, TensorInfo, numel
from .safetensors_io import read_header_file
from .torch_dtypes import TORCH_DTYPES

ReadRange = Callable[[str, int, int], bytes]  # (file, start, end) -> bytes [start, end) of that file


def read_local_range(root: Path) -> ReadRange:
    """`ReadRange` over the files of a local folder."""
    def read(file: str, start: int, end: int) -> bytes:
        path = root / file
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise CheckpointFormatError(f"cannot open ({exc.strerror})", file=str(path)) from None
        try:
            return os.pread(fd, end - start, start)
        finally:
            os.close(fd)
    return read


class OtherShards:
    """Reads rows of tensors in other shards of the base. `headers` gives each shard's planned header (None:
    read it from the local file once); the tensor must still be where the plan saw it."""

    def __init__(self, read_range: ReadRange, headers: Mapping[str, ShardHeader] | None = None,
                 root: Path | None = None) -> None:
        self._read = read_range
        self._headers = dict(headers or {})
        self._root = root

    @classmethod
    def local(cls, root: Path) -> "OtherShards":
        """The sibling shards of a local base folder (headers read from the files themselves)."""
        return cls(read_local_range(root), root=root)

    def _header(self, file: str) -> ShardHeader:
        if file not in self._headers:
            if self._root is None:
                raise CheckpointFormatError("shard not in the plan", file=file)
            self._headers[file] = read_header_file(self._root / file, file)
        return self._headers[file]

    def rows(self, file: str, info: TensorInfo, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) (along dim 0) of tensor `info` of shard `file`, as a new CPU tensor."""
        header = self._header(file)
        if header.by_name.get(info.name) != info:
            raise CheckpointFormatError(f"tensor {info.name!r} is not where the plan found it (the file changed?)",
                                        file=file, fix="do not modify inputs during a merge; re-run")
        row_bytes = numel(info.shape[1:]) * DTYPE_SIZES[info.dtype]
        start = header.data_offset + info.start + r0 * row_bytes
        n = (r1 - r0) * row_bytes
        data = self._read(file, start, start + n) if n else b""
        if len(data) != n:
            raise CheckpointFormatError(f"unexpected end of file while reading {info.name!r}", file=file,
                                        fix="do not modify inputs during a merge; re-run")
        t = torch.frombuffer(bytearray(data), dtype=TORCH_DTYPES[info.dtype]) if n else torch.empty(
            0, dtype=TORCH_DTYPES[info.dtype])
        return t.reshape((r1 - r0, *info.shape[1:]))
