"""keymap's hard-coded model tables, checked against the installed transformers / peft (issue 13 item 7):
when either library learns a new model type, these tests say which table to update."""

from __future__ import annotations

import re
from pathlib import Path

from stream_merge.keymap import PEFT_CONVERTED_MOE, TRANSPOSED_EXPERTS, is_converted_router


def test_converted_moe_types_are_the_ones_peft_converts() -> None:
    """PEFT 0.21 converts an adapter at load time for every model type that transformers'
    _MODEL_TO_CONVERSION_PATTERN (plus peft's own mixtral entry) maps to a base type with fused expert targets
    and a router `gate` target; PEFT then merges that router as a raw parameter (double rounding)."""
    from peft.utils import transformers_weight_conversion as conv

    converted = {model_type for model_type, base in conv._MODEL_TO_CONVERSION_PATTERN.items()
                 if "gate" in conv._MOE_TARGET_MODULE_MAPPING.get(base, {}) and conv._MOE_FUSED_TARGETS.get(base)}
    assert "mixtral" in converted and "qwen3_moe" in converted
    assert PEFT_CONVERTED_MOE == converted, (sorted(converted - PEFT_CONVERTED_MOE),
                                             sorted(PEFT_CONVERTED_MOE - converted))


def test_router_detection() -> None:
    assert is_converted_router("model.layers.0.mlp.gate", "qwen3_moe")
    assert is_converted_router("model.layers.0.block_sparse_moe.gate", "mixtral")
    assert not is_converted_router("model.layers.0.mlp.gate", "llama")
    assert not is_converted_router("model.layers.0.mlp.gate_proj", "qwen3_moe")
    assert not is_converted_router("model.layers.0.mlp.router", "gpt_oss")


def _transposed_model_types() -> set[str]:
    """model_type of every transformers model whose experts are declared `is_transposed=True`, read from the
    modeling sources (the decorator argument) and the configuration classes of the same model folder."""
    import transformers

    root = Path(transformers.__file__).parent / "models"
    found: set[str] = set()
    for modeling in root.glob("*/modeling_*.py"):
        if not re.search(r"use_experts_implementation\([^)]*is_transposed=True", modeling.read_text()):
            continue
        for config in modeling.parent.glob("configuration_*.py"):
            found |= set(re.findall(r'^\s+model_type = "([^"]+)"', config.read_text(), re.M))
    return found


def test_transposed_expert_types_are_the_ones_transformers_marks() -> None:
    found = _transposed_model_types()
    assert "gpt_oss" in found
    assert found == TRANSPOSED_EXPERTS, (sorted(found - TRANSPOSED_EXPERTS), sorted(TRANSPOSED_EXPERTS - found))
