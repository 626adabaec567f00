"""LoRA on raw parameters (`target_parameters`, PEFT's ParamWrapper): fused MoE experts and routers. Pure.

PEFT saves one nested LoRA pair per targeted parameter of a module (`experts.lora_A` for the last registered
parameter, `experts.base_layer.lora_A` for the one before, ...; PEFT_SEMANTICS §5). Each pair is matched to
the base tensors it changes: one fused `(E, out, in)` tensor, a transposed `(E, in, out)` one for models
whose experts transformers marks `is_transposed` (GPT-OSS), or one 2-D tensor per expert and projection
(checkpoints written by transformers v4).
"""

from __future__ import annotations

from dataclasses import dataclass

from .keymap import PER_EXPERT_PARTS, TRANSPOSED_EXPERTS, ParsedKey, targeted_params
from .plan_modules import rank_and_scale
from .plan_state import PlanState
from .records import FLOAT_DTYPES, AdapterSpec, AdapterTensor, LoraPatch, TensorInfo


@dataclass(frozen=True)
class ParamLayout:
    """Where a parameter's delta goes: `experts` experts, and per target (tensor, expert or None for the whole
    fused tensor, first row of the delta it takes). `transposed`: the fused tensor is (E, in, out)."""

    experts: int
    targets: tuple[tuple[TensorInfo, int | None, int], ...]
    transposed: bool = False


def plan_param(state: PlanState, idx: int, spec: AdapterSpec, module: str,
               by_depth: dict[int, dict[str, ParsedKey]], ranks, alphas) -> None:
    """Every nested LoRA pair of one module onto the parameters target_parameters selects."""
    where = f"adapter {idx} module {module!r}"
    params = targeted_params(module, spec.settings.target_parameters)
    if len(params) < len(by_depth):
        state.problems.append(f"{where}: {len(by_depth)} nested LoRA pairs but target_parameters selects "
                              f"{params or 'no parameter'} of this module")
        return
    taken: set[str] = set()
    for depth in sorted(by_depth):
        pair = _lora_pair(state, spec, by_depth[depth], where)
        if pair is None:
            continue
        a, b = pair
        found = _match_param(state, module, params, depth, taken, a, b)
        if found is None:
            state.problems.append(f"{where}: lora_A {list(a.shape)} / lora_B {list(b.shape)} fit none of the base "
                                  f"tensors for parameters {params} (looked for fused and per-expert layouts)")
            continue
        pname, layout = found
        taken.add(pname)
        got = rank_and_scale(state, spec.settings, ranks, alphas, f"{module}.{pname}", a.shape[0] // layout.experts,
                             where)
        if got is not None:
            _add_param_patches(state, idx, spec, f"{module}.{pname}", by_depth[depth], layout, got, where)


def _lora_pair(state: PlanState, spec: AdapterSpec, roles: dict[str, ParsedKey], where: str
               ) -> tuple[AdapterTensor, AdapterTensor] | None:
    """lora_A and lora_B of one nesting level, or None (a problem) when they are not a plain LoRA pair."""
    if "A" not in roles or "B" not in roles:
        have = next(iter(roles.values())).key
        state.problems.append(f"{where}: has {have!r} but its lora_{'B' if 'A' in roles else 'A'} pair is missing")
        return None
    if "magnitude" in roles or "B_bias" in roles:
        state.problems.append(f"{where}: DoRA and lora_bias are not defined for target_parameters (PEFT refuses)")
        return None
    a, b = spec.by_key[roles["A"].key], spec.by_key[roles["B"].key]
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
        state.problems.append(f"{where}: lora_A {list(a.shape)} / lora_B {list(b.shape)} are not a LoRA pair")
        return None
    return a, b


def _match_param(state: PlanState, module: str, params: list[str], depth: int, taken: set[str],
                 a: AdapterTensor, b: AdapterTensor) -> tuple[str, ParamLayout] | None:
    """The parameter a pair at `depth` belongs to: PEFT nests the last registered parameter outermost (depth
    0); the shapes confirm or correct that guess."""
    guess = params[len(params) - 1 - depth]
    for pname in [guess] + [p for p in params if p != guess]:
        if pname in taken:
            continue
        layout = param_layout(state, module, pname, a.shape[1], b.shape[0])
        if layout is not None and a.shape[0] % layout.experts == 0:
            return pname, layout
    return None


def _add_param_patches(state: PlanState, idx: int, spec: AdapterSpec, name: str, roles: dict[str, ParsedKey],
                       layout: ParamLayout, got: tuple[int, float, float], where: str) -> None:
    r, alpha, scale = got
    for info, expert, offset in layout.targets:
        if info.dtype not in FLOAT_DTYPES:
            state.problems.append(f"{where}: base tensor {info.name!r} is {info.dtype}; cannot merge")
            return
    for info, expert, offset in layout.targets:
        state.add(LoraPatch(module=name, target=info.name, kind="param", adapter=idx, a_key=roles["A"].key,
                            b_key=roles["B"].key, rank=r, alpha=alpha, scale=scale, weight=spec.weight,
                            double_round=True, experts=layout.experts, expert=expert, row_offset=offset,
                            transposed=layout.transposed),
                  ("fused, transposed" if layout.transposed else "fused") if expert is None else "per-expert")


def param_layout(state: PlanState, module: str, pname: str, n_in: int, n_out: int) -> ParamLayout | None:
    """How parameter `pname` of `module`, whose LoRA maps n_in -> n_out, is stored in the base, or None when
    the base has no matching tensors."""
    fused, _ = state.resolve(f"{module}.{pname}", module)
    if fused is not None:
        return _fused_layout(state, fused, n_in, n_out)
    for parts in PER_EXPERT_PARTS.get(pname, ()):
        layout = _per_expert_layout(state, module, parts, n_in, n_out)
        if layout is not None:
            return layout
    return None


def _fused_layout(state: PlanState, fused: TensorInfo, n_in: int, n_out: int) -> ParamLayout | None:
    """A fused parameter: (E, out, in) as transformers v5 stores experts, or (E, in, out) for the model types
    whose experts are marked `is_transposed` (decided by the model type, so square experts are right too); a
    2-D parameter (a router) is one (out, in) matrix."""
    if len(fused.shape) == 2:
        return ParamLayout(1, ((fused, 0, 0),)) if fused.shape == (n_out, n_in) else None
    if len(fused.shape) != 3:
        return None
    transposed = state.config("model_type") in TRANSPOSED_EXPERTS
    if fused.shape[1:] == ((n_in, n_out) if transposed else (n_out, n_in)):
        return ParamLayout(fused.shape[0], ((fused, None, 0),), transposed)
    return None


def _per_expert_layout(state: PlanState, module: str, parts: tuple[str, ...], n_in: int, n_out: int
                       ) -> ParamLayout | None:
    """Experts stored one 2-D tensor per expert and projection (`experts.{e}.{part}.weight`), the fused delta's
    rows split over `parts` in order."""
    targets: list[tuple[TensorInfo, int | None, int]] = []
    expert = 0
    while True:
        names = [state.resolver.resolve(f"{module}.{expert}.{part}.weight")[0] for part in parts]
        if any(n is None for n in names):
            break
        offset = 0
        for name in names:
            info = state.base.tensors[name]  # type: ignore[index]
            if len(info.shape) != 2 or info.shape[1] != n_in:
                return None
            targets.append((info, expert, offset))
            offset += info.shape[0]
        if offset != n_out:
            return None
        expert += 1
    return ParamLayout(expert, tuple(targets)) if targets else None
