"""sources.py and the Hub source's download area: local folders, cleanup by ownership."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import make_pair
from stream_merge.errors import InputError
from stream_merge.sources import DOWNLOADS_DIR, LocalSource, resolve_source


def test_local_folder_source(tmp_path: Path) -> None:
    base, _ = make_pair(tmp_path)
    src = resolve_source(str(base), "BASE")
    assert isinstance(src, LocalSource) and src.kind == "local" and src.folder() == base.resolve()
    index = src.base_index("label")
    first = index.shards[0].file
    assert src.available(first) and not src.available("model-99999-of-99999.safetensors")
    assert src.shard_path(first) == base.resolve() / first
    with pytest.raises(InputError, match="folder not found"):
        resolve_source(str(tmp_path / "nope"), "BASE")


def test_hub_source_removes_only_what_it_owns(tmp_path: Path, monkeypatch) -> None:
    """Stale partial files of the shard it downloads go; another shard's partial file, a foreign file and
    another worker's area stay, and so does the folder that holds them."""
    from huggingface_hub import constants

    from stream_merge.hub import HubSource
    from stream_merge.hub_cache import HF_LOCAL_DIR_META, RemoteFile

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    area = tmp_path / "out" / DOWNLOADS_DIR
    files = {f"s{i}.safetensors": RemoteFile(f"s{i}.safetensors", 10, sha256=f"{i}" * 64) for i in (1, 2)}
    src = HubSource("org/base", "BASE", "org/base", "0" * 40, files, tmp_path, download_dir=area)
    dl = area / HF_LOCAL_DIR_META / "download"
    dl.mkdir(parents=True)
    mine = dl / f"abc.{'1' * 64}.1234abcd.incomplete"
    theirs = dl / f"def.{'2' * 64}.5678abcd.incomplete"
    mine.write_bytes(b"x")
    theirs.write_bytes(b"y")
    worker = area / "another-worker"  # another process's area inside the same folder
    worker.mkdir(parents=True)
    (worker / "in-flight.incomplete").write_bytes(b"z")

    def fake_fetch(name: str, local_dir: Path | None, force: bool = False) -> Path:
        assert local_dir == area
        path = area / name
        path.write_bytes(b"0" * 10)
        (dl / f"{name}.metadata").write_text("m")
        return path

    monkeypatch.setattr(src, "_fetch_verified", fake_fetch)
    got = src.shard_path("s1.safetensors")
    assert got == area / "s1.safetensors" and not mine.exists() and theirs.exists()
    src.close(complete=True)
    assert not got.exists() and not (dl / "s1.safetensors.metadata").exists()
    assert theirs.exists() and (worker / "in-flight.incomplete").exists() and area.exists()
    theirs.unlink()
    (worker / "in-flight.incomplete").unlink()
    worker.rmdir()
    src.close(complete=True)
    assert not area.exists()  # empty now: removed
