"""Does the adapter belong to this base? Compares what the adapter records about its training base with the
base's config. Pure: returns human-readable findings; the runner decides warn vs error (--strict)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .model_config import config_value

COMPARED_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")


def _norm(name: str) -> str:
    """A model identity for loose comparison: last path component, lowercase, alphanumerics only."""
    return re.sub(r"[^a-z0-9]", "", name.rstrip("/").rsplit("/", 1)[-1].lower())


def compatibility_findings(base_label: str, base_config: Mapping[str, Any] | None, adapter_label: str,
                           adapter_config: Mapping[str, Any], adapter_model_config: Mapping[str, Any] | None
                           ) -> list[str]:
    """Findings that suggest the adapter was trained on another model than BASE."""
    found = []
    base_config = base_config or {}
    trained_on = adapter_config.get("base_model_name_or_path")
    names = {_norm(base_label)}
    if isinstance(base_config.get("_name_or_path"), str) and base_config["_name_or_path"]:
        names.add(_norm(base_config["_name_or_path"]))
    if isinstance(trained_on, str) and trained_on and _norm(trained_on) not in names:
        found.append(f"adapter {adapter_label} was trained on {trained_on!r}, but BASE is {base_label!r}")
    auto = adapter_config.get("auto_mapping")
    archs = base_config.get("architectures") or []
    if isinstance(auto, Mapping) and isinstance(auto.get("base_model_class"), str) and archs:
        if auto["base_model_class"] not in archs:
            found.append(f"adapter {adapter_label} was trained on a {auto['base_model_class']}, but BASE is "
                         f"{', '.join(map(str, archs))}")
    if adapter_model_config:
        for key in COMPARED_FIELDS:
            a, b = config_value(adapter_model_config, key), config_value(base_config, key)
            if a is not None and b is not None and a != b:
                found.append(f"adapter {adapter_label}'s config.json has {key}={a!r}, BASE has {key}={b!r}")
        a_arch = adapter_model_config.get("architectures")
        if a_arch and archs and list(a_arch) != list(archs):
            found.append(f"adapter {adapter_label}'s config.json says architectures={a_arch}, BASE has {archs}")
    return found
