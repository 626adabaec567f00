"""keymap: the adapter key grammar, name resolution, and its hard-coded model tables checked against the
installed transformers / peft (issue 13 item 7: when either library learns a new model type, these tests say
which table to update)."""

from __future__ import annotations

import re
from pathlib import Path

from stream_merge.keymap import (PEFT_CONVERTED_MOE, TRANSPOSED_EXPERTS, TargetResolver, is_conv1d_module,
                                 is_converted_router, parse_key)

P = "base_model.model.model.layers.0.self_attn.q_proj"


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
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    found = _transposed_model_types()
    assert "gpt_oss" in found
    # every type the installed transformers marks is in our table; a type of ours it does not mark must be one
    # it does not know (an older transformers than the one the table was written against), never a known one
    assert found <= TRANSPOSED_EXPERTS, sorted(found - TRANSPOSED_EXPERTS)
    assert not (TRANSPOSED_EXPERTS - found) & set(CONFIG_MAPPING_NAMES), sorted(TRANSPOSED_EXPERTS - found)


# moved from test_planner.py (assertions unchanged)

def test_key_grammar() -> None:
    k = parse_key(P + ".lora_A.default.weight")
    assert not isinstance(k, str) and (k.module, k.role, k.adapter_name) == (P[len("base_model.model."):], "A", "default")
    k = parse_key("model.embed_tokens.lora_embedding_B")
    assert not isinstance(k, str) and (k.module, k.role) == ("model.embed_tokens", "emb_B")
    k = parse_key("base_model.model.model.embed_tokens.base_layer.weight")
    assert not isinstance(k, str) and (k.role, k.replace_target) == ("replace", "model.embed_tokens.weight")
    k = parse_key("base_model.model.lm_head.modules_to_save.default.weight")
    assert not isinstance(k, str) and (k.role, k.replace_target, k.adapter_name) == ("replace", "lm_head.weight", "default")
    k = parse_key("base_model.model.model.layers.0.mlp.up_proj.lora_B.bias")
    assert not isinstance(k, str) and k.role == "B_bias"
    assert isinstance(parse_key("base_model.prompt_encoder.embedding.weight"), str)
    assert isinstance(parse_key("base_model.model.x.lora_A.weird.extra.weight"), str)


def test_conv1d_decision_for_square_weights() -> None:
    assert is_conv1d_module("transformer.h.0.attn.c_proj", "gpt2", False) is True
    assert is_conv1d_module("model.layers.0.self_attn.o_proj", "llama", True) is False
    assert is_conv1d_module("x.c_proj", None, True) is True


def test_layout_renames_and_ambiguity() -> None:
    names = {"model.layers.0.self_attn.q_proj.weight", "visual.blocks.0.attn.qkv.weight", "lm_head.weight"}
    r = TargetResolver(names)
    assert r.resolve("model.language_model.layers.0.self_attn.q_proj.weight")[0] == "model.layers.0.self_attn.q_proj.weight"
    assert r.resolve("model.visual.blocks.0.attn.qkv.weight")[0] == "visual.blocks.0.attn.qkv.weight"
    legacy = TargetResolver({"model.language_model.layers.0.mlp.up_proj.weight"})
    assert legacy.resolve("model.layers.0.mlp.up_proj.weight")[1] == "rename"
    amb = TargetResolver({"a.x.weight", "b.x.weight"})
    target, via, cands = amb.resolve("x.weight")
    assert target is None and via == "ambiguous" and cands == ["a.x.weight", "b.x.weight"]
    user = TargetResolver({"backbone.q.weight"}, [(r"^model\.", "backbone.")])
    assert user.resolve("model.q.weight") == ("backbone.q.weight", "key_map '^model\\\\.'", [])
