"""Shared fixtures: small synthetic checkpoints/adapters and a CLI runner (whole subprocess)."""

from __future__ import annotations

import json
import time
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants  # noqa: F401 - read HF_HUB_DISABLE_PROGRESS_BARS once, before any in-process main
import pytest
import torch

from stream_merge.synthetic import LlamaShape, write_adapter, write_checkpoint

TINY = LlamaShape(hidden=32, intermediate=48, layers=2, vocab=64, heads=4, kv_heads=2)


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m stream_merge ARGS` as a real process."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "stream_merge", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def make_pair(root: Path, shape: LlamaShape = TINY, shard_bytes: int = 6000, r: int = 4, alpha: float = 6.0,
              dtype: str = "BF16") -> tuple[Path, Path]:
    base, adapter = root / "base", root / "adapter"
    write_checkpoint(base, shape, dtype=dtype, max_shard_bytes=shard_bytes)
    write_adapter(adapter, shape, r=r, alpha=alpha, base_name=str(base))
    return base, adapter


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return make_pair(tmp_path)


@pytest.fixture
def hub(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A Hub-compatible test server on 127.0.0.1 (tests/hub_server.py); it must log no protocol errors."""
    from hub_server import start_hub_server

    server = start_hub_server(tmp_path)
    yield server
    server.stop()
    assert server.errors == [], "\n".join(server.errors)


def edit_json(path: Path, **changes: object) -> None:
    obj = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            obj.pop(k, None)
        else:
            obj[k] = v
    path.write_text(json.dumps(obj))


def rewrite_adapter(adapter: Path, mutate) -> None:
    """Load the adapter's tensors, let `mutate(dict)` change them, write them back."""
    from safetensors.torch import load_file, save_file

    f = adapter / "adapter_model.safetensors"
    sd = load_file(str(f))
    mutate(sd)
    save_file(sd, str(f), metadata={"format": "pt"})


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture
def pusher_env(hub, monkeypatch):  # type: ignore[no-untyped-def]
    """huggingface_hub pointed at the test server in this process (its constants are read at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return hub


def forget_digests(out: Path, files: set[str] | None = None) -> None:
    """Make OUT's record look like one of a merge that recorded no output digest (older versions), for the
    shards in `files` or every shard."""
    record = json.loads((out / "stream_merge.json").read_text())
    for e in record["shards"]:
        if files is None or e["file"] in files:
            e["sha256"] = None
            e.pop("xxh3_128", None)  # older versions did not know the field
    (out / "stream_merge.json").write_text(json.dumps(record))


def wait_until(cond, what: str, limit: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """Poll `cond` until it holds; fail naming `what` after `limit` seconds (a broken pipeline fails, never hangs)."""
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.005)
