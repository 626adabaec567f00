"""The jobs of one output tensor: row blocks of a patched, replaced or fp8 tensor, chunks of a converted one.

Here IO meets the block math: the factors are loaded once per tensor (in file order), the recipe is chosen
once (`recipes.choose_recipe`), and each job reads its base rows (through a map of just that block), runs the
recipe's function into the output buffer and checks the result. Blocks are sized by `Compute.block_bytes`
of fp32, so memory is about one block per thread plus the factors, whatever the tensor size.

Output dtype (`--dtype`): a tensor whose planned dtype differs from its base dtype is merged exactly as
without the option, rounded to the base dtype, and only then converted (what PEFT's `merge_and_unload()`
followed by `model.to(dtype)` does): for an fp32 base that is one rounding from the fp32 sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch

from .adapter import AdapterReader
from .compute import Compute, Job, Scratch
from .cuda_pipeline import TensorPipeline, ring_pool
from .errors import NonFiniteError
from .lora import expert_blocks, row_blocks
from .recipes import (Factor, Recipe, add_delta, add_rounded_delta, choose_recipe, dora_rows, fp8_encode, fp8_merge,
                      one_delta, replace_rows, sum_delta)
from .records import DTYPE_SIZES, TensorInfo, TensorPlan, numel
from .safetensors_io import ShardReader, unmap
from .torch_dtypes import TORCH_DTYPES
from .shard_rows import OtherShards

# (shard file or None for the shard being merged, tensor, r0, r1) -> rows
RowReader = Callable[[str | None, TensorInfo, int, int], torch.Tensor]


def load_factor(adapters: Sequence[AdapterReader], adapter: int, key: str, device: torch.device) -> torch.Tensor:
    """An adapter tensor as exact fp32 on the device; NaN/Inf in it is an error naming the file and key."""
    t = adapters[adapter].tensor(key).to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError("adapter tensor holds NaN or Inf", file=adapters[adapter].spec.weights_file, key=key,
                             fix="the adapter is corrupt or training diverged; use an earlier checkpoint")
    return t


def load_factors(tp: TensorPlan, adapters: Sequence[AdapterReader], dev: torch.device) -> list[Factor]:
    """(patch, A, B) for every patch of the tensor, in patch order."""
    return [(p, load_factor(adapters, p.adapter, p.a_key, dev) if p.a_key else None,
             load_factor(adapters, p.adapter, p.b_key, dev)) for p in tp.patches]


def check_finite_rows(name: str, dtype: str, merged: torch.Tensor, out: torch.Tensor,
                      base: Callable[[], torch.Tensor], r0: int, r1: int) -> None:
    """Cheap path: one fp32 sum (finite iff every element is); the exact mask only when that fails (re-reading
    the base rows), so a base that already holds Inf/NaN is not blamed on the adapter."""
    ok = math.isfinite(float(merged.sum())) if merged.is_floating_point() else True
    if ok and out.dtype == torch.float16:
        ok = math.isfinite(float(torch.sum(out, dtype=torch.float32)))
    if ok:
        return
    bad = ~torch.isfinite(out.float())
    if bool((bad & torch.isfinite(base().float())).any()):
        raise NonFiniteError(f"merged tensor has NaN/Inf in rows {r0}..{r1} where the base was finite "
                             f"(overflow of {dtype}?)", tensor=name,
                             fix="check the adapter's scale and weights; merge into a wider dtype")


def check_conversion(name: str, src: torch.Tensor, dst: torch.Tensor, where: str) -> None:
    """--dtype fp16 from a wider dtype: a finite value beyond fp16's range (65504) would become Inf, a broken
    model written with exit 0; refuse naming the tensor instead. Cheap path: one fp32 sum of the result."""
    if dst.dtype != torch.float16 or src.dtype == torch.float16:
        return
    if math.isfinite(float(torch.sum(dst, dtype=torch.float32))):
        return
    if bool((~torch.isfinite(dst) & torch.isfinite(src)).any()):
        raise NonFiniteError(f"values in {where} exceed the float16 range (|x| > 65504) and would become Inf",
                             tensor=name, fix="use --dtype bf16 or fp32 (or auto)")


def _fused_experts(tp: TensorPlan) -> bool:
    """A whole (E, out, in) parameter patched as one: blocked along E·out rows, not along experts."""
    return len(tp.shape) == 3 and any(p.kind == "param" and p.expert is None for p in tp.patches)


def _blocks(tp: TensorPlan, rows: int, row_elems: int, compute: Compute) -> list[tuple[int, int]]:
    want = max(1, compute.row_block_bytes // max(1, row_elems * 4))
    if _fused_experts(tp):
        return expert_blocks(tp.shape[0], tp.shape[1], want)
    kinds = [p.kind for p in tp.patches]
    if len(tp.patches) == 1 and tp.patches[0].magnitude_key and tp.patches[0].kind != "linear":
        kinds.append("conv")  # column norms (Conv1D, Embedding) and conv norms need the whole tensor
    return row_blocks(rows, want, kinds)


class _TensorMerge:
    """The row-block merge of one tensor, its recipe chosen once in the constructor."""

    def __init__(self, tp: TensorPlan, reader: ShardReader, adapters: Sequence[AdapterReader], compute: Compute,
                 scratch: Scratch) -> None:
        self.tp, self.reader, self.adapters, self.scratch, self.compute = tp, reader, adapters, scratch, compute
        self.name = tp.name
        self.dev = compute.device
        self.dtype = TORCH_DTYPES[tp.source.dtype]  # what the merge rounds to (PEFT's base dtype)
        self.out_dtype = TORCH_DTYPES[tp.dtype]
        self.out_itemsize = DTYPE_SIZES[tp.dtype]
        shape = tp.shape if tp.shape else (1,)
        self.view_shape = (shape[0] * shape[1], *shape[2:]) if _fused_experts(tp) else shape
        self.row_elems = numel(self.view_shape[1:])
        self.factors = load_factors(tp, adapters, self.dev)
        self.recipe: Recipe = choose_recipe(tp, self.factors, self.dev, self.dtype, compute.check_finite)
        p0 = tp.patches[0] if tp.patches else None
        self.magnitude = (load_factor(adapters, p0.adapter, p0.magnitude_key, self.dev)
                          if self.recipe.rule == "dora" and p0 is not None and p0.magnitude_key else None)
        self.blocks = _blocks(tp, self.view_shape[0], self.row_elems, compute)

    def _take(self, slot: str, shape: Sequence[int]) -> torch.Tensor:
        return self.scratch.take(slot, shape, self.dev)

    def base_rows(self, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Base rows [r0, r1) in the base dtype, copied: into `out` (a block's scratch) or a new tensor (the
        rare re-read of the NaN/Inf check)."""
        tp = self.tp
        if tp.replace is not None:
            rep = self.adapters[tp.replace.adapter]
            src = rep.rows(tp.replace.key, r0, r1) if tp.shape else rep.tensor(tp.replace.key).reshape(1)
            return src.to(self.dtype)
        if not tp.shape:
            return self.reader.read_tensor(tp.source).reshape(1)
        info = TensorInfo(tp.source.name, tp.source.dtype, self.view_shape, tp.source.start, tp.source.end)
        return self.reader.read_rows(info, r0, r1, out)

    def delta(self, r0: int, r1: int) -> torch.Tensor:
        if self.recipe.delta == "one":
            return one_delta(self.factors[0], self.tp.shape, r0, r1, self._take)
        return sum_delta(self.factors, self.tp.shape, r0, r1)

    def apply(self, base: torch.Tensor, out: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """The recipe's rule for one block: base rows -> `out` (base dtype); returns the result to check."""
        rule = self.recipe.rule
        delta = self.delta(r0, r1)
        if rule == "add":
            return add_delta(base, delta, out, self._take)
        if rule == "add_rounded":
            return add_rounded_delta(base, delta, out)
        assert rule == "dora" and self.magnitude is not None
        kind = self.tp.patches[0].kind
        return dora_rows(kind, base, delta, self.magnitude[r0:r1] if kind == "linear" else self.magnitude, out)

    def fill(self, r0: int, r1: int, buf: bytearray) -> None:
        """Write output rows [r0, r1) to the start of `buf`."""
        n = (r1 - r0) * self.row_elems
        if not n:
            return
        block = (r1 - r0, *self.view_shape[1:])
        final = torch.frombuffer(buf, dtype=self.out_dtype, count=n).view(block)
        out = final if self.out_dtype == self.dtype else self.scratch.take("cast", block, torch.device("cpu"),
                                                                           self.dtype)
        self._merge_into(out, r0, r1)
        if out is not final:
            final.copy_(out)
            check_conversion(self.tp.name, out, final, f"rows {r0}..{r1}")

    def _merge_into(self, out: torch.Tensor, r0: int, r1: int) -> None:
        recipe, tp = self.recipe, self.tp
        if recipe.base == "map":
            # a positioned read into this thread's scratch, not a map of the block: on a base larger than the
            # page cache, faulting each block in through a fresh map took 77-96 user-s for 30 GB against 38-40
            # user-s (+35-40 sys-s) read (cold cache, `scripts/bench.py`); and a read of a file that shrank is
            # an error, never a SIGBUS
            base = self.base_rows(r0, r1, self.scratch.take("raw", out.shape, torch.device("cpu"), self.dtype))
            merged = self.apply(base, out, r0, r1)
        else:
            if recipe.base == "adapter":
                replace_rows(self.base_rows(r0, r1), out)
            else:
                out.copy_(self.base_rows(r0, r1))
            if recipe.rule == "replace":
                return
            merged = self.apply(out, out, r0, r1)
        if recipe.check_finite:
            check_finite_rows(tp.name, tp.source.dtype, merged, out, lambda: self.base_rows(r0, r1), r0, r1)

    # --- the device pipeline's view of this merge (cuda_pipeline.BlockMath) ---

    def block_shape(self, r0: int, r1: int) -> tuple[int, ...]:
        return (r1 - r0, *self.view_shape[1:])

    def base_view(self, r0: int, r1: int) -> memoryview:
        itemsize = DTYPE_SIZES[self.tp.source.dtype]
        return self.reader.view(self.tp.source.start + r0 * self.row_elems * itemsize,
                                (r1 - r0) * self.row_elems * itemsize)

    def release_view(self, view: memoryview) -> None:
        unmap(view)

    def compute_block(self, base: torch.Tensor, out: torch.Tensor, r0: int, r1: int) -> torch.Tensor | None:
        """The recipe on the device: base rows -> `out`; the result to check for NaN/Inf, if checked."""
        merged = self.apply(base, out, r0, r1)
        return merged if self.recipe.check_finite else None

    def finish(self, stat: torch.Tensor | None, out: torch.Tensor, r0: int, r1: int, buf: bytearray) -> None:
        """A block back on the host: check it (`stat` holds the device's fp32 sum of the merged block), then
        write it to `buf` in the output dtype."""
        if self.recipe.check_finite and stat is not None:
            check_finite_rows(self.tp.name, self.tp.source.dtype, stat, out, lambda: self.base_rows(r0, r1), r0, r1)
        final = torch.frombuffer(buf, dtype=self.out_dtype, count=out.numel()).view(out.shape)
        final.copy_(out)
        if self.out_dtype != self.dtype:
            check_conversion(self.tp.name, out, final, f"rows {r0}..{r1}")

    def pipelined(self) -> bool:
        """Whether this tensor's blocks go through the device pipeline: base rows read from a map and merged by
        a rule that needs nothing but those rows and the factors."""
        return (self.compute.pipelined and self.recipe.base == "map"
                and self.recipe.rule in ("add", "add_rounded", "dora"))

    def jobs(self) -> Iterator[Job]:
        if self.pipelined():
            yield from TensorPipeline(self, ring_pool(self.compute)).jobs()
            return
        itemsize = DTYPE_SIZES[self.tp.dtype]
        for r0, r1 in self.blocks:
            nbytes = (r1 - r0) * self.row_elems * itemsize
            yield Job(self.tp.name, nbytes, lambda buf, r0=r0, r1=r1: self.fill(r0, r1, buf))


def fp8_jobs(tp: TensorPlan, read_rows: RowReader, adapters: Sequence[AdapterReader], compute: Compute
             ) -> Iterator[Job]:
    """fp8 block-scaled weights: dequantize row groups aligned to the scale blocks, add the LoRA delta in
    fp32, then write bf16 (dequant), fresh fp8 values (requant weight) or fresh scales (requant scale).
    `read_rows` reads the weight and its scale tensor, wherever each lives."""
    q = tp.quant
    assert q is not None
    weight, scale = (tp.source, q.partner) if q.role == "weight" else (q.partner, tp.source)
    weight_file, scale_file = (None, q.partner_file) if q.role == "weight" else (q.partner_file, None)
    bm = q.block[0]
    rows, cols = weight.shape
    dev = compute.device
    factors = load_factors(tp, adapters, dev)
    out_row = numel(tp.shape[1:]) * DTYPE_SIZES[tp.dtype]

    def fill(r0: int, r1: int, nbytes: int, buf: bytearray) -> None:
        delta = sum_delta(factors, weight.shape, r0, r1) if factors else None
        w = fp8_merge(read_rows(weight_file, weight, r0, r1).to(dev),
                      read_rows(scale_file, scale, r0 // bm, -(-r1 // bm)).to(dev), q.block, delta)
        if compute.check_finite and not math.isfinite(float(w.sum())):
            raise NonFiniteError(f"merged fp8 weight has NaN/Inf in rows {r0}..{r1}", tensor=weight.name,
                                 fix="check the adapter's scale and weights")
        result = fp8_encode(w, q.mode, q.role, q.block)
        if q.mode == "dequant" and result.dtype != TORCH_DTYPES[tp.dtype]:
            result = result.to(TORCH_DTYPES[tp.dtype])  # --dtype: bf16 first, as a bf16 checkpoint would be
        data = result.cpu().contiguous().view(torch.uint8).reshape(-1)
        assert data.numel() == nbytes, (tp.name, data.numel(), nbytes)
        torch.frombuffer(buf, dtype=torch.uint8, count=nbytes).copy_(data)

    want = max(1, compute.block_bytes // max(1, cols * 4))
    for r0, r1 in row_blocks(rows, want, [p.kind for p in tp.patches], align=bm):
        out_rows = (-(-r1 // bm) - r0 // bm) if q.role == "scale" else r1 - r0
        nbytes = out_rows * out_row
        yield Job(tp.name, nbytes, lambda buf, r0=r0, r1=r1, n=nbytes: fill(r0, r1, n, buf))


def row_reader(reader: ShardReader, others: OtherShards | None) -> RowReader:
    """A `RowReader`: this shard through `reader`, others through `others` (default: the files beside it)."""
    others = others if others is not None else OtherShards.local(reader.path.parent)

    def rows(file: str | None, info: TensorInfo, r0: int, r1: int) -> torch.Tensor:
        return reader.read_rows(info, r0, r1) if file is None else others.rows(file, info, r0, r1)
    return rows


def merged_jobs(tp: TensorPlan, reader: ShardReader, adapters: Sequence[AdapterReader], compute: Compute,
                scratch: Scratch, others: OtherShards | None = None) -> Iterator[Job]:
    """Row blocks of a patched, replaced or fp8 tensor, in file order. The factors are loaded when the first
    job is asked for (in file order, one tensor's factors at a time)."""
    if tp.quant is not None:
        yield from fp8_jobs(tp, row_reader(reader, others), adapters, compute)
        return
    yield from _TensorMerge(tp, reader, adapters, compute, scratch).jobs()


def convert_jobs(tp: TensorPlan, reader: ShardReader, compute: Compute) -> Iterator[Job]:
    """An untouched floating tensor written in another dtype (`--dtype`): element chunks of at most one copy
    chunk of output (or input) bytes, each read through a map and converted with `.to` (round to nearest even:
    what `model.to(dtype)` does)."""
    src, dst = TORCH_DTYPES[tp.source.dtype], TORCH_DTYPES[tp.dtype]
    isz, osz = DTYPE_SIZES[tp.source.dtype], DTYPE_SIZES[tp.dtype]
    total = numel(tp.shape)
    step = max(1, compute.copy_bytes // max(isz, osz))

    def fill(e0: int, e1: int, buf: bytearray) -> None:
        view = reader.view(tp.source.start + e0 * isz, (e1 - e0) * isz)
        try:
            values = torch.frombuffer(view, dtype=src)
            out = torch.frombuffer(buf, dtype=dst, count=e1 - e0).copy_(values)
            check_conversion(tp.name, values, out, f"elements {e0}..{e1}")
        finally:
            unmap(view)

    for e0 in range(0, total, step):
        e1 = min(total, e0 + step)
        yield Job(tp.name, (e1 - e0) * osz, lambda buf, e0=e0, e1=e1: fill(e0, e1, buf))
