"""verify.py: the default mode checks each shard's recorded digest (computed while writing: xxh3_128 always,
sha256 with --checksums or a push, compared where recorded) without reading the inputs, --full recomputes, a
shard without a digest (an older merge) is recomputed and said so; the record
is untrusted input, special files never block, a merge on another device kind is not recomputed on the CPU,
and a shard is never called ok without a check."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import xxhash

from conftest import forget_digests, make_pair, run_cli
from stream_merge.errors import InputError
from stream_merge.verify import VerifyReport, recorded_device_kind, verify

RECORD = "stream_merge.json"


@pytest.fixture
def merged(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A merge with --checksums: every shard records its sha256 (as with a push) beside its xxh3_128."""
    base, adapter = make_pair(tmp_path)
    out = tmp_path / "out"
    r = run_cli("merge", base, adapter, "-o", out, "--quiet", "--device", "cpu", "--checksums")
    assert r.returncode == 0, r.stderr
    return base, adapter, out


@pytest.fixture
def plain(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A merge with the default options: each shard records its xxh3_128 and no sha256."""
    base, adapter = make_pair(tmp_path)
    out = tmp_path / "out"
    r = run_cli("merge", base, adapter, "-o", out, "--quiet", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    return base, adapter, out


def _edit_record(out: Path, change) -> None:  # type: ignore[no-untyped-def]
    record = json.loads((out / RECORD).read_text())
    change(record)
    (out / RECORD).write_text(json.dumps(record))




def _flip(path: Path, at: int = -2) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


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
    forget_digests(out)
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


# ---------------------------------------------------------------------------------------------- item 9: fast verify


def test_checksums_record_each_shards_sha256_computed_while_writing(merged) -> None:  # type: ignore[no-untyped-def]
    _, _, out = merged
    entries = json.loads((out / RECORD).read_text())["shards"]
    assert len(entries) == len(list(out.glob("*.safetensors"))) > 1
    for e in entries:
        assert e["sha256"] == hashlib.sha256((out / e["file"]).read_bytes()).hexdigest(), e["file"]


def test_default_verify_needs_no_input_and_names_a_changed_shard(merged) -> None:  # type: ignore[no-untyped-def]
    base, adapter, out = merged
    shutil.move(base, base.with_name("gone-base"))  # the default mode must not read (or plan) the inputs
    shutil.move(adapter, adapter.with_name("gone-adapter"))
    shards = sorted(out.glob("*.safetensors"))
    ok = run_cli("verify", out)
    assert ok.returncode == 0 and ok.stdout.splitlines()[0] == f"ok: {len(shards)} shards match the record", ok.stdout
    assert "recomputed" not in ok.stdout and "not checked" not in ok.stdout
    _flip(shards[1])
    bad = run_cli("verify", out)
    assert bad.returncode == 1 and f"mismatch: {shards[1].name}: sha256 differs" in bad.stderr, bad.stderr
    assert "--full" in bad.stderr and "recompute" not in bad.stdout
    _flip(shards[1])
    for at in (3, 40):  # the header's length, the header's text: named too (as a bad header or by its digest)
        _flip(shards[1], at)
        bad = run_cli("verify", out)
        assert bad.returncode == 1 and f"mismatch: {shards[1].name}: " in bad.stderr, bad.stderr
        _flip(shards[1], at)
    data = shards[2].read_bytes()
    for cut, why in ((data[:-1], "truncated"), (data[: len(data) // 2], "truncated"),
                     (data + b"\0", "trailing bytes")):
        shards[2].write_bytes(cut)
        bad = run_cli("verify", out)
        assert bad.returncode == 1 and f"mismatch: {shards[2].name}: " in bad.stderr and why in bad.stderr, bad.stderr
    shards[2].write_bytes(data)
    assert run_cli("verify", out).returncode == 0
    _edit_record(out, lambda rec: rec["shards"][2].update(size=len(data) - 1))  # a record that says otherwise
    bad = run_cli("verify", out)
    assert f"{shards[2].name}: size {len(data):,} bytes differs from the record's {len(data) - 1:,}" in bad.stderr


def test_default_verify_hashes_but_never_recomputes(merged, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import stream_merge.verify as v

    _, _, out = merged
    hashed: list[str] = []
    real = v.file_sha256
    monkeypatch.setattr(v, "file_sha256", lambda path, **kw: hashed.append(Path(path).name) or real(path, **kw))
    monkeypatch.setattr(v, "_recompute", lambda *a, **k: pytest.fail("default verify recomputed"))
    report = verify(out)
    assert report.ok and not report.recomputed and sorted(hashed) == sorted(p.name for p in out.glob("*.safetensors"))
    _flip(out / hashed[0])
    report = verify(out)
    assert report.problems == [f"{hashed[0]}: sha256 differs from the record (the bytes changed since the merge; "
                               "`verify --full` names the first differing tensor)"]


def test_full_still_recomputes_and_names_the_tensor(merged) -> None:  # type: ignore[no-untyped-def]
    _, _, out = merged
    shards = sorted(out.glob("*.safetensors"))
    ok = run_cli("verify", out, "--full")
    assert ok.returncode == 0 and f"ok: {len(shards)} shards match the record, {len(shards)} recomputed" in ok.stdout
    _flip(shards[0])
    bad = run_cli("verify", out, "--full")
    assert bad.returncode == 1 and f"{shards[0].name}: tensor '" in bad.stderr, bad.stderr
    assert "differs from a fresh merge" in bad.stderr and "sha256 differs" in bad.stderr


def test_a_shard_without_a_digest_is_recomputed_and_the_summary_says_so(merged) -> None:  # type: ignore[no-untyped-def]
    base, _, out = merged
    shards = sorted(out.glob("*.safetensors"))
    forget_digests(out, {shards[0].name})  # as a merge made before digests were always recorded
    r = run_cli("verify", out)
    assert r.returncode == 0 and f"ok: {len(shards)} shards match the record, 1 recomputed" in r.stdout, r.stdout
    assert f"recomputed: 1 shard(s) have no recorded sha256 ({shards[0].name}; merged by an older" in r.stdout
    _flip(shards[0])
    bad = run_cli("verify", out)
    assert bad.returncode == 1 and f"{shards[0].name}: tensor '" in bad.stderr, bad.stderr
    _flip(shards[0])
    shutil.rmtree(base)  # without the inputs: that one shard is not checked, and said so; the others still are
    r = run_cli("verify", out)
    assert r.returncode == 0 and f"ok: {len(shards) - 1} of {len(shards)} shards match the record" in r.stdout
    assert f"not checked ({shards[0].name}): no recorded sha256" in r.stdout, r.stdout


def test_a_resumed_merge_records_every_shards_digest(merged) -> None:  # type: ignore[no-untyped-def]
    base, adapter, out = merged
    before = {e["file"]: e["sha256"] for e in json.loads((out / RECORD).read_text())["shards"]}
    shards = sorted(before)
    (out / "model.safetensors.index.json").unlink()  # unfinished: the next run resumes
    (out / shards[1]).unlink()
    (out / shards[-1]).unlink()
    r = run_cli("merge", base, adapter, "-o", out, "--device", "cpu", "--checksums")
    assert r.returncode == 0 and f"({len(shards) - 2} resumed)" in r.stdout, r.stdout
    after = {e["file"]: e["sha256"] for e in json.loads((out / RECORD).read_text())["shards"]}
    assert after == before == {f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in shards}
    assert run_cli("verify", out).returncode == 0


def test_a_resumed_older_merge_keeps_a_shard_without_digest_verifiable(merged) -> None:  # type: ignore[no-untyped-def]
    base, adapter, out = merged
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    forget_digests(out, {shards[0]})  # finished by an older version: kept as it is, not hashed again
    (out / "model.safetensors.index.json").unlink()
    (out / shards[1]).unlink()
    assert run_cli("merge", base, adapter, "-o", out, "--device", "cpu", "--quiet", "--checksums").returncode == 0
    after = {e["file"]: e["sha256"] for e in json.loads((out / RECORD).read_text())["shards"]}
    assert after[shards[0]] is None and all(after[f] for f in shards[1:])
    r = run_cli("verify", out)
    assert r.returncode == 0 and "1 recomputed" in r.stdout and "no recorded sha256" in r.stdout, r.stdout


def test_a_default_resume_keeps_the_sha256_of_shards_an_earlier_run_finished(merged: tuple[Path, Path, Path]) -> None:
    base, adapter, out = merged
    before = {e["file"]: e for e in json.loads((out / RECORD).read_text())["shards"]}
    shards = sorted(before)
    (out / "model.safetensors.index.json").unlink()  # unfinished: the next run resumes, without --checksums
    (out / shards[1]).unlink()
    assert run_cli("merge", base, adapter, "-o", out, "--device", "cpu", "--quiet").returncode == 0
    after = {e["file"]: e for e in json.loads((out / RECORD).read_text())["shards"]}
    for f in shards:
        assert after[f]["xxh3_128"] == xxhash.xxh3_128((out / f).read_bytes()).hexdigest(), f
        assert after[f]["sha256"] == (None if f == shards[1] else before[f]["sha256"]), f
    for f in (shards[0], shards[1]):  # one compared by its kept sha256, one by its new xxh3_128
        _flip(out / f)
        bad = run_cli("verify", out)
        kind = "xxh3_128" if f == shards[1] else "sha256"
        assert bad.returncode == 1 and f"mismatch: {f}: {kind} differs" in bad.stderr, bad.stderr
        _flip(out / f)


def test_every_merge_records_each_shards_xxh3_128_and_no_sha256_by_default(plain: tuple[Path, Path, Path]) -> None:
    _, _, out = plain
    entries = json.loads((out / RECORD).read_text())["shards"]
    assert len(entries) == len(list(out.glob("*.safetensors"))) > 1
    for e in entries:
        assert e["xxh3_128"] == xxhash.xxh3_128((out / e["file"]).read_bytes()).hexdigest(), e["file"]
        assert e["sha256"] is None, e["file"]


def test_checksums_record_the_xxh3_128_too(merged: tuple[Path, Path, Path]) -> None:
    _, _, out = merged
    for e in json.loads((out / RECORD).read_text())["shards"]:
        assert e["xxh3_128"] == xxhash.xxh3_128((out / e["file"]).read_bytes()).hexdigest(), e["file"]


def test_default_verify_catches_a_flipped_byte_by_xxh3_128_without_the_base(plain: tuple[Path, Path, Path],
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import stream_merge.verify as v

    base, adapter, out = plain
    shutil.move(base, base.with_name("gone-base"))  # the default mode must not read (or plan) the inputs
    shutil.move(adapter, adapter.with_name("gone-adapter"))
    monkeypatch.setattr(v, "_recompute", lambda *a, **k: pytest.fail("default verify recomputed"))
    monkeypatch.setattr(v, "file_sha256", lambda *a, **k: pytest.fail("no sha256 was recorded to compare"))
    shards = sorted(out.glob("*.safetensors"))
    assert verify(out).ok
    _flip(shards[1])
    report = verify(out)
    assert report.problems == [f"{shards[1].name}: xxh3_128 differs from the record (the bytes changed since the "
                               "merge; `verify --full` names the first differing tensor)"]
    bad = run_cli("verify", out)
    assert bad.returncode == 1 and f"mismatch: {shards[1].name}: xxh3_128 differs" in bad.stderr, bad.stderr


def test_verify_compares_the_sha256_where_both_are_recorded(merged: tuple[Path, Path, Path],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import stream_merge.verify as v

    _, _, out = merged
    monkeypatch.setattr(v, "file_xxh3_128", lambda *a, **k: pytest.fail("the sha256 was recorded: it decides"))
    assert verify(out).ok
    shard = sorted(out.glob("*.safetensors"))[0]
    _flip(shard)
    assert verify(out).problems == [f"{shard.name}: sha256 differs from the record (the bytes changed since the "
                                    "merge; `verify --full` names the first differing tensor)"]


def test_a_merge_without_push_computes_no_sha256_of_its_shards(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """In process, with hashlib.sha256 failing whenever a shard writer (AtomicFile) or a file hash of an output
    shard would start one: the default merge never pays for a sha256 of its output."""
    import stream_merge
    from stream_merge import fileio

    base, adapter = make_pair(tmp_path)
    out = tmp_path / "out"
    real = hashlib.sha256
    started: list[str] = []

    def guarded(*args, **kwargs):  # type: ignore[no-untyped-def]
        caller = sys._getframe(1)
        if caller.f_code is fileio.AtomicFile.__init__.__code__ and caller.f_locals.get("digest"):
            started.append(str(caller.f_locals.get("final")))
            raise AssertionError("a shard writer started a sha256")
        if caller.f_code is fileio.file_sha256.__code__ and Path(caller.f_locals["path"]).parent == out:
            started.append(str(caller.f_locals["path"]))
            raise AssertionError("an output shard was hashed with sha256")
        return real(*args, **kwargs)

    monkeypatch.setattr(hashlib, "sha256", guarded)
    stream_merge.merge(str(base), [str(adapter)], str(out), device="cpu")
    monkeypatch.setattr(hashlib, "sha256", real)
    assert started == []
    entries = json.loads((out / RECORD).read_text())["shards"]
    assert len(entries) > 1 and all(e["sha256"] is None and e["xxh3_128"] for e in entries)
    assert verify(out).ok
    stream_merge.merge(str(base), [str(adapter)], str(tmp_path / "sha"), device="cpu", checksums=True)
    assert started == [] and all(e["sha256"] == real((tmp_path / "sha" / e["file"]).read_bytes()).hexdigest()
                                 for e in json.loads((tmp_path / "sha" / RECORD).read_text())["shards"])


@pytest.mark.hub
def test_push_uses_the_digest_of_the_writer_without_hashing_again(pusher_env, tmp_path: Path, monkeypatch) -> None:
    """The shard's sha256 (the Hub's LFS oid) comes from the merge's writer: the upload reads the file only to
    send it. A file changed since (its bytes no longer match that digest) is refused by the Hub, named."""
    hub = pusher_env
    from huggingface_hub import lfs

    from stream_merge.errors import HubError
    from stream_merge.push import Pusher

    monkeypatch.setattr(lfs, "sha_fileobj", lambda *a, **k: pytest.fail("the shard was hashed a second time"))
    out = tmp_path / "out"
    out.mkdir()
    data = os.urandom(3 << 20)
    (out / "model.safetensors").write_bytes(data)
    (out / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    uploaded: list[str] = []
    p = Pusher.open("org/merged", out, ["model.safetensors"])
    p.on_upload = uploaded.append
    p.submit("model.safetensors", hashlib.sha256(data).hexdigest())
    p.finish(["model.safetensors.index.json"])
    repo = hub.get_repo("org/merged")
    assert repo.commits[repo.branches["main"]].files["model.safetensors"].sha256 == hashlib.sha256(data).hexdigest()
    assert uploaded == ["model.safetensors"]

    written = os.urandom(3 << 20)
    (out / "model.safetensors").write_bytes(written[::-1])  # changed after the digest of `written` was taken
    p = Pusher.open("org/merged2", out, ["model.safetensors"])
    p.submit("model.safetensors", hashlib.sha256(written).hexdigest())
    with pytest.raises(HubError, match="push to org/merged2 failed while uploading model.safetensors"):
        p.finish(["model.safetensors.index.json"])


@pytest.mark.hub
def test_a_merge_with_push_records_the_writers_sha256_and_uploads_it(pusher_env, tmp_path: Path, monkeypatch) -> None:
    """--push-to-hub keeps the sha256 computed by the writer (the LFS oid, never hashed again) beside the
    xxh3_128; verify then compares the sha256."""
    hub = pusher_env
    from huggingface_hub import lfs

    import stream_merge

    monkeypatch.setattr(lfs, "sha_fileobj", lambda *a, **k: pytest.fail("the shard was hashed a second time"))
    base, adapter = make_pair(tmp_path)
    out = tmp_path / "out"
    stream_merge.merge(str(base), [str(adapter)], str(out), device="cpu", push_to_hub="org/pushed", token="hf_push")
    entries = json.loads((out / RECORD).read_text())["shards"]
    head = hub.get_repo("org/pushed").commits[hub.get_repo("org/pushed").branches["main"]]
    assert len(entries) > 1
    for e in entries:
        data = (out / e["file"]).read_bytes()
        assert e["sha256"] == head.files[e["file"]].sha256 == hashlib.sha256(data).hexdigest(), e["file"]
        assert e["xxh3_128"] == xxhash.xxh3_128(data).hexdigest(), e["file"]
    assert verify(out).ok


def test_the_api_reports_verify_progress_to_a_callback(merged) -> None:  # type: ignore[no-untyped-def]
    import stream_merge

    _, _, out = merged
    seen: dict[str, int] = {}
    report = stream_merge.verify_output(out, progress=lambda n, label: seen.update({label: seen.get(label, 0) + n}))
    assert report.ok and seen == {p.name: p.stat().st_size for p in out.glob("*.safetensors")}
    seen.clear()
    assert stream_merge.verify_output(out, full=True, progress=lambda n, label: seen.update(
        {label: seen.get(label, 0) + n})).ok
    sizes = {p.name: p.stat().st_size for p in out.glob("*.safetensors")}
    assert seen == {**sizes, **{f"{f} (recomputed)": n for f, n in sizes.items()}}
