"""Progress off a terminal (plain lines through a pipe), --quiet, and the summary a merge ends with."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from conftest import edit_json, run_cli
from stream_merge import cli
from stream_merge.progress import PlainLines, Reporter
from stream_merge.records import ShardResult


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_one_per_shard_and_at_most_one_per_interval() -> None:
    clock, out = Clock(), io.StringIO()
    p = PlainLines("merge", {"a": 3 << 30, "b": 1 << 30}, out, interval=30.0, clock=clock)
    for _ in range(100):  # 100 reports within 29 s: no line
        clock.now += 0.29
        p(1 << 20, "a")
    assert out.getvalue() == ""
    clock.now += 2.0  # past 30 s since the start: one line, then quiet again for 30 s
    p(1 << 20, "a")
    p(1 << 20, "a")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("merge: a; 0.10 / 4.00 GiB (2%), ") and "MiB/s, ETA " in lines[0]
    p((3 << 30) - (102 << 20), "a")  # a's last bytes: its line at once
    assert out.getvalue().splitlines()[-1].startswith("merge: a done (1/2 shards); 3.00 / 4.00 GiB (75%)")
    clock.now += 1.0
    p(1 << 29, "b")
    p.close()  # b ends with the run
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("merge: b done (2/2 shards); 3.50 / 4.00 GiB")
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_plain_lines_count_a_shard_once_when_its_label_comes_back() -> None:
    out = io.StringIO()
    p = PlainLines("merge", {"a": 10, "b": 10}, out, clock=Clock())
    p(10, "a")
    p(2, "a")  # bytes beyond the estimate (a bigger header): no second line
    p(10, "b")
    p.close()
    assert [ln.split(";")[0] for ln in out.getvalue().splitlines()] == ["merge: a done (1/2 shards)",
                                                                        "merge: b done (2/2 shards)"]


def test_reporter_counts_what_this_run_wrote() -> None:
    r = Reporter(quiet=True)
    r.start("merge", {"b": 5})
    r(5, "b")
    shards = [ShardResult(file=f, size=s, sha256=None, patched=0, copied=0, seconds=0.0) for f, s in (("a", 7), ("b", 5))]
    assert r.written(shards) == 5
    quiet = Reporter(quiet=True)
    quiet(4, "3 shards in flight")  # Ray's label names no shard: the bytes reported count
    assert quiet.written(shards) == 4


def test_piped_merge_prints_one_line_per_shard_and_quiet_keeps_the_summary(pair: tuple[Path, Path],
                                                                           tmp_path: Path) -> None:
    base, adapter = pair
    out = tmp_path / "out"
    r = run_cli("merge", base, adapter, "-o", out)  # stderr is a pipe
    assert r.returncode == 0, r.stderr
    done = [ln for ln in r.stderr.splitlines() if ln.startswith("merge: ") and " done (" in ln]
    assert len(done) == 10 and done[-1].startswith("merge: model-00010-of-00010.safetensors done (10/10 shards)")
    assert "\r" not in r.stderr and "\x1b" not in r.stderr
    assert "14 tensors patched" in r.stdout and f"next: stream-merge verify {out}" in r.stdout
    for shard in sorted(out.glob("model-*.safetensors"))[:3]:
        shard.unlink()
    q = run_cli("merge", base, adapter, "-o", out, "--quiet")
    assert q.returncode == 0 and "merge: " not in q.stderr, q.stderr
    assert "10 shards (7 resumed)" in q.stdout
    assert "resumed: 0.00 GiB written by this run, 0.00 GiB (7 shards) kept from an earlier run" in q.stdout
    assert "next: stream-merge verify" in q.stdout


def test_summary_repeats_warnings_and_config_changes(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = pair
    edit_json(adapter / "adapter_config.json", base_model_name_or_path="meta-llama/Some-Other-Model-70B")
    r = run_cli("merge", base, adapter, "-o", tmp_path / "out", "--quiet")
    assert r.returncode == 0, r.stderr
    warned = [ln for ln in r.stderr.splitlines() if ln.startswith("WARNING: ")]
    assert warned, r.stderr  # shown when they happen ...
    summary = r.stdout.split("warnings (", 1)[1]
    for w in warned:  # ... and once more in the summary
        assert f"  - {w.removeprefix('WARNING: ')}" in summary


def test_hub_bars_are_off_when_stderr_is_not_a_terminal(pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    base, adapter = pair
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    assert cli.main(["plan", str(base), str(adapter), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["problems"] == []
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
