"""Merges one shard: the only place where file IO meets the LoRA math.

`shard_chunks` produces an output shard's bytes in order (header, then each tensor) into buffers it takes
from `get_buffer`. Untouched tensors move as raw byte ranges; patched tensors are processed in row blocks
of about `block_bytes` of fp32, so memory is a few blocks plus one module's adapter factors, whatever the
shard or tensor size. `merge_shard` hands the buffers to a writer thread that hashes and writes them while
the next block is read and computed; `verify --full` compares the same stream with an existing output.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import AdapterReader
from .errors import NonFiniteError
from .lora import (apply_delta_into, combine, conv_delta, delta_rows, dora_apply, param_delta_rows, row_blocks)
from .quant import dequantize, quantize
from .records import DTYPE_SIZES, LoraPatch, ShardPlan, ShardResult, TensorPlan, numel
from .safetensors_io import TORCH_DTYPES, AtomicFile, ShardReader, header_bytes

Chunk = tuple[str | None, bytearray, int]  # (tensor name or None, buffer, valid bytes)


@dataclass
class Compute:
    """Where and how big: the device for the fp32 math, the row-block budget in bytes of fp32 (small blocks
    keep the delta, the sum and the cast in the CPU caches: measured 4x faster than 64 MiB blocks), and the
    chunk size for copying untouched bytes."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    block_bytes: int = 2 * 1024 * 1024
    check_finite: bool = True
    copy_bytes: int = 8 * 1024 * 1024

    @property
    def buffer_bytes(self) -> int:
        """Pool buffer size: a copy chunk, or the largest output block (the last block absorbs a remainder of
        up to one block, see row_blocks)."""
        return max(self.copy_bytes, 2 * self.block_bytes + 8)


def out_header(shard: ShardPlan, reader: ShardReader) -> bytes:
    """The output header: the input's own bytes when no shape changes, else rebuilt in the same order."""
    if shard.header_unchanged:
        return reader.raw_header()
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for t in _data_order(shard):
        offsets[t.name] = (pos, pos + t.out_nbytes)
        pos += t.out_nbytes
    return header_bytes([(t.name, t.dtype, t.shape, *offsets[t.name]) for t in shard.tensors],
                        reader.header.metadata)


def _data_order(shard: ShardPlan) -> list[TensorPlan]:
    """Output data order: the input's, an added tensor (untied head) right after its source."""
    return sorted(shard.tensors, key=lambda t: (t.source.start, t.source.end))


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


def _check_finite(tp: TensorPlan, merged32: torch.Tensor, out: torch.Tensor, base: torch.Tensor, r0: int,
                  r1: int) -> None:
    """Cheap path: one fp32 sum (finite iff every element is); the exact mask only when that fails, so a base
    that already holds Inf/NaN is not blamed on the adapter."""
    ok = math.isfinite(float(merged32.sum())) if merged32.is_floating_point() else True
    if ok and out.dtype == torch.float16:
        ok = math.isfinite(float(torch.sum(out, dtype=torch.float32)))
    if ok:
        return
    bad = ~torch.isfinite(out.float())
    if bool((bad & torch.isfinite(base.float())).any()):
        raise NonFiniteError(f"merged tensor has NaN/Inf in rows {r0}..{r1} where the base was finite "
                             f"(overflow of {tp.dtype}?)", tensor=tp.name,
                             fix="check the adapter's scale and weights; merge into a wider dtype")


def _quant_blocks(tp: TensorPlan, reader: ShardReader, adapters: Sequence[AdapterReader], compute: Compute,
                  get_buffer: Callable[[], bytearray]) -> Iterator[Chunk]:
    """fp8 block-scaled weights: dequantize row groups aligned to the scale blocks, add the LoRA delta in
    fp32, then write bf16 (dequant), fresh fp8 values (requant weight) or fresh scales (requant scale)."""
    q = tp.quant
    assert q is not None
    weight, scale = (tp.source, q.partner) if q.role == "weight" else (q.partner, tp.source)
    bm = q.block[0]
    rows, cols = weight.shape
    dev = compute.device
    factors = [(p, _load_factor(adapters, p.adapter, p.a_key, dev) if p.a_key else None,
                _load_factor(adapters, p.adapter, p.b_key, dev)) for p in tp.patches]
    want = max(1, compute.block_bytes // max(1, cols * 4))
    for r0, r1 in row_blocks(rows, want, [p.kind for p in tp.patches], align=bm):
        w = dequantize(reader.read_rows(weight, r0, r1).to(dev),
                       reader.read_rows(scale, r0 // bm, -(-r1 // bm)).to(dev), q.block)
        if factors:
            w.add_(combine([(_delta(p, a, b, weight.shape, r0, r1), p.weight) for p, a, b in factors]))
        if compute.check_finite and not math.isfinite(float(w.sum())):
            raise NonFiniteError(f"merged fp8 weight has NaN/Inf in rows {r0}..{r1}", tensor=weight.name,
                                 fix="check the adapter's scale and weights")
        if q.mode == "dequant":
            result = w.to(torch.bfloat16)
        else:
            values, scales = quantize(w, q.block)
            result = values if q.role == "weight" else scales
        data = result.cpu().contiguous().view(torch.uint8).reshape(-1)
        buf = get_buffer() if data.numel() <= compute.buffer_bytes else bytearray(data.numel())
        torch.frombuffer(buf, dtype=torch.uint8, count=data.numel()).copy_(data)
        yield tp.name, buf, data.numel()


def _merged_blocks(tp: TensorPlan, reader: ShardReader, adapters: Sequence[AdapterReader], compute: Compute,
                   get_buffer: Callable[[], bytearray]) -> Iterator[Chunk]:
    if tp.quant is not None:
        yield from _quant_blocks(tp, reader, adapters, compute, get_buffer)
        return
    dtype = TORCH_DTYPES[tp.dtype]
    itemsize = DTYPE_SIZES[tp.dtype]
    dev = compute.device
    shape = tp.shape if tp.shape else (1,)
    rows, row_elems = shape[0], numel(shape[1:])
    factors = [(p, _load_factor(adapters, p.adapter, p.a_key, dev) if p.a_key else None,
                _load_factor(adapters, p.adapter, p.b_key, dev)) for p in tp.patches]
    dora = tp.patches[0] if len(tp.patches) == 1 and tp.patches[0].magnitude_key else None
    magnitude = _load_factor(adapters, dora.adapter, dora.magnitude_key, dev) if dora and dora.magnitude_key else None
    double = len(tp.patches) == 1 and tp.patches[0].weight == 1.0 and tp.patches[0].double_round
    want = max(1, compute.block_bytes // max(1, row_elems * 4))
    kinds = [p.kind for p in tp.patches]
    if dora is not None and dora.kind != "linear":
        kinds.append("conv")  # column norms (Conv1D, Embedding) and conv norms need the whole tensor
    for r0, r1 in row_blocks(rows, want, kinds):
        nbytes = (r1 - r0) * row_elems * itemsize
        buf = get_buffer() if nbytes <= compute.buffer_bytes else bytearray(nbytes)
        out = torch.frombuffer(buf, dtype=dtype, count=(r1 - r0) * row_elems).view((r1 - r0, *shape[1:])) \
            if nbytes else torch.empty((0, *shape[1:]), dtype=dtype)
        if tp.replace is not None:
            rep = adapters[tp.replace.adapter]
            src = rep.rows(tp.replace.key, r0, r1) if tp.shape else rep.tensor(tp.replace.key).reshape(1)
            if not factors:
                out.copy_(src)
                yield tp.name, buf, nbytes
                continue
            w = src.to(dtype)
        else:
            w = reader.read_rows(tp.source, r0, r1) if tp.shape else reader.read_tensor(tp.source).reshape(1)
        wd = w.to(dev)
        delta = combine([(_delta(p, a, b, tp.shape, r0, r1), p.weight) for p, a, b in factors])
        if dora is not None:
            assert magnitude is not None
            merged = dora_apply(dora.kind, wd, delta, magnitude[r0:r1] if dora.kind == "linear" else magnitude)
            out.copy_(merged)
            merged32 = merged
        else:
            merged32 = apply_delta_into(wd, delta, double, out if dev.type == "cpu" else None)
            if dev.type != "cpu":
                out.copy_(merged32.to(dtype).cpu())
        if compute.check_finite:
            _check_finite(tp, merged32, out, w, r0, r1)
        yield tp.name, buf, nbytes


def shard_chunks(shard: ShardPlan, reader: ShardReader, adapters: Sequence[AdapterReader], compute: Compute,
                 get_buffer: Callable[[], bytearray]) -> Iterator[Chunk]:
    """The output shard as (tensor name or None, buffer, valid bytes), in file order. Each buffer comes from
    `get_buffer` and belongs to the consumer until it gives it back."""
    header = out_header(shard, reader)
    buf = get_buffer()
    buf[:len(header)] = header
    yield None, buf, len(header)
    ordered = _data_order(shard)
    chunk = compute.copy_bytes
    i = 0
    while i < len(ordered):
        tp = ordered[i]
        if tp.action != "copy":
            yield from _merged_blocks(tp, reader, adapters, compute, get_buffer)
            i += 1
            continue
        start, end = tp.source.start, tp.source.end
        while i + 1 < len(ordered) and ordered[i + 1].action == "copy" and ordered[i + 1].source.start == end:
            i += 1
            end = ordered[i].source.end
        i += 1
        for pos in range(start, end, chunk):
            n = min(chunk, end - pos)
            buf = get_buffer()
            reader.read_into(pos, memoryview(buf)[:n])
            yield None, buf, n


class _Writer:
    """A thread that hashes and writes buffers in order and returns them to a small pool, so that disk
    writes overlap reading and computing the next block (hashlib, os.write and torch all release the GIL)."""

    def __init__(self, out: AtomicFile, buffer_bytes: int, on_bytes: Callable[[int], None], depth: int = 3) -> None:
        self.out = out
        self.on_bytes = on_bytes
        self.free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(depth):
            self.free.put(bytearray(buffer_bytes))
        self.todo: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="stream-merge-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.todo.get()) is not None:
            buf, n = item
            if self.error is None:
                try:
                    self.out.write(memoryview(buf)[:n])
                    self.on_bytes(n)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the producer thread
                    self.error = exc
            self.free.put(buf)

    def get_buffer(self) -> bytearray:
        if self.error is not None:
            raise self.error
        return self.free.get()

    def submit(self, buf: bytearray, n: int) -> None:
        if self.error is not None:
            raise self.error
        self.todo.put((buf, n))

    def finish(self) -> None:
        self.todo.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def write_shard(shard: ShardPlan, reader: ShardReader, adapters: Sequence[AdapterReader], out_path: Path,
                compute: Compute, on_bytes: Callable[[int], None] = lambda n: None) -> tuple[AtomicFile, ShardResult]:
    """Write the merged shard to a temp file beside `out_path`; it is published (fsync, rename) by
    `commit()` on the returned AtomicFile, which the runner does on another thread while the next shard is
    merged. The result's size and sha256 are already final."""
    t0 = time.perf_counter()
    out = AtomicFile(out_path)
    try:
        writer = _Writer(out, compute.buffer_bytes, on_bytes)
        try:
            for _, buf, n in shard_chunks(shard, reader, adapters, compute, writer.get_buffer):
                writer.submit(buf, n)
        finally:
            writer.finish()
    except BaseException:
        out.abort()
        raise
    touched = len(shard.touched)
    return out, ShardResult(file=shard.file, size=out.size, sha256=out.hash.hexdigest(), patched=touched,
                            copied=len(shard.tensors) - touched, seconds=time.perf_counter() - t0)


def merge_shard(shard: ShardPlan, reader: ShardReader, adapters: Sequence[AdapterReader], out_path: Path,
                compute: Compute, on_bytes: Callable[[int], None] = lambda n: None) -> ShardResult:
    """Write the merged version of one shard to `out_path` atomically and return its size and sha256."""
    out, result = write_shard(shard, reader, adapters, out_path, compute, on_bytes)
    publish(out)
    return result


def publish(out: AtomicFile) -> None:
    """Make a written shard durable and visible (fsync, rename, fsync the folder); on failure remove it."""
    try:
        out.commit()
    except BaseException:
        out.abort()
        raise
