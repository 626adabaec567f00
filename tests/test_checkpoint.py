"""checkpoint.py: only regular files are opened, config.json must be an object, shards live next to the index."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import make_pair, run_cli
from stream_merge.checkpoint import check_shard_name, load_json, read_index, regular_file
from stream_merge.errors import CheckpointFormatError, InputError

INDEX = "model.safetensors.index.json"


def _first_shard(base: Path) -> str:
    return sorted(set(json.loads((base / INDEX).read_text())["weight_map"].values()))[0]


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_a_special_file_as_shard_is_refused_by_name(tmp_path: Path, kind: str) -> None:
    base, adapter = make_pair(tmp_path)
    shard = base / _first_shard(base)
    shard.unlink()
    if kind == "fifo":
        os.mkfifo(shard)
    elif kind == "device":
        shard.symlink_to("/dev/zero")
    else:
        shard.mkdir()
    words = {"fifo": "FIFO", "device": "a device", "folder": "a folder"}[kind]
    with pytest.raises(InputError, match=words) as err:
        read_index(base)
    assert shard.name in str(err.value)
    r = run_cli("merge", base, adapter, "-o", tmp_path / "out", timeout=120)  # never blocks on the FIFO
    assert r.returncode == 2 and shard.name in r.stderr and words in r.stderr, r.stderr
    assert not list((tmp_path / "out").glob("*.safetensors")) if (tmp_path / "out").exists() else True


@pytest.mark.parametrize("content", ["[1, 2]", '"text"', "3", "null"])
def test_config_json_that_is_not_an_object_is_refused(tmp_path: Path, content: str) -> None:
    base, adapter = make_pair(tmp_path)
    (base / "config.json").write_text(content)
    r = run_cli("plan", base, adapter)
    assert r.returncode == 2 and "config.json is not a JSON object" in r.stderr and "internal error" not in r.stderr


def test_config_json_that_is_a_folder_or_fifo_is_refused(tmp_path: Path) -> None:
    base, adapter = make_pair(tmp_path)
    (base / "config.json").unlink()
    (base / "config.json").mkdir()
    r = run_cli("plan", base, adapter)
    assert r.returncode == 2 and "config.json is a folder" in r.stderr, r.stderr
    (base / "config.json").rmdir()
    os.mkfifo(base / "config.json")
    with pytest.raises(InputError, match="FIFO"):
        load_json(base / "config.json", "config.json")


def test_an_index_naming_a_shard_in_a_sub_folder_is_refused_at_planning(tmp_path: Path) -> None:
    base, adapter = make_pair(tmp_path)
    index = json.loads((base / INDEX).read_text())
    moved = _first_shard(base)
    (base / "sub").mkdir()
    (base / moved).rename(base / "sub" / moved)
    index["weight_map"] = {k: (f"sub/{v}" if v == moved else v) for k, v in index["weight_map"].items()}
    (base / INDEX).write_text(json.dumps(index))
    r = run_cli("merge", base, adapter, "-o", tmp_path / "out")
    assert r.returncode == 2 and "sub-folder" in r.stderr and f"sub/{moved}" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # refused before any write
    with pytest.raises(CheckpointFormatError, match="sub-folder"):
        check_shard_name("a/b/model.safetensors", INDEX)
    for bad in ("../x.safetensors", "/abs/x.safetensors", "./x.safetensors", "x.bin", "a//x.safetensors"):
        with pytest.raises(CheckpointFormatError, match="unsafe or invalid"):
            check_shard_name(bad, INDEX)
    assert check_shard_name("model-00001-of-00002.safetensors", INDEX) == "model-00001-of-00002.safetensors"


def test_regular_file_passes_files_and_links_to_files(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x")
    (tmp_path / "link").symlink_to(f)
    assert regular_file(tmp_path / "link", "f") == tmp_path / "link"
    with pytest.raises(InputError, match="not found"):
        regular_file(tmp_path / "missing", "shard x")


def test_an_adapters_config_json_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    base, adapter = make_pair(tmp_path)
    (adapter / "config.json").write_text("[1]")
    r = run_cli("plan", base, adapter)
    assert r.returncode == 2 and "adapter's config.json is not a JSON object" in r.stderr, r.stderr
