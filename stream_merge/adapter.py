"""PEFT adapter folders: `adapter_config.json` + `adapter_model.safetensors` (or a legacy `.bin`).

Turns the config into validated `LoraSettings`, failing closed on anything that would change merge semantics
and that we do not implement, and reads tensors on demand (headers at planning time, data at merge time).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import load_json
from .errors import InputError, UnsupportedAdapterError
from .patterns import ModuleSelection, PatternError, compile_patterns
from .records import AdapterSpec, AdapterTensor, LoraSettings, TensorInfo
from .safetensors_io import ShardReader, read_header_file

if TYPE_CHECKING:  # torch is imported by the first tensor read (or a pickled adapter): planning never needs it
    import torch

CONFIG_NAME = "adapter_config.json"
SAFE_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"

# Fields that never change the merged weights (or are checked elsewhere from the weights themselves).
NEUTRAL_FIELDS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "target_modules", "exclude_modules", "lora_dropout", "fan_in_fan_out",
    "modules_to_save", "layers_to_transform", "layers_pattern", "megatron_core", "runtime_config",
    "qalora_group_size", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "velora_config", "monteclora_config",  # merge like plain LoRA (PEFT_SEMANTICS §1.1)
    "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "bias", "lora_bias",
    "init_lora_weights", "use_dora", "trainable_token_indices", "ensure_weight_tying", "target_parameters",
})
# Fields that change the merge (or make it impossible) whenever they are set to a truthy value.
REFUSED_WHEN_SET = {
    "megatron_config": "Megatron parallel LoRA layers",
    "use_qalora": "QALoRA, which PEFT itself cannot merge",
    "alora_invocation_tokens": "activated LoRA (aLoRA), which applies per token and cannot be merged",
    "arrow_config": "Arrow routing, which cannot be merged",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "kasa_config": "KaSA, which truncates the base weight",
    "layer_replication": "layer replication, which PEFT refuses to merge",
}
SAFE_INITS = {True, False, "gaussian", "eva", "orthogonal"}
MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def find_adapter_dir(path: Path) -> Path:
    """The folder holding adapter_config.json: `path` itself or its single named sub-folder."""
    if (path / CONFIG_NAME).is_file():
        return path
    if not path.exists():
        raise InputError("adapter folder not found", file=str(path), fix="check the path or Hub repo id")
    if path.is_file():
        raise InputError("ADAPTER must be a folder holding adapter_config.json, not a file", file=str(path),
                         fix="pass the folder that contains the adapter files")
    subs = sorted(p for p in path.iterdir() if (p / CONFIG_NAME).is_file())
    if len(subs) == 1:
        return subs[0]
    if subs:
        raise InputError(f"folder holds {len(subs)} adapters ({', '.join(p.name for p in subs)})",
                         file=str(path), fix=f"pass one of them, e.g. {subs[0]}")
    raise InputError(f"no {CONFIG_NAME} in the adapter folder", file=str(path),
                     fix="point ADAPTER at a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")


def _num(cfg: Mapping[str, Any], key: str, file: str, default: Any) -> float:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise InputError(f"{key} must be a finite number, got {v!r}", file=file, key=key)
    return v


def _pattern_map(cfg: Mapping[str, Any], key: str, file: str) -> dict[str, Any]:
    v = cfg.get(key) or {}
    if not isinstance(v, dict):
        raise InputError(f"{key} must be an object, got {type(v).__name__}", file=file, key=key)
    for k, val in v.items():
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val) or val <= 0:
            raise InputError(f"{key}[{k!r}] must be a positive number, got {val!r}", file=file, key=key)
    return dict(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_regexes(cfg: Mapping[str, Any], file: str) -> None:
    """Every name-selecting field has the type PEFT accepts, and every regular expression compiles: a bad
    one is an error naming its key now, not a traceback while planning."""
    for key in ("target_modules", "exclude_modules", "layers_pattern"):
        v = cfg.get(key)
        if v is not None and not isinstance(v, str) and not (
                isinstance(v, list) and all(isinstance(x, str) for x in v)):
            raise InputError(f"{key} must be a string (a regular expression) or a list of names, got {v!r}",
                             file=file, key=key)
    layers = cfg.get("layers_to_transform")
    if layers is not None and not _is_int(layers) and not (isinstance(layers, list) and all(map(_is_int, layers))):
        raise InputError(f"layers_to_transform must be a layer index or a list of them, got {layers!r}", file=file,
                         key="layers_to_transform")
    try:
        compile_patterns(_pattern_map(cfg, "rank_pattern", file), "rank_pattern")
        compile_patterns(_pattern_map(cfg, "alpha_pattern", file), "alpha_pattern")
        ModuleSelection.from_config(cfg.get("target_modules"), cfg.get("exclude_modules"),
                                    cfg.get("layers_to_transform"), cfg.get("layers_pattern"))
    except PatternError as exc:
        raise InputError(str(exc), file=file, key=exc.field,
                         fix=f"correct {exc.field} in adapter_config.json") from None


def _check_supported(cfg: Mapping[str, Any], file: str) -> None:
    """A LoRA config without any field that changes merge semantics in a way we do not implement."""
    peft_type = cfg.get("peft_type")
    if peft_type is None:
        raise InputError("adapter_config.json has no peft_type", file=file, key="peft_type",
                         fix="this is not a PEFT adapter config; re-save it with peft")
    if str(peft_type).upper() != "LORA":
        raise UnsupportedAdapterError(
            f"peft_type {peft_type!r} is not supported; stream-merge merges LoRA adapters (incl. rsLoRA)",
            file=file, key="peft_type", fix="merge this adapter with PEFT's merge_and_unload instead")
    for key, what in REFUSED_WHEN_SET.items():
        if cfg.get(key):
            raise UnsupportedAdapterError(f"{key} is set: {what} is not supported", file=file, key=key,
                                          fix=f"train without {key}, or merge with PEFT")
    for key, value in cfg.items():
        if key not in NEUTRAL_FIELDS and key not in REFUSED_WHEN_SET and value not in (None, False, {}, [], ""):
            raise UnsupportedAdapterError(
                f"unknown adapter_config field {key!r} = {value!r} may change how the adapter merges "
                "(stream-merge knows LoRA configs up to peft 0.21)", file=file, key=key,
                fix="upgrade stream-merge, or remove the field if you know it does not affect merging")
    init = cfg.get("init_lora_weights", True)
    if init not in SAFE_INITS:
        mutating = isinstance(init, str) and init.lower().startswith(MUTATING_INITS)
        raise UnsupportedAdapterError(
            f"init_lora_weights={init!r} " + ("changes the base weights at initialisation (the adapter is relative "
                                              "to a residual base)" if mutating else "is not supported"),
            file=file, key="init_lora_weights",
            fix="convert the adapter with PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) "
                "so it applies to the original base" if mutating else "merge with PEFT instead")


def parse_settings(cfg: Mapping[str, Any], file: str) -> LoraSettings:
    """Validate adapter_config.json; refuse every semantics-changing field we do not implement."""
    if not isinstance(cfg, dict):
        raise InputError("adapter_config.json is not a JSON object", file=file)
    _check_supported(cfg, file)
    if cfg.get("use_dora") and cfg.get("lora_bias"):
        raise InputError("use_dora and lora_bias cannot be combined (PEFT refuses this config)", file=file,
                         key="lora_bias")
    target_params = cfg.get("target_parameters") or ()
    if not isinstance(target_params, (list, tuple)) or not all(isinstance(t, str) for t in target_params):
        raise InputError(f"target_parameters must be a list of names, got {target_params!r}", file=file,
                         key="target_parameters")
    if cfg.get("trainable_token_indices"):
        raise UnsupportedAdapterError("trainable_token_indices is not supported yet", file=file,
                                      key="trainable_token_indices", fix="merge with PEFT")
    r = _num(cfg, "r", file, 8)
    if r != int(r) or r <= 0:
        raise InputError(f"r must be a positive integer, got {r!r}", file=file, key="r")
    bias = cfg.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise InputError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}", file=file, key="bias")
    _check_regexes(cfg, file)
    mts = cfg.get("modules_to_save") or ()
    if isinstance(mts, str):
        mts = (mts,)
    if not isinstance(mts, (list, tuple)) or not all(isinstance(m, str) for m in mts):
        raise InputError(f"modules_to_save must be a list of module names, got {mts!r}", file=file,
                         key="modules_to_save")
    return LoraSettings(
        r=int(r),
        lora_alpha=_num(cfg, "lora_alpha", file, 8),
        use_rslora=bool(cfg.get("use_rslora", False)),
        rank_pattern=_pattern_map(cfg, "rank_pattern", file),
        alpha_pattern=_pattern_map(cfg, "alpha_pattern", file),
        fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
        bias=bias,
        lora_bias=bool(cfg.get("lora_bias", False)),
        use_dora=bool(cfg.get("use_dora", False)),
        target_parameters=tuple(target_params),
        target_modules=cfg.get("target_modules"),
        exclude_modules=cfg.get("exclude_modules"),
        layers_to_transform=cfg.get("layers_to_transform"),
        layers_pattern=cfg.get("layers_pattern"),
        modules_to_save=tuple(mts),
        ensure_weight_tying=bool(cfg.get("ensure_weight_tying", False)),
    )


def load_adapter(path: Path, *, weight: float = 1.0, allow_pickle: bool = False, label: str | None = None
                 ) -> AdapterSpec:
    """Read an adapter's config and the names, dtypes and shapes of its tensors (no tensor data)."""
    folder = find_adapter_dir(path)
    cfg_file = folder / CONFIG_NAME
    raw = load_json(cfg_file, "adapter config")
    settings = parse_settings(raw, str(cfg_file))
    safe, pick = folder / SAFE_WEIGHTS, folder / PICKLE_WEIGHTS
    if safe.exists():
        header = read_header_file(safe, str(safe))
        tensors = tuple(AdapterTensor(t.name, t.dtype, t.shape) for t in header.tensors)
        weights_file = safe
    elif pick.exists():
        if not allow_pickle:
            raise InputError("adapter weights are a pickle (adapter_model.bin), which can run code when loaded",
                             file=str(pick), fix="convert to adapter_model.safetensors, or pass --allow-pickle "
                                                 "(loaded with torch.load(weights_only=True))")
        from .torch_dtypes import DTYPE_CODES

        sd = _load_pickle(pick)
        tensors = tuple(AdapterTensor(k, DTYPE_CODES[v.dtype], tuple(v.shape)) for k, v in sd.items())
        weights_file = pick
    else:
        raise InputError(f"no {SAFE_WEIGHTS} next to {CONFIG_NAME}", file=str(folder),
                         fix="copy the adapter weights into the folder")
    if not tensors:
        raise InputError("adapter weight file holds no tensors", file=str(weights_file))
    return AdapterSpec(path=str(folder), config_file=str(cfg_file), weights_file=str(weights_file),
                       settings=settings, tensors=tensors, raw_config=raw, weight=weight,
                       label=label or str(path))


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    import torch

    from .torch_dtypes import DTYPE_CODES

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad input
        raise InputError(f"cannot load pickled adapter weights safely ({str(exc).splitlines()[0][:200]})",
                         file=str(path), fix="convert the adapter to safetensors") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise InputError("pickled adapter weights are not a flat dict of tensors", file=str(path))
    bad = [k for k, v in sd.items() if v.dtype not in DTYPE_CODES]
    if bad:
        raise InputError(f"unsupported dtype {sd[bad[0]].dtype}", file=str(path), tensor=bad[0])
    return sd


class AdapterReader:
    """Tensor data of one adapter, read on demand; factors come back as exact fp32 copies."""

    def __init__(self, spec: AdapterSpec) -> None:
        self.spec = spec
        self._pickled: dict[str, torch.Tensor] | None = None
        self._reader: ShardReader | None = None
        self._infos: Mapping[str, TensorInfo] = {}
        path = Path(spec.weights_file)
        if path.suffix == ".bin":
            self._pickled = _load_pickle(path)
        else:
            header = read_header_file(path, str(path))
            self._reader = ShardReader(path, header)
            self._infos = header.by_name

    def rows(self, key: str, r0: int, r1: int) -> torch.Tensor:
        if self._pickled is not None:
            return self._pickled[key][r0:r1]
        assert self._reader is not None
        return self._reader.read_rows(self._infos[key], r0, r1)

    def tensor(self, key: str) -> torch.Tensor:
        if self._pickled is not None:
            return self._pickled[key]
        assert self._reader is not None
        return self._reader.read_tensor(self._infos[key])

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
