"""Base index + adapters -> MergePlan. Pure: reads no files, so every problem is found before any IO.

For each adapter module we resolve the base tensor(s) it changes, decide the layer kind (Linear, HF Conv1D,
Embedding, ConvNd, lora_bias, raw parameters / MoE experts, DoRA), check every shape and rank, and compute
PEFT's scale. Problems are collected, not raised, so that the user sees all of them at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .keymap import (PER_EXPERT_PARTS, ParsedKey, TargetResolver, is_conv1d_module,
                     is_converted_router, parse_key, targeted_params)
from .patterns import ModuleSelection, PatternTimeout, compile_patterns, pattern_value
from .records import (FLOAT_DTYPES, FP8_DTYPES, AdapterSpec, AdapterTensor, BaseIndex, LoraPatch, MergePlan,
                      ModuleMapping, QuantSpec, Replacement, ShardPlan, TensorInfo, TensorPlan)
from .ties import TIE_HELP, _is_head, _tie_policy, _tied_head, vocab_row_tensor


@dataclass(frozen=True)
class PlanOptions:
    key_map: tuple[tuple[str, str], ...] = ()
    strict: bool = False
    untie: bool = False
    dequantize: bool = False


@dataclass
class _Acc:
    """Mutable scratch state while planning (never escapes this module)."""

    base: BaseIndex
    resolver: TargetResolver
    options: PlanOptions
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    replacements: dict[str, Replacement] = field(default_factory=dict)
    patches: dict[str, list[LoraPatch]] = field(default_factory=dict)
    mapping: list[ModuleMapping] = field(default_factory=list)
    config_updates: dict[str, object] = field(default_factory=dict)
    head_modules: list[tuple[int, str, dict[str, ParsedKey]]] = field(default_factory=list)
    head_base: Replacement | None = None  # PEFT's saved `lm_head.base_layer.weight` on a tied base
    fp8_block: tuple[int, int] | None = None  # fp8 block-quantized base: the scale block shape

    def resolve(self, name: str, what: str) -> tuple[TensorInfo | None, str]:
        target, via, cands = self.resolver.resolve(name)
        if target is not None:
            return self.base.tensors[target], via
        if via == "ambiguous":
            self.problems.append(f"{what}: {name!r} matches several base tensors ({', '.join(cands[:6])}); "
                                 "add a key_map rule to pick one")
        return None, via

    def add(self, patch: LoraPatch, via: str) -> None:
        self.patches.setdefault(patch.target, []).append(patch)
        self.mapping.append(ModuleMapping(patch.adapter, patch.module, patch.target, patch.kind, patch.rank,
                                          patch.alpha, patch.scale, via))


def _text_cfg(base: BaseIndex, key: str) -> object:
    cfg = base.config or {}
    if key in cfg:
        return cfg[key]
    sub = cfg.get("text_config")
    return sub.get(key) if isinstance(sub, dict) else None


def _vocab_size(base: BaseIndex) -> int | None:
    v = _text_cfg(base, "vocab_size")
    return v if isinstance(v, int) else None


def _scale(st, ranks, alphas, key: str, r_file: int, where: str, acc: _Acc) -> tuple[int, float, float] | None:
    r = pattern_value(ranks, key, st.r)
    alpha = pattern_value(alphas, key, st.lora_alpha)
    if r != r_file:
        acc.problems.append(f"{where}: rank mismatch: the config gives r={r} but the weights have rank {r_file}; "
                            "fix rank_pattern or r in adapter_config.json")
        return None
    return r, float(alpha), (alpha / math.sqrt(r) if st.use_rslora else alpha / r)


def _plan_replacements(acc: _Acc, idx: int, spec: AdapterSpec, keys: Sequence[ParsedKey], vocab: int | None) -> None:
    for pk in keys:
        target = pk.replace_target
        reason = ("modules_to_save" if pk.adapter_name or ".modules_to_save." in pk.key
                  or any(pk.module == m or pk.module.endswith("." + m) for m in spec.settings.modules_to_save)
                  else "bias" if pk.param == "bias" else "saved base layer")
        src = spec.by_key[pk.key]
        info, via = acc.resolve(target, f"adapter {idx} key {pk.key!r}")
        if info is None:
            if via == "ambiguous":
                continue
            if _is_head(target) and _tied_head(acc.base):
                if reason == "saved base layer" and acc.head_base is None:
                    # PEFT saves the head it wrapped (= the tied embedding) next to a LoRA on lm_head
                    acc.head_base = Replacement(target, idx, pk.key, reason, src.shape)
                else:
                    acc.problems.append(f"adapter {idx} key {pk.key!r} replaces lm_head ({reason}), but {TIE_HELP}; "
                                        "untying a trained head copy is not supported")
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
            continue  # the wrapper's copy of the trained tensor, saved next to the plain key
        if prev_rep is not None:
            acc.problems.append(f"{info.name!r} is replaced by two adapter tensors "
                                f"({prev_rep.key!r} and {pk.key!r})")
            continue
        acc.replacements[info.name] = Replacement(info.name, idx, pk.key, reason, src.shape)


def _lora_kind(acc: _Acc, module: str, emb: bool, a: AdapterTensor, b: AdapterTensor, wshape: tuple[int, ...],
               name: str, fifo: bool, where: str) -> str | None:
    """linear / conv1d / embedding / conv from the shapes (and the architecture for square Conv1D)."""
    if emb:
        if len(a.shape) == 2 and len(b.shape) == 2 and wshape == (a.shape[1], b.shape[0]):
            return "embedding"
    elif len(wshape) >= 3:
        k = wshape[2:]
        if len(a.shape) != len(wshape) or len(b.shape) != len(wshape):
            pass
        elif a.shape[1] != wshape[1]:
            acc.problems.append(f"{where}: {name!r} is a grouped convolution ({wshape[1]} input channels per group, "
                                f"lora_A has {a.shape[1]}); PEFT cannot merge groups > 1 either")
            return None
        elif len(wshape) == 5 and tuple(wshape[2:4]) == (1, 1):
            acc.problems.append(f"{where}: Conv3d kernel {list(k)} starts with (1, 1), which PEFT's merge "
                                "mishandles; refusing rather than guessing")
            return None
        elif (tuple(a.shape[2:]) == k and b.shape[0] == wshape[0] and b.shape[1] == a.shape[0]
              and all(d == 1 for d in b.shape[2:])):
            return "conv"
    elif len(a.shape) == 2 and len(b.shape) == 2 and len(wshape) == 2:
        as_linear = wshape == (b.shape[0], a.shape[1])
        as_conv1d = wshape == (a.shape[1], b.shape[0])
        if as_linear and as_conv1d:
            return "conv1d" if is_conv1d_module(module, _text_cfg(acc.base, "model_type"), fifo) else "linear"
        if as_linear or as_conv1d:
            return "linear" if as_linear else "conv1d"
    acc.problems.append(f"{where}: shape mismatch: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit "
                        f"base tensor {name!r} {list(wshape)}")
    return None


def _plan_module(acc: _Acc, idx: int, spec: AdapterSpec, module: str, roles: dict[str, ParsedKey],
                 info: TensorInfo, via: str, ranks, alphas, target_name: str | None = None) -> None:
    """One LoRA module onto one 2-D/N-D base tensor (`target_name` renames it: the untied head)."""
    st = spec.settings
    where = f"adapter {idx} module {module!r}"
    emb = "emb_A" in roles
    ka, kb = roles["emb_A" if emb else "A"], roles["emb_B" if emb else "B"]
    a, b = spec.by_key[ka.key], spec.by_key[kb.key]
    name = target_name or info.name
    fp8 = acc.fp8_block is not None and info.dtype in FP8_DTYPES
    if fp8:
        scale = acc.base.tensors.get(info.name + "_scale_inv")
        if scale is None or acc.base.weight_map.get(scale.name) != acc.base.weight_map.get(info.name) \
                or len(info.shape) != 2:
            acc.problems.append(f"{where}: fp8 weight {info.name!r} needs its block scales "
                                f"{info.name + '_scale_inv'!r} in the same shard")
            return
    elif info.dtype not in FLOAT_DTYPES:
        acc.problems.append(f"{where}: base tensor {info.name!r} is {info.dtype}; only F32/F16/BF16/F64 weights "
                            "can be merged (quantized bases are not supported)")
        return
    bad = [f"{k.key!r} is {x.dtype}" for k, x in ((ka, a), (kb, b)) if x.dtype not in FLOAT_DTYPES]
    if bad:
        acc.problems.append(f"{where}: LoRA factors must be float tensors, but {', '.join(bad)}")
        return
    rep = acc.replacements.get(info.name) if target_name is None else None
    wshape = rep.shape if rep else info.shape
    if len(wshape) >= 3 and len(a.shape) == len(wshape) and a.shape[1] != wshape[1]:
        acc.problems.append(f"{where}: {info.name!r} is a grouped convolution ({wshape[1]} input channels per group, "
                            f"lora_A has {a.shape[1]}); PEFT cannot merge groups > 1 either")
        return
    if len(a.shape) < 2 or len(b.shape) < 2 or b.shape[1] != a.shape[0]:
        acc.problems.append(f"{where}: rank mismatch between {ka.key!r} {list(a.shape)} and {kb.key!r} "
                            f"{list(b.shape)}")
        return
    kind = _lora_kind(acc, module, emb, a, b, wshape, info.name, st.fan_in_fan_out, where)
    if kind is None:
        return
    if fp8 and (kind != "linear" or st.use_dora):
        acc.problems.append(f"{where}: only plain LoRA on Linear layers can be merged into fp8 weights")
        return
    got = _scale(st, ranks, alphas, module, a.shape[0], where, acc)
    if got is None:
        return
    r, alpha, scale = got
    mag = roles.get("magnitude")
    if st.use_dora:
        if mag is None:
            acc.problems.append(f"{where}: use_dora is set but the file has no lora_magnitude_vector for it "
                                "(PEFT would silently re-initialise it); the adapter is incomplete")
            return
        m = spec.by_key[mag.key]
        want = {"linear": (wshape[0],), "conv1d": (wshape[1],), "embedding": (wshape[1],),
                "conv": (1, wshape[0]) + (1,) * (len(wshape) - 2)}[kind]
        if tuple(m.shape) != want:
            acc.problems.append(f"{where}: lora_magnitude_vector has shape {list(m.shape)}, expected {list(want)}")
            return
        if spec.weight != 1.0:
            acc.problems.append(f"{where}: a DoRA adapter cannot be weighted (weight {spec.weight:g}): DoRA rescales "
                                "whole weight rows, so a weighted sum has no defined meaning")
            return
    elif mag is not None:
        acc.problems.append(f"{where}: file has {mag.key!r} (DoRA) but use_dora is false in the config")
        return
    double = kind == "embedding" or (kind == "linear" and is_converted_router(module, _text_cfg(acc.base,
                                                                                                "model_type")))
    acc.add(LoraPatch(module=module, target=name, kind=kind, adapter=idx, a_key=ka.key, b_key=kb.key, rank=r,
                      alpha=alpha, scale=scale, weight=spec.weight, double_round=double,
                      magnitude_key=mag.key if (mag and st.use_dora) else None), via)
    if "B_bias" in roles:
        bias_key = roles["B_bias"]
        binfo, _ = acc.resolve(module + ".bias", where)
        bb = spec.by_key[bias_key.key]
        if binfo is None:
            acc.problems.append(f"{where}: lora_bias needs a base bias {module + '.bias'!r}, but the base has none "
                                "(PEFT raises here too)")
        elif binfo.shape != bb.shape or binfo.dtype not in FLOAT_DTYPES:
            acc.problems.append(f"{where}: lora_B bias {list(bb.shape)} does not fit {binfo.name!r} "
                                f"{list(binfo.shape)} {binfo.dtype}")
        else:
            acc.add(LoraPatch(module=module, target=binfo.name, kind="bias", adapter=idx, a_key=None,
                              b_key=bias_key.key, rank=r, alpha=alpha, scale=scale, weight=spec.weight), via)


def _plan_param(acc: _Acc, idx: int, spec: AdapterSpec, module: str, by_depth: dict[int, dict[str, ParsedKey]],
                ranks, alphas) -> None:
    """LoRA on raw parameters (target_parameters): fused MoE experts, on disk fused or one expert at a time."""
    st = spec.settings
    where = f"adapter {idx} module {module!r}"
    params = targeted_params(module, st.target_parameters)
    if len(params) < len(by_depth):
        acc.problems.append(f"{where}: {len(by_depth)} nested LoRA pairs but target_parameters selects "
                            f"{params or 'no parameter'} of this module")
        return
    taken: set[str] = set()
    for depth in sorted(by_depth):
        roles = by_depth[depth]
        if "A" not in roles or "B" not in roles:
            have = next(iter(roles.values())).key
            acc.problems.append(f"{where}: has {have!r} but its lora_{'B' if 'A' in roles else 'A'} pair is missing")
            continue
        if "magnitude" in roles or "B_bias" in roles:
            acc.problems.append(f"{where}: DoRA and lora_bias are not defined for target_parameters (PEFT refuses)")
            continue
        a, b = spec.by_key[roles["A"].key], spec.by_key[roles["B"].key]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            acc.problems.append(f"{where}: lora_A {list(a.shape)} / lora_B {list(b.shape)} are not a LoRA pair")
            continue
        # PEFT nests the last registered parameter outermost (depth 0); shapes confirm or correct the guess.
        order = [params[len(params) - 1 - depth]] + [p for p in params if p != params[len(params) - 1 - depth]]
        found = None
        for pname in order:
            if pname in taken:
                continue
            layout = _param_layout(acc, module, pname, a.shape[1], b.shape[0])
            if layout is not None and a.shape[0] % layout[0] == 0:
                found = (pname, layout)
                break
        if found is None:
            acc.problems.append(f"{where}: lora_A {list(a.shape)} / lora_B {list(b.shape)} fit none of the base "
                                f"tensors for parameters {params} (looked for fused and per-expert layouts)")
            continue
        pname, (experts, targets) = found
        taken.add(pname)
        got = _scale(st, ranks, alphas, f"{module}.{pname}", a.shape[0] // experts, where, acc)
        if got is None:
            continue
        r, alpha, scale = got
        for info, expert, offset in targets:
            if info.dtype not in FLOAT_DTYPES:
                acc.problems.append(f"{where}: base tensor {info.name!r} is {info.dtype}; cannot merge")
                break
            acc.add(LoraPatch(module=f"{module}.{pname}", target=info.name, kind="param", adapter=idx,
                              a_key=roles["A"].key, b_key=roles["B"].key, rank=r, alpha=alpha, scale=scale,
                              weight=spec.weight, double_round=True, experts=experts, expert=expert,
                              row_offset=offset), "fused" if expert is None else "per-expert")


def _param_layout(acc: _Acc, module: str, pname: str, n_in: int, n_out: int
                  ) -> tuple[int, list[tuple[TensorInfo, int | None, int]]] | None:
    """(expert count, [(tensor, expert or None, row offset)]) for parameter `pname` of `module` whose delta is
    (E, n_out, n_in), or None when the base has no matching tensors."""
    fused, _ = acc.resolve(f"{module}.{pname}", module)
    if fused is not None:
        if len(fused.shape) == 3 and fused.shape[1:] == (n_out, n_in):
            return fused.shape[0], [(fused, None, 0)]
        if len(fused.shape) == 2 and fused.shape == (n_out, n_in):
            return 1, [(fused, 0, 0)]
        return None
    for parts in PER_EXPERT_PARTS.get(pname, ()):
        targets: list[tuple[TensorInfo, int | None, int]] = []
        e = 0
        while True:
            infos = [acc.resolver.resolve(f"{module}.{e}.{part}.weight")[0] for part in parts]
            if any(i is None for i in infos):
                break
            offset = 0
            for name in infos:
                info = acc.base.tensors[name]  # type: ignore[index]
                if len(info.shape) != 2 or info.shape[1] != n_in:
                    return None
                targets.append((info, e, offset))
                offset += info.shape[0]
            if offset != n_out:
                return None
            e += 1
        if targets:
            return e, targets
    return None


def _group_keys(acc: _Acc, idx: int, spec: AdapterSpec):
    groups: dict[tuple[str, int], dict[str, ParsedKey]] = {}
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
        else:
            slot = groups.setdefault((pk.module, pk.depth), {})
            if pk.role in slot:
                acc.problems.append(f"adapter {idx}: two keys for {pk.module} {pk.role}: {slot[pk.role].key!r} "
                                    f"and {t.key!r}")
            slot[pk.role] = pk
    if len(names) > 1:
        acc.problems.append(f"adapter {idx} holds weights of several adapters ({', '.join(sorted(names))}); "
                            "save each adapter in its own folder")
    replace.sort(key=lambda k: ".modules_to_save." in k.key)  # plain keys first
    return groups, replace, originals


def _plan_adapter(acc: _Acc, idx: int, spec: AdapterSpec, vocab: int | None) -> None:
    st = spec.settings
    groups, replace, originals = _group_keys(acc, idx, spec)
    _plan_replacements(acc, idx, spec, replace, vocab)
    for pk in originals:
        target, _, _ = acc.resolver.resolve(pk.replace_target)
        rep = acc.replacements.get(target or "")
        if rep is None or rep.adapter != idx:
            acc.problems.append(f"adapter {idx} key {pk.key!r} holds a modules_to_save wrapper's original module but "
                                "the file has no trained copy of it to merge")
    try:
        ranks = compile_patterns(st.rank_pattern, "rank_pattern")
        alphas = compile_patterns(st.alpha_pattern, "alpha_pattern")
        selection = ModuleSelection.from_config(st.target_modules, st.exclude_modules, st.layers_to_transform,
                                                st.layers_pattern)
    except ValueError as exc:
        acc.problems.append(f"adapter {idx}: {exc}")
        return
    nested: dict[str, dict[int, dict[str, ParsedKey]]] = {}
    for (module, depth), roles in sorted(groups.items()):
        if st.target_parameters and (depth > 0 or targeted_params(module, st.target_parameters)) \
                and acc.resolver.resolve(module + ".weight")[0] is None:
            nested.setdefault(module, {})[depth] = roles
            continue
        where = f"adapter {idx} module {module!r}"
        if depth:
            acc.problems.append(f"{where}: nested base_layer LoRA keys but target_parameters does not select it")
            continue
        emb = "emb_A" in roles or "emb_B" in roles
        a_role, b_role = ("emb_A", "emb_B") if emb else ("A", "B")
        if (a_role in roles) != (b_role in roles) or a_role not in roles:
            have = next(iter(roles.values())).key
            miss = (b_role if a_role in roles else a_role)[-1]
            acc.problems.append(f"{where}: has {have!r} but its pair {'lora_embedding_' if emb else 'lora_'}{miss} "
                                "is missing")
            continue
        if "B_bias" in roles and not st.lora_bias:
            acc.problems.append(f"{where}: file has {roles['B_bias'].key!r} but lora_bias is false in the config")
            continue
        info, via = acc.resolve(module + ".weight", where)
        if info is None:
            if via == "ambiguous":
                continue
            if _is_head(module) and _tied_head(acc.base):
                acc.head_modules.append((idx, module, roles))
            else:
                acc.problems.append(f"{where}: matched no base tensor (looked for {module + '.weight'!r}); is this "
                                    "adapter for another model? else add a key_map rule")
            continue
        _plan_module(acc, idx, spec, module, roles, info, via, ranks, alphas)
        if isinstance(st.target_modules, (str, list)) and "weight" not in targeted_params(
                module, st.target_parameters) and selection.selects(module) is False:
            (acc.problems if acc.options.strict else acc.warnings).append(
                f"{where}: the file has LoRA weights for this module but target_modules/layers_to_transform do not "
                "select it (PEFT would ignore them; stream-merge applies them)")
    for module, by_depth in nested.items():
        _plan_param(acc, idx, spec, module, by_depth, ranks, alphas)


QUANT_ADVICE = ("merge into the original 16-bit checkpoint instead (a QLoRA adapter was trained on the "
                "dequantized weights and merges into the bf16 base)")


def _quantization(acc: _Acc) -> None:
    """fp8 block-scaled bases are supported; every other quantization method is refused by name."""
    qc = _text_cfg(acc.base, "quantization_config")
    if qc is None:
        if acc.options.dequantize:
            acc.problems.append("--dequantize: the base has no quantization_config (it is not an fp8 checkpoint)")
        return
    if not isinstance(qc, dict):
        acc.problems.append("config.json quantization_config is not an object")
        return
    method = str(qc.get("quant_method", "unknown"))
    block = qc.get("weight_block_size")
    if method == "fp8" and isinstance(block, list) and len(block) == 2 and all(
            isinstance(b, int) and b > 0 for b in block) and qc.get("fmt", "e4m3") == "e4m3":
        acc.fp8_block = (block[0], block[1])
        return
    what = {"bitsandbytes": "bitsandbytes 4/8-bit", "fp8": "fp8 without block scales (weight_block_size)"}.get(
        method, method)
    acc.problems.append(f"the base is quantized ({what}); stream-merge merges into 16-bit checkpoints and fp8 "
                        f"block-scaled ones only: {QUANT_ADVICE}")


def _shard_tensors(acc: _Acc, header, head: TensorPlan | None) -> list[TensorPlan]:
    base, block = acc.base, acc.fp8_block
    tps = []
    for t in header.tensors:
        rep = acc.replacements.get(t.name)
        patches = tuple(acc.patches.get(t.name, ()))
        tp = TensorPlan(name=t.name, dtype=t.dtype, shape=rep.shape if rep else t.shape, source=t, replace=rep,
                        patches=patches)
        if block is not None:
            scale = base.tensors.get(t.name + "_scale_inv") if t.dtype in FP8_DTYPES else None
            weight = base.tensors.get(t.name[: -len("_scale_inv")]) if t.name.endswith("_scale_inv") else None
            if weight is not None and weight.dtype not in FP8_DTYPES:
                weight = None
            if scale is not None and acc.options.dequantize:
                tp = TensorPlan(name=t.name, dtype="BF16", shape=t.shape, source=t, patches=patches,
                                quant=QuantSpec("dequant", "weight", scale, block))
            elif scale is not None and patches:
                tp = TensorPlan(name=t.name, dtype=t.dtype, shape=t.shape, source=t, patches=patches,
                                quant=QuantSpec("requant", "weight", scale, block))
            elif weight is not None and acc.options.dequantize:
                continue  # the scales of a dequantized weight are dropped
            elif weight is not None and acc.patches.get(weight.name):
                tp = TensorPlan(name=t.name, dtype=t.dtype, shape=t.shape, source=t,
                                patches=tuple(acc.patches[weight.name]),
                                quant=QuantSpec("requant", "scale", weight, block))
        tps.append(tp)
    if head is not None and head.source.name in header.by_name:
        tps.append(head)
    return tps


def build_plan(base: BaseIndex, adapters: Sequence[AdapterSpec], options: PlanOptions = PlanOptions()) -> MergePlan:
    """Map every adapter tensor to the base tensor it changes; collect every problem."""
    acc = _Acc(base=base, resolver=TargetResolver(base.tensors.keys(), options.key_map), options=options)
    _quantization(acc)
    vocab = _vocab_size(base)
    if len(adapters) > 1 and any(a.settings.use_dora for a in adapters):
        acc.problems.append("a DoRA adapter cannot be combined with other adapters: DoRA renormalises whole weight "
                            "rows, so the result would depend on the order; merge them one after another instead")
    head, where = None, ""
    try:  # a config regex that backtracks for ever stops the plan with a problem naming its key
        for idx, spec in enumerate(adapters):
            where = f"adapter {idx} ({spec.config_file})"
            _plan_adapter(acc, idx, spec, vocab)
        where = "tied head"
        head = _tie_policy(acc, adapters, _plan_module)
    except PatternTimeout as exc:
        acc.problems.append(f"{where}: {exc}")
    if "vocab_size" in acc.config_updates and vocab is not None:
        new = acc.config_updates["vocab_size"]
        for name, info in base.tensors.items():
            if len(info.shape) == 2 and info.shape[0] == vocab and name not in acc.replacements and (
                    vocab_row_tensor(base, info) or _is_head(name)):
                acc.problems.append(f"the adapter resizes the vocabulary to {new} but {name!r} keeps {vocab} rows")
    if acc.fp8_block is not None and options.dequantize:
        acc.config_updates["quantization_config"] = None  # removed from config.json
    shards = []
    for h in base.shards:
        tps = _shard_tensors(acc, h, head)
        shards.append(ShardPlan(file=h.file, tensors=tuple(tps), in_bytes=h.size,
                                header_unchanged=len(tps) == len(h.tensors) and all(
                                    (tp.name, tp.shape, tp.dtype) == (tp.source.name, tp.source.shape, tp.source.dtype)
                                    for tp in tps)))
    return MergePlan(base=base, adapters=tuple(adapters), shards=tuple(shards), mapping=tuple(acc.mapping),
                     config_updates=dict(acc.config_updates), warnings=tuple(acc.warnings),
                     problems=tuple(acc.problems))
