"""`plan` and `merge --dry-run` answer "will it work?" (issue 15 item 7): a totals line, a one-line verdict
last, the disk check in a dry run (exit 2 and no OUT when a disk is short), one diagnosis line for an adapter
of another model, the problem list capped; and a one-slash path that is not a folder is said to be taken as
a Hub repo id."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import edit_json, make_pair, rewrite_adapter, run_cli

import stream_merge
from stream_merge import cli
from stream_merge.errors import DiskSpaceError, HubError, InputError, OutputError
from stream_merge.plan_report import (PROBLEM_CAP, DiskNeed, capped, diagnosis, output_sizes, planned_need,
                                      report_lines, verdict)
from stream_merge.synthetic import LlamaShape

WIDE = LlamaShape(hidden=64, intermediate=48, layers=2, vocab=64, heads=4, kv_heads=2)
DEEP = LlamaShape(hidden=32, intermediate=48, layers=4, vocab=64, heads=4, kv_heads=2)


@pytest.fixture(autouse=True)
def _no_env_leak(monkeypatch) -> None:
    """cli.main in-process sets HF_HUB_DISABLE_PROGRESS_BARS when stderr is no terminal; later tests of the
    same process (huggingface_hub's bars, tests/test_progress.py) must not inherit it."""
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)


def _main(capsys, *argv: object) -> tuple[int, list[str], str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def _full_disk(monkeypatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(free * 4, free * 3, free))


def test_capped_lists_the_first_lines_then_a_count() -> None:
    lines = [f"p{i}" for i in range(PROBLEM_CAP + 7)]
    shown = capped(lines)
    assert shown[:PROBLEM_CAP] == lines[:PROBLEM_CAP] and len(shown) == PROBLEM_CAP + 1
    assert shown[-1].startswith("... and 7 more (all of them: `stream-merge plan BASE ADAPTER --json`)")
    assert capped(lines[:PROBLEM_CAP]) == lines[:PROBLEM_CAP] and capped([]) == []


def test_plan_prints_totals_and_an_ok_verdict_last(pair: tuple[Path, Path], capsys) -> None:
    base, adapter = pair
    code, out, err = _main(capsys, "plan", base, adapter)
    assert code == 0, err
    plan = stream_merge.plan(str(base), str(adapter))
    n = len(plan.shards)
    writes = sum(output_sizes(plan).values())
    assert out[-2] == (f"totals: {n} shards, {sum(s.in_bytes for s in plan.shards) / 2**30:.1f} GiB to read, "
                       f"{writes / 2**30:.1f} GiB to write; 14 tensors patched, {plan.copied_tensors} copied; disk: "
                       f"needs 0.0 GiB, free space not checked (no OUT: `merge --dry-run -o OUT` checks it)")
    assert out[-1] == "verdict: OK — 1 adapter, 14 modules onto 14 tensors; needs 0.0 GiB (free space not checked)"
    # the API gives the same text
    assert report_lines(plan, [planned_need(plan, [s.file for s in plan.shards], False, 1)])[-2:] == out[-2:]
    code, out, _ = _main(capsys, "plan", base, adapter, "--json")
    shown = json.loads("\n".join(out))
    assert shown["verdict"].startswith("verdict: OK — 1 adapter") and shown["totals"].startswith("totals: ")
    assert shown["diagnosis"] is None


def test_the_disk_need_follows_the_plan() -> None:
    need = DiskNeed("/out", 10 * 2**30, 0, 5 * 2**30)
    assert need.short and not DiskNeed("/out", 1, 0, 1).short and not DiskNeed("", 5).short


def test_plan_need_of_a_hub_base_adds_the_downloaded_shards(pair: tuple[Path, Path]) -> None:
    plan = stream_merge.plan(str(pair[0]), str(pair[1]))
    files = [s.file for s in plan.shards]
    local, hub = planned_need(plan, files, False, 1), planned_need(plan, files, True, 1)
    sizes = output_sizes(plan)
    assert local.need == sum(sizes.values()) + max(sizes.values()) and local.downloads == 0
    two = sorted((h.size for h in plan.base.shards), reverse=True)[:2]
    assert hub.downloads == sum(two) and hub.need == local.need + sum(two)


def test_dry_run_checks_the_disk_and_reports_free_space(pair: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    base, adapter = pair
    out = tmp_path / "out"
    code, lines, err = _main(capsys, "merge", base, adapter, "-o", out, "--dry-run")
    assert code == 0, err
    assert lines[-1].startswith("verdict: OK — 1 adapter, 14 modules onto 14 tensors; needs ")
    assert lines[-1].endswith(" free")
    assert lines[-2].startswith("totals: ") and f"free on {tmp_path}" in lines[-2]
    assert "dry run: plan is valid, nothing written" in lines and not out.exists()
    report = stream_merge.merge(str(base), str(adapter), str(out), dry_run=True)
    sizes = output_sizes(report.plan)
    assert [d.need for d in report.disk] == [sum(sizes.values()) + max(sizes.values())]
    assert report.disk[0].free is not None and not out.exists()


def test_dry_run_on_a_full_disk_exits_2_without_creating_out(pair: tuple[Path, Path], tmp_path: Path, capsys,
                                                             monkeypatch) -> None:
    base, adapter = pair
    out = tmp_path / "out"
    _full_disk(monkeypatch, 1000)
    for quiet in ([], ["--quiet"]):
        code, lines, err = _main(capsys, "merge", base, adapter, "-o", out, "--dry-run", *quiet)
        assert code == 2 and not out.exists()
        assert lines[-1].startswith("verdict: not enough disk: needs 0.0 GiB, 0.0 GiB free on "), lines[-3:]
        assert err.startswith("error: not enough free disk space") and err.count("\n") == 1, err
        assert "dry run: nothing written" in lines
    with pytest.raises(DiskSpaceError, match="not enough free disk space") as info:
        stream_merge.merge(str(base), str(adapter), str(out), dry_run=True)
    assert info.value.report.plan.patched_tensors == 14 and info.value.report.disk[0].short and not out.exists()
    # a real merge refuses with the same error before its first shard
    with pytest.raises(DiskSpaceError):
        stream_merge.merge(str(base), str(adapter), str(out), device="cpu")
    assert not list(out.glob("*.safetensors"))


def test_dry_run_counts_only_what_is_left_to_write(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = pair
    out = tmp_path / "out"
    stream_merge.merge(str(base), str(adapter), str(out), device="cpu")
    report = stream_merge.merge(str(base), str(adapter), str(out), dry_run=True)
    sizes = output_sizes(report.plan)
    assert [d.need for d in report.disk] == [max(sizes.values())]  # headroom only
    again = stream_merge.merge(str(base), str(adapter), str(out), dry_run=True, fresh=True)
    assert [d.need for d in again.disk] == [sum(sizes.values()) + max(sizes.values())]  # --fresh rewrites all
    pushed = stream_merge.merge(str(base), str(adapter), str(tmp_path / "o2"), dry_run=True, push_to_hub="me/x",
                                local_copy=False)
    sizes = output_sizes(pushed.plan)
    from stream_merge.push import MAX_HELD

    biggest = max(sizes.values())
    assert pushed.disk[0].need == min(sum(sizes.values()) + biggest, (MAX_HELD + 1) * biggest)


def test_dry_run_refuses_what_the_merge_would_refuse_in_out(pair: tuple[Path, Path], tmp_path: Path,
                                                           capsys) -> None:
    """A dry run into an OUT that holds another merge (or files that are not ours) answers as the merge would:
    exit 2 naming OUT and the fix, not an OK verdict that counts someone else's shards as finished."""
    base, adapter = pair
    out = tmp_path / "out"
    stream_merge.merge(str(base), str(adapter), str(out), device="cpu")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    with pytest.raises(OutputError, match="holds a merge of other inputs or options") as info:
        stream_merge.merge(str(base), str(adapter), str(out), dry_run=True, weights=[0.5])
    assert info.value.file == str(out) and "--fresh" in info.value.fix
    code, _, err = _main(capsys, "merge", base, adapter, "-o", out, "--dry-run", "--weights", "0.5")
    assert code == 2 and "holds a merge of other inputs or options" in err
    assert stream_merge.merge(str(base), str(adapter), str(out), dry_run=True, weights=[0.5], fresh=True).dry_run
    assert stream_merge.merge(str(base), str(adapter), str(out), dry_run=True).dry_run  # the same merge: fine
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before  # nothing written
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="notes.txt"):
        stream_merge.merge(str(base), str(adapter), str(foreign), dry_run=True)


def test_an_adapter_of_a_wider_model_gets_one_diagnosis_line(tmp_path: Path, capsys) -> None:
    base, _ = make_pair(tmp_path / "wide", shape=WIDE)
    _, adapter = make_pair(tmp_path / "narrow")
    code, lines, err = _main(capsys, "plan", base, adapter)
    assert code == 2
    want = "the adapter was trained on a model with hidden size 32; BASE has 64"
    diag = [i for i, ln in enumerate(lines) if ln.startswith("diagnosis: ")]
    first_problem = next(i for i, ln in enumerate(lines) if ln.startswith("problem: "))
    assert len(diag) == 1 and diag[0] == first_problem - 1 and lines[diag[0]].startswith(f"diagnosis: {want}")
    assert lines[-1].startswith(f"verdict: WILL FAIL — {want}") and "14 problems" in lines[-1]
    assert err.splitlines()[1].startswith(f"  - diagnosis: {want}")
    # the API: the plan carried by the PlanError
    with pytest.raises(stream_merge.StreamMergeError) as info:
        stream_merge.plan(str(base), str(adapter))
    assert diagnosis(info.value.plan).startswith(want)
    # the same through merge --dry-run and a real merge (exit 2, nothing written)
    r = run_cli("merge", base, adapter, "-o", tmp_path / "out", "--dry-run")
    assert r.returncode == 2 and f"diagnosis: {want}" in r.stdout and r.stdout.splitlines()[-1].startswith(
        "verdict: WILL FAIL")
    code, _, err = _main(capsys, "merge", base, adapter, "-o", tmp_path / "out", "--quiet")
    assert code == 2 and err.splitlines()[1].startswith(f"  - diagnosis: {want}") and not (tmp_path / "out").exists()


def test_an_adapter_with_other_module_names_gets_one_diagnosis_line(pair: tuple[Path, Path], capsys) -> None:
    base, adapter = pair
    rewrite_adapter(adapter, lambda sd: sd.update({k.replace("model.model.layers.", "model.transformer.h."):
                                                   sd.pop(k) for k in list(sd)}))
    code, lines, _ = _main(capsys, "plan", base, adapter)
    assert code == 2
    want = ("diagnosis: none of the adapter's 14 modules exist in BASE (adapter modules look like "
            "`transformer.h.N.mlp.down_proj`, BASE tensors like `model.layers.N.mlp.down_proj`)")
    assert [ln for ln in lines if ln.startswith("diagnosis: ")] == [ln for ln in lines if ln.startswith(want)]
    assert len([ln for ln in lines if ln.startswith(want)]) == 1


def test_a_few_problems_get_no_diagnosis(pair: tuple[Path, Path]) -> None:
    base, adapter = pair
    edit_json(adapter / "adapter_config.json", r=8)  # a rank mismatch on every module: not another model
    with pytest.raises(stream_merge.StreamMergeError) as info:
        stream_merge.plan(str(base), str(adapter))
    plan = info.value.plan
    assert diagnosis(plan) is None and verdict(plan, None).startswith("verdict: WILL FAIL — adapter 0 module ")
    assert verdict(plan, None).endswith("and 13 more problems above")


def test_the_problem_list_is_capped_everywhere(tmp_path: Path, capsys) -> None:
    base, adapter = make_pair(tmp_path, shape=DEEP)
    edit_json(adapter / "adapter_config.json", r=8)  # 28 problems
    more = f"... and {28 - PROBLEM_CAP} more (all of them: `stream-merge plan BASE ADAPTER --json`)"
    code, lines, err = _main(capsys, "plan", base, adapter)
    assert code == 2 and sum(ln.startswith("problem: ") for ln in lines) == PROBLEM_CAP and more in lines
    err_lines = err.splitlines()
    assert err_lines[0] == "error: the merge plan has 28 problems; nothing was written:"
    assert len(err_lines) == 1 + PROBLEM_CAP + 1 and err_lines[-1] == f"  - {more}"
    code, lines, err = _main(capsys, "merge", base, adapter, "-o", tmp_path / "out", "--dry-run")
    assert code == 2 and sum(ln.startswith("problem: ") for ln in lines) == PROBLEM_CAP and more in lines
    assert err.splitlines()[-1] == f"  - {more}"
    code, lines, _ = _main(capsys, "plan", base, adapter, "--json")
    assert code == 2 and len(json.loads("\n".join(lines))["problems"]) == 28  # the full list


def test_a_one_slash_name_that_is_not_a_folder_is_taken_as_a_hub_repo(pair: tuple[Path, Path], tmp_path: Path,
                                                                      monkeypatch) -> None:
    from huggingface_hub import constants

    base, adapter = pair
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(HubError) as info:
        stream_merge.plan("org/model", str(adapter))
    msg = str(info.value)
    assert "not in the HF cache" in msg and "taken as a Hub repo id because no folder of that name exists" in msg
    assert "./org/model to insist on a local folder" in msg
    with pytest.raises(HubError, match="ADAPTER 'org/lora' was taken as a Hub repo id"):
        stream_merge.plan(str(base), "org/lora")
    for spec in ("./org/model", str(tmp_path / "org/model")):
        with pytest.raises(InputError, match="no such folder") as info:
            stream_merge.plan(spec, str(adapter))
        assert not isinstance(info.value, HubError) and "Hub repo id" not in str(info.value)
    (tmp_path / "org").mkdir()
    shutil.copytree(base, tmp_path / "org" / "model")
    assert stream_merge.plan("org/model", str(adapter)).patched_tensors == 14  # a folder of that name wins


def test_a_one_slash_name_not_on_the_test_hub(hub, pair: tuple[Path, Path], tmp_path: Path) -> None:
    from hub_server import hub_env

    base, adapter = pair
    env = hub_env(hub, tmp_path / "hf")
    r = run_cli("plan", "org/missing", adapter, env=env)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "was not found" in r.stderr and "taken as a Hub repo id" in r.stderr and "./org/missing" in r.stderr
    before = len(hub.requests())
    r = run_cli("plan", "./org/missing", adapter, env=env)
    assert r.returncode == 2 and "no such folder" in r.stderr and len(hub.requests()) == before  # never looked up


def test_dry_run_of_a_hub_base_counts_the_download_area(hub, pair: tuple[Path, Path], tmp_path: Path) -> None:
    """(prefetch + 1) base shards downloaded at once, all of them with --keep-downloads; nothing is fetched."""
    import os
    import subprocess
    import sys

    from hub_server import hub_env

    base, adapter = pair
    hub.add_commit("org/base", {p.name: p for p in base.iterdir()})
    plan = stream_merge.plan(str(base), str(adapter))
    sizes = sorted((h.size for h in plan.base.shards), reverse=True)
    out = tmp_path / "out"
    code = ("import json, sys, stream_merge\n"
            "r = stream_merge.merge('org/base', sys.argv[1], sys.argv[2], dry_run=True, **json.loads(sys.argv[3]))\n"
            "print(json.dumps([[d.need, d.downloads] for d in r.disk]))")
    env = dict(os.environ, **hub_env(hub, tmp_path / "hf"))
    writes = sum(output_sizes(plan).values()) + max(output_sizes(plan).values())
    for options, fetched in (({}, sum(sizes[:2])), ({"prefetch": 2}, sum(sizes[:3])),
                             ({"keep_downloads": True}, sum(sizes))):
        r = subprocess.run([sys.executable, "-c", code, str(adapter), str(out), json.dumps(options)], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == [[writes + fetched, fetched]], options
        assert not out.exists()
    r = run_cli("merge", "org/base", adapter, "-o", out, "--dry-run", env=hub_env(hub, tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    totals = next(ln for ln in r.stdout.splitlines() if ln.startswith("totals: "))
    assert "base shards downloaded at once" in totals and r.stdout.splitlines()[-1].startswith("verdict: OK")
    reads = [q for q in hub.requests("GET", "/org/base/resolve/") if q.path.endswith(".safetensors")]
    assert reads and all(q.range is not None for q in reads) and not out.exists()  # headers only


def test_strict_refusal_is_the_verdict(pair: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    base, adapter = pair
    config = json.loads((base / "config.json").read_text())
    (adapter / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 9}))
    want = f"verdict: WILL FAIL — adapter {adapter} was trained on another model than BASE: num_hidden_layers 9"
    for argv in (["plan", base, adapter, "--strict"],
                 ["merge", base, adapter, "-o", tmp_path / "out", "--dry-run", "--strict"]):
        code, lines, err = _main(capsys, *argv)
        assert code == 2 and lines[-1].startswith(want), lines[-3:]
        assert err.startswith("error: adapter ") and err.count("\n") == 1 and "drop --strict" in err, err
        assert not (tmp_path / "out").exists()
    code, lines, _ = _main(capsys, "plan", base, adapter, "--strict", "--json")
    assert code == 2 and json.loads("\n".join(lines))["verdict"].startswith(want)


def test_dry_run_with_max_shard_size_counts_the_output_shards(pair: tuple[Path, Path], tmp_path: Path,
                                                               capsys) -> None:
    base, adapter = pair
    out = tmp_path / "out"
    report = stream_merge.merge(str(base), str(adapter), str(out), dry_run=True, max_shard_size="16KB")
    n = len(report.plan.shards)
    assert 1 < n < len(report.plan.base.shards)  # joined into fewer, bigger output shards
    sizes = output_sizes(report.plan)
    files = {p.name for p in base.glob("*.safetensors")}
    assert not files & set(sizes)
    assert report.disk[0].need == sum(sizes.values()) + max(sizes.values())
    code, lines, err = _main(capsys, "merge", base, adapter, "-o", out, "--dry-run", "--max-shard-size", "16KB")
    assert code == 0, err
    assert lines[-2].startswith(f"totals: {n} shards, ") and lines[-1].startswith("verdict: OK — 1 adapter")
    assert not out.exists()
