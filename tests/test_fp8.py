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


def _fp8_base(root: Path, quant: dict | None = None, apart: bool = False) -> Path:
    """Two shards of fp8 weights with their block scales (`apart`: each scale in the other shard than its
    weight, as DeepSeek-V3's checkpoints have some), a bf16 embedding and a norm."""
    g = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    for i, (name, shape) in enumerate(SHAPES.items()):
        w = torch.randn(shape, generator=g) * 0.05
        q, s = quantize(w, BLOCK)
        shards[i % 2][name] = q
        shards[(i + apart) % 2][name + "_scale_inv"] = s
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


def _weight_map(folder: Path) -> dict[str, str]:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]


@pytest.mark.parametrize("dequant", [False, True], ids=["requant", "dequant"])
def test_scales_in_another_shard_merge_as_if_together(tmp_path: Path, dequant: bool) -> None:
    """Issue 12 item 5: an fp8 weight whose weight_scale_inv lives in another shard merges to the same
    tensors as when they share a shard (both modes, small blocks), in the base's own layout."""
    together, apart = _fp8_base(tmp_path / "together"), _fp8_base(tmp_path / "apart", apart=True)
    wmap = _weight_map(apart)
    assert all(wmap[n] != wmap[n + "_scale_inv"] for n in SHAPES)
    adapter, _ = _adapter(tmp_path / "adapter")
    flags = ["--dequantize"] if dequant else []
    for base in (together, apart):
        r = run_cli("plan", base, adapter, *flags)
        assert r.returncode == 0 and "same shard" not in r.stdout + r.stderr, r.stdout + r.stderr
        r = run_cli("merge", base, adapter, "-o", tmp_path / f"out-{base.name}", "--quiet", "--block-size-mb", "1",
                    *flags)
        assert r.returncode == 0, r.stderr
    want, got = folder_tensors(tmp_path / "out-together"), folder_tensors(tmp_path / "out-apart")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name].view(torch.uint8), want[name].view(torch.uint8)), name
    out_map = _weight_map(tmp_path / "out-apart")
    assert out_map == {k: v for k, v in wmap.items() if k in out_map}
    assert run_cli("verify", tmp_path / "out-apart", "--full").returncode == 0


def test_scales_in_another_shard_with_workers(tmp_path: Path) -> None:
    """--worker I/N: each worker reads the partner rows of the other worker's shard; finalize completes."""
    base = _fp8_base(tmp_path / "base", apart=True)
    adapter, _ = _adapter(tmp_path / "adapter")
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert run_cli("merge", base, adapter, "-o", ref, "--quiet").returncode == 0
    for i in range(2):
        r = run_cli("merge", base, adapter, "-o", out, "--worker", f"{i}/2", "--quiet")
        assert r.returncode == 0, r.stderr
    if not (out / "model.safetensors.index.json").exists():
        assert run_cli("finalize", out).returncode == 0
    for f in ref.glob("*.safetensors"):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_partner_rows_are_read_block_by_block(tmp_path: Path) -> None:
    """Only the partner's rows of each block are read from the other shard, never the whole shard."""
    from stream_merge.records import TensorInfo
    from stream_merge.safetensors_io import read_header_file
    from stream_merge.shard_rows import OtherShards, read_local_range

    base = _fp8_base(tmp_path / "base", apart=True)
    reads: list[tuple[str, int, int]] = []
    local = read_local_range(base)

    def spy(file: str, start: int, end: int) -> bytes:
        reads.append((file, start, end))
        return local(file, start, end)

    name = P + "self_attn.q_proj.weight"
    file = _weight_map(base)[name]
    header = read_header_file(base / file, file)
    others = OtherShards(spy, {file: header})
    info = header.by_name[name]
    rows = others.rows(file, info, 128, 256)
    assert torch.equal(rows.view(torch.uint8), folder_tensors(base)[name][128:256].view(torch.uint8))
    assert reads == [(file, header.data_offset + info.start + 128 * 384, header.data_offset + info.start + 256 * 384)]
    moved = TensorInfo(info.name, info.dtype, info.shape, info.start + 1, info.end + 1)
    with pytest.raises(Exception, match="not where the plan found it"):
        others.rows(file, moved, 0, 1)


@pytest.mark.hub
def test_scales_in_another_shard_from_a_hub_base(hub, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A Hub base: the partner's rows come by range requests (the other shard is not downloaded for them);
    the output equals a local merge."""
    from hub_server import hub_env

    base = _fp8_base(tmp_path / "base", apart=True)
    adapter, _ = _adapter(tmp_path / "adapter")
    ref = tmp_path / "ref"
    assert run_cli("merge", base, adapter, "-o", ref, "--quiet").returncode == 0
    hub.add_commit("org/fp8", {p.name: p for p in base.iterdir()})
    out = tmp_path / "out"
    r = run_cli("merge", "org/fp8", adapter, "-o", out, "--quiet", "--block-size-mb", "1",
                env=hub_env(hub, tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    for f in ref.glob("*.safetensors"):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    partner_reads = [q for q in hub.requests("GET", "/org/fp8/resolve/") if q.range is not None
                     and q.path.endswith(".safetensors") and not q.range.startswith("bytes=0-")]
    assert partner_reads  # rows of the other shard by range requests (headers are read from byte 0)
