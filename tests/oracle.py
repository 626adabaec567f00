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
