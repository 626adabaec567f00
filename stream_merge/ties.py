"""Tied weights: which tensors a model fills from another on load, and what a merge may do to them.

Pure (reads no files). Tied-ness is decided from what the checkpoint and config say: `tie_word_embeddings`
(transformers' default: true) and `tie_encoder_decoder`, the architecture's tied keys (our table in
`tie_table`, else the installed transformers' own keys, else nothing for classifier heads and the Llama-like
rule "lm_head from the input embedding" for everything else), and which member of each tied pair is actually
on disk. So a sequence classifier ties nothing, a T5/BART base ties its encoder/decoder embeddings and head to
`shared`, a BERT masked LM ties `cls.predictions.decoder` to the word embeddings and `cls.predictions.bias`.

A LoRA delta on a member that still shares its tensor with another member is refused unless --untie (PEFT's
merge would add it to the shared tensor, changing every member). Trained full copies of members
(modules_to_save) need no flag: they are written as separate tensors, as PEFT's merge saves them. Untying
writes every tied member under the name its model class loads and sets `tie_word_embeddings: false`, which
in transformers unties every pair of the model at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .keymap import TargetResolver, compile_patterns
from .model_config import config_value
from .records import AdapterSpec, BaseIndex, Replacement, TensorInfo, TensorPlan
from .tie_table import ARCH_TIED_KEYS, HEADLESS_SUFFIXES, LM_SUFFIXES, UNTIE_REFUSED

TIE_HELP = ("changing one changes all of them; pass --untie to write separate tensors and set "
            "tie_word_embeddings=false")


@dataclass(frozen=True)
class TieGroup:
    """`stored` is on disk; a tied model fills each of `aliases` (names in the base's layout) from it."""

    stored: str
    aliases: tuple[str, ...]


def _text_cfg(base: BaseIndex, key: str) -> object:
    return config_value(base.config, key)


def _vocab_size(base: BaseIndex) -> int | None:
    v = _text_cfg(base, "vocab_size")
    return v if isinstance(v, int) else None


def _tie_flag(base: BaseIndex) -> bool:
    tie = _text_cfg(base, "tie_word_embeddings")
    return True if tie is None else bool(tie)  # transformers' PretrainedConfig default


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


def _disk_name(base: BaseIndex, name: str) -> str:
    """An in-memory head name in the base's layout (legacy VLM checkpoints keep `language_model.lm_head`)."""
    return _head_name(base) if name == "lm_head.weight" else name


def arch_tied_keys(config: Any) -> dict[str, str] | None:
    """`target -> source` (in-memory names) for the config's architecture: our table, else the installed
    transformers' keys, else {} for heads that read no vocabulary and None (the language-model rule) otherwise."""
    archs = config.get("architectures") if isinstance(config, Mapping) else None
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if arch is None:
        return None
    if arch in ARCH_TIED_KEYS:
        return dict(ARCH_TIED_KEYS[arch])
    from .hf_ties import transformers_tied_keys  # optional: transformers, where installed

    found = transformers_tied_keys(config)
    if found is not None:
        return found
    return {} if arch.endswith(HEADLESS_SUFFIXES) and not arch.endswith(LM_SUFFIXES) else None


def _lm_groups(base: BaseIndex) -> tuple[TieGroup, ...]:
    """The language-model rule: `lm_head.weight` (absent from disk) is filled from the input embedding."""
    if any(n == "lm_head.weight" or n.endswith(".lm_head.weight") for n in base.tensors):
        return ()
    head = _head_name(base)
    return tuple(TieGroup(i.name, (head,)) for i in base.tensors.values() if vocab_row_tensor(base, i))


def _encoder_decoder_keys(base: BaseIndex) -> dict[str, str]:
    """`tie_encoder_decoder` (transformers 4 EncoderDecoderModel): each decoder weight absent from disk
    whose encoder twin is stored is filled from it."""
    if not _text_cfg(base, "tie_encoder_decoder"):
        return {}
    out = {}
    for name in base.tensors:
        if name.startswith("encoder.") or ".encoder." in name:
            twin = name.replace("encoder.", "decoder.", 1) if name.startswith("encoder.") \
                else name.replace(".encoder.", ".decoder.", 1)
            if twin not in base.tensors:
                out[twin] = name
    return out


def tie_groups(base: BaseIndex, resolver: TargetResolver) -> tuple[TieGroup, ...]:
    """Every tied group of the base: a member on disk and the members a tied model fills from it."""
    keys = arch_tied_keys(base.config) if _tie_flag(base) else {}
    groups = {g.stored: list(g.aliases) for g in (_lm_groups(base) if keys is None else ())}
    for target, source in {**(keys or {}), **_encoder_decoder_keys(base)}.items():
        t, t_via, _ = resolver.resolve(target)
        s, s_via, _ = resolver.resolve(source)
        if t is None and t_via == "missing" and s is not None:
            groups.setdefault(s, []).append(_disk_name(base, target))
        elif s is None and s_via == "missing" and t is not None:  # transformers ties the way round that exists
            groups.setdefault(t, []).append(_disk_name(base, source))
    return tuple(TieGroup(s, tuple(a)) for s, a in groups.items())


def groups_of(acc: Any) -> tuple[TieGroup, ...]:
    """`tie_groups` of the planner's base, computed once per plan (kept on the planner's scratch state)."""
    if acc.tie_groups is None:
        acc.tie_groups = tie_groups(acc.base, acc.resolver)
    return acc.tie_groups


def tied_alias(acc: Any, name: str) -> str | None:
    """The output name of `name` (an adapter's in-memory tensor name absent from disk) if a tied model
    fills it from a stored tensor, else None."""
    disk = _disk_name(acc.base, name)
    for g in groups_of(acc):
        if disk in g.aliases:
            return disk
    return None


def add_alias_replacement(acc: Any, idx: int, key: str, target: str, reason: str, shape: tuple[int, ...]) -> bool:
    """Record an adapter tensor that replaces a tied member absent from disk (a modules_to_save copy of the
    head, PEFT's saved base layer of a LoRA'd head); False if `target` is not a tied member."""
    alias = tied_alias(acc, target)
    if alias is None:
        return False
    prev = acc.replacements.get(alias)
    if prev is not None and prev.adapter == idx and ".modules_to_save." in key:
        if prev.shape != shape:
            acc.problems.append(f"adapter {idx}: {key!r} and {prev.key!r} disagree on the shape of {alias!r}")
        return True
    if prev is not None:
        acc.problems.append(f"{alias!r} is replaced by two adapter tensors ({prev.key!r} and {key!r})")
        return True
    acc.replacements[alias] = Replacement(alias, idx, key, reason, shape)
    return True


def _relevant(acc: Any) -> bool:
    """Can the adapters touch a tied group at all? (Keeps the optional transformers lookup off most plans.)"""
    if acc.head_modules or any(n not in acc.base.tensors for n in acc.replacements) \
            or _text_cfg(acc.base, "tie_encoder_decoder"):
        return True
    vocab = _vocab_size(acc.base)
    for name in [*acc.patches, *acc.replacements]:
        info = acc.base.tensors.get(name)
        if info is not None and (vocab is None or (info.shape and info.shape[0] == vocab)):
            return True
    return False


@dataclass
class _GroupState:
    group: TieGroup
    copied: set[str]  # members replaced by a trained full copy (modules_to_save)
    lora: set[str]  # members with a LoRA delta
    conflict: bool  # a delta would reach members that share one tensor


def _group_states(acc: Any, groups: Sequence[TieGroup], alias_lora: dict[str, list]) -> list[_GroupState]:
    out = []
    for g in groups:
        members = (g.stored, *g.aliases)
        copied = {m for m in members if (r := acc.replacements.get(m)) is not None and r.reason == "modules_to_save"}
        lora = {m for m in members if acc.patches.get(m) or alias_lora.get(m)}
        shared = [m for m in members if m not in copied]
        out.append(_GroupState(g, copied, lora, bool(lora & set(shared)) and len(shared) > 1))
    return out


def _shared_base(acc: Any, g: TieGroup) -> Replacement | None:
    """The adapter's new value of the tensor a group shares, if any: PEFT loads a saved base layer (or a
    `bias="all"` bias) of any tied member into the one shared parameter, so it is every untrained member's
    base (PEFT saves one per member name when the vocabulary was resized). Also becomes the stored tensor's
    replacement when only an absent member carried it."""
    reps = [r for m in (g.stored, *g.aliases)
            if (r := acc.replacements.get(m)) is not None and r.reason != "modules_to_save"]
    if not reps:
        return None
    if len({r.shape for r in reps}) > 1:
        acc.problems.append(f"tied tensors {', '.join(repr(r.key) for r in reps)} (one shared tensor, "
                            f"{g.stored!r}) have different shapes {', '.join(str(list(r.shape)) for r in reps)}")
        return None
    if g.stored not in acc.replacements:
        info = acc.base.tensors[g.stored]
        acc.replacements[g.stored] = Replacement(g.stored, reps[0].adapter, reps[0].key, reps[0].reason,
                                                 reps[0].shape)
        if not _fits_vocab(acc, g.stored, info, reps[0]):
            return None
    return reps[0]


def _tie_policy(acc: Any, adapters: Sequence[AdapterSpec], plan_module: Callable[..., None]) -> list[TensorPlan]:
    """Tied bases: refuse a change that would reach several tied members, or untie (--untie, or trained
    copies of members) by adding the tied members as tensors. Returns the added tensors; each goes into its
    source's shard."""
    if not _relevant(acc):
        return []
    groups = groups_of(acc)
    alias_lora: dict[str, list[tuple[int, str, dict]]] = {}
    for idx, module, roles in acc.head_modules:
        alias = tied_alias(acc, module + ".weight")
        alias_lora.setdefault(alias or module + ".weight", []).append((idx, module, roles))
    bases = {g.stored: _shared_base(acc, g) for g in groups}
    states = _group_states(acc, groups, alias_lora)
    conflicts = [s for s in states if s.conflict]
    if not conflicts and not any(s.copied for s in states):
        return []
    if conflicts and not acc.options.untie:
        for s in conflicts:
            what = ", ".join(sorted(f"{m} (LoRA)" if m in alias_lora else m for m in s.lora))
            acc.problems.append(f"the adapter changes {what}, but the base ties {', '.join(s.group.aliases)} to "
                                f"{s.group.stored!r} (tie_word_embeddings, not on disk), so {TIE_HELP}")
        return []
    why = UNTIE_REFUSED.get(str(_text_cfg(acc.base, "model_type")))
    if why is not None:
        what = "--untie" if conflicts else "writing the trained copies of tied tensors (modules_to_save)"
        acc.problems.append(f"{what}: cannot untie this base: {why}; merge into an untied checkpoint or keep the "
                            "tied embeddings out of the adapter")
        return []
    return _untie(acc, adapters, groups, bases, alias_lora, plan_module)


def _untie(acc: Any, adapters: Sequence[AdapterSpec], groups: Sequence[TieGroup], bases: dict[str, Any],
           alias_lora: dict[str, list], plan_module: Callable[..., None]) -> list[TensorPlan]:
    """Every tied member as its own tensor: its trained copy, else the shared base (the stored tensor or
    the adapter's saved base layer) plus the member's own LoRA delta. `tie_word_embeddings: false` unties
    all pairs at once."""
    owners: dict[str, list[str]] = {}
    for g in groups:
        for alias in g.aliases:
            owners.setdefault(alias, []).append(g.stored)
    for alias, stored in owners.items():
        if len(stored) > 1:
            acc.problems.append(f"--untie: cannot tell which tensor {alias!r} is tied to ({', '.join(stored)}); "
                                "add a key_map rule or fix the config's architectures")
            return []
    added: list[tuple[TensorPlan, TensorInfo, Replacement | None]] = []
    for g in groups:
        info, base_rep = acc.base.tensors[g.stored], bases[g.stored]
        seen = TensorInfo(info.name, info.dtype, base_rep.shape, info.start, info.end) if base_rep else info
        for alias in g.aliases:
            for idx, module, roles in alias_lora.get(alias, ()):
                spec = adapters[idx]
                ranks = compile_patterns(spec.settings.rank_pattern, "rank_pattern")
                alphas = compile_patterns(spec.settings.alpha_pattern, "alpha_pattern")
                plan_module(acc, idx, spec, module, roles, seen, "untied", ranks, alphas, target_name=alias)
            own = acc.replacements.get(alias)
            rep = own if own is not None and own.reason == "modules_to_save" else base_rep
            plan = TensorPlan(name=alias, dtype=info.dtype, shape=rep.shape if rep else info.shape, source=info,
                              replace=Replacement(alias, rep.adapter, rep.key, rep.reason, rep.shape) if rep else None,
                              patches=tuple(acc.patches.get(alias, ())))
            added.append((plan, info, rep))
    # resizing copies first, so that every member is checked against the final vocabulary
    added.sort(key=lambda x: x[2] is None or x[2].shape == x[1].shape)
    if not all([_fits_vocab(acc, plan.name, info, rep) for plan, info, rep in added]):
        return []
    acc.config_updates["tie_word_embeddings"] = False
    if _text_cfg(acc.base, "tie_encoder_decoder"):
        acc.config_updates["tie_encoder_decoder"] = False
    return [plan for plan, _, _ in added]


def _fits_vocab(acc: Any, name: str, info: TensorInfo, rep: Replacement | None) -> bool:
    """A tied member written from `info` (or from `rep`, which may resize the vocabulary) must fit the
    vocabulary like every other vocabulary tensor; a resize is recorded as the config's new vocab_size."""
    vocab, new = _vocab_size(acc.base), acc.config_updates.get("vocab_size")
    if rep is not None and rep.shape != info.shape:
        resized = (len(rep.shape) == len(info.shape) and rep.shape[1:] == info.shape[1:]
                   and vocab is not None and info.shape[0] == vocab)
        if not resized:
            acc.problems.append(f"{rep.key!r} has shape {list(rep.shape)} but {info.name!r}, the tensor "
                                f"{name!r} is tied to, is {list(info.shape)}")
            return False
        if new is not None and new != rep.shape[0]:
            acc.problems.append(f"the adapter resizes the vocabulary to {rep.shape[0]} rows in {rep.key!r} "
                                f"but to {new} elsewhere")
            return False
        acc.config_updates["vocab_size"] = rep.shape[0]
    elif new is not None and vocab is not None and info.shape and info.shape[0] == vocab != new:
        acc.problems.append(f"the adapter resizes the vocabulary to {new} but {name!r} (tied to "
                            f"{info.name!r}) keeps {vocab} rows")
        return False
    return True
