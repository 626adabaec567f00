"""fileio: atomic files, temp names that are unique and fit NAME_MAX, and removal of temp files by owner only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hashlib

import pytest
import xxhash

from stream_merge import fileio
from stream_merge.errors import OutputError
from stream_merge.fileio import (HASH_THREAD_MIN, NAME_MAX, TMP_PREFIX, AtomicFile, file_sha256, file_xxh3_128,
                                 owner_is_dead, owner_tag, recorded_digest, remove_dead_temps, temp_name,
                                 temp_owner, write_file_atomic)


def _ended_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _host() -> str:
    return owner_tag().split("-")[0]


@pytest.mark.parametrize("final", ["model-00001-of-00002.safetensors", "m" * NAME_MAX, "é" * 127 + "x",
                                   "model.safetensors.index.json"])
def test_temp_names_fit_name_max_and_carry_their_owner(final: str) -> None:
    names = {temp_name(final) for _ in range(50)}
    assert len(names) == 50  # a random part in each
    for name in names:
        assert name.startswith(TMP_PREFIX) and len(name.encode()) <= NAME_MAX
        assert temp_owner(name) == owner_tag()
        name.encode("utf-8")  # a multi-byte character is never cut in half


def test_a_final_name_of_name_max_bytes_is_written(tmp_path: Path) -> None:
    path = tmp_path / ("s" * (NAME_MAX - len(".safetensors")) + ".safetensors")
    assert write_file_atomic(path, b"abc") == file_sha256(path)
    assert path.read_bytes() == b"abc" and os.listdir(tmp_path) == [path.name]


@pytest.mark.parametrize("digest", [False, True])
def test_the_writer_always_hashes_xxh3_128_and_sha256_only_when_asked(tmp_path: Path, digest: bool) -> None:
    """Small writes are hashed inline, big ones (>= HASH_THREAD_MIN) on the hash thread: both feed both digests."""
    parts = [b"head", os.urandom(HASH_THREAD_MIN + 7), b"", os.urandom(100), os.urandom(2 * HASH_THREAD_MIN)]
    path = tmp_path / "model.safetensors"
    with AtomicFile(path, digest=digest) as f:
        for p in parts:
            f.write(memoryview(bytearray(p)))
        size, sha = f.commit()
    data = b"".join(parts)
    assert path.read_bytes() == data and size == len(data)
    assert f.xxh3_128() == xxhash.xxh3_128(data).hexdigest() == file_xxh3_128(path)
    assert sha == f.hexdigest() == (hashlib.sha256(data).hexdigest() if digest else None)


def test_recorded_digest_prefers_sha256_then_xxh3_128(tmp_path: Path) -> None:
    assert recorded_digest({"sha256": "s", "xxh3_128": "x"}) == ("sha256", "s")
    assert recorded_digest({"sha256": None, "xxh3_128": "x"}) == ("xxh3_128", "x")
    assert recorded_digest({"sha256": None}) is None and recorded_digest({}) is None


def test_a_name_the_file_system_refuses_is_an_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="too long"):
        write_file_atomic(tmp_path / ("x" * (NAME_MAX + 1)), b"abc")
    assert os.listdir(tmp_path) == []


def test_abort_and_exceptions_remove_only_the_own_temp_file(tmp_path: Path) -> None:
    other = tmp_path / temp_name("model.safetensors")
    other.write_bytes(b"another writer's bytes")
    with pytest.raises(RuntimeError):
        with AtomicFile(tmp_path / "model.safetensors") as f:
            f.write(b"half")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == [other.name]


def test_owner_is_dead_only_for_ended_processes_of_this_host() -> None:
    host = _host()
    assert owner_is_dead(f"{host}-{_ended_pid()}-abcdef")
    assert not owner_is_dead(owner_tag())  # ourselves
    assert owner_is_dead(f"{host}-{os.getpid()}-zzzzzz")  # an earlier process that had our pid
    assert not owner_is_dead(f"{host}-1-abcdef")  # init: alive
    assert not owner_is_dead(f"00000000-{_ended_pid()}-abcdef")  # another host (or pid namespace)
    for legacy in ("4242", "", "a-b", f"{host}-x-abcdef"):
        assert not owner_is_dead(legacy)


def test_remove_dead_temps_keeps_live_and_foreign_owners(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = _host()
        dead = tmp_path / temp_name("a.safetensors", f"{host}-{_ended_pid()}-abcdef")
        live = tmp_path / temp_name("b.safetensors", f"{host}-{sleeper.pid}-abcdef")
        elsewhere = tmp_path / temp_name("c.safetensors", f"00000000-{_ended_pid()}-abcdef")
        legacy = tmp_path / f"{TMP_PREFIX}d.safetensors.4242.deadbeef"  # names of older versions: unknown owner
        mine = tmp_path / temp_name("e.safetensors")
        plain = tmp_path / "f.safetensors"
        for p in (dead, live, elsewhere, legacy, mine, plain):
            p.write_bytes(b"x")
        assert remove_dead_temps([tmp_path, tmp_path / "missing"]) == [dead.name]
        assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in (live, elsewhere, legacy, mine, plain))
    finally:
        sleeper.kill()
        sleeper.wait()


def test_two_pods_with_the_same_pid_and_host_name_have_different_owners(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each pod is PID 1 in its own pid namespace; the namespace (and the boot id) are part of the owner."""
    monkeypatch.setattr(os, "getpid", lambda: 1)
    a = owner_tag()
    real = os.readlink
    monkeypatch.setattr(os, "readlink", lambda p: "pid:[1]" if p == "/proc/self/ns/pid" else real(p))
    b = owner_tag()
    if not Path("/proc/self/ns/pid").exists():
        pytest.skip("no pid namespaces here")
    assert a.split("-")[0] != b.split("-")[0]
    assert not owner_is_dead(a)  # seen from pod b: a process of another namespace is never called dead


def test_a_forked_child_is_another_owner() -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, owner_tag().encode())
        os._exit(0)
    os.close(w)
    child = os.read(r, 200).decode()
    os.waitpid(pid, 0)
    assert child.split("-")[2] != owner_tag().split("-")[2]
    assert owner_is_dead(child)


def test_fileio_and_journal_do_not_import_torch() -> None:
    code = ("import sys; import stream_merge.journal, stream_merge.fileio, stream_merge.locking; "
            "print(sorted(m for m in ('torch', 'numpy', 'huggingface_hub') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]", res.stdout


def test_fsync_dir_tolerates_folders_that_cannot_be_opened(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def refuse(*a: object, **k: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fileio.os, "open", refuse)
    fileio.fsync_dir(tmp_path)
