"""The resume journal: records per shard, the one definition of a finished shard, damaged journals."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import xxhash

from stream_merge.errors import OutputError
from stream_merge.fileio import NAME_MAX, file_sha256
from stream_merge.journal import (JOURNAL_NAME, SHARDS_DIR, Journal, load_journal, record_shard, remove_journal,
                                  shard_finished)
from stream_merge.records import ShardResult


def _publish(out: Path, name: str, data: bytes = b"shard bytes", sha: bool = False) -> ShardResult:
    (out / name).write_bytes(data)
    return ShardResult(file=name, size=len(data), sha256=file_sha256(out / name) if sha else None, patched=1,
                       copied=2, seconds=0.0)


def _journal() -> Journal:
    return Journal(fingerprint="f" * 64, inputs={"base": {}}, options={"device": "cpu"}, tool_version="0.1.0")


@pytest.mark.parametrize("name", ["model-00001-of-00002.safetensors", "ü" * 120 + ".safetensors",
                                  "n" * (NAME_MAX - len(".safetensors")) + ".safetensors", "a%2Fb.safetensors"])
def test_records_round_trip_for_any_valid_shard_name(tmp_path: Path, name: str) -> None:
    j = _journal()
    j.save(tmp_path)
    j.record_shard(tmp_path, _publish(tmp_path, name))
    assert all(len(n.encode()) <= NAME_MAX for n in os.listdir(tmp_path / SHARDS_DIR))
    again = load_journal(tmp_path)
    assert again is not None and list(again.shards) == [name]
    assert shard_finished(tmp_path / name, again.shards[name])
    assert again.fingerprint == j.fingerprint and again.options == {"device": "cpu"}
    again.forget(tmp_path, name)
    assert load_journal(tmp_path).shards == {}


def test_a_record_written_without_a_journal_object(tmp_path: Path) -> None:
    entry = record_shard(tmp_path, _publish(tmp_path, "s.safetensors"))
    assert entry["file"] == "s.safetensors" and entry["size"] == len(b"shard bytes")
    _journal().save(tmp_path)
    assert load_journal(tmp_path).shards["s.safetensors"] == entry


def test_finished_means_same_size_and_mtime_or_same_sha256(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    j = _journal()
    j.record_shard(out, _publish(out, "a.safetensors", sha=True))
    j.record_shard(out, _publish(out, "b.safetensors"))
    ea, eb = j.shards["a.safetensors"], j.shards["b.safetensors"]
    assert shard_finished(out / "a.safetensors", ea) and shard_finished(out / "b.safetensors", eb)
    assert not shard_finished(out / "missing.safetensors", ea) and not shard_finished(out / "a.safetensors", None)
    copy = tmp_path / "copy"  # copied without times: the sha256 still says it is the same file
    copy.mkdir()
    for n in ("a.safetensors", "b.safetensors"):
        shutil.copyfile(out / n, copy / n)
        os.utime(copy / n, ns=(1, 1))
    assert shard_finished(copy / "a.safetensors", ea)
    assert not shard_finished(copy / "b.safetensors", eb)  # no sha256 recorded: not provably ours
    (out / "a.safetensors").write_bytes(b"shard bytez")  # same size, other bytes, new mtime
    assert not shard_finished(out / "a.safetensors", ea)
    (out / "b.safetensors").write_bytes(b"short")
    assert not shard_finished(out / "b.safetensors", eb)


def test_a_copied_shard_with_only_an_xxh3_128_is_recognised_by_it(tmp_path: Path) -> None:
    out, copy = tmp_path / "out", tmp_path / "copy"
    out.mkdir()
    copy.mkdir()
    (out / "c.safetensors").write_bytes(b"shard bytes")
    entry = {"file": "c.safetensors", "size": 11, "mtime_ns": 5, "sha256": None,
             "xxh3_128": xxhash.xxh3_128(b"shard bytes").hexdigest()}
    shutil.copyfile(out / "c.safetensors", copy / "c.safetensors")
    os.utime(copy / "c.safetensors", ns=(1, 1))
    assert shard_finished(copy / "c.safetensors", entry)
    (copy / "c.safetensors").write_bytes(b"shard bytez")  # same size, other bytes
    assert not shard_finished(copy / "c.safetensors", entry)


def test_an_entry_from_a_record_accepts_files_not_modified_after_it(tmp_path: Path) -> None:
    res = _publish(tmp_path, "s.safetensors")
    st = (tmp_path / "s.safetensors").stat()
    entry = {"file": res.file, "size": res.size, "sha256": None, "not_after_ns": st.st_mtime_ns + 10}
    assert shard_finished(tmp_path / "s.safetensors", entry)
    os.utime(tmp_path / "s.safetensors", ns=(st.st_mtime_ns + 11, st.st_mtime_ns + 11))
    assert not shard_finished(tmp_path / "s.safetensors", entry)


@pytest.mark.parametrize("content", [b"{not json", b'{"version": 1}', b"[]", b'{"version": 2}', b"\xff\xfe"])
def test_an_unreadable_journal_is_an_output_error_naming_it(tmp_path: Path, content: bytes) -> None:
    (tmp_path / JOURNAL_NAME).write_bytes(content)
    with pytest.raises(OutputError) as e:
        load_journal(tmp_path)
    assert JOURNAL_NAME in str(e.value.file) and "--fresh" in (e.value.fix or "")


def test_a_journal_that_is_a_folder_is_an_output_error(tmp_path: Path) -> None:
    (tmp_path / JOURNAL_NAME).mkdir()
    with pytest.raises(OutputError, match="unreadable"):
        load_journal(tmp_path)
    with pytest.raises(OutputError, match="cannot remove the old resume journal") as e:
        remove_journal(tmp_path)
    assert JOURNAL_NAME in str(e.value.file)


def test_remove_journal_removes_run_file_and_records(tmp_path: Path) -> None:
    j = _journal()
    j.save(tmp_path)
    j.record_shard(tmp_path, _publish(tmp_path, "s.safetensors"))
    remove_journal(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["s.safetensors"]
    remove_journal(tmp_path)  # nothing to remove: fine


def test_unreadable_shard_records_mean_redo(tmp_path: Path) -> None:
    j = _journal()
    j.save(tmp_path)
    (tmp_path / SHARDS_DIR).mkdir()
    (tmp_path / SHARDS_DIR / "x.safetensors.json").write_text('{"size": 1')
    (tmp_path / SHARDS_DIR / "y.safetensors.json").write_text(json.dumps({"size": 1}))
    (tmp_path / SHARDS_DIR / "worker-0-of-2.lock").write_text("")
    assert load_journal(tmp_path).shards == {}
