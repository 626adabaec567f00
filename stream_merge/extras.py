"""The small files of an output folder: config.json (patched), tokenizer/processor/generation files,
licence, model card, the stream_merge.json record and, last, the index. All written atomically."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .checkpoint import INDEX_NAME
from .errors import InputError
from .fileio import write_file_atomic
from .records import MergePlan, ShardResult, numel

RECORD_NAME = "stream_merge.json"
SIDE_FILES = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py", "LICENSE*", "NOTICE*", "USE_POLICY*",
              "*.spm", "*.vocab")
NOT_SIDE_FILES = (INDEX_NAME, "*.safetensors.index.json", "adapter_config.json", "stream_merge*.json",
                  "pytorch_model*.json", "README.md")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "spiece.model")
MAX_SIDE_FILE = 256 * 1024 * 1024


def is_side_file(name: str, size: int) -> bool:
    """The one rule for which files of a base are carried over: top level (no '/'), not hidden, a config /
    tokenizer / processor / code / licence pattern, not weights or our own records, at most MAX_SIDE_FILE."""
    return ("/" not in name and not name.startswith(".") and size <= MAX_SIDE_FILE
            and any(fnmatch.fnmatch(name, g) for g in SIDE_FILES)
            and not any(fnmatch.fnmatch(name, g) for g in NOT_SIDE_FILES))


def link_inside(folder: Path, path: Path) -> bool:
    """Whether `path` (maybe a symlink) stays inside `folder`, or, for a folder of an HF cache snapshot
    (`.../snapshots/<sha>/...`), inside that repo's own blob store, where the cache's links point."""
    real = path.resolve()
    if real.is_relative_to(folder.resolve()):
        return True
    for anc in (folder, *folder.parents):
        if anc.parent.name == "snapshots":
            return real.is_relative_to((anc.parent.parent / "blobs").resolve())
    return False


def checked_side_file(folder: Path, path: Path) -> Path:
    """`path`, refused when it is a link out of `folder` (it would copy, and push, a file from elsewhere)."""
    if path.is_symlink() and not link_inside(folder, path):
        raise InputError(f"{path.name} is a symbolic link to a file outside the folder ({path.resolve()})",
                         file=str(path), fix="replace the link with a copy of the file, or remove it")
    return path


def side_files(folder: Path) -> list[Path]:
    """Top-level non-weight files worth carrying over (config, tokenizer, processor, code, licence). A link
    that leaves `folder` is refused (InputError naming it); FIFOs, devices and folders are never side files."""
    return [checked_side_file(folder, p) for p in sorted(folder.iterdir())
            if is_side_file(p.name, 0) and p.is_file() and p.stat().st_size <= MAX_SIDE_FILE]


def patched_config(raw: bytes, updates: Mapping[str, Any]) -> bytes:
    """config.json with `updates` applied (in text_config where the key lives there)."""
    if not updates:
        return raw
    cfg = json.loads(raw)
    for key, value in updates.items():
        sub = cfg.get("text_config")
        if value is None:  # a key the merge removes (quantization_config after --dequantize)
            cfg.pop(key, None)
            if isinstance(sub, dict):
                sub.pop(key, None)
            continue
        if isinstance(sub, dict) and key in sub:
            sub[key] = value
        if key in cfg or not (isinstance(sub, dict) and key in sub):
            cfg[key] = value
    return (json.dumps(cfg, indent=2) + "\n").encode()


def copy_side_files(base_dir: Path, adapter_dirs: Sequence[Path], out: Path, updates: Mapping[str, Any]) -> list[str]:
    """Copy the base's side files, then the adapters' tokenizer files over them (fine-tunes that added tokens
    ship their tokenizer with the adapter). Returns the names written."""
    chosen: dict[str, Path] = {p.name: p for p in side_files(base_dir)}
    for adir in adapter_dirs:
        for name in TOKENIZER_FILES:
            if (adir / name).is_file():
                chosen[name] = checked_side_file(adir, adir / name)
    for name, src in chosen.items():
        data = src.read_bytes()
        if name == "config.json":
            data = patched_config(data, updates)
        write_file_atomic(out / name, data)
    return sorted(chosen)


def index_json(plan: MergePlan) -> bytes:
    weight_map = {t.name: s.file for s in plan.shards for t in s.tensors}
    meta = dict(plan.base.index_metadata)
    meta["total_size"] = sum(t.out_nbytes for s in plan.shards for t in s.tensors)
    if "total_parameters" in meta:
        meta["total_parameters"] = sum(numel(t.shape) for s in plan.shards for t in s.tensors)
    return (json.dumps({"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n").encode()


def write_record(out: Path, record: Mapping[str, Any]) -> None:
    write_file_atomic(out / RECORD_NAME, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


def write_index(out: Path, plan: MergePlan) -> None:
    write_file_atomic(out / INDEX_NAME, index_json(plan))


def shard_entries(results: Sequence[ShardResult]) -> list[dict[str, Any]]:
    return [{"file": r.file, "size": r.size, "sha256": r.sha256, "xxh3_128": r.xxh3_128, "patched": r.patched,
             "copied": r.copied} for r in results]
