"""The Mixtral (sparse MoE) shapes of the Hub benchmark: Mixtral-8x22B-v0.1's layout as stored on the Hub
(names, shapes, config, huggingface_hub's shard split), and scripts/bench_hub.py end to end on a tiny MoE shape
of the same layout, Hub -> local and Hub -> Hub: exactly the targeted expert and attention weights change,
each by its own LoRA pair; the router, norms and embeddings come out byte-identical."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stream_merge.synthetic_moe import HF_MAX_SHARD_BYTES, MIXTRAL_8X22B, MixtralShape

from tests.hub_procedural import ProceduralRepo, make_spec
from tests.oracle import lora_delta, merge_once

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_hub  # noqa: E402

GiB = 2**30


def _bench_repo(shape: str, layers: int | None = None) -> ProceduralRepo:
    return ProceduralRepo.from_spec(bench_hub.spec_for(shape, layers))


# ------------------------------------------------------------------------------------------------ the layout
def test_mixtral8x22b_is_the_hub_checkpoint_layout() -> None:
    """281 GB in 59 shards named as save_pretrained names them, none over 5 GB; 56 layers of 8 experts."""
    repo = _bench_repo("mixtral8x22b")
    names = list(repo.shards)
    assert names == [f"model-{i:05d}-of-00059.safetensors" for i in range(1, 60)]
    assert 281.0e9 < repo.nbytes < 281.5e9
    assert all(f.size - len(f.head) <= HF_MAX_SHARD_BYTES for f in repo.shards.values())
    weight_map = json.loads(repo.small["model.safetensors.index.json"])["weight_map"]
    experts = [n for n in weight_map if ".block_sparse_moe.experts." in n]
    assert len(experts) == 56 * 8 * 3 and len(weight_map) == 1 + 56 * (5 + 24 + 2) + 2
    shapes = {n: s for entries in repo.spec["files"].values() for n, s in entries}
    p = "model.layers.55.block_sparse_moe."
    assert shapes[p + "experts.7.w1.weight"] == [16384, 6144] and shapes[p + "experts.7.w2.weight"] == [6144, 16384]
    assert shapes[p + "experts.7.w3.weight"] == [16384, 6144] and shapes[p + "gate.weight"] == [8, 6144]
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == [1024, 6144]
    assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == [32768, 6144]
    # the greedy cut: the embeddings and layer 0's first 21 expert tensors, ..., the last experts and lm_head
    assert names[0] == weight_map["model.layers.0.block_sparse_moe.experts.6.w3.weight"]
    assert weight_map["model.layers.0.block_sparse_moe.experts.7.w1.weight"] == names[1]
    assert weight_map["lm_head.weight"] == weight_map["model.norm.weight"] == names[-1]
    cfg = json.loads(repo.small["config.json"])
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["model_type"] == "mixtral"
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"], cfg["num_local_experts"], cfg["num_experts_per_tok"],
            cfg["torch_dtype"]) == (6144, 16384, 56, 48, 8, 32768, 8, 2, "bfloat16")


def test_greedy_cut_is_huggingface_hubs_rule() -> None:
    """The procedural repo's cut equals huggingface_hub's own splitter on the same sizes (the real model, and a
    tiny one whose limit is below a tensor's size: that tensor gets a shard of its own)."""
    from huggingface_hub.serialization._base import split_state_dict_into_shards_factory

    tiny = MixtralShape(64, 128, 2, 256, 4, 2, experts=4)
    for shape, limit in [(MIXTRAL_8X22B, HF_MAX_SHARD_BYTES), (tiny, 20_000)]:
        sizes = {n: torch.Size(s).numel() * 2 for n, s in shape.tensors()}
        theirs = split_state_dict_into_shards_factory(sizes, get_storage_size=lambda n: n, max_shard_size=limit,
                                                      filename_pattern="model{suffix}.safetensors")
        spec = make_spec(shape.tensors(), "BF16", 0, shape.config("BF16"), max_shard_bytes=limit)
        assert {f: [n for n, _ in entries] for f, entries in spec["files"].items()} == theirs.filename_to_tensors
    assert bench_hub.spec_for("mixtral8x22b")["files"] == make_spec(MIXTRAL_8X22B.tensors(), "BF16", 0, {},
                                                                     max_shard_bytes=HF_MAX_SHARD_BYTES)["files"]


def test_layers_slices_the_moe_shape_like_the_others() -> None:
    """--layers 2: the first two layers (all their experts), embeddings and head, cut by the same rule."""
    repo = _bench_repo("mixtral8x22b", 2)
    assert list(repo.shards) == [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    names = {n for entries in repo.spec["files"].values() for n, _ in entries}
    assert {n.split(".")[2] for n in names if n.startswith("model.layers.")} == {"0", "1"}
    assert len([n for n in names if ".experts." in n]) == 2 * 8 * 3 and "lm_head.weight" in names
    assert json.loads(repo.small["config.json"])["num_hidden_layers"] == 2
    assert bench_hub.shape_for("mixtral8x22b", 2) == MixtralShape(6144, 16384, 2, 32768, 48, 8, experts=8)


def test_mixtral_shape_is_what_transformers_saves(tmp_path: Path) -> None:
    """The installed transformers builds a model from our config.json and saves exactly our names and shapes
    (v5 fuses the experts in memory only, and saves them one by one)."""
    transformers = pytest.importorskip("transformers")
    shape = MixtralShape(64, 96, 2, 256, 4, 2, experts=4)
    config = transformers.MixtralConfig(**shape.config("BF16"))
    assert (config.num_local_experts, config.num_experts_per_tok, config.num_key_value_heads) == (4, 2, 2)
    assert config.rope_parameters["rope_theta"] == 1e6 and config.max_position_embeddings == 65536
    transformers.MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert {n: tuple(t.shape) for n, t in saved.items()} == dict(shape.tensors())


# ------------------------------------------------------------------------------------------------ end to end
def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out: dict[str, torch.Tensor] = {}
    for f in sorted(set(index.values())):
        out.update(load_file(folder / f))
    assert set(out) == set(index)
    return out


def test_bench_hub_tiny_moe_end_to_end(tmp_path: Path) -> None:
    """The script's small path on the tiny MoE shape through the throttled procedural server: Hub -> local
    changes exactly the targeted tensors (every expert's w1/w2/w3 and q/k/v/o), each into
    (W.float() + B @ A * alpha / r).to(bf16) with its own pair; the router, norms, embeddings and head are
    byte-identical; Hub -> Hub pushed the same bytes (the sha256 of every pushed shard equals the local output's)."""
    out = tmp_path / "result.json"
    work, cache = tmp_path / "work", tmp_path / "cache"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_hub.py"), "--shape", "tiny-moe",
                           "--rate", "100MB/s", "--sample-verify", "6", "--work", str(work), "--cache", str(cache),
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["shards"] == 6 and res["ratio_hub_to_local_over_t_dl"] > 0
    assert res["sample_verify"]["all_match"] and len(res["sample_verify"]["shards"]) == 6

    spec = json.loads((work / "spec.json").read_text())
    ProceduralRepo.from_spec(spec).write_to(tmp_path / "base")
    base, merged = _tensors(tmp_path / "base"), _tensors(work / "out-local")
    adapter_dir = cache / f"adapter-{bench_hub.spec_key(spec)}"
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"])
    lora = load_file(adapter_dir / "adapter_model.safetensors")
    targeted = {k[len("base_model.model."):-len(".lora_A.weight")] + ".weight" for k in lora if "lora_A" in k}
    assert len([t for t in targeted if ".experts." in t]) == 2 * 4 * 3 and len(targeted) == 2 * (4 * 3 + 4)

    changed = {n for n in base if not torch.equal(base[n].view(torch.int16), merged[n].view(torch.int16))}
    assert changed == targeted
    assert set(base) - changed >= {"model.layers.1.block_sparse_moe.gate.weight", "model.norm.weight",
                                   "model.layers.0.post_attention_layernorm.weight", "lm_head.weight"}
    scale = cfg["lora_alpha"] / cfg["r"]
    for name in sorted(targeted):  # README: old per-expert adapters go 1:1 onto the expert tensors, one rounding
        mod = "base_model.model." + name[:-len(".weight")]
        want = merge_once(base[name], lora_delta(lora[mod + ".lora_A.weight"], lora[mod + ".lora_B.weight"], scale))
        assert torch.equal(merged[name], want), name
