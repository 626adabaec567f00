"""The base checkpoint's layout: `model.safetensors.index.json` + shards, or one `model.safetensors`.

Reads only the index and each shard's header, and cross-checks them: every index entry must be in the header
of the shard it names and nowhere else, and shard names must be plain relative file names, so a crafted
index cannot make us read or write outside the folder.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import CheckpointFormatError, InputError
from .records import BaseIndex, ShardHeader
from .safetensors_io import read_header_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def regular_file(path: Path, what: str) -> Path:
    """`path` if it is a regular file (after following links); a FIFO, device, socket or folder is refused,
    because opening or reading it could block for ever or never end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"{what} not found", file=str(path)) from None
    except OSError as exc:
        raise InputError(f"{what} cannot be read ({exc.strerror})", file=str(path)) from None
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a regular file")
        raise InputError(f"{what} is {kind}, not a regular file", file=str(path),
                         fix="replace it with the real file")
    return path


def load_json(path: Path, what: str) -> Any:
    """A JSON file of an input; a missing, special or unreadable file or invalid JSON is an InputError."""
    regular_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{what} is not valid JSON ({exc})", file=str(path),
                         fix="re-download or fix the file") from None
    except OSError as exc:
        raise InputError(f"{what} cannot be read ({exc.strerror})", file=str(path)) from None


def load_model_config(path: Path, what: str = "config.json") -> dict[str, Any]:
    """A model's config.json (the base's, or one shipped with an adapter): must be a JSON object."""
    config = load_json(path, what)
    if not isinstance(config, dict):
        raise InputError(f"{what} is not a JSON object (it holds a {type(config).__name__})", file=str(path),
                         fix="re-download the model's config.json")
    return config


def check_shard_name(name: object, index_file: str) -> str:
    """Accept only a plain *.safetensors file name next to the index: no path outside the checkpoint folder,
    and no sub-folder (the output is written flat, so such a checkpoint could never be completed)."""
    ok = isinstance(name, str) and name.endswith(".safetensors") and "\\" not in name
    if ok:
        parts = name.split("/")  # not PurePosixPath(name).parts: it drops "." parts
        ok = not name.startswith("/") and not {"", ".", ".."} & set(parts) and name.isprintable()
    if not ok:
        raise CheckpointFormatError(
            f"index names an unsafe or invalid shard file {name!r}", file=index_file,
            fix="shard entries must be plain relative *.safetensors names inside the checkpoint folder")
    if "/" in name:  # type: ignore[operator]
        raise CheckpointFormatError(
            f"index names a shard in a sub-folder ({name!r}); stream-merge writes every shard next to the index",
            file=index_file, fix="move the shards next to model.safetensors.index.json and drop the folder from "
                                 "the index's weight_map")
    return name  # type: ignore[return-value]


def read_index(root: Path, header_reader: Callable[[str], ShardHeader] | None = None,
               config: dict | None = None, label: str | None = None) -> BaseIndex:
    """Build the BaseIndex of a local folder. `header_reader(shard_name)` lets remote sources plug in
    their own range-request reader; by default headers are read from `root`."""
    label = label or str(root)
    read = header_reader or (lambda name: read_header_file(regular_file(root / name, f"shard {name}"), name))
    index_path = root / INDEX_NAME
    if config is None and os.path.lexists(root / "config.json"):
        config = load_model_config(root / "config.json")
    if index_path.exists():
        index = load_json(index_path, "checkpoint index")
        wmap = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise CheckpointFormatError("index has no weight_map", file=str(index_path),
                                        fix="re-download model.safetensors.index.json")
        for tensor, shard in wmap.items():
            check_shard_name(shard, str(index_path))
        shard_names = sorted(set(wmap.values()))
        headers = [read(name) for name in shard_names]
        problems = []
        seen: dict[str, str] = {}
        for h in headers:
            for t in h.tensors:
                if t.name in seen:
                    problems.append(f"tensor {t.name!r} is in both {seen[t.name]} and {h.file}")
                seen[t.name] = h.file
        for tensor, shard in wmap.items():
            where = seen.get(tensor)
            if where is None:
                problems.append(f"index lists {tensor!r} in {shard} but no shard header has it")
            elif where != shard:
                problems.append(f"index puts {tensor!r} in {shard} but it is in {where}")
        extra = sorted(set(seen) - set(wmap))
        if extra:
            problems.append(f"{len(extra)} tensor(s) in shard headers are missing from the index, e.g. "
                            f"{extra[0]!r} in {seen[extra[0]]}")
        if problems:
            raise CheckpointFormatError(
                "index and shard headers disagree: " + "; ".join(problems[:5])
                + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""),
                file=str(index_path), fix="re-download the checkpoint (index and shards from one revision)")
        meta = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
        return BaseIndex(root=label, shards=tuple(headers), weight_map=dict(wmap), single_file=False,
                         config=config, index_metadata=meta)
    if (root / SINGLE_NAME).exists() or header_reader is not None:
        h = read(SINGLE_NAME)
        return BaseIndex(root=label, shards=(h,), weight_map={t.name: SINGLE_NAME for t in h.tensors},
                         single_file=True, config=config)
    others = sorted(p.name for p in root.glob("*") if p.suffix in {".bin", ".pt", ".pth", ".gguf"})
    if others:
        raise InputError(
            f"base has no safetensors weights, only {', '.join(others[:3])}", file=label,
            fix="convert the checkpoint to safetensors (transformers save_pretrained(safe_serialization=True))")
    if (root / "adapter_config.json").exists():
        raise InputError("BASE is a PEFT adapter folder, not a model", file=label,
                         fix="pass the base model first, then the adapter")
    raise InputError(f"no {INDEX_NAME} or {SINGLE_NAME} in the base folder", file=label,
                     fix="point BASE at a folder holding a safetensors checkpoint")
