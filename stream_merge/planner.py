"""Base index + adapters -> MergePlan. Pure: reads no files, so every problem is found before any IO.

For each adapter: decode its keys, plan full-tensor replacements (modules_to_save, saved biases), then each
LoRA module onto the base tensor it changes (plan_modules: layer kind, shapes, rank, scale, DoRA), raw
parameters and MoE experts (plan_params), the tie policy (ties) and fp8 pairing (plan_fp8). Problems are
collected, not raised, so that the user sees all of them at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from .keymap import ParsedKey, TargetResolver, parse_key, targeted_params
from .load_renames import load_renames
from .model_config import config_value
from .patterns import ModuleSelection, PatternTimeout, compile_patterns
from .plan_dtype import dtype_updates, out_dtype
from .plan_fp8 import DROP, fp8_tensor_plan, is_fp8_scale, read_quantization
from .plan_layout import OUT_METADATA, reshard, with_output_cost
from .plan_modules import plan_module
from .plan_params import plan_param
from .plan_state import PlanOptions, PlanState
from .records import (FLOAT_DTYPES, AdapterSpec, BaseIndex, MergePlan, Replacement, ShardHeader, ShardPlan,
                      TensorPlan)
from .ties import _is_head, _tie_policy, add_alias_replacement, tied_alias, vocab_row_tensor

__all__ = ["PlanOptions", "build_plan"]

# one adapter's keys by job: LoRA roles per (module, nesting depth), full-tensor replacements, and the
# untrained originals a modules_to_save wrapper keeps
RoleGroups = dict[tuple[str, int], dict[str, ParsedKey]]


def _vocab_size(base: BaseIndex) -> int | None:
    v = config_value(base.config, "vocab_size")
    return v if isinstance(v, int) else None


def _replacement_reason(pk: ParsedKey, spec: AdapterSpec) -> str:
    if pk.adapter_name or ".modules_to_save." in pk.key or any(
            pk.module == m or pk.module.endswith("." + m) for m in spec.settings.modules_to_save):
        return "modules_to_save"
    return "bias" if pk.param == "bias" else "saved base layer"


def _unmatched_replacement(state: PlanState, idx: int, pk: ParsedKey, reason: str, shape: tuple[int, ...]) -> None:
    """A replacement whose target is not in the base: a tied member absent from disk (see ties), or a problem."""
    target = pk.replace_target
    if not add_alias_replacement(state, idx, pk.key, target, reason, shape):
        state.problems.append(
            f"adapter {idx} key {pk.key!r} ({reason}) matched no base tensor (looked for {target!r}); "
            "a task head such as 'score' or 'classifier' does not exist in a CausalLM checkpoint, "
            "else add a key_map rule")


def _resize_problem(state: PlanState, idx: int, pk: ParsedKey, src_shape: tuple[int, ...], info, vocab: int | None
                    ) -> bool:
    """A replacement of another shape is only valid as a resized vocabulary (recorded in config_updates);
    True when it is a problem."""
    resized = (len(src_shape) == 2 and len(info.shape) == 2 and src_shape[1] == info.shape[1]
               and vocab is not None and info.shape[0] == vocab)
    if not resized:
        state.problems.append(f"adapter {idx} key {pk.key!r} has shape {list(src_shape)} but base tensor "
                              f"{info.name!r} is {list(info.shape)}")
        return True
    prev = state.config_updates.get("vocab_size")
    if prev is not None and prev != src_shape[0]:
        state.problems.append(f"adapter {idx} resizes the vocabulary to {src_shape[0]} rows in {pk.key!r} "
                              f"but to {prev} elsewhere")
    state.config_updates["vocab_size"] = src_shape[0]
    return False


def _plan_replacements(state: PlanState, idx: int, spec: AdapterSpec, keys: Sequence[ParsedKey],
                       vocab: int | None) -> None:
    """Full tensors of the adapter file that replace base tensors (modules_to_save, biases, saved layers)."""
    for pk in keys:
        reason = _replacement_reason(pk, spec)
        src = spec.by_key[pk.key]
        info, via = state.resolve(pk.replace_target, f"adapter {idx} key {pk.key!r}")
        if info is None:
            if via != "ambiguous":
                _unmatched_replacement(state, idx, pk, reason, src.shape)
            continue
        if info.dtype not in FLOAT_DTYPES or src.dtype not in FLOAT_DTYPES:
            state.problems.append(f"adapter {idx} key {pk.key!r}: cannot replace {info.name!r} of dtype "
                                  f"{info.dtype} with {src.dtype}")
            continue
        if src.shape != info.shape and _resize_problem(state, idx, pk, src.shape, info, vocab):
            continue
        prev_rep = state.replacements.get(info.name)
        if prev_rep is not None and prev_rep.adapter == idx and ".modules_to_save." in pk.key:
            if prev_rep.shape != src.shape:
                state.problems.append(f"adapter {idx}: {pk.key!r} and {prev_rep.key!r} disagree on the shape of "
                                      f"{info.name!r}")
            continue  # the wrapper's copy of the trained tensor, saved next to the plain key
        if prev_rep is not None:
            state.problems.append(f"{info.name!r} is replaced by two adapter tensors "
                                  f"({prev_rep.key!r} and {pk.key!r})")
            continue
        state.replacements[info.name] = Replacement(info.name, idx, pk.key, reason, src.shape)


def _group_keys(state: PlanState, idx: int, spec: AdapterSpec
                ) -> tuple[RoleGroups, list[ParsedKey], list[ParsedKey]]:
    """Decode every key of one adapter: (LoRA roles by (module, depth), replacements, wrapper originals)."""
    groups: RoleGroups = {}
    replace: list[ParsedKey] = []
    originals: list[ParsedKey] = []
    adapter_names: set[str] = set()
    for t in spec.tensors:
        pk = parse_key(t.key)
        if isinstance(pk, str):
            state.problems.append(f"adapter {idx} key {t.key!r}: {pk}")
            continue
        if pk.adapter_name:
            adapter_names.add(pk.adapter_name)
        if pk.role == "replace":
            replace.append(pk)
        elif pk.role == "original":
            originals.append(pk)
        elif pk.role == "tokens":
            state.problems.append(f"adapter {idx} key {t.key!r}: trainable tokens are not supported yet")
        else:
            slot = groups.setdefault((pk.module, pk.depth), {})
            if pk.role in slot:
                state.problems.append(f"adapter {idx}: two keys for {pk.module} {pk.role}: {slot[pk.role].key!r} "
                                      f"and {t.key!r}")
            slot[pk.role] = pk
    if len(adapter_names) > 1:
        state.problems.append(f"adapter {idx} holds weights of several adapters ({', '.join(sorted(adapter_names))}); "
                              "save each adapter in its own folder")
    replace.sort(key=lambda k: ".modules_to_save." in k.key)  # plain keys first
    return groups, replace, originals


def _check_originals(state: PlanState, idx: int, originals: Sequence[ParsedKey]) -> None:
    """A wrapper's untrained original is never merged, but it must come with the trained copy it stands for."""
    for pk in originals:
        target, _, _ = state.resolver.resolve(pk.replace_target)
        rep = state.replacements.get(target or tied_alias(state, pk.replace_target) or "")
        if rep is None or rep.adapter != idx:
            state.problems.append(f"adapter {idx} key {pk.key!r} holds a modules_to_save wrapper's original module "
                                  "but the file has no trained copy of it to merge")


def _module_pair_problem(spec: AdapterSpec, roles: dict[str, ParsedKey]) -> str | None:
    """Both halves of the LoRA pair are there, and lora_bias only where the config enables it."""
    emb = "emb_A" in roles or "emb_B" in roles
    a_role, b_role = ("emb_A", "emb_B") if emb else ("A", "B")
    if (a_role in roles) != (b_role in roles) or a_role not in roles:
        have = next(iter(roles.values())).key
        miss = (b_role if a_role in roles else a_role)[-1]
        return f"has {have!r} but its pair {'lora_embedding_' if emb else 'lora_'}{miss} is missing"
    if "B_bias" in roles and not spec.settings.lora_bias:
        return f"file has {roles['B_bias'].key!r} but lora_bias is false in the config"
    return None


def _plan_adapter(state: PlanState, idx: int, spec: AdapterSpec, vocab: int | None) -> None:
    """Everything one adapter changes; nested (target_parameters) LoRA pairs are planned last, per module."""
    settings = spec.settings
    groups, replace, originals = _group_keys(state, idx, spec)
    _plan_replacements(state, idx, spec, replace, vocab)
    _check_originals(state, idx, originals)
    try:
        ranks = compile_patterns(settings.rank_pattern, "rank_pattern")
        alphas = compile_patterns(settings.alpha_pattern, "alpha_pattern")
        selection = ModuleSelection.from_config(settings.target_modules, settings.exclude_modules,
                                                settings.layers_to_transform, settings.layers_pattern)
    except ValueError as exc:
        state.problems.append(f"adapter {idx}: {exc}")
        return
    nested: dict[str, dict[int, dict[str, ParsedKey]]] = {}
    for (module, depth), roles in sorted(groups.items()):
        if settings.target_parameters and (depth > 0 or targeted_params(module, settings.target_parameters)) \
                and state.resolver.resolve(module + ".weight")[0] is None:
            nested.setdefault(module, {})[depth] = roles
        else:
            _plan_one_module(state, idx, spec, module, depth, roles, ranks, alphas, selection)
    for module, by_depth in nested.items():
        plan_param(state, idx, spec, module, by_depth, ranks, alphas)


def _plan_one_module(state: PlanState, idx: int, spec: AdapterSpec, module: str, depth: int,
                     roles: dict[str, ParsedKey], ranks, alphas, selection: ModuleSelection) -> None:
    """A LoRA module (not a target_parameters one): its base tensor, the plan, and PEFT's selection check."""
    settings = spec.settings
    where = f"adapter {idx} module {module!r}"
    problem = ("nested base_layer LoRA keys but target_parameters does not select it" if depth
               else _module_pair_problem(spec, roles))
    if problem:
        state.problems.append(f"{where}: {problem}")
        return
    info, via = state.resolve(module + ".weight", where)
    if info is None:
        if via == "ambiguous":
            return
        if tied_alias(state, module + ".weight") is not None:
            state.head_modules.append((idx, module, roles))  # LoRA on a tied member absent from disk
        else:
            state.problems.append(f"{where}: matched no base tensor (looked for {module + '.weight'!r}); is this "
                                  "adapter for another model? else add a key_map rule")
        return
    plan_module(state, idx, spec, module, roles, info, via, ranks, alphas)
    if isinstance(settings.target_modules, (str, list)) and "weight" not in targeted_params(
            module, settings.target_parameters) and selection.selects(module) is False:
        (state.problems if state.options.strict else state.warnings).append(
            f"{where}: the file has LoRA weights for this module but target_modules/layers_to_transform do not "
            "select it (PEFT would ignore them; stream-merge applies them)")


def _shard_tensors(state: PlanState, header: ShardHeader, added: Sequence[TensorPlan]) -> list[TensorPlan]:
    """The output tensors of one shard, in the input's order, then the untied members whose source it holds."""
    tensor_plans = []
    for t in header.tensors:
        rep = state.replacements.get(t.name)
        patches = tuple(state.patches.get(t.name, ()))
        quantized = fp8_tensor_plan(state, header.file, t, patches)
        if quantized == DROP:
            continue  # the scales of a dequantized weight are dropped
        tensor_plan = quantized if isinstance(quantized, TensorPlan) else TensorPlan(
            name=t.name, dtype=t.dtype, shape=rep.shape if rep else t.shape, source=t, replace=rep, patches=patches)
        tensor_plans.append(tensor_plan if is_fp8_scale(state, t) else out_dtype(tensor_plan, state.options.dtype))
    tensor_plans.extend(out_dtype(p, state.options.dtype) for p in added if p.source.name in header.by_name)
    return tensor_plans


def _base_shard_plan(h: ShardHeader, tensor_plans: Sequence[TensorPlan]) -> ShardPlan:
    """The output shard of the base's own layout: base shard `h` under its own name (a PyTorch `.bin` under
    the safetensors name transformers gives it), tensors in its order."""
    tensors = tuple(dataclasses.replace(p, source_file=h.file) for p in tensor_plans)
    plan = ShardPlan(file=h.output_name, tensors=tensors, in_bytes=h.size,
                     metadata=h.metadata if h.safetensors else OUT_METADATA,
                     header_unchanged=h.safetensors and len(tensors) == len(h.tensors) and all(
                         (p.name, p.shape, p.dtype) == (p.source.name, p.source.shape, p.source.dtype)
                         for p in tensors))
    # a .bin shard's output costs its safetensors header and the tensors it reads, not the zip's size
    return plan if h.safetensors else with_output_cost(plan)


def _check_resized_vocab(state: PlanState, vocab: int | None) -> None:
    """A resized vocabulary must resize every vocabulary-row tensor (embedding and head) the same way."""
    if "vocab_size" not in state.config_updates or vocab is None:
        return
    new = state.config_updates["vocab_size"]
    for name, info in state.base.tensors.items():
        if len(info.shape) == 2 and info.shape[0] == vocab and name not in state.replacements and (
                vocab_row_tensor(state.base, info) or _is_head(name)):
            state.problems.append(f"the adapter resizes the vocabulary to {new} but {name!r} keeps {vocab} rows")


def _plan_all(state: PlanState, adapters: Sequence[AdapterSpec], vocab: int | None) -> list[TensorPlan]:
    """Every adapter, then the tie policy; returns the tensors untying adds. A config regex that backtracks
    for ever stops planning with a problem naming its key."""
    where = ""
    try:
        for idx, spec in enumerate(adapters):
            where = f"adapter {idx} ({spec.config_file})"
            _plan_adapter(state, idx, spec, vocab)
        where = "tied head"
        return _tie_policy(state, adapters, plan_module)
    except PatternTimeout as exc:
        state.problems.append(f"{where}: {exc}")
        return []


def build_plan(base: BaseIndex, adapters: Sequence[AdapterSpec], options: PlanOptions = PlanOptions()) -> MergePlan:
    """Map every adapter tensor to the base tensor it changes; collect every problem."""
    resolver = TargetResolver(base.tensors.keys(), options.key_map, load_renames=lambda: load_renames(base.config))
    state = PlanState(base=base, resolver=resolver, options=options)
    read_quantization(state)
    vocab = _vocab_size(base)
    if len(adapters) > 1 and any(a.settings.use_dora for a in adapters):
        state.problems.append("a DoRA adapter cannot be combined with other adapters: DoRA renormalises whole "
                              "weight rows, so the result would depend on the order; merge them one after another "
                              "instead")
    added = _plan_all(state, adapters, vocab)
    _check_resized_vocab(state, vocab)
    if state.fp8_block is not None and options.dequantize:
        state.config_updates["quantization_config"] = None  # removed from config.json
    if options.dtype != "auto":
        dtype_updates(state)
    shards = tuple(_base_shard_plan(h, _shard_tensors(state, h, added)) for h in base.shards)
    if options.max_shard_size is not None:
        shards = reshard(shards, options.max_shard_size)
    return MergePlan(base=base, adapters=tuple(adapters), shards=shards, mapping=tuple(state.mapping),
                     config_updates=dict(state.config_updates), warnings=tuple(state.warnings),
                     problems=tuple(state.problems))
