"""Procedural Hub repos: a Llama- or Mixtral-shaped safetensors checkpoint of any size, bytes made on demand.

A repo is described by a small JSON spec (tensor names and shapes, dtype, shard count, config.json); every byte
of a shard is a function of (file, offset): a valid safetensors header, then the tensors' data, tiled from one
block of small random values (bf16/f16/f32 of magnitude ~0.02: finite, as the merge checks) read at a per-file
shift that keeps element alignment. Range reads work at any offset and equal the same slice of a full read.
Nothing of the model is stored: the LFS sha256 of each shard is computed once by streaming and cached on disk,
keyed by the spec, so a 141 GB repo is hashed once ever.

``python tests/hub_procedural.py serve SPEC.json`` runs the test Hub server (``hub_server.py``) with the
repo, bandwidth limits per direction and discarded uploads, and prints ``PORT n`` once it listens;
``scripts/bench_hub.py`` drives it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import struct
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

try:
    from hub_server import HubServer
    from hub_store import Blob
except ImportError:  # tests/ imported as a package
    from tests.hub_server import HubServer
    from tests.hub_store import Blob

SPEC_VERSION = 1
ITEM_SIZES = {"BF16": 2, "F16": 2, "F32": 4}
TILE_BYTES = 4 * ((1 << 20) + 7919)  # not a power of two: tensors do not all start at the same tile phase
_SIZE = re.compile(r"^\s*([0-9.]+)\s*([kmgt]?i?b?)?\s*(/s)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30,
          "ti": 2**40}


def parse_rate(text: str) -> float | None:
    """``"150MB/s"`` -> 150e6 bytes/s (``MiB`` binary); ``"0"``, ``"none"`` or ``"inf"`` -> None (no limit)."""
    if text.strip().lower() in ("0", "none", "inf", "unlimited", ""):
        return None
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"bad rate {text!r}: write e.g. 150MB/s or 1GiB/s")
    unit = (m.group(2) or "").lower().rstrip("b")
    return float(m.group(1)) * _UNITS[unit]


# ------------------------------------------------------------------------------------------------ the spec
def make_spec(tensors: Sequence[tuple[str, Sequence[int]]], dtype: str, shards: int, config: dict[str, Any],
              seed: int = 0, max_shard_bytes: int | None = None) -> dict[str, Any]:
    """A repo spec: tensors in file order, split into `shards` files of about equal size, or, with
    `max_shard_bytes`, cut the way `save_pretrained` cuts a checkpoint (huggingface_hub's greedy rule and names;
    `shards` is then ignored)."""
    if dtype not in ITEM_SIZES:
        raise ValueError(f"dtype {dtype} is not one of {sorted(ITEM_SIZES)}")
    sizes = [_numel(s) * ITEM_SIZES[dtype] for _, s in tensors]
    if max_shard_bytes is not None:
        from stream_merge.plan_layout import shard_name, split_sizes  # pure and torch-free

        cut = split_sizes(sizes, max_shard_bytes)
        files = {shard_name(i, len(cut)): [[tensors[j][0], list(tensors[j][1])] for j in group]
                 for i, group in enumerate(cut, start=1)}
        return {"version": SPEC_VERSION, "dtype": dtype, "seed": seed, "files": files, "config": config}
    total = sum(sizes)
    groups: list[list[list[Any]]] = [[] for _ in range(max(1, shards))]
    pos = 0
    for (name, shape), n in zip(tensors, sizes):
        groups[min(len(groups) - 1, pos * len(groups) // max(1, total))].append([name, list(shape)])
        pos += n
    groups = [g for g in groups if g]
    files = {f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors": g for i, g in enumerate(groups)}
    return {"version": SPEC_VERSION, "dtype": dtype, "seed": seed, "files": files, "config": config}


def spec_key(spec: dict[str, Any]) -> str:
    """What identifies a spec's bytes (the digest cache's key)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _tile(dtype: str, seed: int) -> bytes:
    """TILE_BYTES of small random values of `dtype`, twice over (any window up to TILE_BYTES is one slice)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vals = (rng.standard_normal(TILE_BYTES // ITEM_SIZES[dtype], dtype=np.float32) * 0.02).astype(np.float32)
    if dtype == "BF16":
        raw = (vals.view(np.uint32) >> 16).astype("<u2").tobytes()  # truncation: finite, small
    elif dtype == "F16":
        raw = vals.astype("<f2").tobytes()
    else:
        raw = vals.astype("<f4").tobytes()
    return raw + raw


class ProceduralFile:
    """One shard: header bytes, then `data_size` bytes of the tile read from a per-file shift."""

    def __init__(self, name: str, entries: Sequence[tuple[str, Sequence[int]]], dtype: str, tile: bytes) -> None:
        item = ITEM_SIZES[dtype]
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        pos = 0
        for tname, shape in entries:
            n = _numel(shape) * item
            header[tname] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
            pos += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.name = name
        self.head = struct.pack("<Q", len(raw)) + raw
        self.size = len(self.head) + pos
        self.tile = tile
        period = TILE_BYTES // item
        self.shift = (zlib.crc32(name.encode()) % period) * item  # element-aligned

    def read(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file."""
        start, end = max(0, start), min(end, self.size)
        parts = []
        hl = len(self.head)
        if start < hl:
            parts.append(self.head[start:min(end, hl)])
            start = min(end, hl)
        while start < end:
            off = (start - hl + self.shift) % TILE_BYTES
            n = min(end - start, TILE_BYTES)
            parts.append(self.tile[off:off + n])
            start += n
        return b"".join(parts)


@dataclass
class ProceduralRepo:
    """A spec's files: the shards (made on demand) and the small files (index, config)."""

    spec: dict[str, Any]
    shards: dict[str, ProceduralFile]
    small: dict[str, bytes]

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> ProceduralRepo:
        tile = _tile(spec["dtype"], spec.get("seed", 0))
        shards = {f: ProceduralFile(f, entries, spec["dtype"], tile) for f, entries in spec["files"].items()}
        total = sum(s.size - len(s.head) for s in shards.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {t: f for f, entries in spec["files"].items() for t, _ in entries}}
        small = {"model.safetensors.index.json": json.dumps(index, indent=2).encode(),
                 "config.json": json.dumps(spec["config"], indent=2).encode(),
                 "generation_config.json": b'{"bos_token_id": 1, "eos_token_id": 2}\n'}
        return cls(spec, shards, small)

    @property
    def nbytes(self) -> int:
        return sum(s.size for s in self.shards.values())

    def write_to(self, folder: Path) -> None:
        """The repo as a local folder (a same-size upload for the T_ul baseline; small shapes only)."""
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in self.small.items():
            (folder / name).write_bytes(data)
        for name, f in self.shards.items():
            with open(folder / name, "wb") as out:
                for pos in range(0, f.size, 8 << 20):
                    out.write(f.read(pos, min(f.size, pos + (8 << 20))))


def file_sha256(f: ProceduralFile, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    for pos in range(0, f.size, chunk):
        h.update(f.read(pos, min(f.size, pos + chunk)))
    return h.hexdigest()


def digests(repo: ProceduralRepo, cache_dir: Path | None, threads: int = 2) -> dict[str, str]:
    """The sha256 of every shard: from the cache when this spec was hashed before, else by streaming (and
    then cached)."""
    path = cache_dir / f"procedural-{spec_key(repo.spec)}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        cached = json.loads(path.read_text())
        if set(cached) == set(repo.shards):
            return cached
    with ThreadPoolExecutor(max(1, threads)) as pool:  # hashlib releases the GIL on large buffers
        out = dict(zip(repo.shards, pool.map(file_sha256, repo.shards.values())))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(out, indent=1))
        os.replace(tmp, path)
    return out


def add_repo(server: HubServer, repo_id: str, repo: ProceduralRepo, shas: dict[str, str]) -> str:
    """Commit the repo to `server` (shards as generated blobs); returns the commit sha."""
    files: dict[str, Any] = dict(repo.small)
    files.update({n: Blob.generated(f, shas[n]) for n, f in repo.shards.items()})
    return server.add_commit(repo_id, files, message="procedural checkpoint")


# ------------------------------------------------------------------------------------------------ serving
class EventLog:
    """The server's events (file GETs, LFS uploads, commits) as JSON lines, flushed per line."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "a", buffering=1)
        self._lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:
        with self._lock:
            self._f.write(json.dumps(event) + "\n")


def serve(argv: Sequence[str] | None = None) -> int:
    """`serve SPEC.json --repo ID --rate-down R --rate-up R --log F --cache DIR`: prints `PORT n`, then serves
    until stdin closes or SIGTERM."""
    ap = argparse.ArgumentParser(prog="hub_procedural.py serve")
    ap.add_argument("spec", type=Path)
    ap.add_argument("--repo", default="bench/base")
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--rate-down", default="0")
    ap.add_argument("--rate-up", default="0")
    ap.add_argument("--log", type=Path)
    ap.add_argument("--cache", type=Path)
    args = ap.parse_args(argv)
    repo = ProceduralRepo.from_spec(json.loads(args.spec.read_text()))
    t0 = time.monotonic()
    shas = digests(repo, args.cache)
    print(f"HASHED {time.monotonic() - t0:.1f}", flush=True)
    server = HubServer(args.root, rate_down=parse_rate(args.rate_down), rate_up=parse_rate(args.rate_up),
                       discard_uploads=True, on_event=EventLog(args.log) if args.log else None)
    add_repo(server, args.repo, repo, shas)
    server.start()
    print(f"PORT {server.port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    stop.wait()
    server.stop()
    if server.errors:
        print("\n".join(server.errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        sys.exit(serve(sys.argv[2:]))
    sys.exit("usage: hub_procedural.py serve SPEC.json --root DIR [--rate-down R] [--rate-up R] [--log F]")
