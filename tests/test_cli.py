"""The CLI as users run it: real subprocesses, exit codes, one-line errors, plan output, verify."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from conftest import edit_json, folder_tensors, run_cli


def test_merge_then_rerun_resumes_and_verify_passes(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = pair
    out = tmp_path / "out"
    r = run_cli("merge", base, adapter, "-o", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "14 tensors patched, 7 copied" in r.stdout and "peak RSS" in r.stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    base_index = json.loads((base / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    assert index["metadata"]["total_size"] == base_index["metadata"]["total_size"]
    record = json.loads((out / "stream_merge.json").read_text())
    assert [s["file"] for s in record["shards"]] == sorted(set(base_index["weight_map"].values()))
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    assert "base_model:" in (out / "README.md").read_text()
    first = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    r2 = run_cli("merge", base, adapter, "-o", out)
    assert r2.returncode == 0 and "resumed" in r2.stdout
    assert {p.name: p.read_bytes() for p in out.glob("*.safetensors")} == first
    v = run_cli("verify", out, "--full")
    assert v.returncode == 0 and "match the record" in v.stdout


def test_verify_names_shard_and_tensor_of_a_flipped_byte(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = pair
    out = tmp_path / "out"
    assert run_cli("merge", base, adapter, "-o", out, "--quiet").returncode == 0
    plan = json.loads(run_cli("plan", base, adapter, "--json").stdout)
    for kind in ("patched", "copied"):
        shard = next(s for s in plan["shards"] if (s["patched"] if kind == "patched" else s["copied"] and not s["patched"]))
        path = out / shard["file"]
        data = bytearray(path.read_bytes())
        data[-2] ^= 0x10
        path.write_bytes(bytes(data))
        r = run_cli("verify", out)  # the recorded xxh3_128 names the shard, without reading the inputs
        assert r.returncode == 1, r.stdout
        assert f"{shard['file']}: xxh3_128 differs" in r.stderr
        r = run_cli("verify", out, "--full")  # recomputing names the tensor
        assert r.returncode == 1, r.stdout
        assert shard["file"] in r.stderr and "tensor '" in r.stderr
        data[-2] ^= 0x10
        path.write_bytes(bytes(data))
        assert run_cli("verify", out).returncode == 0


def test_plan_prints_mapping_and_json(pair: tuple[Path, Path]) -> None:
    base, adapter = pair
    r = run_cli("plan", base, adapter)
    assert r.returncode == 0
    assert "model.layers.1.mlp.down_proj" in r.stdout and "linear" in r.stdout and "patched" in r.stdout
    j = json.loads(run_cli("plan", base, adapter, "--json").stdout)
    assert sum(len(s["patched"]) for s in j["shards"]) == 14 and j["problems"] == []


def test_plan_with_problems_exits_2_and_shows_them(pair: tuple[Path, Path]) -> None:
    base, adapter = pair
    edit_json(adapter / "adapter_config.json", r=8)
    r = run_cli("plan", base, adapter)
    assert r.returncode == 2
    assert r.stdout.count("problem: ") == 14
    assert r.stderr.startswith("error: the merge plan has 14 problems") and "Traceback" not in r.stderr


def test_dry_run_writes_nothing(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = pair
    r = run_cli("merge", base, adapter, "-o", tmp_path / "out", "--dry-run")
    assert r.returncode == 0 and "nothing written" in r.stdout
    assert not (tmp_path / "out").exists()


def test_bad_input_is_one_line_exit_2(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = pair
    r = run_cli("merge", base, tmp_path / "nope", "-o", tmp_path / "out")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nope" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("merge", base, adapter)
    assert r.returncode == 2 and "-o OUT" in r.stderr
    r = run_cli("merge", base, adapter, "-o", tmp_path / "o", "--device", "cuda:7")
    assert r.returncode == 2 and "cuda" in r.stderr


def test_config_file_and_flags(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = pair
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"base: {base}\nadapters: [{adapter}]\noutput: {tmp_path / 'from-yaml'}\nweights: [0.5]\n")
    r = run_cli("merge", "--config", cfg, "-o", tmp_path / "from-flag", "--quiet")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "from-flag" / "model.safetensors.index.json").exists() and not (tmp_path / "from-yaml").exists()
    half = folder_tensors(tmp_path / "from-flag")
    assert run_cli("merge", base, adapter, "-o", tmp_path / "full", "--quiet").returncode == 0
    full = folder_tensors(tmp_path / "full")
    orig = folder_tensors(base)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(half[name], full[name]) and not torch.equal(half[name], orig[name])
    cfg.write_text("base: x\nadapter: y\noutputt: z\n")
    r = run_cli("merge", "--config", cfg)
    assert r.returncode == 2 and "did you mean 'output'" in r.stderr


def test_python_dash_m_and_version() -> None:
    r = subprocess.run([sys.executable, "-m", "stream_merge", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("stream-merge ")


def test_closed_stdout_or_stderr_does_not_fail_a_merge(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = pair
    cmd = [sys.executable, "-m", "stream_merge"]
    for i, redirect in enumerate((">&-", "2>&-", ">&- 2>&-", "<&- >&-")):
        out = tmp_path / f"out{i}"
        line = " ".join([*cmd, "merge", str(base), str(adapter), "-o", str(out), "--device", "cpu"])
        r = subprocess.run(f"{line} {redirect}", shell=True, capture_output=True, text=True)
        assert r.returncode == 0, (redirect, r.stderr)
        assert "Traceback" not in r.stderr and (out / "model.safetensors.index.json").exists()
        assert run_cli("verify", out).returncode == 0  # nothing meant for stdout went into a file of OUT
    for args in (["plan", str(base), str(adapter)], ["verify", str(tmp_path / "out0")], ["--version"]):
        r = subprocess.run(" ".join([*cmd, *args]) + " >&-", shell=True, capture_output=True, text=True)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.stderr)
    # and an error still reaches the closed-stdout user's stderr as one line, exit 2
    r = subprocess.run(" ".join([*cmd, "merge", str(base), str(tmp_path / "nope"), "-o", str(tmp_path / "x")]) + " >&-",
                       shell=True, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


def test_merge_help_ends_with_two_examples() -> None:
    r = run_cli("merge", "--help")
    tail = r.stdout.split("examples:")[-1]
    assert r.returncode == 0 and r.stdout.rstrip().endswith(tail.rstrip())
    commands = [ln.strip() for ln in tail.splitlines() if ln.strip().startswith("stream-merge merge ")]
    assert len(commands) == 2
    assert "./" in commands[0] and "--push-to-hub" not in commands[0]  # a local adapter
    assert "--push-to-hub" in commands[1] and not commands[1].split()[2].startswith(".")  # Hub to Hub


def test_plan_with_problems_plans_once(pair: tuple[Path, Path], monkeypatch, capsys) -> None:
    from stream_merge import cli, planning

    base, adapter = pair
    edit_json(adapter / "adapter_config.json", r=8)
    calls = []
    real = planning.plan_merge
    monkeypatch.setattr(planning, "plan_merge", lambda cfg: calls.append(cfg) or real(cfg))
    assert cli.main(["plan", str(base), str(adapter), "--json"]) == 2
    shown = json.loads(capsys.readouterr().out)
    assert len(calls) == 1 and len(shown["problems"]) == 14


def test_python_api_merge_plan_verify_finalize(pair: tuple[Path, Path], tmp_path: Path) -> None:
    import stream_merge
    from stream_merge.errors import ConfigError, PlanError

    base, adapter = pair
    for name in ("merge", "plan", "verify_output", "finalize"):
        doc = getattr(stream_merge, name).__doc__
        assert "Args:" in doc and "Returns:" in doc and "Raises:" in doc, name
    out = tmp_path / "out"
    report = stream_merge.merge(base, adapter, out, device="cpu")
    assert report.plan.patched_tensors == 14 and len(report.shards) == 10
    assert stream_merge.plan(base, [adapter]).patched_tensors == 14
    assert stream_merge.verify_output(out).ok
    assert len(stream_merge.finalize(out).shards) == 10
    try:
        stream_merge.merge(base, adapter, tmp_path / "o2", copy_extras=False)
    except ConfigError as exc:
        assert "copy_extras" in str(exc)
    else:
        raise AssertionError("copy_extras was accepted")
    assert not (tmp_path / "o2").exists()
    edit_json(adapter / "adapter_config.json", r=8)
    try:
        stream_merge.plan(base, adapter)
    except PlanError as exc:
        assert exc.plan is not None and len(exc.plan.problems) == 14
    else:
        raise AssertionError("a plan with problems passed")


def test_an_in_process_cli_run_gives_sigio_back(pair, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The CLI ignores SIGIO while it merges (base files under read leases); a caller that runs `main` in its
    own process gets its handler back, so its later readers take no leases (a lease would make that process's
    own writes to a base file wait for the lease-break timeout)."""
    import signal

    from stream_merge.cli import main

    base, adapter = pair
    before = signal.getsignal(signal.SIGIO)
    assert main(["merge", str(base), str(adapter), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    assert signal.getsignal(signal.SIGIO) == before
