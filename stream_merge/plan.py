"""Base index + adapters -> MergePlan. Pure: reads no files, so every problem is found before any IO.

For each adapter module we resolve the base tensor it changes, decide the layer kind (Linear, HF Conv1D,
Embedding, lora_bias), check every shape and rank, and compute PEFT's scale. Problems are collected, not
raised, so that the user sees all of them at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .keymap import (ParsedKey, TargetResolver, compile_patterns, is_conv1d_module, parse_key, pattern_value,
                     peft_targets)
from .records import (FLOAT_DTYPES, AdapterSpec, BaseIndex, LoraPatch, MergePlan, ModuleMapping, Replacement,
                      ShardPlan, TensorInfo, TensorPlan)


@dataclass(frozen=True)
class PlanOptions:
    key_map: tuple[tuple[str, str], ...] = ()
    strict: bool = False


@dataclass
class _Acc:
    """Mutable scratch state while planning (never escapes this module)."""

    base: BaseIndex
    resolver: TargetResolver
    strict: bool = False
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    replacements: dict[str, Replacement] = field(default_factory=dict)
    patches: dict[str, list[LoraPatch]] = field(default_factory=dict)
    mapping: list[ModuleMapping] = field(default_factory=list)
    config_updates: dict[str, object] = field(default_factory=dict)

    def resolve(self, name: str, what: str) -> tuple[TensorInfo | None, str]:
        target, via, cands = self.resolver.resolve(name)
        if target is not None:
            return self.base.tensors[target], via
        if via == "ambiguous":
            self.problems.append(f"{what}: {name!r} matches several base tensors ({', '.join(cands[:6])}); "
                                 "add a key_map rule to pick one")
        return None, via


def _model_type(base: BaseIndex) -> str | None:
    cfg = base.config or {}
    mt = cfg.get("model_type")
    if mt is None and isinstance(cfg.get("text_config"), dict):
        mt = cfg["text_config"].get("model_type")
    return mt


def _vocab_size(base: BaseIndex) -> int | None:
    cfg = base.config or {}
    v = cfg.get("vocab_size")
    if v is None and isinstance(cfg.get("text_config"), dict):
        v = cfg["text_config"].get("vocab_size")
    return v if isinstance(v, int) else None


def _tied_head(base: BaseIndex) -> bool:
    """The base ties its output head to the input embedding: the config says so and no head is on disk."""
    cfg = base.config or {}
    tie = cfg.get("tie_word_embeddings")
    if tie is None and isinstance(cfg.get("text_config"), dict):
        tie = cfg["text_config"].get("tie_word_embeddings")
    if tie is None:
        tie = True  # transformers' PretrainedConfig default
    return bool(tie) and not any(n == "lm_head.weight" or n.endswith(".lm_head.weight") for n in base.tensors)


def _is_head(name: str) -> bool:
    return name == "lm_head" or name.endswith(".lm_head") or name.startswith("lm_head.") or ".lm_head." in name


def _plan_replacements(acc: _Acc, idx: int, spec: AdapterSpec, keys: Sequence[ParsedKey], vocab: int | None) -> None:
    for pk in keys:
        target = pk.replace_target
        reason = ("modules_to_save" if pk.adapter_name or pk.module in spec.settings.modules_to_save
                  or any(pk.module.endswith("." + m) or pk.module == m for m in spec.settings.modules_to_save)
                  else "bias" if pk.param == "bias" else "saved base layer")
        src = spec.by_key[pk.key]
        info, _ = acc.resolve(target, f"adapter {idx} key {pk.key!r}")
        if info is None:
            if _is_head(target) and _tied_head(acc.base):
                acc.problems.append(
                    f"adapter {idx} key {pk.key!r} replaces the output head, but the base ties lm_head to the input "
                    "embedding (tie_word_embeddings, no lm_head.weight on disk); untying is not supported yet")
            else:
                acc.problems.append(
                    f"adapter {idx} key {pk.key!r} ({reason}) matched no base tensor (looked for {target!r}); "
                    "a task head such as 'score' or 'classifier' does not exist in a CausalLM checkpoint, "
                    "else add a key_map rule")
            continue
        if info.dtype not in FLOAT_DTYPES or src.dtype not in FLOAT_DTYPES:
            acc.problems.append(f"adapter {idx} key {pk.key!r}: cannot replace {info.name!r} of dtype {info.dtype} "
                                f"with {src.dtype}")
            continue
        if src.shape != info.shape:
            resized = (len(src.shape) == 2 and len(info.shape) == 2 and src.shape[1] == info.shape[1]
                       and vocab is not None and info.shape[0] == vocab)
            if not resized:
                acc.problems.append(f"adapter {idx} key {pk.key!r} has shape {list(src.shape)} but base tensor "
                                    f"{info.name!r} is {list(info.shape)}")
                continue
            prev = acc.config_updates.get("vocab_size")
            if prev is not None and prev != src.shape[0]:
                acc.problems.append(f"adapter {idx} resizes the vocabulary to {src.shape[0]} rows in {pk.key!r} "
                                    f"but to {prev} elsewhere")
            acc.config_updates["vocab_size"] = src.shape[0]
        prev_rep = acc.replacements.get(info.name)
        if prev_rep is not None and prev_rep.adapter == idx and ".modules_to_save." in pk.key:
            if prev_rep.shape != src.shape:
                acc.problems.append(f"adapter {idx}: {pk.key!r} and {prev_rep.key!r} disagree on the shape of "
                                    f"{info.name!r}")
            continue  # the wrapper's copy of the trained tensor saved next to the plain key
        if prev_rep is not None:
            acc.problems.append(f"{info.name!r} is replaced by two adapter tensors "
                                f"({acc.replacements[info.name].key!r} and {pk.key!r})")
            continue
        acc.replacements[info.name] = Replacement(info.name, idx, pk.key, reason, src.shape)


def _plan_modules(acc: _Acc, idx: int, spec: AdapterSpec, groups: Mapping[str, dict[str, ParsedKey]]) -> None:
    st = spec.settings
    try:
        ranks = compile_patterns(st.rank_pattern, "rank_pattern")
        alphas = compile_patterns(st.alpha_pattern, "alpha_pattern")
    except ValueError as exc:
        acc.problems.append(f"adapter {idx}: {exc}")
        return
    model_type = _model_type(acc.base)
    tied = _tied_head(acc.base)
    for module, roles in sorted(groups.items()):
        where = f"adapter {idx} module {module!r}"
        if "magnitude" in roles:
            acc.problems.append(f"{where}: has a DoRA magnitude vector but DoRA is not supported yet")
            continue
        emb = "emb_A" in roles or "emb_B" in roles
        a_role, b_role = ("emb_A", "emb_B") if emb else ("A", "B")
        if (a_role in roles) != (b_role in roles):
            have, miss = (a_role, b_role) if a_role in roles else (b_role, a_role)
            acc.problems.append(f"{where}: has {roles[have].key!r} but its pair "
                                f"{'lora_embedding_' if emb else 'lora_'}{miss[-1]} is missing")
            continue
        if "B_bias" in roles and not st.lora_bias:
            acc.problems.append(f"{where}: file has {roles['B_bias'].key!r} but lora_bias is false in the config")
            continue
        if a_role not in roles:
            acc.problems.append(f"{where}: has only {', '.join(k.key for k in roles.values())}, no LoRA pair")
            continue
        ka, kb = roles[a_role], roles[b_role]
        a, b = spec.by_key[ka.key], spec.by_key[kb.key]
        info, via = acc.resolve(module + ".weight", where)
        if info is None:
            if via != "ambiguous":
                if _is_head(module) and tied:
                    acc.problems.append(f"{where}: the adapter changes lm_head, but the base ties lm_head to the "
                                        "input embedding (tie_word_embeddings, no lm_head.weight on disk); "
                                        "untying is not supported yet")
                else:
                    acc.problems.append(f"{where}: matched no base tensor (looked for {module + '.weight'!r}); "
                                        "is this adapter for another model? else add a key_map rule")
            continue
        if info.dtype not in FLOAT_DTYPES:
            acc.problems.append(f"{where}: base tensor {info.name!r} is {info.dtype}; only F32/F16/BF16/F64 "
                                "weights can be merged (quantized bases are not supported)")
            continue
        rep = acc.replacements.get(info.name)
        wshape = rep.shape if rep else info.shape
        if any(x.dtype not in FLOAT_DTYPES for x in (a, b)):
            acc.problems.append(f"{where}: LoRA factors must be float tensors")
            continue
        if len(a.shape) != 2 or len(b.shape) != 2 or len(wshape) != 2:
            if len(wshape) > 2 or len(a.shape) > 2:
                acc.problems.append(f"{where}: LoRA on convolution weights ({info.name!r}, shape {list(wshape)}) "
                                    "is not supported yet")
            else:
                acc.problems.append(f"{where}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit base "
                                    f"tensor {info.name!r} {list(wshape)}")
            continue
        r_file = a.shape[0]
        if b.shape[1] != r_file:
            acc.problems.append(f"{where}: rank mismatch between {ka.key!r} {list(a.shape)} and {kb.key!r} "
                                f"{list(b.shape)}")
            continue
        if emb:
            kind = "embedding"
            fits = wshape == (a.shape[1], b.shape[0])
        else:
            as_linear = wshape == (b.shape[0], a.shape[1])
            as_conv1d = wshape == (a.shape[1], b.shape[0])
            if as_linear and as_conv1d:
                kind = "conv1d" if is_conv1d_module(module, model_type, st.fan_in_fan_out) else "linear"
            else:
                kind = "linear" if as_linear else "conv1d"
            fits = as_linear or as_conv1d
        if not fits:
            want = (a.shape[1], b.shape[0]) if emb else (b.shape[0], a.shape[1])
            acc.problems.append(f"{where}: shape mismatch: lora_A {list(a.shape)} and lora_B {list(b.shape)} make a "
                                f"{list(want)} delta but base tensor {info.name!r} is {list(wshape)}")
            continue
        r = pattern_value(ranks, module, st.r)
        alpha = pattern_value(alphas, module, st.lora_alpha)
        if r != r_file:
            acc.problems.append(f"{where}: rank mismatch: the config gives r={r} but the weights have rank "
                                f"{r_file} ({ka.key!r} {list(a.shape)}); fix rank_pattern or r in adapter_config.json")
            continue
        scale = alpha / math.sqrt(r) if st.use_rslora else alpha / r
        patch = LoraPatch(module=module, target=info.name, kind=kind, adapter=idx, a_key=ka.key, b_key=kb.key,
                          rank=r, alpha=float(alpha), scale=scale, weight=spec.weight,
                          double_round=kind == "embedding")
        acc.patches.setdefault(info.name, []).append(patch)
        acc.mapping.append(ModuleMapping(idx, module, info.name, kind, r, float(alpha), scale, via))
        if tied and (kind == "embedding" or vocab_row_tensor(acc.base, info)):
            acc.problems.append(f"{where}: changes {info.name!r}, which the base also uses as its output head "
                                "(tie_word_embeddings, no lm_head.weight on disk), so the head would change too; "
                                "untying is not supported yet")
        if "B_bias" in roles:
            bias_key = roles["B_bias"]
            binfo, _ = acc.resolve(module + ".bias", where)
            bb = spec.by_key[bias_key.key]
            if binfo is None:
                acc.problems.append(f"{where}: lora_bias needs a base bias {module + '.bias'!r}, but the base has "
                                    "none (PEFT raises here too)")
            elif binfo.shape != bb.shape or binfo.dtype not in FLOAT_DTYPES:
                acc.problems.append(f"{where}: lora_B bias {list(bb.shape)} does not fit {binfo.name!r} "
                                    f"{list(binfo.shape)} {binfo.dtype}")
            else:
                acc.patches.setdefault(binfo.name, []).append(LoraPatch(
                    module=module, target=binfo.name, kind="bias", adapter=idx, a_key=None, b_key=bias_key.key,
                    rank=r, alpha=float(alpha), scale=scale, weight=spec.weight))
        if isinstance(st.target_modules, (str, list)) and peft_targets(
                module, st.target_modules, st.exclude_modules, st.layers_to_transform, st.layers_pattern) is False:
            msg = (f"{where}: the file has LoRA weights for this module but target_modules/layers_to_transform "
                   "do not select it (PEFT would ignore them; stream-merge applies them)")
            (acc.problems if acc.strict else acc.warnings).append(msg)


def vocab_row_tensor(base: BaseIndex, info: TensorInfo) -> bool:
    """Is this the input embedding (2-D, one row per vocabulary entry)?"""
    vocab = _vocab_size(base)
    leaf = info.name.rsplit(".", 2)[-2] if info.name.count(".") >= 1 else info.name
    return (vocab is not None and len(info.shape) == 2 and info.shape[0] == vocab
            and any(s in leaf for s in ("embed", "wte", "tok_embeddings", "word_embeddings")))


def build_plan(base: BaseIndex, adapters: Sequence[AdapterSpec], options: PlanOptions = PlanOptions()) -> MergePlan:
    """Map every adapter tensor to the base tensor it changes; collect every problem."""
    acc = _Acc(base=base, resolver=TargetResolver(base.tensors.keys(), options.key_map), strict=options.strict)
    vocab = _vocab_size(base)
    tied = _tied_head(base)
    for idx, spec in enumerate(adapters):
        groups: dict[str, dict[str, ParsedKey]] = {}
        replace: list[ParsedKey] = []
        originals: list[ParsedKey] = []
        names: set[str] = set()
        for t in spec.tensors:
            pk = parse_key(t.key)
            if isinstance(pk, str):
                acc.problems.append(f"adapter {idx} key {t.key!r}: {pk}")
                continue
            if pk.adapter_name:
                names.add(pk.adapter_name)
            if pk.role == "replace":
                replace.append(pk)
            elif pk.role == "original":
                originals.append(pk)
            elif pk.role == "tokens":
                acc.problems.append(f"adapter {idx} key {t.key!r}: trainable tokens are not supported yet")
            elif pk.role == "nested":
                acc.problems.append(f"adapter {idx} key {t.key!r}: nested base_layer LoRA keys (target_parameters) "
                                    "are not supported yet")
            else:
                slot = groups.setdefault(pk.module, {})
                if pk.role in slot:
                    acc.problems.append(f"adapter {idx}: two keys for {pk.module} {pk.role}: "
                                        f"{slot[pk.role].key!r} and {t.key!r}")
                slot[pk.role] = pk
        if len(names) > 1:
            acc.problems.append(f"adapter {idx} holds weights of several adapters ({', '.join(sorted(names))}); "
                                "save each adapter in its own folder")
        replace.sort(key=lambda k: ".modules_to_save." in k.key)  # plain keys first
        _plan_replacements(acc, idx, spec, replace, vocab)
        for pk in originals:
            target, _, _ = acc.resolver.resolve(pk.replace_target)
            rep = acc.replacements.get(target or "")
            if rep is None or rep.adapter != idx:
                acc.problems.append(f"adapter {idx} key {pk.key!r} holds a modules_to_save wrapper's original "
                                    "module but the file has no trained copy of it to merge")
        if tied:
            for target, rep in acc.replacements.items():
                if rep.adapter == idx and vocab_row_tensor(base, base.tensors[target]):
                    acc.problems.append(f"adapter {idx} key {rep.key!r} replaces {target!r}, which the base also uses "
                                        "as its output head (tie_word_embeddings); untying is not supported yet")
        _plan_modules(acc, idx, spec, groups)
    if "vocab_size" in acc.config_updates and vocab is not None:
        new = acc.config_updates["vocab_size"]
        for name, info in base.tensors.items():
            if len(info.shape) == 2 and info.shape[0] == vocab and name not in acc.replacements and (
                    vocab_row_tensor(base, info) or _is_head(name)):
                acc.problems.append(f"the adapter resizes the vocabulary to {new} but {name!r} keeps {vocab} rows")
    shards = []
    for h in base.shards:
        tps = []
        for t in h.tensors:
            rep = acc.replacements.get(t.name)
            tps.append(TensorPlan(name=t.name, dtype=t.dtype, shape=rep.shape if rep else t.shape, source=t,
                                  replace=rep, patches=tuple(acc.patches.get(t.name, ()))))
        shards.append(ShardPlan(file=h.file, tensors=tuple(tps), in_bytes=h.size,
                                header_unchanged=all(tp.shape == tp.source.shape for tp in tps)))
    return MergePlan(base=base, adapters=tuple(adapters), shards=tuple(shards), mapping=tuple(acc.mapping),
                     config_updates=dict(acc.config_updates), warnings=tuple(acc.warnings),
                     problems=tuple(acc.problems))
