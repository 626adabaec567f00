"""PEFT parity for the "names" cases: GPT-OSS experts stored (E, in, out), checkpoints whose tensor names
transformers v5 renames on load (ViT), and MoE routers PEFT moves into target_parameters.

Each case builds a tiny seeded model, a PEFT-saved adapter with every adapter parameter randomised, and PEFT's
own ``merge_and_unload`` (then ``save_pretrained``) as the expected output; the merged folder is compared
tensor by tensor (bitwise) and by logits after loading it with transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from oracle import assert_bitwise_equal, changed_tensors, load_folder_tensors, logits, merge_twice, peft_merged_pretrained
from oracle_names import (BF16, adapter_tensors, gpt_oss_base, matching, peft_adapter, transposed_expert_delta)


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
