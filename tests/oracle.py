"""Tiny real transformers models, PEFT-saved LoRA adapters, and PEFT's own merge as the oracle.

Helpers only (no tests). Everything runs on CPU with the library defaults that
PEFT_SEMANTICS.md §9 calls "the oracle": ``PeftModel.from_pretrained`` on a base loaded in
the checkpoint dtype, then ``merge_and_unload()`` and ``save_pretrained``.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel

# Shared small sizes: hidden 64, MLP 96 (rectangular), 2 layers, GQA with 4 heads / 2 KV heads.
_COMMON = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(_COMMON),
    "mistral": dict(_COMMON, sliding_window=None),
    "qwen2": dict(_COMMON),  # q/k/v carry biases
    "qwen3": dict(_COMMON, head_dim=16),  # q_norm / k_norm
    "phi3": dict(_COMMON),  # fused qkv_proj and gate_up_proj
    "gemma2": dict(_COMMON, head_dim=16, query_pre_attn_scalar=16),
    "gpt2": dict(  # HF Conv1D: c_attn (64 -> 192), attn.c_proj (64 -> 64), mlp.c_fc / mlp.c_proj
        vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
}

def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded, non-trivial values (fp32 model expected)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise * 0.06)
            elif name.endswith("bias"):
                p.copy_(noise * 0.05)
            else:  # norm scales: around 1 (Gemma stores weight-1, still fine)
                p.copy_(1.0 + noise * 0.1)


def make_base(
    dirpath: str | Path, family: str, dtype: torch.dtype = torch.bfloat16, shards: int = 3,
    seed: int = 0, **overrides: Any,
) -> Path:
    """Save a tiny random ``family`` CausalLM in ``dtype`` with at least ``shards`` safetensors shards."""
    dirpath = Path(dirpath)
    cfg = AutoConfig.for_model(family, **{**FAMILIES[family], **overrides})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _randomize(model, seed)
    model = model.to(dtype).eval()
    state = model.state_dict()
    assert 1 <= shards <= len(state)
    size = sum(t.nbytes for t in state.values()) // shards if shards > 1 else 50 * 2**30
    while True:  # the split is greedy, so shrink until there are enough shards
        if dirpath.exists():
            shutil.rmtree(dirpath)
        model.save_pretrained(dirpath, max_shard_size=size)
        if len(set(weight_map(dirpath).values())) >= shards:
            break
        size = int(size * 0.85)
    if not (dirpath / "generation_config.json").exists():
        GenerationConfig.from_model_config(model.config).save_pretrained(dirpath)
    assert (dirpath / "model.safetensors").exists() == (shards == 1)
    return dirpath


def make_adapter(
    base_dir: str | Path, out_dir: str | Path, seed: int = 1, adapter_dtype: torch.dtype | None = None,
    resize_vocab: int | None = None, **lora_kwargs: Any,
) -> Path:
    """Train-free PEFT LoRA adapter on ``base_dir`` with seeded random weights, saved by PEFT itself.

    ``lora_kwargs`` go to ``LoraConfig`` (``init_lora_weights=False``, ``task_type="CAUSAL_LM"`` by
    default). LoRA factors get std 0.1 so their deltas show up in bf16; ``modules_to_save`` copies and
    trainable biases get small perturbations of their base values. ``adapter_dtype`` casts only the
    ``lora_*`` parameters before saving (PEFT saves them as they are).
    """
    from peft import LoraConfig, get_peft_model

    out_dir = Path(out_dir)
    # transformers would load an adapter_config.json next to the base as a PEFT adapter
    assert out_dir.resolve() != Path(base_dir).resolve(), "adapter and base need separate folders"
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    if resize_vocab is not None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # mean-resizing samples the new rows
            model.resize_token_embeddings(resize_vocab)
    lora_kwargs = {"init_lora_weights": False, "task_type": "CAUSAL_LM", **lora_kwargs}
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters(), key=lambda item: item[0]):
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=gen)
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.1 * noise)
            elif "lora_" in name:
                p.copy_(noise * 0.1)
            else:  # modules_to_save copies, bias="all"/"lora_only" biases
                p.add_(noise * 0.05)
            if adapter_dtype is not None and "lora_" in name:
                p.data = p.data.to(adapter_dtype)
    peft_model.save_pretrained(out_dir)
    return out_dir


def _load_merged_model(
    base_dir: str | Path, adapter_dir: str | Path, dtype: torch.dtype | str, resize_vocab: int | None,
) -> PreTrainedModel:
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    if resize_vocab is not None:
        model.resize_token_embeddings(resize_vocab)  # the adapter file must overwrite the new rows
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().eval()


def peft_merged(
    base_dir: str | Path, adapter_dir: str | Path, dtype: torch.dtype | str = "auto",
    resize_vocab: int | None = None, save_to: str | Path | None = None,
) -> dict[str, torch.Tensor]:
    """PEFT's merge (defaults, CPU) saved with ``save_pretrained`` and read back: name -> tensor.

    With ``save_to`` the saved folder is kept there (for logits); otherwise a temp dir is used.
    """
    merged = _load_merged_model(base_dir, adapter_dir, dtype, resize_vocab)
    if save_to is not None:
        merged.save_pretrained(save_to)
        return load_folder_tensors(save_to)
    with tempfile.TemporaryDirectory() as tmp:
        merged.save_pretrained(tmp)
        return load_folder_tensors(tmp)


def weight_map(folder: str | Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index or the single ``model.safetensors``."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    with safe_open(folder / "model.safetensors", "pt") as f:
        return dict.fromkeys(f.keys(), "model.safetensors")


def adapter_touched(adapter_dir: str | Path) -> set[str]:
    """Base tensor names that the keys of a PEFT adapter file merge into or replace.

    ``X.lora_A.weight`` / ``X.lora_embedding_A`` -> ``X.weight``; ``X.lora_B.bias`` -> ``X.bias``;
    ``X.base_layer.P`` -> ``X.P``; ``X.modules_to_save.P`` / ``X.original_module.P`` -> ``X.P``;
    anything else (``modules_to_save``, ``bias="all"``, resized embeddings) names the tensor itself.
    """
    rules = [
        (r"\.lora_[AB]\.weight$", ".weight"), (r"\.lora_B\.bias$", ".bias"),
        (r"\.lora_embedding_[AB]$", ".weight"), (r"\.(base_layer|modules_to_save|original_module)\.", "."),
    ]
    with safe_open(Path(adapter_dir) / "adapter_model.safetensors", "pt") as f:
        keys = [k.removeprefix("base_model.model.") for k in f.keys()]
    out = set()
    for key in keys:
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out.add(key)
    return out


def load_folder_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (sharded with an index, or a single ``model.safetensors``)."""
    folder = Path(folder)
    wmap = weight_map(folder)
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(wmap.values())):
        tensors = load_file(folder / shard)
        assert all(wmap.get(k) == shard for k in tensors), f"{shard} disagrees with the index"
        out.update(tensors)
    assert out.keys() == wmap.keys(), "the index names tensors missing from the shards"
    return out


def tensor_mismatches(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """Human-readable differences between two name -> tensor dicts (empty when bitwise equal)."""
    problems = [f"missing: {k}" for k in sorted(expected.keys() - actual.keys())]
    problems += [f"unexpected: {k}" for k in sorted(actual.keys() - expected.keys())]
    for k in sorted(expected.keys() & actual.keys()):
        a, e = actual[k], expected[k]
        if a.dtype != e.dtype or a.shape != e.shape:
            problems.append(f"{k}: {a.dtype}{tuple(a.shape)} != expected {e.dtype}{tuple(e.shape)}")
        elif not torch.equal(a, e):
            max_diff = (a.double() - e.double()).abs().max().item()  # nan if either side has NaN
            problems.append(f"{k}: max|diff|={max_diff:.3g}, {int((a != e).sum())}/{a.numel()} elements differ")
    return problems


def assert_bitwise_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes and ``torch.equal`` values; the message lists every mismatch."""
    problems = tensor_mismatches(actual, expected)
    assert not problems, f"{len(problems)} tensor mismatch(es):\n  " + "\n  ".join(problems)


def logits(
    folder_or_model: str | Path | torch.nn.Module, input_ids: torch.Tensor,
    dtype: torch.dtype | str = "auto",
) -> torch.Tensor:
    """Forward ``input_ids`` through a model (or ``from_pretrained(folder, dtype)``) and return logits."""
    model = folder_or_model
    if not isinstance(model, torch.nn.Module):
        model = AutoModelForCausalLM.from_pretrained(folder_or_model, dtype=dtype)
    with torch.no_grad():
        return model.eval()(input_ids=input_ids).logits


# ---------------------------------------------------------------------------------------------------------
# LoRA-family helpers (DoRA, ConvNd, MoE, VLM, tied embeddings, several adapters): used by
# test_peft_parity_family.py. Everything above keeps its behaviour.
# ---------------------------------------------------------------------------------------------------------

def randomize_adapter(peft_model: torch.nn.Module, seed: int, adapter_name: str | None = None) -> None:
    """The seeded perturbation of ``make_adapter`` for any PeftModel (optionally one named adapter only).

    LoRA factors (also ``lora_embedding_*``) get std 0.1; the DoRA ``lora_magnitude_vector`` is multiplied
    by ``1 + 0.1·noise`` (so it is not PEFT's init norm ‖W + sBA‖); other trainable params get +0.05·noise.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters(), key=lambda item: item[0]):
            if not p.requires_grad or (adapter_name is not None and f".{adapter_name}" not in name):
                continue
            noise = torch.randn(p.shape, generator=gen)
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.1 * noise)
            elif "lora_" in name:
                p.copy_(noise * 0.1)
            else:
                p.add_(noise * 0.05)


def randomize_module(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``_randomize`` for any module (fp32 expected); returns it."""
    _randomize(module, seed)
    return module


def save_model(model: PreTrainedModel, dirpath: str | Path, max_shard_size: int | str | None = None) -> Path:
    """``save_pretrained`` (transformers' own on-disk layout) plus a generation config; returns the folder."""
    dirpath = Path(dirpath)
    if dirpath.exists():
        shutil.rmtree(dirpath)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(dirpath, **kwargs)
    if not (dirpath / "generation_config.json").exists():
        GenerationConfig.from_model_config(model.config).save_pretrained(dirpath)
    return dirpath


def save_state_dict(state: dict[str, torch.Tensor], dirpath: str | Path, shards: int = 1) -> Path:
    """A plain ``nn.Module`` state dict as a checkpoint folder: ``model.safetensors`` (shards=1) or
    ``shards`` files ``model-0000i-of-0000n.safetensors`` with a hand-written index (round-robin by name,
    so every shard holds tensors of several layers)."""
    from safetensors.torch import save_file

    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    if shards == 1:
        save_file(state, str(dirpath / "model.safetensors"), metadata={"format": "pt"})
        return dirpath
    names = list(state)
    assert len(names) >= shards
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    wmap = {name: files[i % shards] for i, name in enumerate(names)}
    for f in files:
        save_file({k: state[k] for k in names if wmap[k] == f}, str(dirpath / f), metadata={"format": "pt"})
    total = sum(t.nbytes for t in state.values())
    (dirpath / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}, indent=2))
    return dirpath


def rename_checkpoint(src: str | Path, dst: str | Path, rename: Any) -> Path:
    """Copy a checkpoint folder, renaming every tensor with ``rename(name) -> name`` in the shards and the
    index (shard files, tensor order and dtypes kept); non-weight files are copied as they are."""
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    wmap = weight_map(src)
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name != "model.safetensors.index.json":
            shutil.copy2(p, dst / p.name)
    for shard in sorted(set(wmap.values())):
        with safe_open(src / shard, "pt") as f:
            meta = f.metadata()
            tensors = {rename(k): f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(dst / shard), metadata=meta)
    index = src / "model.safetensors.index.json"
    if index.exists():
        obj = json.loads(index.read_text())
        obj["weight_map"] = {rename(k): v for k, v in obj["weight_map"].items()}
        (dst / index.name).write_text(json.dumps(obj, indent=2))
    return dst


def load_peft_checked(model: torch.nn.Module, adapter_dir: str | Path, strict: bool = True, **kwargs: Any):
    """``PeftModel.from_pretrained`` with the oracle defaults, proving that PEFT really loaded the file.

    With ``strict``: no "Found missing adapter keys" warning (a silent no-op merge otherwise), and every
    tensor of the adapter file is a tensor of the loaded adapter with the same value (PEFT drops unexpected
    file keys without a word). Returns the PeftModel (unmerged).
    """
    import warnings

    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), **kwargs)
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    if strict:
        assert not missing, missing[0][:2000]
        adapter_name = kwargs.get("adapter_name", "default")
        loaded = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
        file = load_file(Path(adapter_dir) / "adapter_model.safetensors")
        assert file.keys() == loaded.keys(), (
            f"file-only keys {sorted(file.keys() - loaded.keys())[:5]}, "
            f"model-only keys {sorted(loaded.keys() - file.keys())[:5]}")
        bad = [k for k in file if not torch.equal(file[k].float(), loaded[k].float())]
        assert not bad, f"adapter tensors not loaded as saved: {bad[:5]}"
    peft_model.missing_adapter_warnings = missing  # type: ignore[attr-defined]
    return peft_model


def peft_merged_pretrained(
    model_cls: Any, base_dir: str | Path, adapter_dir: str | Path, dtype: torch.dtype | str = "auto",
    save_to: str | Path | None = None, **load_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """``peft_merged`` for any transformers class (VLMs, MoE) with the strict load check: PEFT merge,
    ``save_pretrained`` (transformers writes its own on-disk layout), read back."""
    model = model_cls.from_pretrained(base_dir, dtype=dtype)
    merged = load_peft_checked(model, adapter_dir, **load_kwargs).merge_and_unload().eval()
    if save_to is None:
        with tempfile.TemporaryDirectory() as tmp:
            merged.save_pretrained(tmp)
            return load_folder_tensors(tmp)
    merged.save_pretrained(save_to)
    return load_folder_tensors(save_to)


def peft_merged_module(module: torch.nn.Module, base_dir: str | Path, adapter_dir: str | Path,
                       **load_kwargs: Any) -> dict[str, torch.Tensor]:
    """Oracle for a plain ``nn.Module``: load the checkpoint's tensors into ``module`` (strict, the module
    must already have the checkpoint dtype), apply the adapter with PEFT, ``merge_and_unload().state_dict()``."""
    state = load_folder_tensors(base_dir)
    module.load_state_dict(state, strict=True)
    assert all(p.dtype == state[n].dtype for n, p in module.named_parameters())
    merged = load_peft_checked(module, adapter_dir, **load_kwargs).merge_and_unload()
    return {k: v.detach().clone().contiguous() for k, v in merged.state_dict().items()}


def adapter_modules(adapter_dir: str | Path) -> dict[str, set[str]]:
    """Module path (in-memory name, prefix stripped) -> the adapter key kinds found for it
    (``lora_A``, ``lora_B``, ``lora_embedding_A``, ``lora_magnitude_vector``, ``base_layer.weight``...)."""
    with safe_open(Path(adapter_dir) / "adapter_model.safetensors", "pt") as f:
        keys = [k.removeprefix("base_model.model.") for k in f.keys()]
    out: dict[str, set[str]] = {}
    for key in keys:
        m = re.match(r"^(.*?)\.(lora_[AB]\.weight|lora_B\.bias|lora_embedding_[AB]|lora_magnitude_vector)$", key)
        module, kind = (m.group(1), m.group(2)) if m else (key.rsplit(".", 1)[0], key.rsplit(".", 1)[1])
        out.setdefault(module, set()).add(kind)
    return out


def changed_tensors(actual: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> set[str]:
    """Names whose tensor differs from (or is absent in) ``base``."""
    return {k for k, v in actual.items() if k not in base or not torch.equal(v, base[k])}


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise distance in units in the last place between two bf16 tensors, from their bit patterns
    (sign-magnitude mapped to a monotonic integer line, so ±0 are 0 apart and the step across 0 counts)."""
    assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape

    def line(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (line(a) - line(b)).abs()


def lora_delta(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """PEFT's fp32 Linear delta ``(B32 @ A32) * s`` (two separate ops)."""
    return (b.float() @ a.float()) * s


def merge_once(w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """One rounding: ``(W.float() + D).to(W.dtype)``."""
    return (w.float() + delta).to(w.dtype)


def merge_twice(w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Two roundings (Embedding, ParamWrapper): ``W + D.to(W.dtype)``."""
    return w + delta.to(w.dtype)
