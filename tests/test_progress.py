"""Progress off a terminal (plain lines through a pipe), --quiet, and the summary a merge ends with."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from conftest import run_cli
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
    trained_on = json.loads((base / "config.json").read_text())  # the adapter says it was trained on a deeper model
    trained_on["num_hidden_layers"] += 8
    (adapter / "config.json").write_text(json.dumps(trained_on))
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
    seen: list[str | None] = []
    plan_command = cli.COMMANDS["plan"]
    monkeypatch.setitem(cli.COMMANDS, "plan", lambda args: (
        seen.append(os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")), plan_command(args))[1])
    assert cli.main(["plan", str(base), str(adapter), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["problems"] == []
    assert seen == ["1"]  # off while the command runs ...
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ  # ... and an in-process caller's environment given back


# ---------------------------------------------------------------------------------------------- phases (issue 15.3)


def test_phases_run_side_by_side_each_with_its_own_lines() -> None:
    out = io.StringIO()
    r = Reporter(stream=out)
    download = r.start("download", {"a": 10, "b": 10})
    r.start("merge", {"a": 4, "b": 4})
    upload = r.start("upload", {"a": 4})
    download(10, "a")
    r(4, "a")  # the merge phase
    download(6, "b")
    upload(4, "a")
    r.stop("merge")  # a phase that ends does not end the others
    download(4, "b")
    r.close()
    lines = out.getvalue().splitlines()
    assert [ln.split(";")[0] for ln in lines] == ["download: a done (1/2 shards)", "merge: a done (1/2 shards)",
                                                  "upload: a done (1/1 shards)", "download: b done (2/2 shards)"]
    assert lines[-1].split("; ")[1].startswith("0.00 / 0.00 GiB (100%)")
    assert r.bytes_done == 4 and r.labels == {"a"}  # only the merge phase counts toward the summary


def test_quiet_reporter_prints_nothing_in_any_phase() -> None:
    out = io.StringIO()
    r = Reporter(quiet=True, stream=out)
    for phase in ("download", "merge", "upload", "verify"):
        r.start(phase, {"a": 1})(1, "a")
    r.close()
    assert out.getvalue() == ""


def test_arrivals_count_each_file_once_up_to_its_size() -> None:
    from stream_merge.progress import Arrivals, counting_bar

    got: list[tuple[int, str]] = []
    a = Arrivals(lambda n, f: got.append((n, f)), {"a": 10})
    bar = counting_bar(object, lambda n: a.add("a", n))(total=10, initial=3)  # resumed from 3 bytes
    bar.update(5)
    bar.update(5)  # more than the file holds (a retried download): capped
    a.finish("a")
    a.finish("other")  # a file not downloaded by this phase counts nothing
    assert got == [(3, "a"), (5, "a"), (2, "a")]


def test_a_terminal_gets_one_bar_per_phase_and_huggingface_hub_bars_are_off_meanwhile() -> None:
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    enable_progress_bars()
    out = Tty()
    r = Reporter(stream=out)
    r.start("download", {"a": 2 << 30})(1 << 30, "a")
    r.start("merge", {"a": 2 << 30})
    assert are_progress_bars_disabled()  # theirs would fight ours
    r(1 << 30, "a")
    r.close()
    assert not are_progress_bars_disabled()  # given back as we found them
    text = out.getvalue()
    assert "download: " in text and "merge: " in text and " GiB [" in text and "MiB/s" in text and "GB " not in text


def test_piped_verify_prints_its_phase_and_quiet_prints_none(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = pair
    out = tmp_path / "out"
    assert run_cli("merge", base, adapter, "-o", out, "--quiet").returncode == 0
    v = run_cli("verify", out)
    assert v.returncode == 0, v.stderr
    done = [ln for ln in v.stderr.splitlines() if ln.startswith("verify: ") and " done (" in ln]
    assert len(done) == 10 and done[-1].startswith("verify: model-00010-of-00010.safetensors done (10/10 shards)")
    assert "\r" not in v.stderr and "\x1b" not in v.stderr
    full = run_cli("verify", out, "--full")
    assert full.returncode == 0 and sum(" (recomputed) done (" in ln for ln in full.stderr.splitlines()) == 10
    q = run_cli("verify", out, "--quiet")
    assert q.returncode == 0 and q.stderr == "" and "ok: 10 shards match the record" in q.stdout


@pytest.mark.hub
def test_piped_hub_to_hub_merge_shows_download_merge_and_upload(hub, tmp_path: Path) -> None:
    import subprocess
    import sys

    from hub_server import hub_env
    from stream_merge.synthetic import LlamaShape, write_adapter, write_checkpoint

    shape = LlamaShape(hidden=128, intermediate=256, layers=3, vocab=512, heads=4, kv_heads=2)
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shards = write_checkpoint(base, shape, max_shard_bytes=200_000)
    write_adapter(adapter, shape, r=4, alpha=8.0, base_name="org/base")
    hub.add_commit("org/lora", {p.name: p for p in adapter.iterdir()})
    hub.add_commit("org/base", {p.name: p for p in base.iterdir()})

    def merge(out: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "stream_merge", "merge", "org/base", "org/lora", "-o", str(out),
                               "--device", "cpu", "--push-to-hub", f"org/{out.name}", "--token", "hf_push", *extra],
                              capture_output=True, text=True, env=hub_env(hub, tmp_path / "hf"), timeout=300)

    r = merge(tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "\x1b" not in r.stderr
    for phase in ("download", "merge", "upload"):
        done = [ln for ln in r.stderr.splitlines() if ln.startswith(f"{phase}: ") and " done (" in ln]
        assert len(done) == len(shards), (phase, r.stderr)
        assert all(" GiB (" in ln and "MiB/s" in ln for ln in done)
        assert f"({len(shards)}/{len(shards)} shards); " in done[-1] and "(100%)" in done[-1], done[-1]
    q = merge(tmp_path / "quiet", "--quiet")
    assert q.returncode == 0 and q.stderr == "", q.stderr
    assert "pushed to org/quiet" in q.stdout  # the summary stays
    v = subprocess.run([sys.executable, "-m", "stream_merge", "verify", str(tmp_path / "merged"), "--full"],
                       capture_output=True, text=True, env=hub_env(hub, tmp_path / "hf"), timeout=300)
    assert v.returncode == 0, v.stderr  # verify --full downloads the base shards again: both phases show
    for phase in ("download", "verify"):
        done = [ln for ln in v.stderr.splitlines() if ln.startswith(f"{phase}: ") and " done (" in ln]
        assert len(done) == len(shards) * (2 if phase == "verify" else 1), (phase, v.stderr)
    assert "\r" not in v.stderr and "\x1b" not in v.stderr
