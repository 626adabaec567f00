"""Partitioned merges (--worker I/N, finalize) and Ray: one consistent output, byte-identical to a plain run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_pair, run_cli
from stream_merge.synthetic import LlamaShape

SHAPE = LlamaShape(hidden=128, intermediate=344, layers=4, vocab=256, heads=4, kv_heads=2)


def _files(folder: Path) -> dict[str, bytes]:
    names = [p for p in folder.iterdir() if p.suffix == ".safetensors" or p.name == "model.safetensors.index.json"]
    return {p.name: p.read_bytes() for p in names}


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("dist")
    base, adapter = make_pair(root, SHAPE, shard_bytes=60_000)
    ref = root / "ref"
    assert run_cli("merge", base, adapter, "-o", ref, "--quiet").returncode == 0
    return base, adapter, _files(ref)


def test_workers_in_separate_processes_match_a_single_merge(job, tmp_path: Path) -> None:
    base, adapter, ref = job
    out = tmp_path / "out"
    n = 3
    procs = [subprocess.Popen([sys.executable, "-m", "stream_merge", "merge", str(base), str(adapter), "-o", str(out),
                               "--worker", f"{i}/{n}", "--quiet", "--block-size-mb", "1"])
             for i in range(n)]
    # kill one worker early; the others finish their shares
    time.sleep(0.3)
    procs[1].send_signal(signal.SIGKILL)
    codes = [p.wait(timeout=300) for p in procs]
    assert codes[0] == 0 and codes[2] == 0
    if codes[1] != 0:  # it died: finalize must refuse until its share is redone
        assert not (out / "model.safetensors.index.json").exists()
        r = run_cli("finalize", out)
        assert r.returncode == 2 and "not finished" in r.stderr
        assert run_cli("merge", base, adapter, "-o", out, "--worker", f"1/{n}", "--quiet").returncode == 0
    assert _files(out) == ref
    assert run_cli("verify", out, "--full").returncode == 0


def test_finalize_refuses_while_shards_are_missing_then_completes(job, tmp_path: Path) -> None:
    base, adapter, ref = job
    out = tmp_path / "out"
    r = run_cli("merge", base, adapter, "-o", out, "--worker", "0/2")
    assert r.returncode == 0 and "left to other workers" in r.stdout
    assert not (out / "model.safetensors.index.json").exists()
    r = run_cli("finalize", out)
    assert r.returncode == 2 and "not finished" in r.stderr and "Traceback" not in r.stderr
    # worker 1 writes its shards but is told to leave the index to finalize: simulate by deleting it after
    assert run_cli("merge", base, adapter, "-o", out, "--worker", "1/2", "--quiet").returncode == 0
    assert _files(out) == ref
    (out / "model.safetensors.index.json").unlink()
    r = run_cli("finalize", out)
    assert r.returncode == 0, r.stderr
    assert _files(out) == ref
    # re-running a finished worker redoes nothing
    r = run_cli("merge", base, adapter, "-o", out, "--worker", "0/2")
    assert r.returncode == 0 and "resumed" in r.stdout
    assert _files(out) == ref


def test_worker_option_errors(job, tmp_path: Path) -> None:
    base, adapter, _ = job
    for extra, word in ((["--worker", "2/2"], "I/N"), (["--worker", "0/2", "--fresh"], "--fresh"),
                        (["--worker", "0/2", "--ray"], "--ray")):
        r = run_cli("merge", base, adapter, "-o", tmp_path / "o", *extra)
        assert r.returncode == 2 and word in r.stderr, r.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_ray_local_instance_matches_and_survives_a_failed_task(job, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    base, adapter, ref = job
    out = tmp_path / "out"
    shard = sorted(n for n in ref if n.endswith(".safetensors"))[1]
    marker = tmp_path / "failed-once"
    env = {"STREAM_MERGE_TEST_FAIL_ONCE": f"{shard}:{marker}", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    r = run_cli("merge", base, adapter, "-o", out, "--ray", "--quiet", env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert marker.exists(), "the injected failure did not happen"
    assert _files(out) == ref
    assert run_cli("verify", out).returncode == 0


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.hub
def test_ray_push_to_hub_uploads_every_shard_before_the_index(job, hub, tmp_path: Path) -> None:
    """Issue 12 item 1: each shard a Ray task finishes reaches the uploader; the index arrives last, in a
    commit after every shard it lists."""
    pytest.importorskip("ray")
    from hub_server import hub_env

    base, adapter, ref = job
    out = tmp_path / "out"
    env = hub_env(hub, tmp_path / "hf", {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"})
    r = subprocess.run([sys.executable, "-m", "stream_merge", "merge", str(base), str(adapter), "-o", str(out),
                        "--ray", "--quiet", "--push-to-hub", "org/merged", "--token", "hf_push"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    repo = hub.get_repo("org/merged")
    head = repo.commits[repo.branches["main"]]
    index = "model.safetensors.index.json"
    for name, data in ref.items():
        assert name in head.files, f"{name} was not pushed"
        assert head.files[name].read() == data, name
    assert index not in repo.commits[head.parent].files  # the index came last
    assert all(name in repo.commits[head.parent].files for name in ref if name != index)


def test_a_ray_task_computes_on_the_device_kind_the_driver_asked_for(job, tmp_path: Path, monkeypatch) -> None:
    """Issue 12 item 4: the driver's device kind travels with each task (the task runs in-process here, with
    the merge replaced by a probe); the task records its shard in OUT's journal itself."""
    import torch

    from stream_merge import ray_runner, worker
    from stream_merge.config import build_config
    from stream_merge.journal import Journal, load_journal
    from stream_merge.records import ShardResult
    from stream_merge.runner import plan_merge

    base, adapter, _ = job
    out = tmp_path / "out"
    out.mkdir()
    plan = plan_merge(build_config(base=str(base), adapters=[str(adapter)], dry_run=True))[0]
    file = plan.shards[0].file
    seen = []

    def probe(shard, reader, adapters, path, compute, on_bytes, checksum, others):  # type: ignore[no-untyped-def]
        seen.append(compute.device)
        path.write_bytes(b"merged")
        return ShardResult(file=shard.file, size=6, sha256=None, patched=0, copied=0, seconds=0.0)

    class Actor:
        class add:  # noqa: N801 - mimics a Ray actor method
            @staticmethod
            def remote(n: int) -> None:
                pass

    monkeypatch.setattr(worker, "merge_shard", probe)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    for kind in ("cpu", "cuda", "meta"):
        ray_runner._merge_task(plan, str(base), str(out), file, kind, 1 << 20, True, False, Actor())
    assert [d.type for d in seen] == ["cpu", "cuda", "meta"]
    Journal(fingerprint="f", inputs={}, options={}, tool_version="0").save(out)
    assert load_journal(out).shards[file]["size"] == 6
