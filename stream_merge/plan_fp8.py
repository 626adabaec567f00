"""fp8 block-quantized bases in the plan: which quantizations are accepted, and how each fp8 weight is paired
with its `weight_scale_inv` tensor. Pure.

A patched fp8 weight is decoded with its block scales, merged, and re-encoded with fresh scales (or written
as bf16 with --dequantize, its scales dropped), so weight and scales are planned as a pair, wherever each
of them is stored.
"""

from __future__ import annotations

from .plan_state import PlanState
from .records import FP8_DTYPES, LoraPatch, QuantSpec, TensorInfo, TensorPlan

QUANT_ADVICE = ("merge into the original 16-bit checkpoint instead (a QLoRA adapter was trained on the "
                "dequantized weights and merges into the bf16 base)")
SCALE_SUFFIX = "_scale_inv"
DROP = "drop"  # fp8_tensor_plan's answer for the scales of a dequantized weight


def read_quantization(state: PlanState) -> None:
    """fp8 block-scaled bases are supported (sets `state.fp8_block`); every other method is refused by name."""
    qc = state.config("quantization_config")
    if qc is None:
        if state.options.dequantize:
            state.problems.append("--dequantize: the base has no quantization_config (it is not an fp8 checkpoint)")
        return
    if not isinstance(qc, dict):
        state.problems.append("config.json quantization_config is not an object")
        return
    method = str(qc.get("quant_method", "unknown"))
    block = qc.get("weight_block_size")
    if method == "fp8" and isinstance(block, list) and len(block) == 2 and all(
            isinstance(b, int) and b > 0 for b in block) and qc.get("fmt", "e4m3") == "e4m3":
        state.fp8_block = (block[0], block[1])
        return
    what = {"bitsandbytes": "bitsandbytes 4/8-bit", "fp8": "fp8 without block scales (weight_block_size)"}.get(
        method, method)
    state.problems.append(f"the base is quantized ({what}); stream-merge merges into 16-bit checkpoints and fp8 "
                          f"block-scaled ones only: {QUANT_ADVICE}")


def is_fp8_weight(state: PlanState, info: TensorInfo) -> bool:
    """A block-quantized fp8 weight (the base is fp8 block-scaled and the tensor is fp8)."""
    return state.fp8_block is not None and info.dtype in FP8_DTYPES


def fp8_weight_problem(state: PlanState, info: TensorInfo) -> str | None:
    """Why a LoRA cannot be merged into this fp8 weight (its scales are missing), or None. The scales may
    live in another shard (DeepSeek-V3 does this)."""
    scale = state.base.tensors.get(info.name + SCALE_SUFFIX)
    if scale is None or len(info.shape) != 2:
        return f"fp8 weight {info.name!r} needs its block scales {info.name + SCALE_SUFFIX!r} (any shard)"
    return None


def _partner_file(state: PlanState, shard: str, partner: TensorInfo) -> str | None:
    """The shard of an fp8 pair's other tensor when it is not this one."""
    other = state.base.weight_map.get(partner.name, shard)
    return None if other == shard else other


def is_fp8_scale(state: PlanState, tensor: TensorInfo) -> bool:
    """The block scales of an fp8 weight (they keep F32 under --dtype)."""
    if state.fp8_block is None or not tensor.name.endswith(SCALE_SUFFIX):
        return False
    weight = state.base.tensors.get(tensor.name[: -len(SCALE_SUFFIX)])
    return weight is not None and weight.dtype in FP8_DTYPES


def fp8_tensor_plan(state: PlanState, shard: str, tensor: TensorInfo, patches: tuple[LoraPatch, ...]
                    ) -> TensorPlan | str | None:
    """The plan of an fp8 weight or of its scale tensor in `shard`: a TensorPlan with a QuantSpec, DROP for
    the scales of a dequantized weight, or None when the tensor is only copied (or the base is not fp8)."""
    base, block = state.base, state.fp8_block
    if block is None:
        return None
    scale = base.tensors.get(tensor.name + SCALE_SUFFIX) if tensor.dtype in FP8_DTYPES else None
    weight = base.tensors.get(tensor.name[: -len(SCALE_SUFFIX)]) if tensor.name.endswith(SCALE_SUFFIX) else None
    if weight is not None and weight.dtype not in FP8_DTYPES:
        weight = None
    if scale is not None and state.options.dequantize:
        return TensorPlan(name=tensor.name, dtype="BF16", shape=tensor.shape, source=tensor, patches=patches,
                          quant=QuantSpec("dequant", "weight", scale, block, _partner_file(state, shard, scale)))
    if scale is not None and patches:
        return TensorPlan(name=tensor.name, dtype=tensor.dtype, shape=tensor.shape, source=tensor, patches=patches,
                          quant=QuantSpec("requant", "weight", scale, block, _partner_file(state, shard, scale)))
    if weight is not None and state.options.dequantize:
        return DROP
    if weight is not None and state.patches.get(weight.name):
        return TensorPlan(name=tensor.name, dtype=tensor.dtype, shape=tensor.shape, source=tensor,
                          patches=tuple(state.patches[weight.name]),
                          quant=QuantSpec("requant", "scale", weight, block, _partner_file(state, shard, weight)))
    return None
