"""--dtype: the output dtype of floating tensors, bitwise equal to PEFT's `merge_and_unload()` followed by
`model.to(dtype)` and `save_pretrained` (the merge rounds to the base dtype, then converts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import make_pair, run_cli
from oracle import _load_merged_model, assert_bitwise_equal, load_folder_tensors, logits, make_adapter, make_base

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
NAMES = {"bf16": BF16, "fp16": FP16, "fp32": FP32}
TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]  # Linear (1 rounding) and Embedding (2)


def _oracle(base: Path, adapter: Path, dtype: torch.dtype, out: Path) -> dict[str, torch.Tensor]:
    model = _load_merged_model(base, adapter, "auto", None).to(dtype)
    model.save_pretrained(out)
    return load_folder_tensors(out)


@pytest.mark.parametrize("base_dtype,out", [(FP32, "bf16"), (FP32, "fp16"), (BF16, "fp32"), (BF16, "fp16"),
                                            (FP16, "bf16"), (BF16, "bf16")])
def test_dtype_matches_peft_merge_then_to(base_dtype: torch.dtype, out: str, tmp_path: Path) -> None:
    base = make_base(tmp_path / "base", "llama", base_dtype, shards=2)
    adapter = make_adapter(base, tmp_path / "adapter", r=8, lora_alpha=12, target_modules=TARGETS,
                           modules_to_save=["lm_head"])
    expected = _oracle(base, adapter, NAMES[out], tmp_path / "oracle")
    merged = tmp_path / "out"
    r = run_cli("merge", base, adapter, "-o", merged, "--dtype", out, "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    got = load_folder_tensors(merged)
    assert_bitwise_equal(got, expected)
    assert all(t.dtype == NAMES[out] for t in got.values())
    cfg = json.loads((merged / "config.json").read_text())
    assert cfg["dtype"] == str(NAMES[out]).removeprefix("torch.")
    assert cfg["dtype"] == json.loads((tmp_path / "oracle" / "config.json").read_text())["dtype"]
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(merged, ids), logits(tmp_path / "oracle", ids))
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in got.values())


def test_fp32_to_bf16_halves_the_output_and_auto_changes_nothing(tmp_path: Path) -> None:
    base, adapter = make_pair(tmp_path, dtype="F32", shard_bytes=20_000)
    auto, half = tmp_path / "auto", tmp_path / "half"
    assert run_cli("merge", base, adapter, "-o", auto, "--quiet").returncode == 0
    r = run_cli("merge", base, adapter, "-o", half, "--dtype", "bf16", "--quiet")
    assert r.returncode == 0, r.stderr
    size = {d: sum(p.stat().st_size for p in d.glob("*.safetensors")) for d in (base, auto, half)}
    assert size[auto] == size[base]
    headers = sum(8 + int.from_bytes(p.read_bytes()[:8], "little") for p in half.glob("*.safetensors"))
    assert size[half] - headers == (size[base] - sum(8 + int.from_bytes(p.read_bytes()[:8], "little")
                                                     for p in base.glob("*.safetensors"))) // 2
    a, h = load_folder_tensors(auto), load_folder_tensors(half)
    assert all(torch.equal(h[k], a[k].to(BF16)) for k in a)  # fp32 merge, rounded once
    assert run_cli("verify", half, "--full").returncode == 0  # the recorded options rebuild the same plan
    again = run_cli("merge", base, adapter, "-o", half, "--dtype", "bf16")
    shards = len(list(half.glob("*.safetensors")))
    assert again.returncode == 0 and f"({shards} resumed)" in again.stdout, again.stdout + again.stderr
    other = run_cli("merge", base, adapter, "-o", half, "--dtype", "fp16")  # another output: not mixed in
    assert other.returncode == 2 and "other inputs or options" in other.stderr
    assert "dtype" not in json.loads((auto / "config.json").read_text()) or \
        json.loads((auto / "config.json").read_text()) == json.loads((base / "config.json").read_text())


def test_integer_tensors_keep_their_dtype_and_the_plan_says_so(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    base, adapter = make_pair(tmp_path)
    shard = sorted(base.glob("*.safetensors"))[0]
    sd = load_file(str(shard))
    sd["model.position_ids"] = torch.arange(16, dtype=torch.int64)
    save_file(sd, str(shard), metadata={"format": "pt"})
    index = base / "model.safetensors.index.json"
    idx = json.loads(index.read_text())
    idx["weight_map"]["model.position_ids"] = shard.name
    index.write_text(json.dumps(idx))
    r = run_cli("plan", base, adapter, "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    assert "--dtype fp32: 1 integer/fp8 tensor(s) keep their dtype (model.position_ids)" in r.stdout + r.stderr
    assert "config.json: dtype -> float32" in r.stdout
    out = tmp_path / "out"
    r = run_cli("merge", base, adapter, "-o", out, "--dtype", "fp32", "--quiet")
    assert r.returncode == 0, r.stderr
    with safe_open(str(out / shard.name), "pt") as f:
        assert f.get_tensor("model.position_ids").dtype == torch.int64
        assert all(f.get_tensor(k).dtype == FP32 for k in f.keys() if k != "model.position_ids")


def test_dtype_is_validated_in_yaml_and_on_the_command_line(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = pair
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dtype: float8\n")
    r = run_cli("merge", base, adapter, "-o", tmp_path / "o", "--config", cfg)
    assert r.returncode == 2 and "dtype must be auto, bf16, fp16 or fp32" in r.stderr
    assert not (tmp_path / "o").exists()
    r = run_cli("merge", base, adapter, "-o", tmp_path / "o", "--dtype", "int8")
    assert r.returncode == 2 and "--dtype" in r.stderr
    cfg.write_text("dtype: fp16\n")
    out = tmp_path / "o16"
    assert run_cli("merge", base, adapter, "-o", out, "--config", cfg, "--quiet").returncode == 0
    assert all(t.dtype == FP16 for t in load_folder_tensors(out).values())


@pytest.mark.parametrize("where", ["untouched", "merged"])
def test_fp16_overflow_is_refused_naming_the_tensor(tmp_path: Path, where: str) -> None:
    """An fp32 base holding values beyond fp16's range: --dtype fp16 would write Inf with exit 0 (what
    `model.to(float16)` does); refused naming the tensor, nothing published. bf16 takes them."""
    from safetensors.torch import load_file, save_file

    base, adapter = make_pair(tmp_path, dtype="F32")
    name = "model.norm.weight" if where == "untouched" else "model.layers.0.self_attn.q_proj.weight"
    shard = next(p for p in base.glob("*.safetensors") if name in load_file(str(p)))
    sd = load_file(str(shard))
    sd[name][0] = 1e6
    save_file(sd, str(shard), metadata={"format": "pt"})
    r = run_cli("merge", base, adapter, "-o", tmp_path / "out", "--dtype", "fp16")
    assert r.returncode == 2 and name in r.stderr and "float16 range" in r.stderr, r.stderr
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert not list((tmp_path / "out").glob(shard.name))
    assert run_cli("merge", base, adapter, "-o", tmp_path / "bf16", "--dtype", "bf16", "--quiet").returncode == 0
