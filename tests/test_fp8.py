"""fp8 block-scaled bases (DeepSeek-V3 layout): re-quantize patched weights, or --dequantize everything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import stream_merge
from conftest import folder_tensors, run_cli
from stream_merge.errors import PlanError
from stream_merge.quant import FP8_MAX, dequantize, quantize

BLOCK = (128, 128)
P = "model.layers.0."
SHAPES = {P + "self_attn.q_proj.weight": (256, 384), P + "self_attn.o_proj.weight": (384, 256),
          P + "mlp.down_proj.weight": (384, 300)}  # 300: a partial last scale block


def _fp8_base(root: Path, quant: dict | None = None) -> Path:
    g = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    for i, (name, shape) in enumerate(SHAPES.items()):
        w = torch.randn(shape, generator=g) * 0.05
        q, s = quantize(w, BLOCK)
        shards[i % 2][name] = q
        shards[i % 2][name + "_scale_inv"] = s
    shards[0]["model.embed_tokens.weight"] = torch.randn(64, 384, generator=g).to(torch.bfloat16)
    shards[1][P + "input_layernorm.weight"] = torch.ones(384, dtype=torch.bfloat16)
    root.mkdir(parents=True)
    wmap = {}
    for i, sd in enumerate(shards):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file(sd, str(root / name), metadata={"format": "pt"})
        wmap.update({k: name for k in sd})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    qc = quant or {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                   "weight_block_size": list(BLOCK)}
    (root / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "vocab_size": 64, "hidden_size": 384,
                                                  "quantization_config": qc, "tie_word_embeddings": False}))
    return root


def _adapter(root: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    sd = {}
    for mod in ("self_attn.q_proj", "self_attn.o_proj"):
        out, inp = SHAPES[P + mod + ".weight"]
        sd[f"base_model.model.{P}{mod}.lora_A.weight"] = torch.randn(8, inp, generator=g) * 0.1
        sd[f"base_model.model.{P}{mod}.lora_B.weight"] = torch.randn(out, 8, generator=g) * 0.1
    root.mkdir(parents=True)
    save_file(sd, str(root / "adapter_model.safetensors"), metadata={"format": "pt"})
    (root / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 12,
                                                          "target_modules": ["q_proj", "o_proj"]}))
    return root, sd


def _target(base: Path, adapter_sd: dict, name: str) -> torch.Tensor:
    t = folder_tensors(base)
    w = dequantize(t[name], t[name + "_scale_inv"], BLOCK)
    mod = "base_model.model." + name[: -len(".weight")]
    if mod + ".lora_A.weight" in adapter_sd:
        w = w + (adapter_sd[mod + ".lora_B.weight"] @ adapter_sd[mod + ".lora_A.weight"]) * (12 / 8)
    return w


def _raw(folder: Path, name: str) -> bytes:
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            if name in st.keys():
                return bytes(st.get_tensor(name).contiguous().view(torch.uint8).reshape(-1).tolist())
    raise KeyError(name)


def test_dequantize_writes_bf16_and_drops_scales(tmp_path: Path) -> None:
    base = _fp8_base(tmp_path / "base")
    adapter, sd = _adapter(tmp_path / "adapter")
    stream_merge.merge(base, adapter, tmp_path / "out", dequantize=True)
    out = folder_tensors(tmp_path / "out")
    for name in SHAPES:
        assert out[name].dtype == torch.bfloat16
        assert torch.equal(out[name], _target(base, sd, name).to(torch.bfloat16)), name
    assert not [n for n in out if n.endswith("_scale_inv")]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "deepseek_v3"
    assert torch.equal(out["model.embed_tokens.weight"], folder_tensors(base)["model.embed_tokens.weight"])


def test_requantize_is_within_one_fp8_step_and_keeps_the_rest(tmp_path: Path) -> None:
    base = _fp8_base(tmp_path / "base")
    adapter, sd = _adapter(tmp_path / "adapter")
    r = run_cli("merge", base, adapter, "-o", tmp_path / "out", "--quiet")
    assert r.returncode == 0, r.stderr
    out, src = folder_tensors(tmp_path / "out"), folder_tensors(base)
    for name in (P + "self_attn.q_proj.weight", P + "self_attn.o_proj.weight"):
        q, s = out[name], out[name + "_scale_inv"]
        assert q.dtype == torch.float8_e4m3fn and s.shape == src[name + "_scale_inv"].shape
        target = _target(base, sd, name)
        _, want_scales = quantize(target, BLOCK)
        assert torch.equal(s, want_scales)  # amax / 448 per block
        v = target / s.repeat_interleave(128, 0)[: q.shape[0]].repeat_interleave(128, 1)[:, : q.shape[1]]
        assert float(v.abs().max()) <= FP8_MAX * (1 + 1e-6)
        step = torch.exp2(torch.floor(torch.log2(v.abs().clamp(min=2.0**-6))) - 3)  # e4m3: 3 mantissa bits
        assert bool(((q.float() - v).abs() <= step).all()), name
        assert not torch.equal(q.view(torch.uint8), src[name].view(torch.uint8))
    for name in (P + "mlp.down_proj.weight", P + "mlp.down_proj.weight_scale_inv", "model.embed_tokens.weight"):
        assert _raw(tmp_path / "out", name) == _raw(base, name)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    assert run_cli("verify", tmp_path / "out", "--full").returncode == 0


@pytest.mark.parametrize("quant,word", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
    ({"quant_method": "gptq", "bits": 4}, "gptq"),
    ({"quant_method": "awq", "bits": 4}, "awq"),
    ({"quant_method": "compressed-tensors"}, "compressed-tensors"),
    ({"quant_method": "mxfp4"}, "mxfp4"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "weight_block_size"),
])
def test_other_quantized_bases_are_refused(tmp_path: Path, quant: dict, word: str) -> None:
    base = _fp8_base(tmp_path / "base", quant)
    adapter, _ = _adapter(tmp_path / "adapter")
    with pytest.raises(PlanError) as exc:
        stream_merge.merge(base, adapter, tmp_path / "out")
    assert word in str(exc.value) and "16-bit" in str(exc.value)
    assert not (tmp_path / "out").exists()
