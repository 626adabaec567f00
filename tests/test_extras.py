"""extras.py: the one side-file rule, and side files linked out of BASE refused before any work."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import make_pair, run_cli
from stream_merge.errors import InputError
from stream_merge.extras import MAX_SIDE_FILE, copy_side_files, is_side_file, link_inside, side_files


def test_is_side_file_is_the_one_rule() -> None:
    for name in ("config.json", "tokenizer.json", "tokenizer.model", "merges.txt", "LICENSE", "chat_template.jinja",
                 "modeling_x.py", "generation_config.json"):
        assert is_side_file(name, 100), name
    for name in ("model.safetensors.index.json", "adapter_config.json", "stream_merge.json", "README.md",
                 "model-00001-of-00002.safetensors", "sub/config.json", ".hidden.json", "pytorch_model.bin.index.json"):
        assert not is_side_file(name, 100), name
    assert not is_side_file("tokenizer.json", MAX_SIDE_FILE + 1)


def test_links_inside_base_and_into_an_hf_blob_store_are_fine(tmp_path: Path) -> None:
    repo = tmp_path / "models--org--base"
    snap = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "blobs" / "f00d").write_text("{}")
    (snap / "config.json").symlink_to(Path("../..") / "blobs" / "f00d")
    (snap / "real.json").write_text("{}")
    (snap / "tokenizer_config.json").symlink_to("real.json")
    assert [p.name for p in side_files(snap)] == ["config.json", "real.json", "tokenizer_config.json"]
    other = tmp_path / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    (other / "beef").write_text("{}")
    (snap / "tokenizer.json").symlink_to(other / "beef")
    assert not link_inside(snap, snap / "tokenizer.json")  # another repo's blobs are outside
    with pytest.raises(InputError, match="tokenizer.json is a symbolic link to a file outside"):
        side_files(snap)


def test_special_files_are_never_side_files(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "tokenizer.json")
    (tmp_path / "vocab.json").mkdir()
    assert side_files(tmp_path) == []


@pytest.mark.parametrize("name", ["tokenizer.json", "config.json", "LICENSE"])
def test_a_side_file_linked_out_of_base_is_refused_at_planning(tmp_path: Path, name: str) -> None:
    base, adapter = make_pair(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("{}" if name == "config.json" else "private")
    (base / name).unlink(missing_ok=True)
    (base / name).symlink_to(secret)
    out = tmp_path / "out"
    r = run_cli("merge", base, adapter, "-o", out)
    assert r.returncode == 2 and name in r.stderr and "outside" in r.stderr, r.stderr
    assert not out.exists() or not list(out.glob("*.safetensors"))  # refused before any shard


def test_adapter_tokenizer_linked_out_is_refused_when_copying(tmp_path: Path) -> None:
    base, adapter = make_pair(tmp_path)
    (tmp_path / "elsewhere.json").write_text("{}")
    (adapter / "tokenizer.json").symlink_to(tmp_path / "elsewhere.json")
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match="tokenizer.json is a symbolic link"):
        copy_side_files(base, [adapter], tmp_path / "out", {})
    assert not (tmp_path / "out" / "tokenizer.json").exists()
