"""Whose files OUT holds, what identifies the inputs, and who may delete what (issues 12, 14, 15).

- a foreign file with one of our output names is never replaced; --fresh removes only what our journal or
  record names;
- a base changed after a complete merge is noticed (size, mtime, inode; sha256 with --checksums);
- a complete OUT has no journal, and a re-run is a no-op decided from the record;
- a plain merge and --worker runs on one OUT never run side by side on one host; no run deletes a file of
  another run (two pods may both be PID 1); each run downloads into its own area;
- platforms: Windows is refused in one line; no O_DIRECT means buffered writes; ru_maxrss units.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_pair, run_cli
from stream_merge.fileio import TMP_PREFIX, owner_tag, temp_name
from stream_merge.journal import JOURNAL_NAME, SHARDS_DIR

INDEX = "model.safetensors.index.json"
RECORD = "stream_merge.json"
DOWNLOADS = ".stream-merge-downloads"


def _listing(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def _stamps(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}


def _refused(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("outdir")
    base, adapter = make_pair(root)
    ref = root / "ref"
    r = run_cli("merge", base, adapter, "-o", ref, "--quiet", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    return base, adapter, ref


def _merge(base: Path, adapter: Path, out: Path, *extra: object) -> subprocess.CompletedProcess:
    return run_cli("merge", base, adapter, "-o", out, "--device", "cpu", *extra)


def _shards(ref: Path) -> list[str]:
    return sorted(set(json.loads((ref / INDEX).read_text())["weight_map"].values()))


# ---------------------------------------------------------------------------------------------- foreign files


@pytest.mark.parametrize("what", ["shard-and-index", "index-only", "one-shard", "other-file"])
def test_foreign_files_are_never_replaced(inputs, tmp_path: Path, what: str) -> None:
    base, adapter, ref = inputs
    out = tmp_path / "out"
    out.mkdir()
    first = _shards(ref)[0]
    names = {"shard-and-index": [first, INDEX], "index-only": [INDEX], "one-shard": [first],
             "other-file": ["notes.txt"]}[what]
    for n in names:
        (out / n).write_bytes(b"another model's " + n.encode())
    before = _listing(out)
    _refused(_merge(base, adapter, out), "did not write", names[0])
    assert _listing(out) == before
    # --fresh does not remove them either: they are not ours
    _refused(_merge(base, adapter, out, "--fresh"), "did not write", "--fresh only removes")
    assert _listing(out) == before and not (out / JOURNAL_NAME).exists()


def test_fresh_removes_only_what_the_record_names(inputs, tmp_path: Path) -> None:
    base, adapter, ref = inputs
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    (out / "notes.txt").write_text("mine, not the tool's")
    r = _merge(base, adapter, out, "--fresh", "--weights", "0.5")
    assert r.returncode == 0, r.stderr
    assert (out / "notes.txt").read_text() == "mine, not the tool's"
    assert (out / INDEX).exists() and json.loads((out / RECORD).read_text())["options"]["weights"] == [0.5]


def test_fresh_when_the_old_journal_cannot_be_removed(inputs, tmp_path: Path) -> None:
    base, adapter, _ = inputs
    out = tmp_path / "out"
    out.mkdir()
    (out / JOURNAL_NAME).mkdir()  # not a file: unreadable, and unlink fails
    (out / JOURNAL_NAME / "x").write_text("x")
    _refused(_merge(base, adapter, out), JOURNAL_NAME)
    _refused(_merge(base, adapter, out, "--fresh"), "cannot remove the old resume journal", JOURNAL_NAME)


# ---------------------------------------------------------------------------------------------- input identity


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("change", ["bytes", "mtime", "replaced"])
def test_a_base_changed_after_a_complete_merge_is_refused(tmp_path: Path, change: str) -> None:
    base, adapter = make_pair(tmp_path)
    out = tmp_path / "out"
    assert _merge(base, adapter, out, "--quiet").returncode == 0
    before = _listing(out)
    shard = sorted(p for p in base.glob("*.safetensors"))[1]
    if change == "bytes":  # same size, same header
        _flip(shard)
    elif change == "mtime":
        os.utime(shard, ns=(1, 1))
    else:  # the same bytes in a new file (new inode)
        data = shard.read_bytes()
        shard.unlink()
        shard.write_bytes(data)
    _refused(_merge(base, adapter, out), shard.name, "changed since", "--fresh")
    assert _listing(out) == before
    r = _merge(base, adapter, out, "--fresh")
    assert r.returncode == 0, r.stderr


def test_with_checksums_only_a_content_change_is_refused(tmp_path: Path) -> None:
    base, adapter = make_pair(tmp_path)
    out = tmp_path / "out"
    assert _merge(base, adapter, out, "--quiet", "--checksums").returncode == 0
    shard = sorted(base.glob("*.safetensors"))[0]
    os.utime(shard, ns=(1, 1))  # only the time: the recorded sha256 forgives it
    r = _merge(base, adapter, out, "--checksums")
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr
    _flip(shard)
    _refused(_merge(base, adapter, out, "--checksums"), shard.name, "changed since")


def test_a_base_changed_during_a_partial_merge_is_refused_on_resume(tmp_path: Path) -> None:
    base, adapter = make_pair(tmp_path)
    out = tmp_path / "out"
    r = _merge(base, adapter, out, "--worker", "0/2", "--quiet")
    assert r.returncode == 0, r.stderr
    shard = sorted(base.glob("*.safetensors"))[-1]
    _flip(shard)
    _refused(_merge(base, adapter, out, "--worker", "1/2"), shard.name, "changed since")
    _refused(run_cli("finalize", out), shard.name, "changed since")


# ---------------------------------------------------------------------------------------------- finished folders


def test_a_complete_output_holds_no_journal_and_a_rerun_writes_nothing(inputs, tmp_path: Path) -> None:
    base, adapter, ref = inputs
    assert not (ref / JOURNAL_NAME).exists() and not (ref / SHARDS_DIR).exists()
    assert not [n for n in os.listdir(ref) if n.startswith(".")]
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    before = _stamps(out)
    r = _merge(base, adapter, out)
    n = len(_shards(ref))
    assert r.returncode == 0 and f"({n} resumed)" in r.stdout, r.stdout + r.stderr
    assert _stamps(out) == before  # not one file rewritten, no journal created
    # a re-run with other options is refused from the record alone
    _refused(_merge(base, adapter, out, "--weights", "0.5"), "other inputs or options", "--fresh")
    assert _stamps(out) == before


def test_a_shipped_file_removed_from_a_complete_output_is_written_again(inputs, tmp_path: Path) -> None:
    base, adapter, ref = inputs
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    (out / "README.md").unlink()
    r = _merge(base, adapter, out)
    assert r.returncode == 0, r.stderr
    got, want = _listing(out), _listing(ref)
    assert f"-o {out}".encode() in got.pop("README.md") and want.pop("README.md")  # the card names the command
    assert got == want


# ---------------------------------------------------------------------------------------------- device kind


def test_a_merge_started_on_another_device_kind_is_refused(tmp_path: Path) -> None:
    base, adapter = make_pair(tmp_path)
    out = tmp_path / "out"
    assert _merge(base, adapter, out, "--worker", "0/2", "--quiet").returncode == 0
    journal = json.loads((out / JOURNAL_NAME).read_text())
    assert journal["options"]["device"] == "cpu"
    journal["options"]["device"] = "cuda"  # as if the merge had been started with --device cuda
    journal["fingerprint"] = "0" * 64
    (out / JOURNAL_NAME).write_text(json.dumps(journal))
    _refused(_merge(base, adapter, out, "--worker", "1/2"), "merged on cuda", "--device cuda")


def test_device_auto_resumes_on_the_kind_the_merge_started_on(tmp_path: Path, monkeypatch) -> None:
    """On a GPU machine, `auto` means cuda; a merge started with --device cpu must still resume (and re-run as a
    no-op) without the user repeating --device cpu."""
    import torch

    import stream_merge

    base, adapter = make_pair(tmp_path)
    out = tmp_path / "out"
    assert _merge(base, adapter, out, "--worker", "0/2", "--device", "cpu", "--quiet").returncode == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    report = stream_merge.merge(base, adapter, out)  # device auto, cuda "available": resumes on the CPU
    assert not report.pending and (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "stream_merge.json").read_text())["options"]["device"] == "cpu"
    stream_merge.merge(base, adapter, out)  # and the complete output is a no-op, not a refusal


# ---------------------------------------------------------------------------------------------- locks and owners


def _hold(out: Path, how: int) -> int:
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, how | fcntl.LOCK_NB)
    return fd


def test_a_plain_merge_and_workers_are_serialised(inputs, tmp_path: Path) -> None:
    base, adapter, _ = inputs
    out = tmp_path / "out"
    out.mkdir()
    fd = _hold(out, fcntl.LOCK_SH)  # a --worker is running
    try:
        _refused(_merge(base, adapter, out), "another stream-merge", str(out))
        r = _merge(base, adapter, out, "--worker", "0/2", "--quiet")  # workers run side by side
        assert r.returncode == 0, r.stderr
    finally:
        os.close(fd)
    fd = _hold(out, fcntl.LOCK_EX)  # a plain merge is running
    try:
        _refused(_merge(base, adapter, out, "--worker", "1/2"), "another stream-merge", str(out))
        _refused(run_cli("finalize", out), "another stream-merge")
    finally:
        os.close(fd)
    worker_lock = os.open(out / SHARDS_DIR / "worker-1-of-2.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(worker_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the same worker already runs on this host
    try:
        _refused(_merge(base, adapter, out, "--worker", "1/2"), "--worker 1/2")
    finally:
        os.close(worker_lock)
    assert _merge(base, adapter, out, "--worker", "1/2", "--quiet").returncode == 0
    assert (out / INDEX).exists() and not (out / SHARDS_DIR).exists()  # lock files go with the journal


POD = r"""
import os, runpy, socket, sys
os.getpid = lambda: 1                      # every pod is PID 1 ...
socket.gethostname = lambda: sys.argv[1]   # ... on its own host
sys.argv = ["stream_merge", *sys.argv[2:]]
runpy.run_module("stream_merge", run_name="__main__")
"""


def test_workers_with_the_same_pid_never_delete_each_others_files(inputs, tmp_path: Path) -> None:
    base, adapter, ref = inputs
    out = tmp_path / "out"
    out.mkdir()
    shards = _shards(ref)
    theirs = shards[0]  # pod A's shard (worker 0/2 of a split by bytes takes the biggest first; any name will do)
    pod_a = subprocess.run([sys.executable, "-c", "import os, socket; os.getpid = lambda: 1; "
                            "socket.gethostname = lambda: 'pod-a'; from stream_merge.fileio import owner_tag; "
                            "print(owner_tag())"], capture_output=True, text=True, check=True).stdout.strip()
    in_flight = [out / temp_name(theirs, pod_a),                      # pod A writing a shard right now
                 out / f"{TMP_PREFIX}{theirs}.1.deadbeef",            # the same, as older versions named it
                 out / SHARDS_DIR / temp_name(theirs + ".json", pod_a)]
    (out / SHARDS_DIR).mkdir()
    area = out / DOWNLOADS / pod_a
    area.mkdir(parents=True)
    (area / "x.safetensors.incomplete").write_bytes(b"pod A downloading")
    for p in in_flight:
        p.write_bytes(b"pod A's bytes")
    for worker in ("0/2", "1/2"):
        r = subprocess.run([sys.executable, "-c", POD, "pod-b", "merge", str(base), str(adapter), "-o", str(out),
                            "--device", "cpu", "--worker", worker, "--quiet"], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", "")))
        assert r.returncode == 0, r.stderr
    for p in in_flight:
        assert p.read_bytes() == b"pod A's bytes", p.name
    assert (area / "x.safetensors.incomplete").exists()


def test_leftovers_of_dead_runs_of_this_host_are_removed(inputs, tmp_path: Path) -> None:
    base, adapter, ref = inputs
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = f"{owner_tag().split('-')[0]}-{proc.pid}-abcdef"
    elsewhere = f"00000000-{proc.pid}-abcdef"
    (out / DOWNLOADS / dead).mkdir(parents=True)
    (out / DOWNLOADS / dead / "a.incomplete").write_bytes(b"x")
    (out / DOWNLOADS / elsewhere).mkdir(parents=True)
    (out / temp_name(_shards(ref)[0], dead)).write_bytes(b"x")
    r = _merge(base, adapter, out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out / DOWNLOADS)) == [elsewhere]  # another host's run may still be alive
    assert not [n for n in os.listdir(out) if n.startswith(TMP_PREFIX)]


# ---------------------------------------------------------------------------------------------- names and paths


def _rename_shards(base: Path, rename) -> None:  # type: ignore[no-untyped-def]
    index = json.loads((base / INDEX).read_text())
    names = {old: rename(i, old) for i, old in enumerate(sorted(set(index["weight_map"].values())))}
    for old, new in names.items():
        (base / old).rename(base / new)
    index["weight_map"] = {k: names[v] for k, v in index["weight_map"].items()}
    (base / INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize("style", ["ascii-255", "multibyte"])
def test_valid_but_very_long_shard_names_merge(tmp_path: Path, style: str) -> None:
    base, adapter = make_pair(tmp_path, shard_bytes=20_000)
    if style == "ascii-255":
        _rename_shards(base, lambda i, _: f"{i:03d}-" + "x" * (255 - 4 - len(".safetensors")) + ".safetensors")
    else:  # 3 bytes per character: the journal's quoted record name would be 9 bytes per character
        _rename_shards(base, lambda i, _: f"{i:03d}-" + "模" * 78 + ".safetensors")
    out = tmp_path / "out"
    r = _merge(base, adapter, out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert run_cli("verify", out).returncode == 0


def test_a_non_utf8_path_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """The record, the card and the Hub need text: a path that is not UTF-8 is refused at start (exit 2,
    naming it), never after every shard was written."""
    base, adapter = make_pair(tmp_path)
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/base-\xff\xfe"))
    try:
        base.rename(odd)
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses non-UTF-8 names")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "stream_merge", "merge", os.fsencode(odd), str(adapter), "-o", str(out),
                        "--device", "cpu", "--quiet"], capture_output=True, text=True, errors="replace")
    _refused(r, "not valid UTF-8", "base-")
    assert not out.exists()
    odd_out = Path(os.fsdecode(bytes(tmp_path) + b"/out-\xff"))
    base2, adapter2 = make_pair(tmp_path / "two")
    r = subprocess.run([sys.executable, "-m", "stream_merge", "merge", str(base2), str(adapter2), "-o",
                        os.fsencode(odd_out), "--device", "cpu"], capture_output=True, text=True, errors="replace")
    _refused(r, "not valid UTF-8", "out-")
    assert not os.path.lexists(odd_out)


# ---------------------------------------------------------------------------------------------- platforms


def test_windows_is_refused_in_one_line_at_start(inputs, tmp_path: Path) -> None:
    base, adapter, _ = inputs
    code = ("import sys; sys.modules['fcntl'] = None; sys.modules['resource'] = None; "
            "import runpy; sys.argv = ['stream_merge', *sys.argv[1:]]; "
            "runpy.run_module('stream_merge', run_name='__main__')")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", code, "merge", str(base), str(adapter), "-o", str(out)],
                       capture_output=True, text=True)
    _refused(r, "Linux and macOS")
    assert not out.exists()


def test_platform_checks_by_monkeypatching(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from stream_merge import platform_support
    from stream_merge.errors import ConfigError
    from stream_merge.fileio import AtomicFile

    monkeypatch.setattr(platform_support, "fcntl", None)
    with pytest.raises(ConfigError, match="Linux and macOS"):
        platform_support.check_platform()
    monkeypatch.undo()
    rss = platform_support.peak_rss_bytes()
    monkeypatch.setattr(sys, "platform", "darwin")  # macOS reports bytes, Linux KiB
    assert platform_support.peak_rss_bytes() * 1024 == pytest.approx(rss, rel=0.5)
    monkeypatch.undo()
    monkeypatch.delattr(os, "O_DIRECT", raising=False)  # macOS: no O_DIRECT, buffered writes
    with AtomicFile(tmp_path / "f.bin", direct=True) as f:
        f.write(b"y" * 10000)
        assert not f._f.direct
        f.commit()
    assert (tmp_path / "f.bin").read_bytes() == b"y" * 10000


@pytest.mark.slow
def test_a_base_shard_truncated_by_another_process_mid_merge_is_named_never_sigbus(tmp_path: Path) -> None:
    """Another process truncates the base shard being merged: the merge exits 2 naming it (the CLI holds a read
    lease, so the truncation waits for the reader), never dies of SIGBUS, and publishes no index."""
    import time

    from stream_merge.synthetic import LlamaShape

    shape = LlamaShape(hidden=1024, intermediate=2816, layers=4, vocab=256, heads=8, kv_heads=8)
    base, adapter = make_pair(tmp_path, shape=shape, shard_bytes=1 << 30)
    shard = next(base.glob("*.safetensors"))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "stream_merge", "merge", str(base), str(adapter), "-o", str(out),
                             "--block-size-mb", "1", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not any(
            p.name.startswith(TMP_PREFIX) and ".safetensors." in p.name  # the shard's temp file, not the journal's
            for p in (out.iterdir() if out.exists() else [])):
        time.sleep(0.005)
    truncate = subprocess.Popen([sys.executable, "-c", f"import os; os.truncate({str(shard)!r}, 4096)"])
    _, err = proc.communicate(timeout=180)
    assert truncate.wait(timeout=120) == 0
    assert proc.returncode in (0, 2), (proc.returncode, err)  # -7 would be SIGBUS
    if proc.returncode == 2:  # the usual case: the truncation landed mid-merge
        assert shard.name in err and "changed during the merge" in err and "Traceback" not in err, err
        assert not (out / "model.safetensors.index.json").exists()
