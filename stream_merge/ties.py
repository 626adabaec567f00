"""Tied input/output embeddings: is the base tied, and what a merge may do to a tied pair.

Pure (reads no files). The planner calls `_tie_policy` once every adapter is planned: a change to a tied
tensor is refused unless --untie, which adds a separate head tensor and sets tie_word_embeddings=false.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .keymap import compile_patterns
from .records import AdapterSpec, BaseIndex, Replacement, TensorInfo, TensorPlan

TIE_HELP = ("the base ties lm_head to the input embedding (tie_word_embeddings, no lm_head.weight on disk), so "
            "changing one changes both; pass --untie to write a separate lm_head.weight and set "
            "tie_word_embeddings=false")


def _text_cfg(base: BaseIndex, key: str) -> object:
    cfg = base.config or {}
    if key in cfg:
        return cfg[key]
    sub = cfg.get("text_config")
    return sub.get(key) if isinstance(sub, dict) else None


def _vocab_size(base: BaseIndex) -> int | None:
    v = _text_cfg(base, "vocab_size")
    return v if isinstance(v, int) else None


def _tied_head(base: BaseIndex) -> bool:
    """The base ties its output head to the input embedding: the config says so and no head is on disk."""
    tie = _text_cfg(base, "tie_word_embeddings")
    if tie is None:
        tie = True  # transformers' PretrainedConfig default
    return bool(tie) and not any(n == "lm_head.weight" or n.endswith(".lm_head.weight") for n in base.tensors)


def _is_head(name: str) -> bool:
    return name == "lm_head" or name.endswith(".lm_head") or name.startswith("lm_head.") or ".lm_head." in name


def vocab_row_tensor(base: BaseIndex, info: TensorInfo) -> bool:
    """Is this the input embedding (2-D, one row per vocabulary entry)?"""
    vocab = _vocab_size(base)
    leaf = info.name.rsplit(".", 2)[-2] if "." in info.name else info.name
    return (vocab is not None and len(info.shape) == 2 and info.shape[0] == vocab
            and any(s in leaf for s in ("embed", "wte", "tok_embeddings", "word_embeddings")))


def _head_name(base: BaseIndex) -> str:
    return "language_model.lm_head.weight" if any(n.startswith("language_model.model.") for n in base.tensors) \
        else "lm_head.weight"


def _tie_policy(acc: Any, adapters: Sequence[AdapterSpec], plan_module: Callable[..., None]) -> TensorPlan | None:
    """Tied bases: refuse changes to the shared tensor, or (--untie) add a separate head. Returns the new
    head tensor, which goes into the embedding's shard."""
    if not _tied_head(acc.base):
        return None
    embeds = [i for i in acc.base.tensors.values() if vocab_row_tensor(acc.base, i)]
    touched = [n for n in list(acc.patches) + list(acc.replacements) if any(e.name == n for e in embeds)]
    if not touched and not acc.head_modules:
        if acc.head_base is not None:
            acc.problems.append(f"adapter key {acc.head_base.key!r} saves an lm_head but no LoRA on lm_head uses it")
        return None
    if not acc.options.untie:
        what = ", ".join(sorted({*touched, *(f"{m} (LoRA)" for _, m, _ in acc.head_modules)}))
        acc.problems.append(f"the adapter changes {what}, but {TIE_HELP}")
        return None
    if len(embeds) != 1:
        acc.problems.append(f"--untie: cannot tell which tensor is the tied input embedding "
                            f"({', '.join(e.name for e in embeds) or 'none found'})")
        return None
    emb = embeds[0]
    rep = acc.replacements.get(emb.name)
    if rep is not None and rep.reason == "modules_to_save":
        acc.problems.append(f"--untie with a trained copy of {emb.name!r} (modules_to_save) is ambiguous: the tied "
                            "head would follow either copy; merge with an untied base instead")
        return None
    name = _head_name(acc.base)
    for idx, module, roles in acc.head_modules:
        spec = adapters[idx]
        ranks = compile_patterns(spec.settings.rank_pattern, "rank_pattern")
        alphas = compile_patterns(spec.settings.alpha_pattern, "alpha_pattern")
        plan_module(acc, idx, spec, module, roles, emb, "untied", ranks, alphas, target_name=name)
    acc.config_updates["tie_word_embeddings"] = False
    head_rep = acc.head_base or rep
    if head_rep is not None and head_rep.shape != (rep.shape if rep else emb.shape):
        acc.problems.append(f"--untie: {head_rep.key!r} has shape {list(head_rep.shape)} but the embedding is "
                            f"{list(rep.shape if rep else emb.shape)}")
        return None
    return TensorPlan(name=name, dtype=emb.dtype, shape=head_rep.shape if head_rep else emb.shape, source=emb,
                      replace=Replacement(name, head_rep.adapter, head_rep.key, head_rep.reason, head_rep.shape)
                      if head_rep else None, patches=tuple(acc.patches.get(name, ())))
