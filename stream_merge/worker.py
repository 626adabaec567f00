"""Merges one shard: the only place where file IO meets the LoRA math.

`shard_chunks` yields an output shard's bytes in order: the header, then each tensor. Untouched tensors move
as raw byte ranges through one reusable buffer; patched tensors are processed in row blocks sized by
`block_bytes`, so memory is one block plus one module's adapter factors, whatever the shard or tensor size.
`merge_shard` writes the stream through an AtomicFile (hashed on the way out); `verify --full` compares it
with an existing output instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import AdapterReader
from .errors import NonFiniteError
from .lora import apply_delta, combine, conv_delta, delta_rows, dora_apply, param_delta_rows, row_blocks
from .records import LoraPatch, ShardPlan, ShardResult, TensorPlan, numel
from .safetensors_io import TORCH_DTYPES, AtomicFile, ShardReader, header_bytes, tensor_bytes

COPY_CHUNK = 16 * 1024 * 1024


@dataclass
class Compute:
    """Where and how big: the device for the fp32 math and the row-block budget in bytes of fp32."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    block_bytes: int = 64 * 1024 * 1024
    check_finite: bool = True


def out_header(shard: ShardPlan, reader: ShardReader) -> bytes:
    """The output header: the input's own bytes when no shape changes, else rebuilt in the same order."""
    if shard.header_unchanged:
        return reader.raw_header()
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for t in sorted(shard.tensors, key=lambda t: (t.source.start, t.source.end)):
        offsets[t.name] = (pos, pos + t.out_nbytes)
        pos += t.out_nbytes
    return header_bytes([(t.name, t.dtype, t.shape, *offsets[t.name]) for t in shard.tensors],
                        reader.header.metadata)


def _load_factor(adapters: Sequence[AdapterReader], adapter: int, key: str, device: torch.device) -> torch.Tensor:
    t = adapters[adapter].tensor(key).to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError("adapter tensor holds NaN or Inf", file=adapters[adapter].spec.weights_file, key=key,
                             fix="the adapter is corrupt or training diverged; use an earlier checkpoint")
    return t


def _delta(p: LoraPatch, a: torch.Tensor | None, b: torch.Tensor, shape: tuple[int, ...], r0: int, r1: int
           ) -> torch.Tensor:
    if p.kind == "conv":
        assert a is not None
        return conv_delta(a, b, p.scale, shape)[r0:r1]
    if p.kind == "param":
        assert a is not None
        return param_delta_rows(a, b, p.scale, p.experts, p.expert, p.row_offset, r0, r1)
    return delta_rows(p.kind, a, b, p.scale, r0, r1)


def _merged_blocks(tp: TensorPlan, reader: ShardReader, adapters: Sequence[AdapterReader],
                   compute: Compute) -> Iterator[bytearray]:
    dtype = TORCH_DTYPES[tp.dtype]
    dev = compute.device
    shape = tp.shape if tp.shape else (1,)
    rows, row_elems = shape[0], numel(shape[1:])
    factors = [(p, _load_factor(adapters, p.adapter, p.a_key, dev) if p.a_key else None,
                _load_factor(adapters, p.adapter, p.b_key, dev)) for p in tp.patches]
    dora = tp.patches[0] if len(tp.patches) == 1 and tp.patches[0].magnitude_key else None
    magnitude = _load_factor(adapters, dora.adapter, dora.magnitude_key, dev) if dora else None
    double = len(tp.patches) == 1 and tp.patches[0].weight == 1.0 and tp.patches[0].double_round
    want = max(1, compute.block_bytes // max(1, row_elems * 4))
    kinds = [p.kind for p in tp.patches]
    if dora is not None and dora.kind != "linear":
        kinds.append("conv")  # column norms (Conv1D, Embedding) and conv norms need the whole tensor
    for r0, r1 in row_blocks(rows, want, kinds):
        if tp.replace is not None:
            rep = adapters[tp.replace.adapter]
            src = rep.rows(tp.replace.key, r0, r1) if tp.shape else rep.tensor(tp.replace.key).reshape(1)
            w = src.to(dtype)
        else:
            w = reader.read_rows(tp.source, r0, r1) if tp.shape else reader.read_tensor(tp.source).reshape(1)
        if factors:
            wd = w.to(dev)
            delta = combine([(_delta(p, a, b, tp.shape, r0, r1), p.weight) for p, a, b in factors])
            if dora is not None:
                assert magnitude is not None
                m = magnitude[r0:r1] if dora.kind == "linear" else magnitude
                merged = dora_apply(dora.kind, wd, delta, m)
            else:
                merged = apply_delta(wd, delta, double)
            if compute.check_finite:
                bad = ~torch.isfinite(merged)
                if bool(bad.any()) and bool((bad & torch.isfinite(wd)).any()):
                    raise NonFiniteError(
                        f"merged tensor has NaN/Inf in rows {r0}..{r1} where the base was finite "
                        f"(overflow of {tp.dtype}?)", tensor=tp.name,
                        fix="check the adapter's scale and weights; merge into a wider dtype")
            w = merged.to("cpu")
        yield tensor_bytes(w)


def shard_chunks(shard: ShardPlan, reader: ShardReader, adapters: Sequence[AdapterReader],
                 compute: Compute) -> Iterator[tuple[str | None, memoryview | bytes | bytearray]]:
    """(tensor name or None for the header / a run of copied tensors, bytes) in output order.

    A yielded memoryview is only valid until the next item (the copy buffer is reused)."""
    yield None, out_header(shard, reader)
    buf = bytearray(COPY_CHUNK)
    mv = memoryview(buf)
    ordered = sorted(shard.tensors, key=lambda t: (t.source.start, t.source.end))
    i = 0
    while i < len(ordered):
        tp = ordered[i]
        if tp.action != "copy":
            for block in _merged_blocks(tp, reader, adapters, compute):
                yield tp.name, block
            i += 1
            continue
        start, end = tp.source.start, tp.source.end
        while i + 1 < len(ordered) and ordered[i + 1].action == "copy" and ordered[i + 1].source.start == end:
            i += 1
            end = ordered[i].source.end
        i += 1
        for pos in range(start, end, COPY_CHUNK):
            n = min(COPY_CHUNK, end - pos)
            reader.read_into(pos, mv[:n])
            yield None, mv[:n]


def merge_shard(shard: ShardPlan, reader: ShardReader, adapters: Sequence[AdapterReader], out_path: Path,
                compute: Compute, on_bytes: Callable[[int], None] = lambda n: None) -> ShardResult:
    """Write the merged version of one shard to `out_path` atomically and return its size and sha256."""
    t0 = time.perf_counter()
    with AtomicFile(out_path) as out:
        for _, data in shard_chunks(shard, reader, adapters, compute):
            out.write(data)
            on_bytes(len(data))
        size, sha = out.commit()
    touched = len(shard.touched)
    return ShardResult(file=shard.file, size=size, sha256=sha, patched=touched,
                       copied=len(shard.tensors) - touched, seconds=time.perf_counter() - t0)
