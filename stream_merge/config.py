"""Merge options: YAML file and/or keyword arguments -> one frozen MergeConfig.

The YAML keys are the CLI flag names with underscores; flags win over the file. Unknown keys are errors with
a "did you mean", never silently ignored.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class MergeConfig:
    """Everything that decides a merge. `base`/`adapters` are local folders or Hub ids `org/name[@revision]`."""

    base: str
    adapters: tuple[str, ...]
    output: str | None = None
    weights: tuple[float, ...] = ()
    device: str = "auto"
    dry_run: bool = False
    fresh: bool = False
    strict: bool = False
    allow_pickle: bool = False
    untie: bool = False
    dequantize: bool = False
    dtype: str = "auto"              # output dtype of floating tensors: auto (the base's), bf16, fp16, fp32
    worker: str | None = None
    ray: str | None = None
    key_map: tuple[tuple[str, str], ...] = ()
    block_size_mb: int = 2
    check_finite: bool = True
    checksums: bool = False          # sha256 of every output shard in the record (always on with push_to_hub)
    copy_extras: bool = True
    token: str | None = field(default=None, repr=False)  # Hub token (default: HF_TOKEN or the saved login)
    prefetch: int = 1                # Hub base: shards downloaded ahead of the one being merged
    keep_downloads: bool = False     # Hub base: download into the HF cache and keep the shards there
    push_to_hub: str | None = None   # org/name to upload the output to, shard by shard
    private: bool = False            # create the push_to_hub repo private
    local_copy: bool = True          # False: delete each shard from OUT once it is pushed

    @property
    def adapter_weights(self) -> tuple[float, ...]:
        return self.weights or tuple(1.0 for _ in self.adapters)


FIELD_NAMES = tuple(f.name for f in fields(MergeConfig))
ALIASES = {"adapter": "adapters", "out": "output", "weight": "weights"}
REQUIRED = ("base", "adapters")


def _unknown(key: str) -> ConfigError:
    near = difflib.get_close_matches(key, FIELD_NAMES + tuple(ALIASES), n=1)
    hint = f"did you mean {near[0]!r}?" if near else f"known keys: {', '.join(FIELD_NAMES)}"
    return ConfigError(f"unknown config key {key!r}", key=key, fix=hint)


def _as_str_list(v: Any, key: str) -> tuple[str, ...]:
    if isinstance(v, str):
        return (v,)
    if isinstance(v, Sequence) and all(isinstance(x, str) for x in v) and v:
        return tuple(v)
    raise ConfigError(f"{key} must be a string or a non-empty list of strings, got {v!r}", key=key)


def _key_map(v: Any) -> tuple[tuple[str, str], ...]:
    """key_map: a mapping {regex: replacement} or a list of {pattern, replacement} / [regex, replacement]."""
    items: list[tuple[Any, Any]]
    if isinstance(v, Mapping):
        items = list(v.items())
    elif isinstance(v, Sequence) and not isinstance(v, str):
        items = []
        for it in v:
            if isinstance(it, Mapping) and set(it) == {"pattern", "replacement"}:
                items.append((it["pattern"], it["replacement"]))
            elif isinstance(it, Sequence) and not isinstance(it, str) and len(it) == 2:
                items.append((it[0], it[1]))
            else:
                raise ConfigError(f"key_map entry {it!r} must be {{pattern: ..., replacement: ...}}", key="key_map")
    else:
        raise ConfigError("key_map must map regex patterns to replacements", key="key_map")
    out = []
    for p, r in items:
        if not isinstance(p, str) or not isinstance(r, str):
            raise ConfigError(f"key_map entry {p!r}: pattern and replacement must be strings", key="key_map")
        try:
            re.compile(p)
        except re.error as exc:
            raise ConfigError(f"key_map pattern {p!r} is not a valid regex ({exc})", key="key_map") from None
        out.append((p, r))
    return tuple(out)


def _coerce(key: str, value: Any) -> Any:
    if key == "adapters":
        return _as_str_list(value, key)
    if key == "weights":
        vals = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
            raise ConfigError(f"weights must be numbers, got {value!r}", key=key)
        return tuple(float(x) for x in vals)
    if key == "key_map":
        return _key_map(value)
    if key in ("base", "output", "device", "token", "push_to_hub", "worker", "ray", "dtype"):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key} must be a non-empty string, got {value!r}", key=key)
        return value
    if key == "block_size_mb":
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"block_size_mb must be a positive integer, got {value!r}", key=key)
        return value
    if key == "prefetch":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"prefetch must be a whole number >= 0, got {value!r}", key=key)
        return value
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}", key=key)
    return value


def normalise(options: Mapping[str, Any]) -> dict[str, Any]:
    """Check names and types of raw options; drop None values (= not given)."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        name = ALIASES.get(key, key)
        if name not in FIELD_NAMES:
            raise _unknown(key)
        if value is None:
            continue
        out[name] = _coerce(name, value)
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("config file not found", file=str(p)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file is not valid YAML ({str(exc).splitlines()[0]})", file=str(p)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config file must be a YAML mapping of option names to values", file=str(p))
    try:
        return normalise(data)
    except ConfigError as exc:
        raise ConfigError(exc.message, file=str(p), key=exc.key, fix=exc.fix) from None


def build_config(file_options: Mapping[str, Any] | None = None, **overrides: Any) -> MergeConfig:
    """YAML values, then keyword overrides (None = not given); validates combinations."""
    merged = dict(file_options or {})
    merged.update(normalise(overrides))
    missing = [k for k in REQUIRED if k not in merged]
    if missing:
        raise ConfigError(f"missing {' and '.join(missing)}", fix="give them on the command line or in --config")
    cfg = MergeConfig(**merged)
    if cfg.weights and len(cfg.weights) != len(cfg.adapters):
        raise ConfigError(f"{len(cfg.weights)} weights for {len(cfg.adapters)} adapters", key="weights",
                          fix="give one weight per adapter")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}", key="device")
    if cfg.dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(f"dtype must be auto, bf16, fp16 or fp32, got {cfg.dtype!r}", key="dtype")
    if cfg.worker is not None:
        from .partition import parse_worker

        parse_worker(cfg.worker)
        if cfg.ray is not None:
            raise ConfigError("--worker and --ray are two ways to split a merge; use one", key="worker")
    if cfg.push_to_hub is None and (cfg.private or not cfg.local_copy):
        raise ConfigError(f"{'private' if cfg.private else 'local_copy: false (--no-local-copy)'} only applies "
                          "with push_to_hub",
                          key="private" if cfg.private else "local_copy", fix="add --push-to-hub ORG/NAME")
    if cfg.push_to_hub is not None and not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", cfg.push_to_hub):
        raise ConfigError(f"push_to_hub must be a repo id ORG/NAME (no @revision), got {cfg.push_to_hub!r}",
                          key="push_to_hub")
    return replace(cfg)
