"""Finds the config of the model an adapter was trained on, for `compat`'s comparison with BASE. No network:
the adapter folder's own config.json, else its `base_model_name_or_path` as a local folder or as an entry of
the HF cache. A config found this way that cannot be read is no finding (it only feeds a warning); the
adapter folder's own config.json must be a JSON object, as before.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .checkpoint import load_model_config
from .compat import TrainedOn
from .errors import StreamMergeError

log = logging.getLogger("stream_merge")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # `org/name`, or a legacy id like `gpt2`


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return load_model_config(path, "config.json") if path.is_file() else None
    except (StreamMergeError, OSError) as exc:
        log.info("not comparing with %s: %s", path, exc)
        return None


def _cached_config(repo_id: str) -> Path | None:
    """config.json of the repo's `main` snapshot in the HF cache, else of its newest snapshot."""
    try:
        from .hub_cache import repo_cache_dir
    except ImportError:
        return None
    repo = repo_cache_dir(repo_id)
    try:
        ref = repo / "refs" / "main"
        if ref.is_file() and (repo / "snapshots" / ref.read_text().strip() / "config.json").is_file():
            return repo / "snapshots" / ref.read_text().strip() / "config.json"
        found = sorted((p.stat().st_mtime, str(p)) for p in (repo / "snapshots").glob("*/config.json"))
    except OSError:
        return None
    return Path(found[-1][1]) if found else None


def find_trained_on(adapter_folder: Path, adapter_config: Mapping[str, Any]) -> TrainedOn:
    """The adapter's training base config: `ADAPTER/config.json`, else `base_model_name_or_path` resolved as a
    local folder (`~` expanded, relative to the working directory) or an HF cache entry; else none."""
    own = adapter_folder / "config.json"
    if own.exists():
        return TrainedOn(load_model_config(own, "adapter's config.json"), f"{own}")
    name = adapter_config.get("base_model_name_or_path")
    if not isinstance(name, str) or not name.strip():
        return TrainedOn()
    candidates = [Path(name).expanduser() / "config.json"]
    if REPO_ID.match(name):
        cached = _cached_config(name)
        if cached is not None:
            candidates.append(cached)
    for path in candidates:
        config = _read(path)
        if config is not None:
            return TrainedOn(config, str(path))
    return TrainedOn()
