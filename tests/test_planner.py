"""Planner: key grammar, name resolution, PEFT's pattern rules, and every problem reported at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import edit_json, make_pair, rewrite_adapter
from stream_merge.adapter import load_adapter
from stream_merge.checkpoint import read_index
from stream_merge.errors import UnsupportedAdapterError
from stream_merge.planner import PlanOptions, build_plan

P = "base_model.model.model.layers.0.self_attn.q_proj"


def _plan(base: Path, adapter: Path):
    return build_plan(read_index(base), [load_adapter(adapter)])


def test_plan_maps_every_module_and_is_json(pair: tuple[Path, Path]) -> None:
    plan = _plan(*pair)
    assert not plan.problems
    assert len(plan.mapping) == 2 * 7 and {m.kind for m in plan.mapping} == {"linear"}
    assert all(m.scale == 6.0 / 4 and m.via == "exact" for m in plan.mapping)
    assert plan.patched_tensors == 14 and plan.copied_tensors == 7
    json.dumps(plan.summary())
    assert plan.fingerprint() == _plan(*pair).fingerprint()


def test_all_problems_are_listed_at_once(pair: tuple[Path, Path]) -> None:
    base, adapter = pair

    def mutate(sd: dict) -> None:
        del sd[P + ".lora_B.weight"]                                       # missing half
        sd["base_model.model.model.layers.9.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)  # unmatched
        sd["base_model.model.model.layers.9.mlp.up_proj.lora_B.weight"] = torch.zeros(48, 4)
        k = "base_model.model.model.layers.1.mlp.down_proj"
        sd[k + ".lora_B.weight"] = torch.zeros(7, 4)                     # shape mismatch
        k = "base_model.model.model.layers.1.self_attn.o_proj"
        sd[k + ".lora_A.weight"] = torch.zeros(3, 32)                    # rank mismatch A vs B
    rewrite_adapter(adapter, mutate)
    plan = _plan(base, adapter)
    text = "\n".join(plan.problems)
    assert len(plan.problems) == 4, text
    assert "q_proj" in text and "lora_B is missing" in text
    assert "layers.9.mlp.up_proj" in text and "matched no base tensor" in text
    assert "shape mismatch" in text and "down_proj" in text
    assert "rank mismatch" in text and "o_proj" in text


def test_config_rank_must_match_weights(pair: tuple[Path, Path]) -> None:
    base, adapter = pair
    edit_json(adapter / "adapter_config.json", rank_pattern={"q_proj": 8})
    plan = _plan(base, adapter)
    assert len(plan.problems) == 2 and all("r=8" in p and "q_proj" in p for p in plan.problems)


@pytest.mark.parametrize("field,value", [
    ("peft_type", "LOHA"), ("init_lora_weights", "pissa"), ("init_lora_weights", "olora"),
    ("trainable_token_indices", [1, 2]), ("layer_replication", [[0, 2]]), ("use_qalora", True),
    ("alora_invocation_tokens", [1, 2]), ("brand_new_field", {"x": 1}), ("kasa_config", {"k": 1}),
])
def test_unsupported_fields_are_refused_by_name(pair: tuple[Path, Path], field: str, value: object) -> None:
    _, adapter = pair
    edit_json(adapter / "adapter_config.json", **{field: value})
    with pytest.raises(UnsupportedAdapterError) as exc:
        load_adapter(adapter)
    assert exc.value.key == field and field in exc.value.one_line()


def test_unknown_fields_without_a_value_are_accepted(pair: tuple[Path, Path]) -> None:
    _, adapter = pair
    edit_json(adapter / "adapter_config.json", future_option=None, other_flag=False, velora_config={"a": 1})
    assert load_adapter(adapter).settings.r == 4


def test_unselected_modules_warn_and_strict_refuses(pair: tuple[Path, Path]) -> None:
    """Weights for modules that target_modules does not select are applied with a warning (an error with
    --strict); a module that target_parameters selects (PEFT's converted MoE router `gate.weight`) is selected."""
    base, adapter = pair
    edit_json(adapter / "adapter_config.json", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    plan = _plan(base, adapter)
    assert len(plan.warnings) == 2 * 3 and all("PEFT would ignore" in w for w in plan.warnings)
    assert {w.split("'")[1].rsplit(".", 1)[-1] for w in plan.warnings} == {"gate_proj", "up_proj", "down_proj"}
    strict = build_plan(read_index(base), [load_adapter(adapter)], PlanOptions(strict=True))
    assert len(strict.problems) == 6 and not strict.warnings
    for targets in (["gate_proj.weight", "up_proj.weight", "down_proj.weight"], ["mlp.gate_proj.weight",
                    "layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight", "mlp.down_proj.weight"]):
        edit_json(adapter / "adapter_config.json", target_parameters=targets)
        strict = build_plan(read_index(base), [load_adapter(adapter)], PlanOptions(strict=True))
        assert not strict.problems and not strict.warnings, strict.problems
        assert len(strict.mapping) == 14
    edit_json(adapter / "adapter_config.json", target_parameters=["gate_proj.bias", "up_proj.weight"])
    plan = _plan(base, adapter)
    assert {w.split("'")[1].rsplit(".", 1)[-1] for w in plan.warnings} == {"gate_proj", "down_proj"}


def test_tied_embeddings_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    base, adapter = make_pair(tmp_path)
    index_file = base / "model.safetensors.index.json"
    idx = json.loads(index_file.read_text())
    head_shard = base / idx["weight_map"].pop("lm_head.weight")
    sd = {k: v for k, v in load_file(str(head_shard)).items() if k != "lm_head.weight"}
    if sd:
        save_file(sd, str(head_shard), metadata={"format": "pt"})
    else:
        head_shard.unlink()
    index_file.write_text(json.dumps(idx))
    edit_json(base / "config.json", tie_word_embeddings=True)

    def add_head(sd: dict) -> None:
        sd["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 32)
        sd["base_model.model.lm_head.lora_B.weight"] = torch.zeros(64, 4)
    rewrite_adapter(adapter, add_head)
    plan = _plan(base, adapter)
    assert len(plan.problems) == 1 and "tie_word_embeddings" in plan.problems[0]


def test_api_plan_stays_callable_after_the_planner_is_imported(pair: tuple[Path, Path]) -> None:
    """`stream_merge.plan` is a function; a submodule of the same name used to replace it on first import."""
    import stream_merge

    base, adapter = pair
    first = stream_merge.plan(str(base), str(adapter))
    import stream_merge.planner  # noqa: F401

    assert stream_merge.plan(str(base), str(adapter)).fingerprint() == first.fingerprint()
