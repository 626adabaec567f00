"""verify.py: the record is untrusted input, special files never block, a merge on another device kind is not
recomputed on the CPU, and a shard is never called ok without a check."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import make_pair, run_cli
from stream_merge.errors import InputError
from stream_merge.verify import VerifyReport, recorded_device_kind, verify

RECORD = "stream_merge.json"


@pytest.fixture
def merged(tmp_path: Path) -> tuple[Path, Path, Path]:
    base, adapter = make_pair(tmp_path)
    out = tmp_path / "out"
    r = run_cli("merge", base, adapter, "-o", out, "--quiet", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    return base, adapter, out


def _edit_record(out: Path, change) -> None:  # type: ignore[no-untyped-def]
    record = json.loads((out / RECORD).read_text())
    change(record)
    (out / RECORD).write_text(json.dumps(record))


@pytest.mark.parametrize("name", ["../x.safetensors", "/etc/passwd.safetensors", "sub/x.safetensors", "..", 7])
def test_a_record_naming_files_outside_out_is_refused(merged, name) -> None:  # type: ignore[no-untyped-def]
    _, _, out = merged
    (out.parent / "x.safetensors").write_bytes(b"\0" * 16)

    def point_out(record: dict) -> None:
        record["shards"][0]["file"] = name

    _edit_record(out, point_out)
    with pytest.raises(InputError, match="outside the output folder or is malformed"):
        verify(out)
    r = run_cli("verify", out)
    assert r.returncode == 2 and RECORD in r.stderr and "\n" not in r.stderr.strip(), r.stderr


def test_a_fifo_in_place_of_a_shard_is_reported_not_opened(merged) -> None:  # type: ignore[no-untyped-def]
    _, _, out = merged
    shard = sorted(out.glob("*.safetensors"))[0]
    shard.unlink()
    os.mkfifo(shard)
    r = run_cli("verify", out, timeout=120)
    assert r.returncode == 1 and shard.name in r.stderr and "FIFO" in r.stderr, r.stderr


def test_a_merge_recorded_on_cuda_is_not_comparable_without_checksums(merged) -> None:  # type: ignore[no-untyped-def]
    _, _, out = merged
    _edit_record(out, lambda rec: rec.setdefault("options", {}).update(device="cuda:0"))
    assert recorded_device_kind(json.loads((out / RECORD).read_text())) == "cuda"
    shard = sorted(out.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-2] ^= 0x10
    shard.write_bytes(bytes(data))  # undetectable without checksums, and never called a mismatch or ok
    r = run_cli("verify", out, "--full")
    assert r.returncode == 0 and "not comparable" in r.stdout and "merged on cuda" in r.stdout, r.stdout
    assert "not checked: none of the" in r.stdout and "mismatch" not in r.stderr


def test_checksums_decide_for_a_cuda_merge(tmp_path: Path) -> None:
    base, adapter = make_pair(tmp_path)
    out = tmp_path / "out"
    assert run_cli("merge", base, adapter, "-o", out, "--quiet", "--checksums").returncode == 0
    _edit_record(out, lambda rec: rec.setdefault("options", {}).update(device="cuda"))
    ok = run_cli("verify", out)
    assert ok.returncode == 0 and "not checked" not in ok.stdout and "match the record" in ok.stdout, ok.stdout
    shard = sorted(out.glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-2] ^= 0x10
    shard.write_bytes(bytes(data))
    bad = run_cli("verify", out)
    assert bad.returncode == 1 and shard.name in bad.stderr and "sha256" in bad.stderr


def test_summary_never_calls_an_unchecked_shard_ok() -> None:
    report = VerifyReport(output="o", shards_checked=3)
    assert report.summary() == ["ok: 3 shards match the record"]
    report.skip(["b.safetensors"], "why")
    report.skip(["b.safetensors"], "counted once")
    assert report.summary() == ["ok: 2 of 3 shards match the record", "note: 1 shard(s) not checked (b.safetensors): why"]
    report.skip(["a.safetensors", "c.safetensors"], "why")
    assert report.summary()[0] == "not checked: none of the 3 shards could be checked"
