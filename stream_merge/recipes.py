"""One recipe per merge path: how a patched tensor's row blocks turn base rows into output rows.

A `Recipe` is chosen once per tensor (`choose_recipe`) from the plan and the loaded factors; each rule has its
own function below that takes base rows and an fp32 delta and writes the output rows, op for op as PEFT
(PEFT_SEMANTICS §2.4, §3, §4, §5):

- "add":         W' = (W.float() + Δ).to(T)             Linear, Conv1D, ConvNd, lora_bias, weighted sums
- "add_rounded": W' = W + Δ.to(T)                       Embedding, raw parameters (double rounding)
- "dora":        W' = (m / ‖W + Δ‖ · (W + Δ)).to(T)     DoRA, one rounding
- "replace":     W' = R.to(T)                            modules_to_save, saved biases and embeddings
- "fp8":         dequantize, add Δ, write bf16 or re-quantize (see `fp8_merge` / `fp8_encode`)

Pure: tensors and numbers in, tensors out; the IO (maps, adapter readers, buffers) is in `tensor_jobs`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .lora import combine, conv_delta, delta_rows, dora_apply, param_delta_flat_rows, param_delta_rows
from .quant import dequantize, quantize
from .records import LoraPatch, TensorPlan

Factor = tuple[LoraPatch, "torch.Tensor | None", torch.Tensor]  # (patch, A or None, B), fp32 on the device
TakeScratch = Callable[[str, Sequence[int]], torch.Tensor]  # (slot, shape) -> reusable fp32 tensor


@dataclass(frozen=True)
class Recipe:
    """How one tensor is merged, decided once per tensor.

    rule: "add" | "add_rounded" | "dora" | "replace" | "fp8" (see the module docstring).
    base: where the base rows come from: "map" (the block, read from the base shard: a positioned read on the
    CPU, a map in the device pipeline), "read" (copied into the output buffer: scalars), "adapter" (a
    replacement tensor), "fp8" (values and block scales).
    delta: "none" (no factors), "one" (one LoRA with weight 1 into per-thread scratch), "sum" (Σ wᵢ·Δᵢ).
    check_finite: run the NaN/Inf pass on each block (skipped only where overflow is provably impossible).
    """

    rule: str
    base: str
    delta: str
    check_finite: bool


def cannot_overflow(factor: Factor, dtype: torch.dtype) -> bool:
    """True when W + s·B·A is provably finite wherever W is: every |Δ| is at most |s|·r·max|B|·max|A| (no
    partial sum of the GEMM can exceed it), and for bf16/fp32 a finite W plus a |Δ| below 1e30 cannot reach
    the rounding threshold to Inf (half an ulp at the top of the range is 6.6e35 for bf16, 1e31 for fp32).
    Then the per-block NaN/Inf pass is skipped: it could only blame the base, which it does not do."""
    p, a, b = factor
    if a is None or dtype not in (torch.bfloat16, torch.float32) or not a.numel() or not b.numel():
        return False
    bound = abs(p.scale) * a.shape[0] * float(a.abs().max()) * float(b.abs().max())
    return bound < 1e30


def choose_recipe(tp: TensorPlan, factors: Sequence[Factor], device: torch.device, dtype: torch.dtype,
                  check_finite: bool) -> Recipe:
    """The recipe for a patched, replaced or fp8 tensor. `dtype` is the base dtype the merge rounds to."""
    if tp.quant is not None:
        return Recipe("fp8", "fp8", "sum" if factors else "none", check_finite)
    single = len(factors) == 1 and factors[0][0].weight == 1.0
    dora = len(tp.patches) == 1 and tp.patches[0].magnitude_key is not None
    double = single and tp.patches[0].double_round
    base = "adapter" if tp.replace is not None else ("map" if tp.shape else "read")
    if not factors:
        return Recipe("replace", base, "none", False)
    cpu = device.type == "cpu"
    delta = "one" if single and cpu and not dora else "sum"
    rule = "dora" if dora else ("add_rounded" if double else "add")
    bounded = rule == "add" and delta == "one" and base == "map" and cannot_overflow(factors[0], dtype)
    return Recipe(rule, base, delta, check_finite and not bounded)


def factor_delta(p: LoraPatch, a: torch.Tensor | None, b: torch.Tensor, shape: tuple[int, ...], r0: int, r1: int
                 ) -> torch.Tensor:
    """Rows [r0, r1) of one factor pair's fp32 delta, laid out like the base tensor (for a fused (E, out, in)
    parameter: rows of its (E·out, in) view)."""
    if p.kind == "conv":
        assert a is not None
        return conv_delta(a, b, p.scale, shape)[r0:r1]
    if p.kind == "param":
        assert a is not None
        if p.expert is None:
            return param_delta_flat_rows(a, b, p.scale, p.experts, shape[1], r0, r1, p.transposed)
        return param_delta_rows(a, b, p.scale, p.experts, p.expert, p.row_offset, r0, r1)
    return delta_rows(p.kind, a, b, p.scale, r0, r1)


def sum_delta(factors: Sequence[Factor], shape: tuple[int, ...], r0: int, r1: int) -> torch.Tensor:
    """Σ wᵢ·Δᵢ for rows [r0, r1) in fp32 (one delta of weight 1 is returned as computed: PEFT's bits)."""
    return combine([(factor_delta(p, a, b, shape, r0, r1), p.weight) for p, a, b in factors])


def one_delta(factor: Factor, shape: tuple[int, ...], r0: int, r1: int, take: TakeScratch) -> torch.Tensor:
    """`factor_delta` into reusable scratch for the common kinds: the same ops (GEMM, then the scale) with
    `out=`, so the same bits, without allocating a block per block. A scale of exactly 1 (lora_alpha == r)
    skips its pass over the block: x * 1.0 is x for every float, so the bits are PEFT's."""
    p, a, b = factor
    if p.kind == "linear":
        assert a is not None
        d = take("delta", (r1 - r0, a.shape[1]))
        torch.matmul(b[r0:r1], a, out=d)
        return d if p.scale == 1.0 else d.mul_(p.scale)
    if p.kind in ("conv1d", "embedding"):
        assert a is not None
        g = take("gemm", (b.shape[0], r1 - r0))
        torch.matmul(b, a[:, r0:r1], out=g)
        return torch.mul(g.T, p.scale, out=take("delta", (r1 - r0, b.shape[0])))
    return factor_delta(p, a, b, shape, r0, r1)


def _store(out: torch.Tensor, merged: torch.Tensor) -> None:
    """Round `merged` into `out` (a CPU view of the output buffer), whatever device it was computed on."""
    out.copy_(merged if merged.device == out.device else merged.to(out.dtype).cpu())


def add_delta(base: torch.Tensor, delta: torch.Tensor, out: torch.Tensor, take: TakeScratch | None = None
              ) -> torch.Tensor:
    """Rule "add", rounded once: out = (W.float() + Δ).to(T). The fp32 sum is formed in `delta` itself
    (W + Δ and Δ + W are the same IEEE sum); `base` may alias `out`. Returns the unrounded sum."""
    if base.dtype == torch.float32 and base.device == delta.device:
        w32 = base
    elif take is not None:
        w32 = take("base", tuple(base.shape)).copy_(base)
    else:
        w32 = base.to(device=delta.device, dtype=torch.float32)
    merged = delta.add_(w32)  # a mixed-dtype add_ is several times slower than the copy above
    _store(out, merged)
    return merged


def add_rounded_delta(base: torch.Tensor, delta: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Rule "add_rounded", rounded twice as PEFT's Embedding and ParamWrapper merges: out = W + Δ.to(T).
    Returns the result (in T)."""
    rounded = delta.to(base.dtype)
    if base.device == delta.device == out.device:
        torch.add(base, rounded, out=out)
        return out
    merged = base.to(delta.device) + rounded
    _store(out, merged)
    return merged


def dora_rows(kind: str, base: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, out: torch.Tensor
              ) -> torch.Tensor:
    """Rule "dora": the DoRA merge of these rows (all of them unless `kind` is "linear", whose row norms
    need only their own row); `magnitude` holds the matching entries. Returns the result (in T)."""
    merged = dora_apply(kind, base.to(delta.device), delta, magnitude)
    _store(out, merged)
    return merged


def replace_rows(src: torch.Tensor, out: torch.Tensor) -> None:
    """Rule "replace": a tensor from the adapter file cast to the base dtype (the same cast as `.to(T)`)."""
    out.copy_(src.to(out.dtype))


def fp8_merge(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], delta: torch.Tensor | None
              ) -> torch.Tensor:
    """Rule "fp8", first half: the fp32 weight rows of a block-scaled fp8 weight (rows start on a scale
    block) plus the LoRA delta."""
    w = dequantize(q, scale, block)
    if delta is not None:
        w.add_(delta)
    return w


def fp8_encode(w: torch.Tensor, mode: str, role: str, block: tuple[int, int]) -> torch.Tensor:
    """Rule "fp8", second half: what the output holds for these rows: bf16 ("dequant"), or fresh fp8 values
    (role "weight") / fresh block scales (role "scale") of a re-quantization."""
    if mode == "dequant":
        return w.to(torch.bfloat16)
    values, scales = quantize(w, block)
    return values if role == "weight" else scales
