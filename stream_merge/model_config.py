"""Reading a model's config.json the way transformers does for the text model. Pure.

Multimodal configs nest the language model's fields under `text_config`; a field is looked up at the top
level first, then there. One helper for the planner, the tie policy and the compatibility check.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def config_value(config: Mapping[str, Any] | None, key: str) -> Any:
    """`config[key]`, else `config["text_config"][key]`, else None."""
    if not config:
        return None
    if key in config:
        return config[key]
    text = config.get("text_config")
    return text.get(key) if isinstance(text, Mapping) else None
