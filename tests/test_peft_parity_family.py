"""PEFT parity for the rest of the LoRA family: DoRA, ConvNd, MoE experts, VLM layouts, tied embeddings,
weighted multi-adapter merges and adapters saved in a named sub-folder.

Every case builds a tiny seeded model, a PEFT-saved adapter (``init_lora_weights=False``, every adapter
parameter randomised to a visible magnitude, ``alpha/r`` not a power of two, bf16 base unless noted) and an
expected output. The expected output is PEFT's own ``merge_and_unload`` wherever PEFT is right (loaded with
``oracle.load_peft_checked``, which fails on a "missing adapter keys" warning or an adapter tensor PEFT did not
load: PEFT's silent no-op), and a formula computed here where PEFT_SEMANTICS.md §5 / §7.1 documents that PEFT
deviates. Each oracle is also checked to change exactly the tensors the adapter names. Then
``stream_merge.merge`` runs and its folder is compared tensor by tensor (bitwise unless a case says otherwise)
and, for transformers models, by logits.

The engine is imported inside ``_engine_merge`` only, so the oracle part of every case runs (and is checked)
even while the engine does not support the case yet.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from oracle import (
    assert_bitwise_equal, bf16_ulps, changed_tensors, load_folder_tensors, load_peft_checked, logits,
    lora_delta, make_adapter, make_base, merge_once, merge_twice, peft_merged_module,
    peft_merged_pretrained, randomize_adapter, randomize_module, rename_checkpoint, save_model,
    save_state_dict, weight_map,
)

BF16, FP32 = torch.bfloat16, torch.float32
LLAMA_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
LLAMA_ALL = [*LLAMA_ATTN, "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------------------
# shared plumbing
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory of module-shared ``make_base`` checkpoints, one per (family, dtype, shards, overrides)."""
    cache: dict[tuple, Path] = {}

    def get(family: str, dtype: torch.dtype = BF16, shards: int = 3, **overrides: Any) -> Path:
        key = (family, dtype, shards, tuple(sorted(overrides.items())))
        if key not in cache:
            name = f"{family}-{str(dtype).removeprefix('torch.')}-{shards}-{len(cache)}"
            cache[key] = make_base(tmp_path_factory.mktemp("bases") / name, family, dtype, shards, **overrides)
        return cache[key]

    return get


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _engine_merge(base: Path, adapters: Path | list[Path], out: Path, **kwargs: Any) -> Any:
    """``stream_merge.merge`` on CPU; the base and the adapters must come out untouched."""
    from stream_merge import merge  # imported here so the oracle part of each case runs first

    adapter_list = adapters if isinstance(adapters, list) else [adapters]
    before = [_folder_bytes(p) for p in (base, *adapter_list)]
    arg = [str(a) for a in adapters] if isinstance(adapters, list) else str(adapters)
    try:
        return merge(str(base), arg, str(out), device="cpu", **kwargs)
    finally:
        assert [_folder_bytes(p) for p in (base, *adapter_list)] == before, "an input folder was modified"


def _engine_refuses(base: Path, adapters: Path | list[Path], out: Path, match: str | None = None,
                    **kwargs: Any) -> Exception:
    """The engine raises a StreamMergeError whose text, file paths blanked out (test folder names would
    match too), searches ``match``; no finished output is written."""
    from stream_merge.errors import StreamMergeError

    with pytest.raises(StreamMergeError) as info:
        _engine_merge(base, adapters, out, **kwargs)
    text = re.sub(r"/[^\s'\"\]]+", "<path>", str(info.value))
    assert match is None or re.search(match, text), f"expected /{match}/ in: {text}"
    assert not (out / "model.safetensors.index.json").exists()
    return info.value


def _check_output(out: Path, base: Path, expected: dict[str, torch.Tensor], config_changes: dict | None = None,
                  ) -> None:
    """Bitwise tensors, the base's shard layout for the base's tensors, config.json = base's + changes."""
    assert_bitwise_equal(load_folder_tensors(out), expected)
    base_map, out_map = weight_map(base), weight_map(out)
    assert {k: out_map[k] for k in base_map if k in out_map} == base_map, "the base's shard layout changed"
    if (base / "config.json").exists():
        base_cfg = json.loads((base / "config.json").read_text())
        assert json.loads((out / "config.json").read_text()) == {**base_cfg, **(config_changes or {})}


def _lora_modules(adapter: Path) -> set[str]:
    """In-memory module paths that carry LoRA factors in a PEFT adapter file."""
    keys = load_file(adapter / "adapter_model.safetensors").keys()
    return {re.sub(r"\.(lora_A\.weight|lora_embedding_A)$", "", k.removeprefix("base_model.model."))
            for k in keys if re.search(r"\.(lora_A\.weight|lora_embedding_A)$", k)}


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(0))


def _assert_oracle_changes(expected: dict[str, torch.Tensor], base: dict[str, torch.Tensor], names: set[str]) -> None:
    """The oracle keeps the base's tensor names and changes exactly ``names``."""
    assert expected.keys() == base.keys()
    assert changed_tensors(expected, base) == names


# ---------------------------------------------------------------------------------------------------------
# 1. DoRA (PEFT_SEMANTICS §3): Linear, Conv1D, Embedding, Conv2d; one rounding; missing magnitude refused
# ---------------------------------------------------------------------------------------------------------

DORA_CASES = {
    "llama-linear": dict(family="llama", lora=dict(target_modules=LLAMA_ALL)),
    "gpt2-conv1d": dict(family="gpt2", lora=dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "llama-embedding": dict(family="llama", lora=dict(target_modules=["embed_tokens", "q_proj"])),
}


@pytest.mark.parametrize("name", list(DORA_CASES))
def test_dora_transformers(name: str, base_dir: Callable[..., Path], tmp_path: Path) -> None:
    """DoRA on Llama Linear, GPT-2 Conv1D (fan_in_fan_out) and the Llama embedding: bitwise = PEFT.

    PEFT merges DoRA as ``((m / ‖W + ΔW‖) * (W + ΔW)).to(T)``: the norm of the unmerged base plus delta (over
    the input dim for Linear/Conv1D output rows, over the vocabulary for each embedding column), one rounding.
    """
    case = DORA_CASES[name]
    base = base_dir(case["family"])
    adapter = make_adapter(base, tmp_path / "adapter", r=8, lora_alpha=12, use_dora=True, **case["lora"])
    ad = load_file(adapter / "adapter_model.safetensors")
    modules = _lora_modules(adapter)
    assert modules and all(f"base_model.model.{m}.lora_magnitude_vector" in ad for m in modules)

    oracle_dir = tmp_path / "oracle"
    expected = peft_merged_pretrained(AutoModelForCausalLM, base, adapter, BF16, save_to=oracle_dir)
    w = load_folder_tensors(base)
    _assert_oracle_changes(expected, w, {f"{m}.weight" for m in modules})

    if name == "llama-linear":  # guard the oracle: PEFT's DoRA is the §3 formula, one rounding, non-trivial m
        q = "model.layers.1.self_attn.q_proj"
        m = ad[f"base_model.model.{q}.lora_magnitude_vector"]
        delta = lora_delta(ad[f"base_model.model.{q}.lora_A.weight"], ad[f"base_model.model.{q}.lora_B.weight"], 1.5)
        combined = w[f"{q}.weight"] + delta
        norm = torch.linalg.norm(combined, dim=1)
        assert not torch.allclose(m, norm, rtol=1e-3)  # the magnitude is not PEFT's init value
        assert torch.equal(expected[f"{q}.weight"], ((m / norm).view(-1, 1) * combined).to(BF16))

    out = tmp_path / "out"
    _engine_merge(base, adapter, out)
    _check_output(out, base, expected)
    ids = _ids(256)
    assert torch.equal(logits(out, ids), logits(oracle_dir, ids))


def test_dora_missing_magnitude_refused(base_dir: Callable[..., Path], tmp_path: Path) -> None:
    """A DoRA adapter without one ``lora_magnitude_vector`` is refused.

    PEFT loads such a file with only a "Found missing adapter keys" warning and silently uses its init value
    ‖W + sBA‖ for that module (PEFT_SEMANTICS §3); the engine must not guess.
    """
    base = base_dir("llama")
    adapter = make_adapter(base, tmp_path / "adapter", r=8, lora_alpha=12, use_dora=True,
                           target_modules=["q_proj", "v_proj"])
    f = adapter / "adapter_model.safetensors"
    sd = load_file(f)
    gone = "base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector"
    del sd[gone]
    save_file(sd, str(f), metadata={"format": "pt"})

    peft_model = load_peft_checked(AutoModelForCausalLM.from_pretrained(base, dtype=BF16), adapter, strict=False)
    assert any("v_proj.lora_magnitude_vector" in m for m in peft_model.missing_adapter_warnings)

    _engine_refuses(base, adapter, tmp_path / "out", match="magnitude")


class ConvNet(nn.Module):
    """A plain module with every conv kind PEFT's LoRA supports (and one it cannot merge)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(6, 10, 3)  # (10, 6, 3)
        self.c2 = nn.Conv2d(10, 12, 3, padding=1)  # (12, 10, 3, 3)
        self.pw = nn.Conv2d(12, 16, 1)  # 1x1: PEFT's matmul branch
        self.c3 = nn.Conv3d(4, 6, (2, 3, 3))  # (6, 4, 2, 3, 3)
        self.grouped = nn.Conv2d(8, 8, 3, groups=2)  # PEFT cannot merge (groups > 1)
        self.fc = nn.Linear(16, 10)


def _convnet(dtype: torch.dtype = BF16) -> ConvNet:
    torch.manual_seed(0)  # the constructor's init is overwritten anyway
    return randomize_module(ConvNet(), seed=0).to(dtype)


@pytest.fixture(scope="module")
def convnet_bases(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The ConvNet's bf16 state dict as a single ``model.safetensors`` and as 3 hand-indexed shards."""
    root = tmp_path_factory.mktemp("convnet")
    state = _convnet().state_dict()
    return {n: save_state_dict(state, root / f"shards{n}", shards=n) for n in (1, 3)}


def _convnet_adapter(base: Path, out: Path, seed: int = 1, **lora: Any) -> Path:
    from peft import LoraConfig, get_peft_model

    module = _convnet()
    module.load_state_dict(load_folder_tensors(base))
    peft_model = get_peft_model(module, LoraConfig(r=8, lora_alpha=12, init_lora_weights=False, **lora))
    randomize_adapter(peft_model, seed)
    peft_model.save_pretrained(out)
    return out


CONV_CASES = {
    # 2. plain LoRA on every conv kind (and the Linear next to them)
    "lora-all-convs": dict(target_modules=["c1", "c2", "pw", "c3", "fc"]),
    # 1. DoRA on Conv2d (3x3 and 1x1), then on Conv1d/Conv3d
    "dora-conv2d": dict(target_modules=["c2", "pw"], use_dora=True),
    "dora-conv1d-conv3d-linear": dict(target_modules=["c1", "c3", "fc"], use_dora=True),
}


@pytest.mark.parametrize("shards", [1, 3], ids=["single-file", "sharded"])
@pytest.mark.parametrize("name", list(CONV_CASES))
def test_convnd(name: str, shards: int, convnet_bases: dict[int, Path], tmp_path: Path) -> None:
    """ConvNd LoRA / DoRA in a plain ``nn.Module`` checkpoint (no config.json): bitwise = PEFT.

    The oracle is ``merge_and_unload().state_dict()`` of the module. Since PEFT 0.20 (PR #3396) ConvNd merges
    round once, ``(W.float() + ΔW).to(T)``, with ΔW from ``F.convNd`` (1x1: a matmul); this is asserted on the
    oracle too, so a PEFT that rounded twice would be caught here rather than blamed on the engine.
    """
    base = convnet_bases[shards]
    adapter = _convnet_adapter(base, tmp_path / "adapter", **CONV_CASES[name])
    expected = peft_merged_module(_convnet(), base, adapter)
    w = load_folder_tensors(base)
    modules = _lora_modules(adapter)
    _assert_oracle_changes(expected, w, {f"{m}.weight" for m in modules})

    if name == "lora-all-convs":
        ad = load_file(adapter / "adapter_model.safetensors")
        for m, conv in (("c1", torch.nn.functional.conv1d), ("c2", torch.nn.functional.conv2d),
                        ("c3", torch.nn.functional.conv3d), ("pw", None)):
            a, b = (ad[f"base_model.model.{m}.lora_{x}.weight"] for x in "AB")
            if conv is None:
                delta = (b[:, :, 0, 0] @ a[:, :, 0, 0])[:, :, None, None] * 1.5
            else:
                delta = conv(a.transpose(0, 1), b).transpose(0, 1) * 1.5
            assert torch.equal(expected[f"{m}.weight"], merge_once(w[f"{m}.weight"], delta)), m
            assert not torch.equal(expected[f"{m}.weight"], merge_twice(w[f"{m}.weight"], delta)), m
    if name == "dora-conv2d":  # PEFT's ConvNd DoRA is §3: per-output-channel norm of W + ΔW, one rounding
        ad = load_file(adapter / "adapter_model.safetensors")
        a, b, m = (ad[f"base_model.model.c2.{x}"] for x in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"))
        assert m.shape == (1, 12, 1, 1)
        combined = w["c2.weight"] + torch.nn.functional.conv2d(a.transpose(0, 1), b).transpose(0, 1) * 1.5
        norm = combined.norm(p=2, dim=(1, 2, 3), keepdim=True).transpose(1, 0)
        assert torch.equal(expected["c2.weight"], ((m / norm).view(-1, 1, 1, 1) * combined).to(BF16))

    out = tmp_path / "out"
    _engine_merge(base, adapter, out)
    _check_output(out, base, expected)


def test_conv_groups_refused(convnet_bases: dict[int, Path], tmp_path: Path) -> None:
    """LoRA on a Conv2d with groups > 1: PEFT cannot merge it (NotImplementedError), the engine refuses."""
    base = convnet_bases[3]
    adapter = _convnet_adapter(base, tmp_path / "adapter", target_modules=["grouped", "c2"])
    assert "base_model.model.grouped.lora_B.weight" in load_file(adapter / "adapter_model.safetensors")
    module = _convnet()
    module.load_state_dict(load_folder_tensors(base))
    with pytest.raises(NotImplementedError, match="groups"):
        load_peft_checked(module, adapter).merge_and_unload()
    _engine_refuses(base, adapter, tmp_path / "out", match="(?i)groups")


# ---------------------------------------------------------------------------------------------------------
# 3. MoE: transformers-v5 fused experts in memory, per-expert tensors on disk (PEFT_SEMANTICS §1.3, §5)
# ---------------------------------------------------------------------------------------------------------

MOE_CONFIGS = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=16,
                      decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True),
}
# on-disk names of one layer's expert tensors and router, as transformers 5.24 save_pretrained writes them
MOE_EXPERTS = {"mixtral": r"model\.layers\.\d+\.block_sparse_moe\.experts\.\d+\.w[123]\.weight",
               "qwen3_moe": r"model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight"}
MOE_ROUTER = {"mixtral": r"model\.layers\.\d+\.block_sparse_moe\.gate\.weight",
              "qwen3_moe": r"model\.layers\.\d+\.mlp\.gate\.weight"}
MOE_ATTN = r"model\.layers\.\d+\.self_attn\.(q|v)_proj\.weight"


@pytest.fixture(scope="module")
def moe_base(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Tiny bf16 MoE checkpoints as transformers 5.24 writes them: per-expert tensors in 12+ small shards."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cfg = AutoConfig.for_model(
                family, vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2, **MOE_CONFIGS[family])
            model = randomize_module(AutoModelForCausalLM.from_config(cfg, dtype=FP32), seed=0).to(BF16)
            path = save_model(model, tmp_path_factory.mktemp("moe") / family, max_shard_size="20KB")
            wmap = weight_map(path)
            layer0 = {wmap[k] for k in wmap if re.fullmatch(MOE_EXPERTS[family], k) and ".layers.0." in k}
            assert len(layer0) >= 2, "one layer's experts should span several shards"
            cache[family] = path
        return cache[family]

    return get


def _round_robin(base: Path, out: Path, shards: int = 5) -> Path:
    """The same tensors re-sharded round-robin by name, so the experts of one tensor kind and layer are
    spread over several files (transformers keeps each fused parameter's experts together)."""
    save_state_dict(load_folder_tensors(base), out, shards=shards)
    for f in ("config.json", "generation_config.json"):
        shutil.copy2(base / f, out / f)
    wmap = weight_map(out)
    assert len({wmap[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"] for e in range(4)}) > 1
    return out


def _moe_adapter(base: Path, out: Path, **lora: Any) -> Path:
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(base, dtype=BF16)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **lora))
    randomize_adapter(peft_model, 1)
    peft_model.save_pretrained(out)
    return out


MOE_CASES = {
    # (a) fused experts via target_parameters + attention modules
    "mixtral-experts": ("mixtral", "experts"),
    "mixtral-experts-round-robin-shards": ("mixtral", "experts"),
    "qwen3_moe-experts": ("qwen3_moe", "experts"),
    # (b) attention + router only; PEFT turns target_modules "gate" into target_parameters ["gate.weight"]
    "mixtral-router": ("mixtral", "router"),
    "qwen3_moe-router": ("qwen3_moe", "router"),
}


@pytest.mark.parametrize("name", list(MOE_CASES))
def test_moe(name: str, moe_base: Callable[[str], Path], tmp_path: Path) -> None:
    """MoE adapters trained on transformers-v5 fused experts, merged into per-expert on-disk checkpoints.

    In memory (5.24): ``model.layers.N.mlp.experts.gate_up_proj (E, 2I, H)`` and ``.down_proj (E, H, I)``
    (Mixtral's ``block_sparse_moe`` is renamed ``mlp``). PEFT saves ``…mlp.experts.base_layer.lora_{A,B}.weight``
    for gate_up_proj (A ``(r·E, H)``, B ``(2I, r·E)``) and ``…mlp.experts.lora_{A,B}.weight`` for down_proj
    (the last registered parameter is the outermost wrapper); the router ``…mlp.gate.lora_{A,B}.weight``.
    All ParamWrapper merges round twice. Oracle: PEFT merge, then transformers' ``save_pretrained`` writes the
    per-expert tensors back (Mixtral ``block_sparse_moe.experts.e.w1/w3/w2``, Qwen ``mlp.experts.e.gate/up/down_proj``).
    """
    family, kind = MOE_CASES[name]
    base = moe_base(family)
    adapter_base = base
    if "round-robin" in name:
        base = _round_robin(base, tmp_path / "base")
    if kind == "experts":
        lora = dict(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj"],
                    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        touched = {MOE_ATTN, MOE_EXPERTS[family]}
    else:
        lora = dict(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "gate"])
        touched = {MOE_ATTN, MOE_ROUTER[family]}
    adapter = _moe_adapter(adapter_base, tmp_path / "adapter", **lora)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    ad = load_file(adapter / "adapter_model.safetensors")
    if kind == "experts":
        assert sorted(cfg["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
        inter = 96 if family == "mixtral" else 48
        assert ad["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape == (16, 64)
        assert ad["base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"].shape == (2 * inter, 16)
        assert ad["base_model.model.model.layers.0.mlp.experts.lora_A.weight"].shape == (16, inter)
        assert ad["base_model.model.model.layers.0.mlp.experts.lora_B.weight"].shape == (64, 16)
    else:
        assert cfg["target_parameters"] == ["gate.weight"] and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
        assert ad["base_model.model.model.layers.0.mlp.gate.lora_A.weight"].shape == (4, 64)

    oracle_dir = tmp_path / "oracle"
    expected = peft_merged_pretrained(AutoModelForCausalLM, base, adapter, BF16, save_to=oracle_dir)
    w = load_folder_tensors(base)
    _assert_oracle_changes(expected, w, {k for k in w if any(re.fullmatch(p, k) for p in touched)})

    if name == "mixtral-experts":  # guard the oracle: §5 einsum, expert-major A, rank-major B, double rounding
        for key, parts in (("base_layer.", (("w1", slice(0, 96)), ("w3", slice(96, 192)))),
                           ("", (("w2", slice(None)),))):
            a = ad[f"base_model.model.model.layers.1.mlp.experts.{key}lora_A.weight"]
            b = ad[f"base_model.model.model.layers.1.mlp.experts.{key}lora_B.weight"]
            delta = torch.einsum("ore,eri->eoi", b.reshape(b.shape[0], -1, 4), a.reshape(4, -1, a.shape[1])) * 1.5
            for e in range(4):
                for proj, rows in parts:
                    k = f"model.layers.1.block_sparse_moe.experts.{e}.{proj}.weight"
                    assert torch.equal(expected[k], merge_twice(w[k], delta[e][rows])), k
    if kind == "router":  # guard the oracle: a 2-D ParamWrapper, (B @ A) * s rounded twice (§5)
        router = "block_sparse_moe.gate" if family == "mixtral" else "mlp.gate"
        for layer in range(2):
            a, b = (ad[f"base_model.model.model.layers.{layer}.mlp.gate.lora_{x}.weight"] for x in "AB")
            k = f"model.layers.{layer}.{router}.weight"
            assert torch.equal(expected[k], merge_twice(w[k], lora_delta(a, b, 1.5))), k
            assert not torch.equal(expected[k], merge_once(w[k], lora_delta(a, b, 1.5))), k

    out = tmp_path / "out"
    # a router in target_parameters is selected: no warning, and --strict accepts it (the re-sharded copy of
    # the base has another path than the one the adapter names, which --strict reports on its own)
    report = _engine_merge(base, adapter, out, strict=base == adapter_base)
    assert not report.plan.warnings, report.plan.warnings
    _check_output(out, base, expected)
    ids = _ids(256)
    assert torch.equal(logits(out, ids), logits(oracle_dir, ids))


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_moe_old_per_expert_adapter(rslora: bool, moe_base: Callable[[str], Path], tmp_path: Path) -> None:
    """A transformers-v4 Mixtral adapter (keys ``…block_sparse_moe.experts.{e}.w1/w2/w3.lora_A.weight``) is
    merged 1:1 into the per-expert disk tensors: ``(W.float() + (B @ A) * s).to(bf16)``, one rounding.

    PEFT 0.21.2 under transformers v5 instead converts the adapter to fused ``target_parameters`` (A concatenated
    over rank, B block-diagonal, ``r`` and ``alpha`` doubled for gate_up_proj) and merges it with double rounding
    (PEFT_SEMANTICS §5); with rsLoRA its fused gate/up scale is ``2α/√(2r) = √2·α/√r``, a √2 error on w1/w3.
    Both deviations are asserted on PEFT here, so the expected output is the formula, not PEFT.
    """
    from peft import LoraConfig

    base = moe_base("mixtral")
    adapter = tmp_path / "adapter"
    r, alpha = 4, 6
    LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, init_lora_weights=False, task_type="CAUSAL_LM",
               target_modules=["q_proj", "w1", "w2", "w3"]).save_pretrained(str(adapter))
    w = load_folder_tensors(base)
    gen = torch.Generator().manual_seed(3)
    sd = {}
    for k, t in sorted(w.items()):
        if re.fullmatch(MOE_EXPERTS["mixtral"], k) or re.fullmatch(r"model\.layers\.\d+\.self_attn\.q_proj\.weight", k):
            m = k.removesuffix(".weight")
            sd[f"base_model.model.{m}.lora_A.weight"] = torch.randn(r, t.shape[1], generator=gen) * 0.1
            sd[f"base_model.model.{m}.lora_B.weight"] = torch.randn(t.shape[0], r, generator=gen) * 0.1
    save_file(sd, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})

    s = alpha / math.sqrt(r) if rslora else alpha / r
    deltas = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight":
              lora_delta(v, sd[k.replace("lora_A", "lora_B")], s) for k, v in sd.items() if ".lora_A." in k}
    expected = dict(w)
    expected.update({k: merge_once(w[k], d) for k, d in deltas.items()})

    # what PEFT does with it (documented deviations; also proves PEFT loads every key)
    peft_model = load_peft_checked(AutoModelForCausalLM.from_pretrained(base, dtype=BF16), adapter, strict=False)
    assert not peft_model.missing_adapter_warnings
    peft_cfg = peft_model.peft_config["default"]
    assert peft_cfg.target_parameters == {"gate_up_proj", "down_proj"} and peft_cfg.target_modules == {"q_proj"}
    peft_out = tmp_path / "peft"
    peft_model.merge_and_unload().save_pretrained(peft_out)
    got = load_folder_tensors(peft_out)
    assert changed_tensors(got, w) == set(deltas)
    s_fused = 2 * alpha / math.sqrt(2 * r) if rslora else s
    for k, d in deltas.items():
        if k.endswith(("w1.weight", "w3.weight")):
            sd_key = "base_model.model." + k.removesuffix(".weight")
            d_peft = lora_delta(sd[sd_key + ".lora_A.weight"], sd[sd_key + ".lora_B.weight"], s_fused)
            assert torch.equal(got[k], merge_twice(w[k], d_peft)), k
        elif k.endswith("w2.weight"):
            assert torch.equal(got[k], merge_twice(w[k], d)), k
        else:
            assert torch.equal(got[k], expected[k]), k  # attention: a plain Linear, same as ours
    assert sum(not torch.equal(got[k], expected[k]) for k in deltas) > 0

    out = tmp_path / "out"
    _engine_merge(base, adapter, out)
    _check_output(out, base, expected)


# ---------------------------------------------------------------------------------------------------------
# 4. VLM layouts: Qwen2.5-VL (PEFT_SEMANTICS §1.3, §7.2)
# ---------------------------------------------------------------------------------------------------------

def _to_new_layout(name: str) -> str:
    """Legacy on-disk Qwen2.5-VL names -> the in-memory (transformers >= 4.52) names."""
    return re.sub(r"^visual\.", "model.visual.", re.sub(r"^model\.", "model.language_model.", name))


@pytest.fixture(scope="module")
def qwen_vl_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny bf16 Qwen2.5-VL saved by transformers 5.24: legacy layout ``model.*`` / ``visual.*`` / ``lm_head``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                pad_token_id=0, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                           image_token_id=250, video_token_id=251, vision_start_token_id=252,
                           vision_end_token_id=253)
    model = randomize_module(Qwen2_5_VLForConditionalGeneration(cfg), seed=0).to(BF16)
    path = save_model(model, tmp_path_factory.mktemp("vlm") / "qwen2_5_vl", max_shard_size="100KB")
    names = set(weight_map(path))
    assert "model.layers.0.self_attn.q_proj.weight" in names and "visual.blocks.0.attn.qkv.weight" in names
    assert not any(n.startswith(("model.language_model.", "model.visual.")) for n in names)
    assert len(set(weight_map(path).values())) >= 3
    return path


VLM_TARGETS = {
    # LM attention plus vision-tower linears (fused qkv, proj, MLP) and the merger
    "lm-and-vision": r"model\.language_model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj"
                     r"|model\.visual\.blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.up_proj)|model\.visual\.merger\.mlp\.0",
    # VLM-R1 shape: LoRA only on the language model's q/k/v/o/gate/up/down, as an explicit module list
    "vlm-r1": [f"model.language_model.layers.{i}.{p}" for i in range(2) for p in
               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")],
}


@pytest.mark.parametrize("disk_layout", ["legacy", "new"])
@pytest.mark.parametrize("targets", list(VLM_TARGETS))
def test_qwen2_5_vl(targets: str, disk_layout: str, qwen_vl_base: Path, tmp_path: Path) -> None:
    """An adapter made by PEFT on the in-memory Qwen2.5-VL (``model.language_model.*``, ``model.visual.*``) onto
    the legacy disk layout transformers 5.24 writes (``model.*``, ``visual.*``) and onto the same checkpoint
    rewritten in the new layout; the expected output of the latter is the oracle's tensors renamed alike."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration as VL

    model = VL.from_pretrained(qwen_vl_base, dtype=BF16)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=12, init_lora_weights=False,
                                                  target_modules=VLM_TARGETS[targets]))
    randomize_adapter(peft_model, 1)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    modules = _lora_modules(adapter)
    assert all(m.startswith(("model.language_model.", "model.visual.")) for m in modules)
    assert any(m.startswith("model.visual.") for m in modules) == (targets == "lm-and-vision")

    oracle_dir = tmp_path / "oracle"
    expected = peft_merged_pretrained(VL, qwen_vl_base, adapter, BF16, save_to=oracle_dir)
    w = load_folder_tensors(qwen_vl_base)
    legacy = {re.sub(r"^model\.language_model\.", "model.", re.sub(r"^model\.visual\.", "visual.", m))
              for m in modules}
    _assert_oracle_changes(expected, w, {f"{m}.weight" for m in legacy})

    base = qwen_vl_base
    if disk_layout == "new":
        base = rename_checkpoint(qwen_vl_base, tmp_path / "base-new", _to_new_layout)
        expected = {_to_new_layout(k): v for k, v in expected.items()}
        assert "model.language_model.layers.0.self_attn.q_proj.weight" in weight_map(base)

    out = tmp_path / "out"
    _engine_merge(base, adapter, out)
    _check_output(out, base, expected)
    ids = _ids(250)
    want = logits(VL.from_pretrained(oracle_dir, dtype=BF16), ids)
    assert torch.equal(logits(VL.from_pretrained(out, dtype=BF16), ids), want)


# ---------------------------------------------------------------------------------------------------------
# 5. Tied embeddings (PEFT_SEMANTICS §7.1): untie, and match the UNMERGED adapter, not PEFT's merge
# ---------------------------------------------------------------------------------------------------------

TIED_CASES = {"embed_tokens": ["embed_tokens", "q_proj"], "lm_head": ["lm_head"]}


@pytest.mark.parametrize("target", list(TIED_CASES))
def test_tied_embeddings(target: str, base_dir: Callable[..., Path], tmp_path: Path) -> None:
    """LoRA on a tied pair (``tie_word_embeddings=True``, no ``lm_head.weight`` on disk).

    Without ``untie`` the engine refuses. With ``untie=True`` it writes a separate ``lm_head.weight`` and sets
    ``tie_word_embeddings: false`` so the merged model computes what the unmerged adapter computes:

    - LoRA on ``embed_tokens``: ``embed_tokens = W + ΔW_emb.to(bf16)`` (PEFT's embedding rounding), ``lm_head = W``
      (the unmerged forward's head is the original shared tensor);
    - LoRA on ``lm_head``: ``lm_head = (W.float() + ΔW_head).to(bf16)`` (Linear rounding), ``embed_tokens = W``.

    PEFT 0.21.2's own merge differs: it adds Δ to the shared tensor, so both the input embedding and the head
    change and the model still saves tied; its logits then differ from the unmerged forward (asserted below,
    huggingface/peft#2018, #2777). Its merged shared tensor is still our changed tensor bit for bit.
    """
    from peft import PeftModel

    base = base_dir("llama", BF16, 2, tie_word_embeddings=True)
    w = load_folder_tensors(base)
    assert "lm_head.weight" not in w and json.loads((base / "config.json").read_text())["tie_word_embeddings"]
    adapter = make_adapter(base, tmp_path / "adapter", r=8, lora_alpha=12, target_modules=TIED_CASES[target])
    ad = load_file(adapter / "adapter_model.safetensors")
    emb = "model.embed_tokens.weight"

    if target == "embed_tokens":
        a, b = (ad[f"base_model.model.model.embed_tokens.lora_embedding_{x}"] for x in "AB")
        new_emb = merge_twice(w[emb], (b.float() @ a.float()).T * 1.5)
        expected = {**w, emb: new_emb, "lm_head.weight": w[emb]}
        for layer in range(2):
            q = f"model.layers.{layer}.self_attn.q_proj"
            expected[f"{q}.weight"] = merge_once(w[f"{q}.weight"], lora_delta(
                ad[f"base_model.model.{q}.lora_A.weight"], ad[f"base_model.model.{q}.lora_B.weight"], 1.5))
        shared_peft = new_emb
    else:
        a, b = ad["base_model.model.lm_head.lora_A.weight"], ad["base_model.model.lm_head.lora_B.weight"]
        assert torch.equal(ad["base_model.model.lm_head.base_layer.weight"], w[emb])  # PEFT saves the tied head
        head = merge_once(w[emb], lora_delta(a, b, 1.5))
        expected = {**w, "lm_head.weight": head}
        shared_peft = head

    # PEFT's merge: one shared tensor W+Δ (our changed tensor), still tied on disk
    peft_dir = tmp_path / "peft"
    got = peft_merged_pretrained(AutoModelForCausalLM, base, adapter, BF16, save_to=peft_dir)
    assert got.keys() == w.keys() and torch.equal(got[emb], shared_peft)
    assert json.loads((peft_dir / "config.json").read_text())["tie_word_embeddings"] is True
    assert changed_tensors(got, w) == changed_tensors({k: v for k, v in expected.items() if k in w}, w) | {emb}

    # fp32 logits of the unmerged adapter (what the untied merge must reproduce); PEFT's tied merge does not
    base32 = base_dir("llama", FP32, 2, tie_word_embeddings=True)
    emb32 = load_folder_tensors(base32)[emb]
    adapter32 = tmp_path / "adapter32"  # the same factors; the saved base layer is the fp32 embedding
    shutil.copytree(adapter, adapter32)
    save_file({k: (emb32 if ".base_layer." in k else v) for k, v in ad.items()},
              str(adapter32 / "adapter_model.safetensors"), metadata={"format": "pt"})
    ids = _ids(256)
    want = logits(load_peft_checked(AutoModelForCausalLM.from_pretrained(base32, dtype=FP32), adapter32), ids)
    assert (want - logits(base32, ids, FP32)).abs().max() > 1e-2, "the adapter should change the logits"
    peft_tied = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base32, dtype=FP32),
                                                 adapter32).merge_and_unload(), ids)
    assert (peft_tied - want).abs().max() > 1e-2, "PEFT's tied merge was expected to deviate (§7.1)"

    _engine_refuses(base, adapter, tmp_path / "refused", match="(?i)tie")
    out = tmp_path / "out"
    _engine_merge(base, adapter, out, untie=True)
    assert_bitwise_equal(load_folder_tensors(out), expected)
    base_map, out_map = weight_map(base), weight_map(out)
    assert out_map.keys() == base_map.keys() | {"lm_head.weight"}
    assert {k: out_map[k] for k in base_map} == base_map
    base_cfg = json.loads((base / "config.json").read_text())
    assert json.loads((out / "config.json").read_text()) == {**base_cfg, "tie_word_embeddings": False}

    out32 = tmp_path / "out32"
    _engine_merge(base32, adapter32, out32, untie=True)
    torch.testing.assert_close(logits(out32, ids, FP32), want, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# 6. Several adapters with weights
# ---------------------------------------------------------------------------------------------------------

def _reference(w: dict[str, torch.Tensor], adapters: list[Path], weights: list[float]
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """float64 ``W + Σ wᵢ·sᵢ·BᵢAᵢ`` for every patched tensor, and an fp64 magnitude bound
    ``|W| + Σ |wᵢ·sᵢ|·|Bᵢ|@|Aᵢ|`` of the terms (the cancellation allowance of ``_assert_within_1ulp``)."""
    ref: dict[str, torch.Tensor] = {}
    mag: dict[str, torch.Tensor] = {}
    for adapter, weight in zip(adapters, weights):
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        assert not cfg["rank_pattern"] and not cfg["alpha_pattern"]
        s = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg["use_rslora"] else cfg["r"])
        ad = load_file(adapter / "adapter_model.safetensors")
        for key, a in ad.items():
            if not key.endswith(".lora_A.weight"):
                continue
            b = ad[key.replace(".lora_A.", ".lora_B.")].double()
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
            ref.setdefault(name, w[name].double())
            mag.setdefault(name, w[name].double().abs())
            ref[name] = ref[name] + weight * s * (b @ a.double())
            mag[name] = mag[name] + abs(weight * s) * (b.abs() @ a.double().abs())
    return ref, mag


def _nearest_bf16(x: torch.Tensor) -> torch.Tensor:
    """Correct round-to-nearest of a float64 tensor to bf16 (torch goes through fp32, which can double-round)."""
    c = x.to(BF16)
    cands = torch.stack([torch.nextafter(c, torch.full_like(c, -math.inf)), c,
                         torch.nextafter(c, torch.full_like(c, math.inf))])
    err = (cands.double() - x).abs()
    return cands.gather(0, err.argmin(0, keepdim=True))[0]


def _assert_within_1ulp(actual: dict[str, torch.Tensor], w: dict[str, torch.Tensor],
                        ref: dict[str, torch.Tensor], mag: dict[str, torch.Tensor]) -> None:
    """Every patched tensor is within 1 bf16 ulp (on the bit patterns) of the correctly rounded float64
    reference; the only allowance: an element whose error is below 2⁻²⁰ of its terms' magnitude (fp32
    accumulation error after cancellation near zero, where bf16 ulps get tiny). Other tensors are bitwise."""
    assert actual.keys() == w.keys()
    for k in sorted(w):
        if k not in ref:
            assert torch.equal(actual[k], w[k]), f"{k} should be untouched"
            continue
        ulps = bf16_ulps(actual[k], _nearest_bf16(ref[k]))
        ok = (ulps <= 1) | ((actual[k].double() - ref[k]).abs() <= 2.0**-20 * mag[k])
        assert bool(ok.all()), f"{k}: {int((~ok).sum())} elements beyond 1 ulp (max {int(ulps.max())} ulps)"
        assert not torch.equal(actual[k], w[k]), f"{k} should be patched"


@pytest.fixture(scope="module")
def two_adapters(base_dir: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
                 ) -> tuple[Path, Path, Path]:
    """A Llama base and two adapters overlapping on q_proj: (q, v) r=8 α=12 and (q, o, down) rsLoRA r=6 α=9."""
    base = base_dir("llama")
    root = tmp_path_factory.mktemp("two")
    a1 = make_adapter(base, root / "a1", seed=1, r=8, lora_alpha=12, target_modules=["q_proj", "v_proj"])
    a2 = make_adapter(base, root / "a2", seed=2, r=6, lora_alpha=9, use_rslora=True,
                      target_modules=["q_proj", "o_proj", "down_proj"])
    return base, a1, a2


@pytest.mark.parametrize("weights", [[0.7, 0.3], None], ids=["0.7-0.3", "default-1.0"])
def test_weighted_adapters(weights: list[float] | None, two_adapters: tuple[Path, Path, Path],
                           tmp_path: Path) -> None:
    """Two adapters, each scaled by its weight: within 1 ulp of the float64 ``W + Σ wᵢ·sᵢ·BᵢAᵢ``.

    The reference is guarded against PEFT: with one adapter and weight 1 it agrees with PEFT's merge to the
    same tolerance (so scale, rsLoRA and targets are read right)."""
    base, a1, a2 = two_adapters
    w = load_folder_tensors(base)
    for adapter in (a1, a2):
        ref, mag = _reference(w, [adapter], [1.0])
        _assert_within_1ulp(peft_merged_pretrained(AutoModelForCausalLM, base, adapter, BF16), w, ref, mag)

    ref, mag = _reference(w, [a1, a2], weights or [1.0, 1.0])
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
            "model.layers.0.self_attn.v_proj.weight", "model.layers.1.self_attn.o_proj.weight"} <= ref.keys()
    out = tmp_path / "out"
    _engine_merge(base, [a1, a2], out, **({} if weights is None else {"weights": weights}))
    _assert_within_1ulp(load_folder_tensors(out), w, ref, mag)
    assert weight_map(out) == weight_map(base)
    assert json.loads((out / "config.json").read_text()) == json.loads((base / "config.json").read_text())


def test_dora_with_another_adapter_refused(two_adapters: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """DoRA's norm depends on the whole merged weight, so a DoRA adapter combined with another is refused."""
    base, a1, _ = two_adapters
    dora = make_adapter(base, tmp_path / "dora", seed=3, r=8, lora_alpha=12, use_dora=True,
                        target_modules=["k_proj"])
    _engine_refuses(base, [a1, dora], tmp_path / "out1", match="(?i)dora", weights=[0.5, 0.5])
    _engine_refuses(base, [dora, a1], tmp_path / "out2", match="(?i)dora")


# ---------------------------------------------------------------------------------------------------------
# 7. Adapters saved in a named sub-folder
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_default", [True, False], ids=["default-and-other", "only-other"])
def test_named_subfolder(with_default: bool, base_dir: Callable[..., Path], tmp_path: Path) -> None:
    """``save_pretrained`` of a PeftModel writes a non-default adapter to ``<dir>/<name>/``.

    With a "default" adapter next to it, ``<dir>/other`` is passed; with "other" alone, ``<dir>`` itself
    (it holds only that one named sub-folder) is passed. Expected: PEFT's merge of ``<dir>/other``."""
    from peft import LoraConfig, get_peft_model

    base = base_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=BF16)
    other = LoraConfig(r=8, lora_alpha=12, init_lora_weights=False, task_type="CAUSAL_LM",
                       target_modules=["o_proj", "down_proj"])
    if with_default:
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=6, init_lora_weights=False,
                                                      task_type="CAUSAL_LM", target_modules=["q_proj"]))
        peft_model.add_adapter("other", other)
    else:
        peft_model = get_peft_model(model, other, adapter_name="other")
    randomize_adapter(peft_model, 1)
    root = tmp_path / "adapters"
    peft_model.save_pretrained(root)
    assert (root / "other" / "adapter_config.json").exists()
    assert (root / "adapter_config.json").exists() == with_default
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["other"]

    oracle_dir = tmp_path / "oracle"
    expected = peft_merged_pretrained(AutoModelForCausalLM, base, root / "other", BF16, save_to=oracle_dir)
    w = load_folder_tensors(base)
    _assert_oracle_changes(expected, w, {f"{m}.weight" for m in _lora_modules(root / "other")})
    assert _lora_modules(root / "other") == {f"model.layers.{i}.{p}" for i in range(2)
                                             for p in ("self_attn.o_proj", "mlp.down_proj")}

    out = tmp_path / "out"
    _engine_merge(base, root / "other" if with_default else root, out)
    _check_output(out, base, expected)
