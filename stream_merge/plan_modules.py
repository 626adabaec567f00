"""One LoRA module onto one base tensor: layer kind, shapes, rank, scale, DoRA and lora_bias checks. Pure.

The layer kind (Linear, HF Conv1D, Embedding, ConvNd) is decided from the shapes of lora_A, lora_B and the
base tensor, and from the architecture only where shapes cannot tell (square Conv1D weights).
"""

from __future__ import annotations

import math

from .keymap import ParsedKey, is_conv1d_module, is_converted_router
from .patterns import pattern_value
from .plan_fp8 import fp8_weight_problem, is_fp8_weight
from .plan_state import PlanState
from .records import FLOAT_DTYPES, AdapterSpec, AdapterTensor, LoraPatch, LoraSettings, TensorInfo


def rank_and_scale(state: PlanState, settings: LoraSettings, ranks, alphas, key: str, r_file: int, where: str
                   ) -> tuple[int, float, float] | None:
    """(r, alpha, scale) for `key` from the config's patterns (PEFT's rules); None (a problem) when the
    config's rank is not the rank of the weights."""
    r = pattern_value(ranks, key, settings.r)
    alpha = pattern_value(alphas, key, settings.lora_alpha)
    if r != r_file:
        state.problems.append(f"{where}: rank mismatch: the config gives r={r} but the weights have rank {r_file}; "
                              "fix rank_pattern or r in adapter_config.json")
        return None
    return r, float(alpha), (alpha / math.sqrt(r) if settings.use_rslora else alpha / r)


def lora_kind(state: PlanState, module: str, emb: bool, a: AdapterTensor, b: AdapterTensor,
              wshape: tuple[int, ...], name: str, fan_in_fan_out: bool, where: str) -> str | None:
    """linear / conv1d / embedding / conv from the shapes (and the architecture for square Conv1D); None (a
    problem) when they do not fit. Grouped convolutions are refused before this is called."""
    if emb:
        if len(a.shape) == 2 and len(b.shape) == 2 and wshape == (a.shape[1], b.shape[0]):
            return "embedding"
    elif len(wshape) >= 3 and len(a.shape) == len(b.shape) == len(wshape):
        k = wshape[2:]
        if len(wshape) == 5 and tuple(wshape[2:4]) == (1, 1):
            state.problems.append(f"{where}: Conv3d kernel {list(k)} starts with (1, 1), which PEFT's merge "
                                  "mishandles; refusing rather than guessing")
            return None
        if (tuple(a.shape[2:]) == k and b.shape[0] == wshape[0] and b.shape[1] == a.shape[0]
                and all(d == 1 for d in b.shape[2:])):
            return "conv"
    elif len(a.shape) == 2 and len(b.shape) == 2 and len(wshape) == 2:
        as_linear = wshape == (b.shape[0], a.shape[1])
        as_conv1d = wshape == (a.shape[1], b.shape[0])
        if as_linear and as_conv1d:
            return "conv1d" if is_conv1d_module(module, state.config("model_type"), fan_in_fan_out) else "linear"
        if as_linear or as_conv1d:
            return "linear" if as_linear else "conv1d"
    state.problems.append(f"{where}: shape mismatch: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit "
                          f"base tensor {name!r} {list(wshape)}")
    return None


def plan_module(state: PlanState, idx: int, spec: AdapterSpec, module: str, roles: dict[str, ParsedKey],
                info: TensorInfo, via: str, ranks, alphas, target_name: str | None = None) -> None:
    """One LoRA module onto one 2-D/N-D base tensor (`target_name` renames it: the untied head)."""
    settings = spec.settings
    where = f"adapter {idx} module {module!r}"
    emb = "emb_A" in roles
    ka, kb = roles["emb_A" if emb else "A"], roles["emb_B" if emb else "B"]
    a, b = spec.by_key[ka.key], spec.by_key[kb.key]
    rep = state.replacements.get(info.name) if target_name is None else None
    wshape = rep.shape if rep else info.shape
    problem = _dtype_problem(state, info, ka, a, kb, b) or _factor_shape_problem(info, wshape, ka, a, kb, b)
    if problem:
        state.problems.append(f"{where}: {problem}")
        return
    kind = lora_kind(state, module, emb, a, b, wshape, info.name, settings.fan_in_fan_out, where)
    if kind is None:
        return
    if is_fp8_weight(state, info) and (kind != "linear" or settings.use_dora):
        state.problems.append(f"{where}: only plain LoRA on Linear layers can be merged into fp8 weights")
        return
    got = rank_and_scale(state, settings, ranks, alphas, module, a.shape[0], where)
    if got is None:
        return
    mag = roles.get("magnitude")
    problem = _dora_problem(spec, mag, kind, wshape)
    if problem:
        state.problems.append(f"{where}: {problem}")
        return
    r, alpha, scale = got
    double = kind == "embedding" or (kind == "linear" and is_converted_router(module, state.config("model_type")))
    state.add(LoraPatch(module=module, target=target_name or info.name, kind=kind, adapter=idx, a_key=ka.key,
                        b_key=kb.key, rank=r, alpha=alpha, scale=scale, weight=spec.weight, double_round=double,
                        magnitude_key=mag.key if (mag and settings.use_dora) else None), via)
    if "B_bias" in roles:
        _plan_lora_bias(state, idx, spec, module, roles["B_bias"], got, via, where)


def _dtype_problem(state: PlanState, info: TensorInfo, ka: ParsedKey, a: AdapterTensor, kb: ParsedKey,
                   b: AdapterTensor) -> str | None:
    """The base tensor must be a float (or a paired fp8) weight and both factors float tensors."""
    if is_fp8_weight(state, info):
        problem = fp8_weight_problem(state, info)
        if problem:
            return problem
    elif info.dtype not in FLOAT_DTYPES:
        return (f"base tensor {info.name!r} is {info.dtype}; only F32/F16/BF16/F64 weights can be merged "
                "(quantized bases are not supported)")
    bad = [f"{k.key!r} is {x.dtype}" for k, x in ((ka, a), (kb, b)) if x.dtype not in FLOAT_DTYPES]
    return f"LoRA factors must be float tensors, but {', '.join(bad)}" if bad else None


def _factor_shape_problem(info: TensorInfo, wshape: tuple[int, ...], ka: ParsedKey, a: AdapterTensor,
                          kb: ParsedKey, b: AdapterTensor) -> str | None:
    """Grouped convolutions (PEFT cannot merge them) and A/B pairs whose ranks differ."""
    if len(wshape) >= 3 and len(a.shape) == len(wshape) and a.shape[1] != wshape[1]:
        return (f"{info.name!r} is a grouped convolution ({wshape[1]} input channels per group, lora_A has "
                f"{a.shape[1]}); PEFT cannot merge groups > 1 either")
    if len(a.shape) < 2 or len(b.shape) < 2 or b.shape[1] != a.shape[0]:
        return f"rank mismatch between {ka.key!r} {list(a.shape)} and {kb.key!r} {list(b.shape)}"
    return None


def _dora_problem(spec: AdapterSpec, mag: ParsedKey | None, kind: str, wshape: tuple[int, ...]) -> str | None:
    """A DoRA module needs its magnitude vector of the right shape and an unweighted adapter; a magnitude
    vector without use_dora is an inconsistent file."""
    if not spec.settings.use_dora:
        return f"file has {mag.key!r} (DoRA) but use_dora is false in the config" if mag is not None else None
    if mag is None:
        return ("use_dora is set but the file has no lora_magnitude_vector for it (PEFT would silently "
                "re-initialise it); the adapter is incomplete")
    m = spec.by_key[mag.key]
    want = {"linear": (wshape[0],), "conv1d": (wshape[1],), "embedding": (wshape[1],),
            "conv": (1, wshape[0]) + (1,) * (len(wshape) - 2)}[kind]
    if tuple(m.shape) != want:
        return f"lora_magnitude_vector has shape {list(m.shape)}, expected {list(want)}"
    if spec.weight != 1.0:
        return (f"a DoRA adapter cannot be weighted (weight {spec.weight:g}): DoRA rescales whole weight rows, "
                "so a weighted sum has no defined meaning")
    return None


def _plan_lora_bias(state: PlanState, idx: int, spec: AdapterSpec, module: str, bias_key: ParsedKey,
                    got: tuple[int, float, float], via: str, where: str) -> None:
    """lora_bias: `bias += lora_B.bias * scale` on the module's base bias."""
    r, alpha, scale = got
    binfo, _ = state.resolve(module + ".bias", where)
    bb = spec.by_key[bias_key.key]
    if binfo is None:
        state.problems.append(f"{where}: lora_bias needs a base bias {module + '.bias'!r}, but the base has none "
                              "(PEFT raises here too)")
    elif binfo.shape != bb.shape or binfo.dtype not in FLOAT_DTYPES:
        state.problems.append(f"{where}: lora_B bias {list(bb.shape)} does not fit {binfo.name!r} "
                              f"{list(binfo.shape)} {binfo.dtype}")
    else:
        state.add(LoraPatch(module=module, target=binfo.name, kind="bias", adapter=idx, a_key=None,
                            b_key=bias_key.key, rank=r, alpha=alpha, scale=scale, weight=spec.weight), via)
