"""The base checkpoint's layout: `model.safetensors.index.json` + shards, or one `model.safetensors`; with
--allow-pickle also PyTorch's `pytorch_model.bin.index.json` + `.bin` shards, or one `pytorch_model.bin`
(safetensors is preferred when a folder holds both).

Reads only the index and each shard's header (for `.bin` shards: the zip directory and data.pkl, see
`pickle_io`), and cross-checks them: every index entry must be in the header of the shard it names and nowhere
else, and shard names must be plain relative file names, so a crafted index cannot make us read or write
outside the folder.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import CheckpointFormatError, InputError
from .keymap import TargetResolver
from .model_config import config_value
from .pickle_io import read_pickle_file
from .records import BaseIndex, ShardHeader
from .safetensors_io import read_header_file
from .ties import arch_tied_keys

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_SINGLE_NAME = "pytorch_model.bin"
PICKLE_HELP = ("loading a pickle can run code, so stream-merge reads one only when asked (it parses the file "
               "without running it)")


@dataclass(frozen=True)
class WeightFiles:
    """Which files hold a base's weights: an index (`index`) naming shards, or one file (`single`)."""

    index: str | None
    single: str
    pickle: bool  # PyTorch .bin (torch.save zip) rather than safetensors

    @property
    def suffix(self) -> str:
        return ".bin" if self.pickle else ".safetensors"


SAFETENSORS_FILES = WeightFiles(None, SINGLE_NAME, False)


def weight_files(names: Collection[str]) -> WeightFiles | None:
    """The weight layout a set of file names holds: safetensors first (index, then single file), then the
    PyTorch pickle ones; None when there is neither."""
    for index, single, pickle in ((INDEX_NAME, SINGLE_NAME, False), (PICKLE_INDEX_NAME, PICKLE_SINGLE_NAME, True)):
        if index in names:
            return WeightFiles(index, single, pickle)
        if single in names:
            return WeightFiles(None, single, pickle)
    return None


def check_pickle_allowed(files: WeightFiles, allow_pickle: bool, label: str) -> None:
    """A pickle base without --allow-pickle: one line naming the file and the flag."""
    if files.pickle and not allow_pickle:
        raise InputError(f"base holds only PyTorch pickle weights ({files.index or files.single}); {PICKLE_HELP}",
                         file=label, fix="pass --allow-pickle if you trust this checkpoint, or convert it to "
                                         "safetensors")


def read_shard_header(path: Path, name: str) -> ShardHeader:
    """The header of a local base shard, safetensors or (by its `.bin` name) a torch.save zip."""
    regular_file(path, f"shard {name}")
    return read_pickle_file(path, name) if name.endswith(".bin") else read_header_file(path, name)


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


def check_shard_name(name: object, index_file: str, suffix: str = ".safetensors") -> str:
    """Accept only a plain *.safetensors (or, for a pickle index, *.bin) file name next to the index: no path
    outside the checkpoint folder, and no sub-folder (the output is written flat, so such a checkpoint could
    never be completed)."""
    ok = isinstance(name, str) and name.endswith(suffix) and "\\" not in name
    if ok:
        parts = name.split("/")  # not PurePosixPath(name).parts: it drops "." parts
        ok = not name.startswith("/") and not {"", ".", ".."} & set(parts) and name.isprintable()
    if not ok:
        raise CheckpointFormatError(
            f"index names an unsafe or invalid shard file {name!r}", file=index_file,
            fix=f"shard entries must be plain relative *{suffix} names inside the checkpoint folder")
    if "/" in name:  # type: ignore[operator]
        raise CheckpointFormatError(
            f"index names a shard in a sub-folder ({name!r}); stream-merge writes every shard next to the index",
            file=index_file, fix=f"move the shards next to {Path(index_file).name} and drop the folder from "
                                 "the index's weight_map")
    return name  # type: ignore[return-value]


def index_shard_names(index: Any, index_file: str, files: WeightFiles) -> dict[str, str]:
    """The weight map of a loaded index file, every shard name checked."""
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise CheckpointFormatError("index has no weight_map", file=index_file,
                                    fix=f"re-download {Path(index_file).name}")
    for shard in wmap.values():
        check_shard_name(shard, index_file, files.suffix)
    return wmap


def _cross_check(headers: list[ShardHeader], wmap: dict[str, str], index_file: str) -> None:
    """Every index entry is in the header of the shard it names and nowhere else."""
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
            file=index_file, fix="re-download the checkpoint (index and shards from one revision)")


def _distinct_outputs(headers: list[ShardHeader], index_file: str) -> None:
    """Two .bin shards whose safetensors output names would be one file are refused."""
    seen: dict[str, str] = {}
    for h in headers:
        other = seen.setdefault(h.output_name, h.file)
        if other != h.file:
            raise CheckpointFormatError(f"shards {other} and {h.file} would both be written as {h.output_name}",
                                        file=index_file, fix="rename the shards as transformers names them "
                                                             "(pytorch_model-0000i-of-0000n.bin)")


def local_weight_files(root: Path, label: str) -> WeightFiles:
    """The weight layout of a local base folder; a folder without one is refused naming what it holds."""
    found = weight_files([n for n in (INDEX_NAME, SINGLE_NAME, PICKLE_INDEX_NAME, PICKLE_SINGLE_NAME)
                          if (root / n).exists()])
    if found is not None:
        return found
    others = sorted(p.name for p in root.glob("*") if p.suffix in {".bin", ".pt", ".pth", ".gguf"})
    if others:
        raise InputError(
            f"base has no safetensors weights, only {', '.join(others[:3])}", file=label,
            fix="convert the checkpoint to safetensors (transformers save_pretrained(safe_serialization=True)); "
                f"a torch.save state dict named {PICKLE_SINGLE_NAME} is read with --allow-pickle")
    if (root / "adapter_config.json").exists():
        raise InputError("BASE is a PEFT adapter folder, not a model", file=label,
                         fix="pass the base model first, then the adapter")
    raise InputError(f"no {INDEX_NAME} or {SINGLE_NAME} in the base folder", file=label,
                     fix="point BASE at a folder holding a safetensors checkpoint")


def read_index(root: Path, header_reader: Callable[[str], ShardHeader] | None = None,
               config: dict | None = None, label: str | None = None, *, allow_pickle: bool = False,
               files: WeightFiles | None = None) -> BaseIndex:
    """Build the BaseIndex of a local folder. `header_reader(shard_name)` lets remote sources plug in
    their own range-request reader (with the `files` layout of their file list); by default headers are read
    from `root`. A pickle base needs `allow_pickle`, and its tied copies are dropped (`drop_tied_copies`)."""
    label = label or str(root)
    if files is None:
        files = local_weight_files(root, label) if header_reader is None else SAFETENSORS_FILES
    check_pickle_allowed(files, allow_pickle, label)
    read = header_reader or (lambda name: read_shard_header(root / name, name))
    if config is None and os.path.lexists(root / "config.json"):
        config = load_model_config(root / "config.json")
    if files.index is not None:
        index_path = root / files.index
        index = load_json(index_path, "checkpoint index")
        wmap = index_shard_names(index, str(index_path), files)
        headers = [read(name) for name in sorted(set(wmap.values()))]
        _cross_check(headers, wmap, str(index_path))
        _distinct_outputs(headers, str(index_path))
        meta = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
        base = BaseIndex(root=label, shards=tuple(headers), weight_map=dict(wmap), single_file=False,
                         config=config, index_metadata=meta)
    else:
        h = read(files.single)
        base = BaseIndex(root=label, shards=(h,), weight_map={t.name: files.single for t in h.tensors},
                         single_file=True, config=config)
    return drop_tied_copies(base) if files.pickle else base


def tied_copies(base: BaseIndex) -> set[str]:
    """Names a tied model fills from another tensor, stored by torch.save as the same bytes (a .bin state dict
    holds every tied name: `lm_head.weight` and the embedding share one storage). transformers drops them
    when it saves safetensors, keeping the tie's source; so do we. Not tied by the config: both are kept."""
    tie = config_value(base.config, "tie_word_embeddings")
    keys = arch_tied_keys(base.config) if (tie is None or bool(tie)) else {}
    resolver = TargetResolver(set(base.tensors))
    pairs = [(resolver.resolve(t)[0], resolver.resolve(s)[0]) for t, s in keys.items()] if keys else []
    drop: set[str] = set()
    for shard in base.shards:
        groups: dict[tuple, list[str]] = {}
        for t in shard.tensors:
            groups.setdefault((t.start, t.end, t.dtype, t.shape), []).append(t.name)
        for (start, end, _, _), names in groups.items():
            if len(names) < 2 or start == end:
                continue
            if keys is None:  # the language-model rule: the head is filled from the input embedding
                heads = {n for n in names if n == "lm_head.weight" or n.endswith(".lm_head.weight")}
                drop |= heads if len(heads) < len(names) else set()
            else:
                drop |= {t for t, s in pairs if t in names and s in names and t != s}
    return drop


def drop_tied_copies(base: BaseIndex) -> BaseIndex:
    """`base` without its `tied_copies`."""
    drop = tied_copies(base)
    if not drop:
        return base
    shards = tuple(replace(h, tensors=tuple(t for t in h.tensors if t.name not in drop)) for h in base.shards)
    return replace(base, shards=shards, weight_map={k: v for k, v in base.weight_map.items() if k not in drop})
