"""Tensor names that transformers v5 changes when it loads a checkpoint (ViT, DeiT, BEiT, Dinov2, Swin...).

transformers 5 renames many vision models' modules in memory (`encoder.layer.N.attention.attention.query`
on disk is `layers.N.attention.q_proj` once loaded) and renames them back when it saves. A PEFT adapter
trained on the loaded model names the in-memory form, the checkpoint keeps the old one. This module gives
the disk -> memory renaming for a base: the rules transformers itself applies where it is installed (its
`conversion_mapping`, imported lazily and only its pure renamings, never its tensor converters), else a
table of ours for the common families. Pure: strings in, strings out; transformers is optional.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .model_config import config_value

RenameRule = tuple[str, str]  # (regular expression on the disk name, replacement); the first match is replaced

# transformers 5.24 conversion_mapping "ViTModel" (also DeiT, BEiT, ViTMAE, ViTMSN, I-JEPA via _MODEL_TO_...)
VIT_RULES: tuple[RenameRule, ...] = (
    (r"encoder\.layer\.", "layers."), ("attention.query", "q_proj"), ("attention.key", "k_proj"),
    ("attention.value", "v_proj"), ("attention.output.dense", "attention.o_proj"),
    ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2"),
)
# "Dinov2Model" / "Dinov2WithRegistersModel" (their SwiGLU `weights_in` split is a converter: not a rename)
DINOV2_RULES: tuple[RenameRule, ...] = (
    ("attention.attention.query", "attention.q_proj"), ("attention.attention.key", "attention.k_proj"),
    ("attention.attention.value", "attention.v_proj"), ("attention.output.dense", "attention.o_proj"),
    ("mlp.weights_out", "mlp.down_proj"),
)
# "swin"
SWIN_RULES: tuple[RenameRule, ...] = (
    ("attention.self.query", "attention.q_proj"), ("attention.self.key", "attention.k_proj"),
    ("attention.self.value", "attention.v_proj"),
    ("attention.self.relative_position_bias_table", "attention.relative_position_bias.relative_position_bias_table"),
    ("attention.output.dense", "attention.o_proj"), ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2"),
)
BUILTIN_RULES: Mapping[str, tuple[RenameRule, ...]] = {
    "vit": VIT_RULES, "deit": VIT_RULES, "beit": VIT_RULES, "vit_mae": VIT_RULES, "vit_msn": VIT_RULES,
    "ijepa": VIT_RULES, "dinov2": DINOV2_RULES, "dinov2_with_registers": DINOV2_RULES, "swin": SWIN_RULES,
}


@dataclass(frozen=True)
class LoadRenames:
    """How a base's disk names become in-memory names, and where the rules came from ("transformers" or
    "built-in table")."""

    source: str
    rename: Callable[[str], str]


def load_renames(config: Mapping[str, Any] | None) -> LoadRenames | None:
    """The disk -> memory renaming of this base, or None when neither transformers nor our table has rules
    for it."""
    rename = transformers_renames(config)
    if rename is not None:
        return LoadRenames("transformers", rename)
    rules = BUILTIN_RULES.get(str(config_value(config, "model_type")))
    return LoadRenames("built-in table", table_renames(rules)) if rules else None


def table_renames(rules: tuple[RenameRule, ...]) -> Callable[[str], str]:
    """Apply every rule in turn, each to its first match (what transformers' WeightRenaming does)."""
    compiled = [(re.compile(p), r) for p, r in rules]

    def rename(name: str) -> str:
        for rx, repl in compiled:
            name = rx.sub(repl.replace("\\", "\\\\"), name, count=1)
        return name
    return rename


def transformers_renames(config: Mapping[str, Any] | None) -> Callable[[str], str] | None:
    """The pure renamings transformers applies on load for this config's classes and model type (plus its
    "legacy" ones), or None when transformers is not installed or has none for this model."""
    try:  # optional: transformers is not a dependency; any import failure means "not available"
        from transformers import conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
    except Exception:  # noqa: BLE001
        return None
    renamings: list[Any] = []
    seen: set[str] = set()
    for ident in _identifiers(config, MODEL_MAPPING_NAMES):
        transforms = conversion_mapping.get_checkpoint_conversion_mapping(ident) or []
        for t in transforms:
            if isinstance(t, WeightRenaming) and not isinstance(t, WeightConverter) and repr(t) not in seen:
                seen.add(repr(t))
                renamings.append(t)
    if not renamings:
        return None
    legacy = conversion_mapping.get_checkpoint_conversion_mapping("legacy") or []
    renamings += [t for t in legacy if isinstance(t, WeightRenaming) and not isinstance(t, WeightConverter)]

    def rename(name: str) -> str:
        for t in renamings:
            name = t.rename_source_key(name)[0]
        return name
    return rename


def _identifiers(config: Mapping[str, Any] | None, base_classes: Mapping[str, Any]) -> list[str]:
    """What transformers looks conversions up by: the model's classes (architectures and the base model class
    of its type, which a task model wraps) and its model_type."""
    archs = config.get("architectures") if config else None
    ids = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    model_type = config_value(config, "model_type")
    if isinstance(model_type, str):
        base_class = base_classes.get(model_type)
        if isinstance(base_class, (list, tuple)):
            base_class = base_class[0] if base_class else None
        if isinstance(base_class, str):
            ids.append(base_class)
        ids.append(model_type)
    return list(dict.fromkeys(ids))
