"""Tied-weight keys from the installed transformers, for architectures our table does not list.

Optional: transformers is never required at runtime. When it is installed and knows the config's
architecture class, the class is built on the `meta` device (no memory, no weights) with tying switched on, and
transformers' own expansion of its tied keys is returned; on any failure the caller falls back to its rules.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any


def transformers_tied_keys(config: Mapping[str, Any]) -> dict[str, str] | None:
    """`target -> source` names (in memory) that the config's architecture ties, or None if unknown here."""
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        return None
    try:
        torch = importlib.import_module("torch")
        transformers = importlib.import_module("transformers")
    except Exception:  # noqa: BLE001 - not installed, or broken: our own rules apply
        return None
    cls = getattr(transformers, archs[0], None)
    if cls is None or not hasattr(cls, "config_class") or not hasattr(cls, "get_expanded_tied_weights_keys"):
        return None
    hf_logging = transformers.utils.logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tied = {**config, "tie_word_embeddings": True}
        if isinstance(config.get("text_config"), Mapping):  # multimodal configs: the language model's flag
            tied["text_config"] = {**config["text_config"], "tie_word_embeddings": True}
        cfg = cls.config_class.from_dict(tied)
        with torch.device("meta"):
            model = cls(cfg)
        return {str(k): str(v) for k, v in model.get_expanded_tied_weights_keys(all_submodels=True).items()}
    except Exception:  # noqa: BLE001 - a config this transformers cannot build: our own rules apply
        return None
    finally:
        hf_logging.set_verbosity(level)
