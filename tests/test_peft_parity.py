"""Bitwise parity of ``stream_merge.merge`` with PEFT's ``merge_and_unload`` on tiny real models.

Each case builds a PEFT-saved adapter (``init_lora_weights=False``, scales that are not powers of two),
merges it with PEFT (the oracle, see ``oracle.py``) and with stream_merge, and requires every output
tensor to be bitwise equal and the transformers logits of both folders to be equal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file

from oracle import (
    adapter_touched, assert_bitwise_equal, load_folder_tensors, logits, make_adapter, make_base,
    peft_merged, weight_map,
)

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora(**kw: Any) -> dict[str, Any]:
    """LoraConfig kwargs: r=16, alpha=24 (scale 1.5) on all Llama projections unless overridden."""
    return {"r": 16, "lora_alpha": 24, "target_modules": LLAMA_ALL, **kw}


def _set(**fields: Any) -> Callable[[dict], None]:
    """Edit of ``adapter_config.json`` after PEFT saved it (PEFT writes it with sorted keys)."""
    return lambda cfg: cfg.update(fields)


@dataclass
class Case:
    lora: dict[str, Any]
    family: str = "llama"
    dtype: torch.dtype = BF16
    shards: int = 3
    adapter_dtype: torch.dtype | None = None
    resize_vocab: int | None = None
    edit_config: Callable[[dict], None] | None = None
    ranks: dict[str, int] = field(default_factory=dict)  # module -> rank PEFT must have saved


# Patterns are matched as PEFT >= 0.15 does: re.match(rf"(.*\.)?({key})$", module), first key in JSON
# order wins. PEFT saves adapter_config.json with sort_keys=True, so these dicts are written sorted.
RANK_PATTERN = {
    "model.layers.1.self_attn.q_proj": 4,  # full path; also matched by the regex below, listed first
    "p_proj": 6,  # needs the "." boundary: must NOT match up_proj
    r"self_attn\.(q|k)_proj": 12,  # regex
}
ALPHA_PATTERN = {
    "down_proj": 40,  # also matched by the regex below, but listed first: alpha 40
    "j": 99,  # matches nothing with "." boundaries
    r"mlp\..*": 20,
    "model.layers.0.self_attn.v_proj": 7,  # full path
}

CASES: dict[str, Case] = {
    # 1-2: plain LoRA, adapter and base dtypes
    "llama-bf16-fp32adapter": Case(lora()),
    "llama-bf16-bf16adapter": Case(lora(), adapter_dtype=BF16),
    "llama-fp16": Case(lora(), dtype=FP16),
    "llama-fp32": Case(lora(), dtype=FP32),
    # 3: rsLoRA (12 / sqrt(8) is irrational)
    "llama-rslora": Case(lora(r=8, lora_alpha=12, use_rslora=True)),
    # 4: rank/alpha patterns (r=8, alpha=12 for the rest)
    "llama-patterns": Case(
        lora(r=8, lora_alpha=12, rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN),
        ranks={"model.layers.1.self_attn.q_proj": 4, "model.layers.0.self_attn.q_proj": 12,
               "model.layers.1.self_attn.k_proj": 12, "model.layers.0.mlp.up_proj": 8}),
    # the file's key order decides, not sorting: regex first now gives down_proj alpha 20
    "llama-patterns-file-order": Case(
        lora(r=8, lora_alpha=12, alpha_pattern=ALPHA_PATTERN),
        edit_config=_set(alpha_pattern={r"mlp\..*": 20, "down_proj": 40}),
    ),
    # 5: only layer 1
    "llama-layers_to_transform": Case(lora(r=8, lora_alpha=12, layers_to_transform=[1])),
    # PEFT forces fan_in_fan_out=False for nn.Linear whatever the file says (q/o are square)
    "llama-fifo-true-in-file": Case(lora(r=8, lora_alpha=12), edit_config=_set(fan_in_fan_out=True)),
    "llama-regex-target": Case(lora(r=8, lora_alpha=12, target_modules=r".*\.(q_proj|down_proj)")),
    # 6: biases (Qwen2 has q/k/v biases, o_proj has none)
    "qwen2-lora_bias": Case(lora(r=8, lora_alpha=12, target_modules=["q_proj", "k_proj", "v_proj"],
                                 lora_bias=True), family="qwen2"),
    "qwen2-bias-lora_only": Case(lora(r=8, lora_alpha=12, target_modules=["q_proj", "v_proj", "o_proj"],
                                      bias="lora_only"), family="qwen2"),
    "qwen2-bias-all": Case(lora(r=8, lora_alpha=12, target_modules=["q_proj", "o_proj"], bias="all"),
                           family="qwen2"),
    # 7: GPT-2 Conv1D: c_attn (64->192), attn.c_proj (square), mlp.c_fc / mlp.c_proj
    "gpt2-conv1d": Case(lora(r=8, lora_alpha=12, target_modules=["c_attn", "c_proj", "c_fc"],
                             fan_in_fan_out=True), family="gpt2"),
    "gpt2-conv1d-fifo-false-in-file": Case(
        lora(r=8, lora_alpha=12, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
        family="gpt2", edit_config=_set(fan_in_fan_out=False)),
    "gpt2-bias-all": Case(lora(r=8, lora_alpha=12, target_modules=["c_attn"], fan_in_fan_out=True,
                               bias="all"), family="gpt2"),
    # 8: embedding LoRA (double rounding) and resized vocabularies
    "llama-embedding": Case(lora(r=8, lora_alpha=12, target_modules=["embed_tokens", "q_proj", "v_proj"])),
    "llama-resized-untargeted": Case(lora(r=8, lora_alpha=12, target_modules=["q_proj"]), resize_vocab=272),
    "llama-resized-embed-and-head-lora": Case(
        lora(r=8, lora_alpha=12, target_modules=["embed_tokens", "lm_head", "q_proj"]), resize_vocab=272),
    "llama-resized-modules_to_save": Case(
        lora(r=8, lora_alpha=12, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]),
        resize_vocab=272),
    # 9: replacement head
    "llama-modules_to_save-lm_head": Case(lora(r=8, lora_alpha=12, target_modules=["q_proj", "v_proj"],
                                               modules_to_save=["lm_head"])),
    # 10: single-file base
    "llama-single-file": Case(lora(), shards=1),
    # other families, "all-linear" (saved by PEFT as a list of full module paths)
    **{f"{fam}-all-linear": Case(lora(r=8, lora_alpha=12, target_modules="all-linear"), family=fam)
       for fam in ("mistral", "qwen3", "phi3", "gemma2", "gpt2")},
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory of module-shared bases, one per (family, dtype, shards)."""
    cache: dict[tuple, Path] = {}

    def get(family: str, dtype: torch.dtype = BF16, shards: int = 3) -> Path:
        key = (family, dtype, shards)
        if key not in cache:
            name = f"{family}-{str(dtype).removeprefix('torch.')}-{shards}"
            cache[key] = make_base(tmp_path_factory.mktemp("bases") / name, family, dtype, shards)
        return cache[key]

    return get


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _input_ids(vocab: int) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    ids[:, -1] = vocab - 1  # reaches the new rows of a resized vocabulary
    return ids


def _check_adapter(case: Case, adapter: Path) -> None:
    """The saved adapter holds what the case claims to test (factor dtype, ranks)."""
    tensors = load_file(adapter / "adapter_model.safetensors")
    factors = {k: v for k, v in tensors.items() if ".lora_" in k}
    assert factors and all(v.dtype == (case.adapter_dtype or FP32) for v in factors.values())
    for module, r in case.ranks.items():
        assert tensors[f"base_model.model.{module}.lora_A.weight"].shape[0] == r


def _engine_merge(base: Path, adapter: Path, out: Path) -> Any:
    from stream_merge import merge  # imported here so the oracle part of each case runs first

    before = _folder_bytes(base)
    report = merge(str(base), str(adapter), str(out), device="cpu")
    assert _folder_bytes(base) == before, "the base checkpoint was modified"
    return report


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_merge_matches_peft(case: Case, base_dir: Callable[..., Path], tmp_path: Path) -> None:
    base = base_dir(case.family, case.dtype, case.shards)
    adapter = make_adapter(base, tmp_path / "adapter", adapter_dtype=case.adapter_dtype,
                           resize_vocab=case.resize_vocab, **case.lora)
    _check_adapter(case, adapter)
    if case.edit_config is not None:
        cfg_path = adapter / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        case.edit_config(cfg)
        cfg_path.write_text(json.dumps(cfg, indent=2))
    oracle_dir = tmp_path / "oracle"
    expected = peft_merged(base, adapter, case.dtype, case.resize_vocab, save_to=oracle_dir)

    # the oracle really applied the adapter: exactly the tensors the adapter file names changed
    base_tensors = load_folder_tensors(base)
    changed = {k for k, v in expected.items() if k not in base_tensors or not torch.equal(v, base_tensors[k])}
    assert expected.keys() == base_tensors.keys()
    assert changed == adapter_touched(adapter)

    out = tmp_path / "out"
    _engine_merge(base, adapter, out)

    assert_bitwise_equal(load_folder_tensors(out), expected)
    assert weight_map(out) == weight_map(base), "output must keep the base's shard layout"
    base_cfg = json.loads((base / "config.json").read_text())
    out_cfg = json.loads((out / "config.json").read_text())
    vocab = json.loads((oracle_dir / "config.json").read_text())["vocab_size"]
    assert out_cfg == {**base_cfg, "vocab_size": vocab}
    ids = _input_ids(vocab)
    assert torch.equal(logits(out, ids), logits(oracle_dir, ids))


def test_oracle_is_sane(base_dir: Callable[..., Path], tmp_path: Path) -> None:
    """The helpers build what they claim and PEFT rounds as PEFT_SEMANTICS.md §2.4 says."""
    base = base_dir("llama")
    wmap = weight_map(base)
    assert len(set(wmap.values())) >= 3
    assert wmap["model.layers.0.self_attn.q_proj.weight"] != wmap["model.layers.1.mlp.down_proj.weight"]
    assert (base_dir("llama", BF16, 1) / "model.safetensors").exists()
    assert (base / "generation_config.json").exists()

    adapter = make_adapter(base, tmp_path / "adapter", r=8, lora_alpha=12,
                           target_modules=["q_proj", "embed_tokens"])
    merged, w = peft_merged(base, adapter, BF16, save_to=tmp_path / "merged"), load_folder_tensors(base)
    ad = load_file(adapter / "adapter_model.safetensors")
    assert ad["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].dtype == FP32
    s = 12 / 8

    q = "model.layers.0.self_attn.q_proj"
    a, b = (ad[f"base_model.model.{q}.lora_{x}.weight"].float() for x in "AB")
    assert not torch.equal(merged[f"{q}.weight"], w[f"{q}.weight"])
    assert torch.equal(merged[f"{q}.weight"], (w[f"{q}.weight"].float() + (b @ a) * s).to(BF16))  # 1 rounding
    for untouched in ("model.layers.0.self_attn.k_proj.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(merged[untouched], w[untouched])

    e = "model.embed_tokens"
    a, b = (ad[f"base_model.model.{e}.lora_embedding_{x}"].float() for x in "AB")
    delta = (b @ a).T * s
    assert torch.equal(ad[f"base_model.model.{e}.base_layer.weight"], w[f"{e}.weight"])
    assert torch.equal(merged[f"{e}.weight"], w[f"{e}.weight"] + delta.to(BF16))  # 2 roundings
    assert not torch.equal(merged[f"{e}.weight"], (w[f"{e}.weight"].float() + delta).to(BF16))

    with pytest.raises(AssertionError, match=r"q_proj\.weight: max\|diff\|=.*elements differ"):
        assert_bitwise_equal(merged, w)
    ids = _input_ids(256)
    assert not torch.equal(logits(tmp_path / "merged", ids), logits(base, ids))
