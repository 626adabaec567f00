"""Was this adapter trained on this base? Pure: compares model configs (architecture and sizes), never folder
or repo names, so a local copy of the same model under another name is the same model.

The adapter's side is the config of the model it was trained on (found by `trained_on.find_trained_on`: the
adapter folder's own config.json, or its `base_model_name_or_path` as a local folder or HF cache entry); when
none is found, the hidden size read from its LoRA factor shapes. The runner decides warn vs error (--strict).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .keymap import ParsedKey, parse_key
from .model_config import config_value
from .records import AdapterSpec, BaseIndex

COMPARED_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "intermediate_size", "vocab_size")
HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
# LoRA modules whose lora_A reads the hidden state (in_features = hidden size): attention and MLP inputs
INPUT_LEAVES = frozenset({"q_proj", "k_proj", "v_proj", "qkv_proj", "query", "key", "value", "query_key_value",
                          "W_pack", "Wqkv", "c_attn", "gate_proj", "up_proj", "gate_up_proj", "fc1", "w1", "w3",
                          "c_fc", "in_proj"})


@dataclass(frozen=True)
class TrainedOn:
    """The config of the model an adapter was trained on, and where it was read (for the message)."""

    config: Mapping[str, Any] | None = None
    source: str = ""


def _lora_a(spec: AdapterSpec) -> Iterable[tuple[ParsedKey, tuple[int, ...]]]:
    for t in spec.tensors:
        pk = parse_key(t.key)
        if isinstance(pk, ParsedKey) and pk.role == "A" and len(t.shape) == 2:
            yield pk, t.shape


def _mode(values: Iterable[int]) -> int | None:
    common = Counter(values).most_common(1)
    return common[0][0] if common else None


def adapter_hidden_size(spec: AdapterSpec) -> int | None:
    """The hidden size the adapter was trained with: the most common in_features of the lora_A factors of
    attention / MLP input projections (None when it has none)."""
    return _mode(shape[1] for pk, shape in _lora_a(spec) if pk.module.rsplit(".", 1)[-1] in INPUT_LEAVES)


def base_hidden_size(base: BaseIndex) -> int | None:
    """BASE's hidden size: its config.json (the text model's), else the in_features of its attention / MLP
    input projection weights."""
    for key in HIDDEN_KEYS:
        value = config_value(base.config, key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return _mode(t.shape[-1] for name, t in base.tensors.items() if len(t.shape) == 2 and name.endswith(".weight")
                 and name[: -len(".weight")].rsplit(".", 1)[-1] in INPUT_LEAVES)


def _architecture(trained: Mapping[str, Any] | None, adapter_config: Mapping[str, Any]) -> list[str]:
    """The adapter side's architectures: its model config's, else the class PEFT recorded in auto_mapping."""
    archs = (trained or {}).get("architectures")
    if isinstance(archs, list) and archs:
        return [str(a) for a in archs]
    auto = adapter_config.get("auto_mapping")
    if isinstance(auto, Mapping) and isinstance(auto.get("base_model_class"), str):
        return [auto["base_model_class"]]
    return []


def config_differences(trained: Mapping[str, Any] | None, base_config: Mapping[str, Any] | None,
                       adapter_config: Mapping[str, Any], resized_vocab: int | None = None) -> list[str]:
    """`field value (BASE value)` for each compared field that both sides have and that differs. A vocabulary
    the adapter resizes on purpose (`resized_vocab`, planned as a config update) is no difference."""
    diffs = []
    mine, theirs = _architecture(trained, adapter_config), list((base_config or {}).get("architectures") or [])
    if mine and theirs and not set(mine) & set(map(str, theirs)):
        diffs.append(f"architecture {'/'.join(mine)} (BASE {'/'.join(map(str, theirs))})")
    for key in COMPARED_FIELDS if trained else ():
        a, b = config_value(trained, key), config_value(base_config, key)
        if a is None or b is None or a == b or (key == "vocab_size" and a == resized_vocab):
            continue
        diffs.append(f"{key} {a!r} (BASE {b!r})")
    return diffs


def compatibility_findings(base: BaseIndex, spec: AdapterSpec, trained_on: TrainedOn,
                           resized_vocab: int | None = None) -> list[str]:
    """At most one finding per adapter: the ways the model it was trained on differs from BASE (configs when
    the adapter's base config was found, else the hidden size from its factor shapes)."""
    label = spec.label or spec.path
    diffs = config_differences(trained_on.config, base.config, spec.raw_config, resized_vocab)
    source = f"; its base model's config: {trained_on.source}" if trained_on.config is not None else ""
    if trained_on.config is None or config_value(trained_on.config, "hidden_size") is None:
        mine, theirs = adapter_hidden_size(spec), base_hidden_size(base)
        if mine is not None and theirs is not None and mine != theirs:
            diffs.append(f"hidden size {mine} from its LoRA shapes (BASE {theirs})")
    if not diffs:
        return []
    return [f"adapter {label} was trained on another model than BASE: {', '.join(diffs)}{source}"]
