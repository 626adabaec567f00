"""compat.py: does the adapter belong to this base? Findings from what the adapter records about its training
base; model_config.config_value is the one text_config-aware lookup they use."""

from __future__ import annotations

from stream_merge.compat import compatibility_findings
from stream_merge.model_config import config_value

BASE = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 256,
        "architectures": ["LlamaForCausalLM"], "_name_or_path": "org/Llama-Tiny"}


def test_config_value_reads_top_level_then_text_config() -> None:
    vlm = {"model_type": "qwen2_5_vl", "text_config": {"vocab_size": 151936, "model_type": "qwen2_5_vl_text"}}
    assert config_value(vlm, "model_type") == "qwen2_5_vl"          # top level wins
    assert config_value(vlm, "vocab_size") == 151936                # else text_config
    assert config_value(vlm, "hidden_size") is None
    assert config_value({"text_config": "not a dict"}, "vocab_size") is None
    assert config_value(None, "vocab_size") is None and config_value({}, "x") is None


def test_a_matching_adapter_has_no_findings() -> None:
    cfg = {"base_model_name_or_path": "org/llama-tiny", "auto_mapping": {"base_model_class": "LlamaForCausalLM"}}
    assert compatibility_findings("/models/llama-tiny", BASE, "A", cfg, dict(BASE)) == []
    # the base's own _name_or_path counts as its name; case and punctuation do not matter
    assert compatibility_findings("/x/base", BASE, "A", {"base_model_name_or_path": "Llama_Tiny"}, None) == []


def test_each_difference_is_one_finding_naming_both_sides() -> None:
    cfg = {"base_model_name_or_path": "org/mistral-7b", "auto_mapping": {"base_model_class": "MistralForCausalLM"}}
    model_cfg = {**BASE, "hidden_size": 4096, "text_config": {}, "architectures": ["MistralForCausalLM"]}
    found = compatibility_findings("/models/llama-tiny", BASE, "A", cfg, model_cfg)
    assert len(found) == 4, found
    assert "trained on 'org/mistral-7b'" in found[0] and "'/models/llama-tiny'" in found[0]
    assert "MistralForCausalLM" in found[1] and "LlamaForCausalLM" in found[1]
    assert "hidden_size=4096" in found[2] and "hidden_size=64" in found[2]
    assert "architectures" in found[3]


def test_nested_text_config_fields_are_compared() -> None:
    base = {"model_type": "llava", "text_config": {"vocab_size": 32064}}
    adapter_model = {"model_type": "llava", "text_config": {"vocab_size": 32000}}
    found = compatibility_findings("b", base, "A", {}, adapter_model)
    assert found == ["adapter A's config.json has vocab_size=32000, BASE has vocab_size=32064"]
