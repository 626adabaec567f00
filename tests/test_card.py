"""The output's model card (stream_merge/card.py), read back with huggingface_hub's own ModelCard parser."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from conftest import edit_json, make_pair, run_cli
from stream_merge.card import base_hub_id, command_line, model_card, split_card
from stream_merge.config import build_config
from stream_merge.errors import InputError
from stream_merge.runner import plan_merge

BASE_CARD = """---
license: other
license_name: llama3
license_link: https://llama.meta.com/llama3/license
language: [en, de]
extra_gated_prompt: Accept the licence
extra_gated_fields:
  Country: country
pipeline_tag: text-generation
---
# Llama-ish

The base model's own words.
"""


@pytest.fixture
def planned(tmp_path: Path):
    base, adapter = make_pair(tmp_path)
    plan = plan_merge(build_config(base=str(base), adapters=[str(adapter)]))[0]
    return base, adapter, plan


def test_card_of_a_hub_base_carries_its_licence_gating_and_text(planned) -> None:
    base, adapter, plan = planned
    (base / "README.md").write_text(BASE_CARD)
    inputs = {"base": {"spec": "org/base@main", "revision": "a" * 40},
              "adapters": [{"spec": "org/lora", "revision": "b" * 40}]}
    card = ModelCard(model_card(plan, "org/base@main", ["org/lora"], base_dir=base, inputs=inputs,
                                argv=["stream-merge", "merge", "org/base@main", "org/lora", "-o", "out", "--token",
                                      "hf_secret"]).decode())
    data = card.data.to_dict()
    assert data["base_model"] == "org/base" and data["base_model_relation"] == "finetune"
    assert (data["license"], data["license_name"], data["license_link"]) == (
        "other", "llama3", "https://llama.meta.com/llama3/license")
    assert data["language"] == ["en", "de"] and data["extra_gated_prompt"] == "Accept the licence"
    assert data["extra_gated_fields"] == {"Country": "country"} and "pipeline_tag" not in data
    assert data["tags"] == ["merge", "lora", "stream-merge"] and data["library_name"] == "transformers"
    text = card.text
    assert f"https://huggingface.co/org/lora) at revision `{'b' * 40}`" in text
    assert f"[`org/base`](https://huggingface.co/org/base) at revision `{'a' * 40}`" in text
    assert "stream-merge merge org/base@main org/lora -o out --token ***" in text and "hf_secret" not in text
    assert text.index("Merged model") < text.index("The base model's own words.")


def test_a_local_base_is_named_by_the_adapters_base_model_name(planned, tmp_path: Path) -> None:
    base, adapter, plan = planned
    assert base_hub_id({"base": {"spec": str(base)}}, plan) == (None, None)  # the adapter names a local folder
    raw = model_card(plan, str(base), [str(adapter)], base_dir=base).decode()
    assert "base_model" not in ModelCard(raw).data.to_dict() and "# base_model: unknown, BASE was the local folder" in raw
    assert "(stream_merge called from Python)" in raw
    edit_json(adapter / "adapter_config.json", base_model_name_or_path="meta-llama/Llama-3.1-8B")
    plan = plan_merge(build_config(base=str(base), adapters=[str(adapter)]))[0]
    data = ModelCard(model_card(plan, str(base), [str(adapter)], base_dir=base,
                                inputs={"base": {"spec": str(base)}, "adapters": [{"spec": str(adapter)}]}).decode())
    assert data.data.to_dict()["base_model"] == "meta-llama/Llama-3.1-8B"
    assert "a local copy of [`meta-llama/Llama-3.1-8B`]" in data.text and "license" not in data.data.to_dict()


def test_a_card_linked_out_of_the_base_is_refused(planned, tmp_path: Path) -> None:
    base, adapter, plan = planned
    secret = tmp_path / "secret.md"
    secret.write_text("private notes")
    (base / "README.md").symlink_to(secret)
    with pytest.raises(InputError, match="README.md is a symbolic link to a file outside"):
        model_card(plan, str(base), [str(adapter)], base_dir=base)


def test_split_card_and_command_line_edge_cases() -> None:
    assert split_card("no front matter") == ({}, "no front matter")
    assert split_card("---\n: bad: [\n---\nbody") == ({}, "body")
    assert split_card("---\n- a list\n---\nbody") == ({}, "body")
    assert command_line(["python"]) == "(stream_merge called from Python)"
    assert command_line(["stream-merge", "merge", "a b", "--token=x"]) == "stream-merge merge 'a b' --token=***"


def test_merge_writes_the_card_into_out(tmp_path: Path) -> None:
    base, adapter = make_pair(tmp_path)
    (base / "README.md").write_text(BASE_CARD)
    edit_json(adapter / "adapter_config.json", base_model_name_or_path="org/base")
    out = tmp_path / "out"
    r = run_cli("merge", base, adapter, "-o", out, "--quiet")
    assert r.returncode == 0, r.stderr
    card = ModelCard((out / "README.md").read_text())
    assert card.data.to_dict()["base_model"] == "org/base" and card.data.to_dict()["license_name"] == "llama3"
    assert f"stream-merge merge {base} {adapter} -o {out} --quiet" in card.text
