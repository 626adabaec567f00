"""PEFT parity for the "names" cases: GPT-OSS experts stored (E, in, out), checkpoints whose tensor names
transformers v5 renames on load (ViT), and MoE routers PEFT moves into target_parameters.

Each case builds a tiny seeded model, a PEFT-saved adapter with every adapter parameter randomised, and PEFT's
own ``merge_and_unload`` (then ``save_pretrained``) as the expected output; the merged folder is compared
tensor by tensor (bitwise) and by logits after loading it with transformers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from oracle import assert_bitwise_equal, changed_tensors, load_folder_tensors, logits, merge_twice, peft_merged_pretrained
from oracle_names import (BF16, FAMILY_DISK_NAMES, adapter_tensors, gpt_oss_base, matching, peft_adapter,
                          transposed_expert_delta, vit_base, vit_logits)


def _merge(base: Path, adapter: Path, out: Path, **kwargs):  # type: ignore[no-untyped-def]
    from stream_merge import merge

    return merge(str(base), str(adapter), str(out), device="cpu", **kwargs)


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gpt_oss_base(tmp_path_factory.mktemp("gpt_oss") / "base")


GPT_OSS_EXPERTS = r"model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)"
GPT_OSS_ATTN = r"model\.layers\.\d+\.self_attn\.(q|v)_proj\.weight"


def test_gpt_oss_transposed_experts(gpt_oss: Path, tmp_path: Path) -> None:
    """GPT-OSS experts ``gate_up_proj (E, H, 2I)`` and ``down_proj (E, I, H)`` are (E, in, out):
    transformers marks them ``is_transposed`` and PEFT's ParamWrapper merges
    ``einsum("ore,eri->eio", B, A) * s`` with double rounding (PEFT_SEMANTICS §5). down_proj is square here,
    so only the model type tells the layout. Bitwise against PEFT, and by logits (row blocks inside an expert:
    test_transposed_delta_rows_match_peft_for_any_block)."""
    adapter = peft_adapter(AutoModelForCausalLM, gpt_oss, tmp_path / "adapter", r=4, lora_alpha=6,
                           task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"],
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    ad = adapter_tensors(adapter)
    assert ad["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape == (16, 64)
    assert ad["base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"].shape == (128, 16)
    oracle_dir = tmp_path / "oracle"
    expected = peft_merged_pretrained(AutoModelForCausalLM, gpt_oss, adapter, BF16, save_to=oracle_dir)
    w = load_folder_tensors(gpt_oss)
    assert changed_tensors(expected, w) == matching(w, GPT_OSS_EXPERTS, GPT_OSS_ATTN)
    for key, pname in (("base_layer.", "gate_up_proj"), ("", "down_proj")):  # guard the oracle: §5, transposed
        a = ad[f"base_model.model.model.layers.1.mlp.experts.{key}lora_A.weight"]
        b = ad[f"base_model.model.model.layers.1.mlp.experts.{key}lora_B.weight"]
        k = f"model.layers.1.mlp.experts.{pname}"
        assert torch.equal(expected[k], merge_twice(w[k], transposed_expert_delta(a, b, 1.5, 4))), k

    out = tmp_path / "out"
    report = _merge(gpt_oss, adapter, out, strict=True)
    assert not report.plan.warnings
    vias = {m.via for m in report.plan.mapping if m.kind == "param"}
    assert vias == {"fused, transposed"}, vias
    assert_bitwise_equal(load_folder_tensors(out), expected)
    assert json.loads((out / "config.json").read_text()) == json.loads((gpt_oss / "config.json").read_text())
    ids = _ids(256)
    assert torch.equal(logits(out, ids), logits(oracle_dir, ids))


def test_transposed_delta_rows_match_peft_for_any_block(gpt_oss: Path) -> None:
    """Row blocks of the (E·in, out) view, whole experts or 64-aligned rows inside one expert, give the bits
    of PEFT's einsum."""
    from stream_merge.lora import expert_blocks, param_delta_flat_rows

    gen = torch.Generator().manual_seed(5)
    for experts, r, n_in, n_out in ((4, 4, 64, 128), (3, 8, 2880 // 8, 96), (2, 16, 256, 256)):
        a = torch.randn(r * experts, n_in, generator=gen)
        b = torch.randn(n_out, r * experts, generator=gen)
        want = transposed_expert_delta(a, b, 0.75, experts).reshape(experts * n_in, n_out)
        for block in (n_in * experts, n_in, 64, 128):
            got = torch.cat([param_delta_flat_rows(a, b, 0.75, experts, n_in, r0, r1, transposed=True)
                             for r0, r1 in expert_blocks(experts, n_in, block)])
            assert torch.equal(got, want), (experts, r, n_in, n_out, block)


# ---------------------------------------------------------------------------------------------------------
# checkpoint names that transformers v5 renames on load (issue 12 item 7)
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return vit_base(tmp_path_factory.mktemp("vit") / "base")


@pytest.fixture(scope="module")
def vit_adapter(vit: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import ViTForImageClassification

    return peft_adapter(ViTForImageClassification, vit, tmp_path_factory.mktemp("vit") / "adapter", r=4,
                        lora_alpha=6, target_modules=["q_proj", "v_proj", "o_proj", "fc1"],
                        modules_to_save=["classifier"])


VIT_TOUCHED = (r"vit\.encoder\.layer\.\d+\.attention\.attention\.(query|value)\.weight",
               r"vit\.encoder\.layer\.\d+\.(attention\.output|intermediate)\.dense\.weight", r"classifier\.(weight|bias)")


def test_vit_renamed_on_load(vit: Path, vit_adapter: Path, tmp_path: Path) -> None:
    """A ViT classifier: the adapter names `vit.layers.N.attention.q_proj` / `mlp.fc1` (in memory), the
    checkpoint `vit.encoder.layer.N.attention.attention.query` / `intermediate.dense`; modules_to_save
    replaces the classifier. Resolved through transformers' own load renames, no key_map; bitwise against
    PEFT tensor by tensor, and by logits."""
    from transformers import ViTForImageClassification

    ad = adapter_tensors(vit_adapter)
    assert "base_model.model.vit.layers.0.attention.q_proj.lora_A.weight" in ad
    assert "base_model.model.vit.layers.1.attention.o_proj.lora_B.weight" in ad
    oracle_dir = tmp_path / "oracle"
    expected = peft_merged_pretrained(ViTForImageClassification, vit, vit_adapter, BF16, save_to=oracle_dir)
    w = load_folder_tensors(vit)
    assert changed_tensors(expected, w) == matching(w, *VIT_TOUCHED)

    out = tmp_path / "out"
    report = _merge(vit, vit_adapter, out, strict=True)
    assert not report.plan.warnings
    assert {m.via for m in report.plan.mapping} == {"rename (transformers)"}
    assert len(report.plan.mapping) == 2 * 4
    assert_bitwise_equal(load_folder_tensors(out), expected)
    assert torch.equal(vit_logits(out), vit_logits(oracle_dir))
    assert not torch.equal(vit_logits(out), vit_logits(vit))


def test_vit_renamed_without_transformers(vit: Path, vit_adapter: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without transformers the built-in table resolves the same names to the same tensors."""
    from stream_merge.adapter import load_adapter
    from stream_merge.checkpoint import read_index
    from stream_merge.planner import build_plan

    with_tf = build_plan(read_index(vit), [load_adapter(vit_adapter)])
    for mod in ("transformers", "transformers.conversion_mapping", "transformers.core_model_loading"):
        monkeypatch.setitem(sys.modules, mod, None)  # `import transformers` raises ImportError
    without = build_plan(read_index(vit), [load_adapter(vit_adapter)])
    assert not with_tf.problems and not without.problems
    assert {m.via for m in without.mapping} == {"rename (built-in table)"}
    assert [(m.module, m.target) for m in without.mapping] == [(m.module, m.target) for m in with_tf.mapping]
    assert without.fingerprint() == with_tf.fingerprint()


def test_unrenamed_models_do_not_need_transformers(monkeypatch: pytest.MonkeyPatch,
                                                   pair: tuple[Path, Path]) -> None:
    """Load renames are looked up only for names nothing else resolves: a plain Llama plan never asks."""
    from stream_merge import load_renames as lr
    from stream_merge.adapter import load_adapter
    from stream_merge.checkpoint import read_index
    from stream_merge.planner import build_plan

    calls: list[object] = []
    monkeypatch.setattr(lr, "transformers_renames", lambda config: calls.append(config))
    base, adapter = pair
    assert not build_plan(read_index(base), [load_adapter(adapter)]).problems
    assert calls == []


@pytest.mark.parametrize("family", list(FAMILY_DISK_NAMES), ids=[f[0] for f in FAMILY_DISK_NAMES])
def test_builtin_table_agrees_with_transformers(family: tuple[str, str]) -> None:
    from stream_merge.load_renames import BUILTIN_RULES, table_renames, transformers_renames

    model_type, arch = family
    theirs = transformers_renames({"model_type": model_type, "architectures": [arch]})
    assert theirs is not None
    ours = table_renames(BUILTIN_RULES[model_type])
    names = FAMILY_DISK_NAMES[family]
    assert [ours(n) for n in names] == [theirs(n) for n in names]
    assert sum(ours(n) != n for n in names) >= 3


def test_plan_shows_via_rename(vit: Path, vit_adapter: Path) -> None:
    from conftest import run_cli

    proc = run_cli("plan", vit, vit_adapter)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("vit.layers.0.attention.q_proj "))
    assert "vit.encoder.layer.0.attention.attention.query.weight" in line and line.endswith("rename (transformers)")
