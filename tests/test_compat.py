"""compat.py / trained_on.py: was the adapter trained on this base? Model configs are compared (architecture,
sizes), never folder or repo names; the adapter's side is its own config.json, else its
base_model_name_or_path as a local folder or HF cache entry, else the hidden size of its LoRA shapes. The
warning is one line per adapter, printed once. model_config.config_value is the text_config-aware lookup."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import TINY, edit_json, make_pair, run_cli

from stream_merge.compat import (TrainedOn, adapter_hidden_size, base_hidden_size, compatibility_findings,
                                 config_differences)
from stream_merge.model_config import config_value
from stream_merge.records import AdapterSpec, AdapterTensor, BaseIndex, LoraSettings
from stream_merge.trained_on import find_trained_on

BASE = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 256,
        "num_attention_heads": 4, "architectures": ["LlamaForCausalLM"], "_name_or_path": "org/Llama-Tiny"}


def _base(config: dict | None = None) -> BaseIndex:
    return BaseIndex(root="/models/llama", shards=(), weight_map={}, single_file=True, config=config)


def _spec(hidden: int = 64, raw: dict | None = None) -> AdapterSpec:
    keys = [f"base_model.model.model.layers.{i}.self_attn.{p}.lora_{ab}.weight" for i in range(2)
            for p in ("q_proj", "v_proj") for ab in "AB"]
    tensors = tuple(AdapterTensor(k, "F32", (4, hidden) if "lora_A" in k else (hidden, 4)) for k in keys)
    return AdapterSpec(path="/adapters/a", config_file="adapter_config.json", weights_file="adapter_model.safetensors",
                       settings=LoraSettings(r=4, lora_alpha=8.0), tensors=tensors, raw_config=raw or {}, label="A")


def test_config_value_reads_top_level_then_text_config() -> None:
    vlm = {"model_type": "qwen2_5_vl", "text_config": {"vocab_size": 151936, "model_type": "qwen2_5_vl_text"}}
    assert config_value(vlm, "model_type") == "qwen2_5_vl"          # top level wins
    assert config_value(vlm, "vocab_size") == 151936                # else text_config
    assert config_value(vlm, "hidden_size") is None
    assert config_value({"text_config": "not a dict"}, "vocab_size") is None
    assert config_value(None, "vocab_size") is None and config_value({}, "x") is None


def test_same_config_under_another_name_has_no_findings() -> None:
    raw = {"base_model_name_or_path": "someone/completely-different-name",
           "auto_mapping": {"base_model_class": "LlamaForCausalLM"}}
    same = {**BASE, "_name_or_path": "/elsewhere/copy"}
    assert compatibility_findings(_base(BASE), _spec(raw=raw), TrainedOn(same, "x/config.json")) == []
    # no config found: the shapes agree with BASE's hidden size, so nothing either (the name is not compared)
    assert compatibility_findings(_base(BASE), _spec(raw=raw), TrainedOn()) == []


def test_all_differences_are_one_finding_naming_both_sides_and_the_source() -> None:
    raw = {"auto_mapping": {"base_model_class": "MistralForCausalLM"}}
    other = {**BASE, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
             "architectures": ["MistralForCausalLM"], "text_config": {}}
    found = compatibility_findings(_base(BASE), _spec(raw=raw), TrainedOn(other, "/cache/config.json"))
    assert len(found) == 1, found
    line = found[0]
    for text in ("adapter A was trained on another model than BASE", "architecture MistralForCausalLM (BASE "
                 "LlamaForCausalLM)", "hidden_size 4096 (BASE 64)", "num_hidden_layers 32 (BASE 2)",
                 "num_attention_heads 32 (BASE 4)", "/cache/config.json"):
        assert text in line, line


def test_auto_mapping_alone_names_the_architecture() -> None:
    raw = {"auto_mapping": {"base_model_class": "GPT2LMHeadModel"}}
    found = compatibility_findings(_base(BASE), _spec(raw=raw), TrainedOn())
    assert len(found) == 1 and "architecture GPT2LMHeadModel (BASE LlamaForCausalLM)" in found[0]
    raw = {"auto_mapping": {"base_model_class": "LlamaForCausalLM"}}
    assert compatibility_findings(_base(BASE), _spec(raw=raw), TrainedOn()) == []


def test_nested_text_config_fields_are_compared_and_a_planned_resize_is_not_a_difference() -> None:
    base = {"model_type": "llava", "text_config": {"vocab_size": 32064}}
    adapter_model = {"model_type": "llava", "text_config": {"vocab_size": 32000}}
    assert config_differences(adapter_model, base, {}) == ["vocab_size 32000 (BASE 32064)"]
    # the adapter's own config.json after a resize the plan carries out (config_updates["vocab_size"])
    assert config_differences({**BASE, "vocab_size": 300}, BASE, {}, resized_vocab=300) == []
    assert config_differences({**BASE, "vocab_size": 300}, BASE, {}, resized_vocab=None) == [
        "vocab_size 300 (BASE 256)"]


def test_without_a_config_the_hidden_size_comes_from_the_lora_shapes() -> None:
    assert adapter_hidden_size(_spec(hidden=32)) == 32
    assert base_hidden_size(_base(BASE)) == 64
    found = compatibility_findings(_base(BASE), _spec(hidden=32), TrainedOn())
    assert found == ["adapter A was trained on another model than BASE: hidden size 32 from its LoRA shapes "
                     "(BASE 64)"]
    # a config without hidden_size still gets the shape check
    found = compatibility_findings(_base(BASE), _spec(hidden=32), TrainedOn({"model_type": "llama"}, "c"))
    assert len(found) == 1 and "hidden size 32 from its LoRA shapes" in found[0]


def test_find_trained_on_prefers_the_adapter_folder_then_a_local_folder(tmp_path: Path) -> None:
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "config.json").write_text(json.dumps({**BASE, "hidden_size": 8}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    assert find_trained_on(adapter, {"base_model_name_or_path": str(trained)}).config["hidden_size"] == 8
    assert find_trained_on(adapter, {"base_model_name_or_path": str(tmp_path / "gone")}) == TrainedOn()
    assert find_trained_on(adapter, {}) == TrainedOn() and find_trained_on(adapter, {"base_model_name_or_path": 3}) \
        == TrainedOn()
    (adapter / "config.json").write_text(json.dumps({**BASE, "hidden_size": 16}))
    got = find_trained_on(adapter, {"base_model_name_or_path": str(trained)})
    assert got.config["hidden_size"] == 16 and got.source == str(adapter / "config.json")
    # an unreadable config found by name is no finding (it only feeds a warning)
    (adapter / "config.json").unlink()
    (trained / "config.json").write_text("[1]")
    assert find_trained_on(adapter, {"base_model_name_or_path": str(trained)}) == TrainedOn()


def test_find_trained_on_reads_the_hf_cache_without_network(tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--llama-tiny"
    for sha, hidden in (("a" * 40, 1), ("b" * 40, 2)):
        (repo / "snapshots" / sha).mkdir(parents=True)
        (repo / "snapshots" / sha / "config.json").write_text(json.dumps({**BASE, "hidden_size": hidden}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    got = find_trained_on(adapter, {"base_model_name_or_path": "org/llama-tiny"})
    assert got.config["hidden_size"] == 1 and "a" * 40 in got.source  # main's snapshot
    (repo / "refs" / "main").unlink()
    assert find_trained_on(adapter, {"base_model_name_or_path": "org/llama-tiny"}).config is not None
    assert find_trained_on(adapter, {"base_model_name_or_path": "org/not-cached"}) == TrainedOn()


def test_a_renamed_local_copy_gives_no_warning(tmp_path: Path) -> None:
    base, adapter = make_pair(tmp_path)
    copy = tmp_path / "my-renamed-copy"
    shutil.copytree(base, copy)
    for trained_on in (str(base), "meta-llama/Some-Other-Name", str(tmp_path / "deleted-original")):
        edit_json(adapter / "adapter_config.json", base_model_name_or_path=trained_on)
        r = run_cli("plan", copy, adapter)
        assert r.returncode == 0, r.stderr
        assert "warning" not in (r.stdout + r.stderr).lower(), (trained_on, r.stdout[-800:], r.stderr)


def test_the_warning_is_printed_once(tmp_path: Path) -> None:
    base, adapter = make_pair(tmp_path)
    other = json.loads((base / "config.json").read_text())
    (adapter / "config.json").write_text(json.dumps({**other, "num_hidden_layers": TINY.layers + 5}))
    r = run_cli("plan", base, adapter)
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr.lower(), r.stderr  # shown in the plan, not logged beside it
    assert r.stdout.count("was trained on another model") == 1 and "num_hidden_layers 7 (BASE 2)" in r.stdout
    assert r.stdout.splitlines()[-1].endswith("1 warning above")
    r = run_cli("merge", base, adapter, "-o", tmp_path / "out", "--quiet", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("was trained on another model") == 1, r.stderr   # once as it happens
    assert r.stdout.count("was trained on another model") == 1, r.stdout   # once in the summary's list
