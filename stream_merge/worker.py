"""Merges one shard: the only place where file IO meets the LoRA math.

An output shard is a list of jobs in file order: its header, raw byte ranges of untouched tensors, and row
blocks of patched tensors (about `block_bytes` of fp32 each, so a block's delta, sum and cast stay in the CPU
caches). `shard_chunks` runs the jobs on `Compute.threads` threads, each filling one buffer from a small
pool, and hands the buffers on in file order: `write_shard` writes them on a writer thread while the next
blocks are read and computed, `verify --full` compares them with an existing output. Memory is the pool plus
per-thread fp32 scratch and one module's adapter factors, whatever the shard or tensor size.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import AdapterReader
from .errors import NonFiniteError
from .lora import (apply_delta_into, combine, conv_delta, delta_rows, dora_apply, param_delta_rows, row_blocks)
from .quant import dequantize, quantize
from .records import DTYPE_SIZES, LoraPatch, ShardPlan, ShardResult, TensorPlan, numel
from .fileio import AtomicFile
from .safetensors_io import TORCH_DTYPES, ShardReader, header_bytes, unmap

Chunk = tuple[str | None, "bytearray | memoryview", int]  # (tensor name or None, buffer, valid bytes)


@dataclass
class Compute:
    """Where and how: the device for the fp32 math; the row-block budget in bytes of fp32 (2 MiB blocks keep
    the delta, the sum and the cast in the CPU caches: measured 2.5x faster than 8 MiB ones once the fp32
    scratch is reused); the chunk size for copying untouched bytes; how many jobs run at once (CPU: one per
    core, each on one torch thread: 2.5 GB/s on 2 cores against 1.5 GB/s for one job on 2 intra-op
    threads)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    block_bytes: int = 2 * 1024 * 1024
    check_finite: bool = True
    copy_bytes: int = 4 * 1024 * 1024
    threads: int = 1
    direct_io: bool = True  # write shards with O_DIRECT where the file system allows (see direct_io)

    @property
    def buffer_bytes(self) -> int:
        """Pool buffer size: a copy chunk, or the largest output block (the last block absorbs a remainder of
        up to one block, see row_blocks)."""
        return max(self.copy_bytes, 2 * self.block_bytes + 8)

    @property
    def depth(self) -> int:
        """Jobs in flight: enough to keep every thread busy while the oldest result waits for the writer."""
        return 2 * max(1, self.threads)

    def pool(self, spare: int = 2) -> "BufferPool":
        """A pool big enough for `depth` jobs in flight plus `spare` buffers held by the consumer."""
        return BufferPool(self.buffer_bytes, self.depth + spare + 1)


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """Move every object alive now (torch's own: hundreds of thousands) out of the cyclic collector's reach
    for the duration of a merge: the jobs allocate many small objects, and each full collection walked all
    of torch (measured 4% of a merge's CPU in gc_collect_main and its visitors). Undone afterwards."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def torch_settings() -> Iterator[None]:
    """The torch settings every merge runs under, restored afterwards. One intra-op thread: row blocks run on
    `Compute.threads` threads of their own, cache-sized tiles gain nothing from intra-op threads, and
    OpenMP's spinning threads collapse under contention with the writer (measured: 77 s -> 19 s for 4.5 GB on
    2 busy cores). TF32 off for matmuls and cuDNN convolutions: it would change the bits (PEFT_SEMANTICS §0)."""
    threads = torch.get_num_threads()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        torch.set_num_threads(threads)


def compute_threads(device: torch.device) -> int:
    """Jobs to run at once: one per usable core on CPU (at most 8: past that the writer is the limit), one
    on a GPU (it is fed from one thread)."""
    if device.type != "cpu":
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


class BufferPool:
    """Fixed-size reusable output buffers; `get` blocks until the consumer gives one back."""

    def __init__(self, size: int, count: int) -> None:
        self.size = size
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(count):
            self._free.put(bytearray(size))

    def get(self, nbytes: int) -> bytearray:
        """A pool buffer, or a one-off one for a chunk larger than the pool's buffers."""
        return self._free.get() if nbytes <= self.size else bytearray(nbytes)

    def put(self, buf: bytearray | memoryview) -> None:
        """Take a buffer back: pool buffers are reused, views of the base (untouched bytes) unmapped."""
        if isinstance(buf, memoryview):
            unmap(buf)
        elif len(buf) == self.size:
            self._free.put(buf)


@dataclass(frozen=True)
class Job:
    """One chunk of the output: `fill(buf)` writes its `nbytes` bytes to the start of a pool buffer, or
    `source()` returns them as a view of the base (untouched bytes: no copy of ours at all)."""

    name: str | None
    nbytes: int
    fill: Callable[[bytearray], None] | None = None
    source: Callable[[], memoryview] | None = None

    def run(self, buf: bytearray | None) -> bytearray | memoryview:
        if self.source is not None:
            return self.source()
        assert self.fill is not None and buf is not None
        self.fill(buf)
        return buf


class _Scratch(threading.local):
    """Per-thread reusable fp32 tensors: allocating a fresh 2 MiB tensor per block costs page faults and
    zeroing that measured as much as the math itself."""

    def __init__(self) -> None:
        self.bufs: dict[tuple[str, torch.device], torch.Tensor] = {}

    def take(self, slot: str, shape: Sequence[int], device: torch.device) -> torch.Tensor:
        n = numel(tuple(shape))
        buf = self.bufs.get((slot, device))
        if buf is None or buf.numel() < n:
            buf = self.bufs[(slot, device)] = torch.empty(n, dtype=torch.float32, device=device)
        return buf[:n].view(tuple(shape))


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


def _delta_scratch(p: LoraPatch, a: torch.Tensor | None, b: torch.Tensor, shape: tuple[int, ...], r0: int,
                   r1: int, scratch: _Scratch) -> torch.Tensor:
    """`_delta` into per-thread scratch for the common kinds: the same ops (GEMM, then the scale) with `out=`,
    so the same bits."""
    if p.kind == "linear":
        assert a is not None
        d = scratch.take("delta", (r1 - r0, a.shape[1]), b.device)
        torch.matmul(b[r0:r1], a, out=d)
        return d.mul_(p.scale)
    if p.kind in ("conv1d", "embedding"):
        assert a is not None
        g = scratch.take("gemm", (b.shape[0], r1 - r0), b.device)
        torch.matmul(b, a[:, r0:r1], out=g)
        return torch.mul(g.T, p.scale, out=scratch.take("delta", (r1 - r0, b.shape[0]), b.device))
    return _delta(p, a, b, shape, r0, r1)


def _check_finite(tp: TensorPlan, merged32: torch.Tensor, out: torch.Tensor, base: Callable[[], torch.Tensor],
                  r0: int, r1: int) -> None:
    """Cheap path: one fp32 sum (finite iff every element is); the exact mask only when that fails (re-reading
    the base rows), so a base that already holds Inf/NaN is not blamed on the adapter."""
    ok = math.isfinite(float(merged32.sum())) if merged32.is_floating_point() else True
    if ok and out.dtype == torch.float16:
        ok = math.isfinite(float(torch.sum(out, dtype=torch.float32)))
    if ok:
        return
    bad = ~torch.isfinite(out.float())
    if bool((bad & torch.isfinite(base().float())).any()):
        raise NonFiniteError(f"merged tensor has NaN/Inf in rows {r0}..{r1} where the base was finite "
                             f"(overflow of {tp.dtype}?)", tensor=tp.name,
                             fix="check the adapter's scale and weights; merge into a wider dtype")


Factors = list[tuple[LoraPatch, torch.Tensor | None, torch.Tensor]]


def _cannot_overflow(factor: tuple[LoraPatch, torch.Tensor | None, torch.Tensor], dtype: torch.dtype) -> bool:
    """True when W + s·B·A is provably finite wherever W is: every |Δ| is at most |s|·r·max|B|·max|A| (no
    partial sum of the GEMM can exceed it), and for bf16/fp32 a finite W plus a |Δ| below 1e30 cannot reach
    the rounding threshold to Inf (half an ulp at the top of the range is 6.6e35 for bf16, 1e31 for fp32).
    Then the per-block NaN/Inf pass is skipped: it could only blame the base, which it does not do."""
    p, a, b = factor
    if a is None or dtype not in (torch.bfloat16, torch.float32) or not a.numel() or not b.numel():
        return False
    bound = abs(p.scale) * a.shape[0] * float(a.abs().max()) * float(b.abs().max())
    return bound < 1e30


def _factors(tp: TensorPlan, adapters: Sequence[AdapterReader], dev: torch.device) -> Factors:
    return [(p, _load_factor(adapters, p.adapter, p.a_key, dev) if p.a_key else None,
             _load_factor(adapters, p.adapter, p.b_key, dev)) for p in tp.patches]


def _quant_jobs(tp: TensorPlan, reader: ShardReader, adapters: Sequence[AdapterReader], compute: Compute
                ) -> Iterator[Job]:
    """fp8 block-scaled weights: dequantize row groups aligned to the scale blocks, add the LoRA delta in
    fp32, then write bf16 (dequant), fresh fp8 values (requant weight) or fresh scales (requant scale)."""
    q = tp.quant
    assert q is not None
    weight, scale = (tp.source, q.partner) if q.role == "weight" else (q.partner, tp.source)
    bm = q.block[0]
    rows, cols = weight.shape
    dev = compute.device
    factors = _factors(tp, adapters, dev)
    out_row = numel(tp.shape[1:]) * DTYPE_SIZES[tp.dtype]

    def fill(r0: int, r1: int, nbytes: int, buf: bytearray) -> None:
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
        assert data.numel() == nbytes, (tp.name, data.numel(), nbytes)
        torch.frombuffer(buf, dtype=torch.uint8, count=nbytes).copy_(data)

    want = max(1, compute.block_bytes // max(1, cols * 4))
    for r0, r1 in row_blocks(rows, want, [p.kind for p in tp.patches], align=bm):
        out_rows = (-(-r1 // bm) - r0 // bm) if q.role == "scale" else r1 - r0
        nbytes = out_rows * out_row
        yield Job(tp.name, nbytes, lambda buf, r0=r0, r1=r1, n=nbytes: fill(r0, r1, n, buf))


def _merged_jobs(tp: TensorPlan, reader: ShardReader, adapters: Sequence[AdapterReader], compute: Compute,
                 scratch: _Scratch) -> Iterator[Job]:
    """Row blocks of a patched (or replaced) tensor. The base rows are read through a map of the block (a
    replacement comes from the adapter into the output buffer) and merged through fp32 scratch into the output
    buffer; the adapter factors are loaded once, here, in file order."""
    if tp.quant is not None:
        yield from _quant_jobs(tp, reader, adapters, compute)
        return
    dtype = TORCH_DTYPES[tp.dtype]
    itemsize = DTYPE_SIZES[tp.dtype]
    dev = compute.device
    shape = tp.shape if tp.shape else (1,)
    rows, row_elems = shape[0], numel(shape[1:])
    factors = _factors(tp, adapters, dev)
    dora = tp.patches[0] if len(tp.patches) == 1 and tp.patches[0].magnitude_key else None
    magnitude = _load_factor(adapters, dora.adapter, dora.magnitude_key, dev) if dora and dora.magnitude_key else None
    double = len(tp.patches) == 1 and tp.patches[0].weight == 1.0 and tp.patches[0].double_round
    single = len(factors) == 1 and factors[0][0].weight == 1.0 and dora is None
    cpu = dev.type == "cpu"
    # one LoRA on CPU, rounded once, from the base: the NaN/Inf pass only where overflow is possible
    check = compute.check_finite and not (single and cpu and not double and tp.replace is None and bool(tp.shape)
                                          and _cannot_overflow(factors[0], dtype))
    mapped = tp.replace is None and bool(tp.shape)  # base rows come from a map, not copied into the buffer

    def base_rows(r0: int, r1: int) -> torch.Tensor:
        if tp.replace is not None:
            rep = adapters[tp.replace.adapter]
            src = rep.rows(tp.replace.key, r0, r1) if tp.shape else rep.tensor(tp.replace.key).reshape(1)
            return src.to(dtype)
        return reader.read_rows(tp.source, r0, r1) if tp.shape else reader.read_tensor(tp.source).reshape(1)

    def merge(base: torch.Tensor, out: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Merge the base rows into `out`; returns the unrounded result for the NaN/Inf check."""
        if single and cpu:
            p, a, b = factors[0]
            delta = _delta_scratch(p, a, b, tp.shape, r0, r1, scratch)
        else:
            delta = combine([(_delta(p, a, b, tp.shape, r0, r1), p.weight) for p, a, b in factors])
        if dora is not None:
            assert magnitude is not None
            merged32 = dora_apply(dora.kind, base.to(dev), delta, magnitude[r0:r1] if dora.kind == "linear"
                                  else magnitude)
            out.copy_(merged32)
        elif cpu:
            if double:
                merged32 = apply_delta_into(base, delta, True, out)
            else:  # W + Δ and Δ + W are the same IEEE sum: form it in Δ, round it into the buffer
                merged32 = delta.add_(base if base.dtype == torch.float32 else
                                      scratch.take("base", out.shape, dev).copy_(base))
                out.copy_(merged32)
        else:
            merged32 = apply_delta_into(base.to(dev), delta, double, None)
            out.copy_(merged32.to(dtype).cpu())
        return merged32

    def fill(r0: int, r1: int, nbytes: int, buf: bytearray) -> None:
        if not nbytes:
            return
        out = torch.frombuffer(buf, dtype=dtype, count=(r1 - r0) * row_elems).view((r1 - r0, *shape[1:]))
        offset = tp.source.start + r0 * row_elems * itemsize
        if mapped:
            view = reader.view(offset, nbytes)
            try:
                merged32 = merge(torch.frombuffer(view, dtype=dtype).view(out.shape), out, r0, r1)
            finally:
                unmap(view)  # the base tensor above is gone by now; if not, the map goes with it
        else:
            if tp.replace is not None:
                out.copy_(base_rows(r0, r1))  # the same cast as .to(dtype)
                if not factors:
                    return
            else:
                reader.read_into(offset, memoryview(buf)[:nbytes])
            merged32 = merge(out, out, r0, r1)
        if check:
            _check_finite(tp, merged32, out, lambda: base_rows(r0, r1), r0, r1)

    want = max(1, compute.block_bytes // max(1, row_elems * 4))
    kinds = [p.kind for p in tp.patches]
    if dora is not None and dora.kind != "linear":
        kinds.append("conv")  # column norms (Conv1D, Embedding) and conv norms need the whole tensor
    for r0, r1 in row_blocks(rows, want, kinds):
        nbytes = (r1 - r0) * row_elems * itemsize
        yield Job(tp.name, nbytes, lambda buf, r0=r0, r1=r1, n=nbytes: fill(r0, r1, n, buf))


def shard_jobs(shard: ShardPlan, reader: ShardReader, adapters: Sequence[AdapterReader], compute: Compute,
               scratch: _Scratch | None = None) -> Iterator[Job]:
    """The output shard as jobs in file order; adjacent untouched tensors become one byte range."""
    scratch = scratch if scratch is not None else _Scratch()
    header = out_header(shard, reader)

    def put_header(buf: bytearray) -> None:
        buf[:len(header)] = header

    yield Job(None, len(header), put_header)
    ordered = _data_order(shard)
    chunk = compute.copy_bytes
    i = 0
    while i < len(ordered):
        tp = ordered[i]
        if tp.action != "copy":
            yield from _merged_jobs(tp, reader, adapters, compute, scratch)
            i += 1
            continue
        start, end = tp.source.start, tp.source.end
        while i + 1 < len(ordered) and ordered[i + 1].action == "copy" and ordered[i + 1].source.start == end:
            i += 1
            end = ordered[i].source.end
        i += 1
        for pos in range(start, end, chunk):
            n = min(chunk, end - pos)
            yield Job(None, n, source=lambda pos=pos, n=n: reader.view(pos, n))


def shard_chunks(shard: ShardPlan, reader: ShardReader, adapters: Sequence[AdapterReader], compute: Compute,
                 pool: BufferPool) -> Iterator[Chunk]:
    """The output shard as (tensor name or None, buffer, valid bytes), in file order. Jobs run on
    `compute.threads` threads (torch releases the GIL); each buffer belongs to the consumer, who gives it
    back with `pool.put`. The pool must hold more than `compute.depth` buffers plus those the consumer keeps."""
    scratch = _Scratch()
    jobs = shard_jobs(shard, reader, adapters, compute, scratch)
    if compute.threads <= 1:
        for job in jobs:
            yield job.name, job.run(None if job.source else pool.get(job.nbytes)), job.nbytes
        return
    inflight: deque[tuple[Job, Future[bytearray | memoryview]]] = deque()
    with ThreadPoolExecutor(compute.threads, thread_name_prefix="stream-merge-compute") as ex:
        try:
            for job in jobs:
                if len(inflight) >= compute.depth:
                    done, fut = inflight.popleft()
                    yield done.name, fut.result(), done.nbytes
                # pool buffers are taken here, in file order: the oldest job always has one
                inflight.append((job, ex.submit(job.run, None if job.source else pool.get(job.nbytes))))
            while inflight:
                done, fut = inflight.popleft()
                yield done.name, fut.result(), done.nbytes
        finally:
            for _, fut in inflight:
                fut.cancel()


class _Writer:
    """A thread that writes (and hashes) buffers in order and gives them back to the pool, so that disk
    writes overlap reading and computing the next blocks (hashlib, os.write and torch all release the GIL)."""

    def __init__(self, out: AtomicFile, pool: BufferPool, on_bytes: Callable[[int], None]) -> None:
        self.out = out
        self.pool = pool
        self.on_bytes = on_bytes
        self.todo: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
        self.error: BaseException | None = None
        self.cancelled = False
        self.thread = threading.Thread(target=self._run, name="stream-merge-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.todo.get()) is not None:
            buf, n = item
            if self.error is None and not self.cancelled:
                try:
                    self.out.write(memoryview(buf)[:n])
                    self.on_bytes(n)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the producer thread
                    self.error = exc
            self.pool.put(buf)

    def submit(self, buf: bytearray, n: int) -> None:
        if self.error is not None:
            self.pool.put(buf)
            raise self.error
        self.todo.put((buf, n))

    def finish(self) -> None:
        self.todo.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """After a failure or an interrupt: drop what is queued and wait until the thread has ended, even
        through a second Ctrl-C (the first one is already on its way up)."""
        self.cancelled = True
        self.todo.put(None)
        while self.thread.is_alive():
            try:
                self.thread.join()
            except KeyboardInterrupt:
                continue


def write_shard(shard: ShardPlan, reader: ShardReader, adapters: Sequence[AdapterReader], out_path: Path,
                compute: Compute, on_bytes: Callable[[int], None] = lambda n: None, checksum: bool = True
                ) -> tuple[AtomicFile, ShardResult]:
    """Write the merged shard to a temp file beside `out_path`; it is published (fsync, rename) by
    `commit()` on the returned AtomicFile, which the runner does on another thread while the next shard is
    merged. The result's size (and sha256, with `checksum`) are already final."""
    t0 = time.perf_counter()
    out = AtomicFile(out_path, digest=checksum, direct=compute.direct_io)
    writer: _Writer | None = None
    try:
        pool = compute.pool()
        writer = _Writer(out, pool, on_bytes)
        chunks = shard_chunks(shard, reader, adapters, compute, pool)
        try:
            for _, buf, n in chunks:
                writer.submit(buf, n)
        finally:
            chunks.close()  # stops the compute threads first when the writer failed
        writer.finish()
    except BaseException:
        if writer is not None:
            writer.stop()  # the file is closed only once nothing writes to it any more
        out.abort()
        raise
    touched = len(shard.touched)
    return out, ShardResult(file=shard.file, size=out.size, sha256=out.hexdigest(), patched=touched,
                            copied=len(shard.tensors) - touched, seconds=time.perf_counter() - t0)


def merge_shard(shard: ShardPlan, reader: ShardReader, adapters: Sequence[AdapterReader], out_path: Path,
                compute: Compute, on_bytes: Callable[[int], None] = lambda n: None, checksum: bool = True
                ) -> ShardResult:
    """Write the merged version of one shard to `out_path` atomically and return its size and sha256."""
    out, result = write_shard(shard, reader, adapters, out_path, compute, on_bytes, checksum)
    publish(out)
    return result


def publish(out: AtomicFile) -> None:
    """Make a written shard durable and visible (fsync, rename, fsync the folder); on failure remove it."""
    try:
        out.commit()
    except BaseException:
        out.abort()
        raise
