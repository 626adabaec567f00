"""--dtype in the plan: the output dtype of floating tensors, and the config.json fields that follow. Pure.

The merge still rounds to the base dtype first, then converts (what PEFT's merge followed by
`model.to(dtype)` gives); integer and fp8 tensors, and fp8 block scales, keep their dtype.
"""

from __future__ import annotations

import dataclasses

from .plan_state import PlanState
from .records import FLOAT_DTYPES, FP8_DTYPES, TensorPlan

OUT_DTYPES = {"bf16": ("BF16", "bfloat16"), "fp16": ("F16", "float16"), "fp32": ("F32", "float32")}


def out_dtype(tensor_plan: TensorPlan, dtype: str) -> TensorPlan:
    """--dtype: floating tensors (and dequantized fp8 weights) are written in `dtype`; integer and fp8 ones
    keep theirs."""
    if dtype == "auto" or tensor_plan.dtype not in FLOAT_DTYPES or (
            tensor_plan.quant is not None and tensor_plan.quant.mode != "dequant"):
        return tensor_plan
    return dataclasses.replace(tensor_plan, dtype=OUT_DTYPES[dtype][0])


def dtype_updates(state: PlanState) -> None:
    """--dtype: config.json's dtype fields follow; the plan names the tensors that keep their dtype."""
    name = OUT_DTYPES[state.options.dtype][1]
    state.config_updates["dtype"] = name
    if state.base.config is not None and "torch_dtype" in state.base.config:
        state.config_updates["torch_dtype"] = name
    requant = state.fp8_block is not None and not state.options.dequantize
    kept = sorted(t.name for t in state.base.tensors.values() if t.dtype not in FLOAT_DTYPES
                  and (requant or t.dtype not in FP8_DTYPES))
    if kept:
        state.warnings.append(f"--dtype {state.options.dtype}: {len(kept)} integer/fp8 tensor(s)"
                              f"{' and their block scales' if requant else ''} keep their dtype "
                              f"({', '.join(kept[:3])}{', ...' if len(kept) > 3 else ''})")
