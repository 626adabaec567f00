"""Smoke tests for scripts/bench.py and scripts/memcheck.py: tiny sizes, whole subprocesses, no timing assertions."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
TINY = ["--hidden", "128", "--intermediate", "344", "--vocab", "512"]
sys.path.insert(0, str(SCRIPTS))
import bench  # noqa: E402


def run_script(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_parse_size() -> None:
    assert bench.parse_size("4.5GB") == 4_500_000_000
    assert bench.parse_size("700MB") == 700_000_000
    assert bench.parse_size("30GB") == 30 * 10**9
    assert bench.parse_size("1GiB") == 2**30
    assert bench.parse_size("512 MiB") == 512 * 2**20
    assert bench.parse_size("1234") == 1234
    for bad in ("", "GB", "1.2.3GB", "5XB", "-1GB"):
        with pytest.raises(Exception):
            bench.parse_size(bad)


def test_measure_reports_the_child_not_the_parent() -> None:
    """The pytest process holds torch (hundreds of MiB); a trivial child must not inherit that figure, and a
    child that touches 200 MiB must show at least that."""
    small = bench.measure("true")
    assert small["rc"] == 0 and small["peak_rss_bytes"] < 64 * 2**20
    big = bench.measure(f"{sys.executable} -c 'b = bytearray(200 << 20); b[::4096] = bytes(len(b) // 4096 or 1)'")
    assert big["rc"] == 0 and big["peak_rss_bytes"] >= 200 * 2**20
    assert bench.measure("exit 3")["rc"] == 3


@pytest.mark.slow
def test_bench_tiny(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    p = run_script("bench.py", "--size", "8MB", "--shard-size", "3MB", "--repeats", "1", *TINY,
                   "--workdir", tmp_path / "work", "--json", out, "--checksums", "--startup")
    assert p.returncode == 0, p.stderr + p.stdout
    for text in ("median wall s", "x cp", "peak RSS MiB", "GB/s", "machine:", "command:", "stream-merge merge"):
        assert text in p.stdout
    d = json.loads(out.read_text())
    assert {"machine", "engine", "invocation", "commands", "params", "runs", "summary"} <= d.keys()
    assert {"cpu", "cores", "ram_gib", "torch"} <= d["machine"].keys()
    assert set(d["summary"]) == {"cp", "stream-merge", "sm-checksums", "startup"}
    assert "--checksums" in d["commands"]["sm-checksums"] and "import stream_merge.runner" in d["commands"]["startup"]
    for s in d["summary"].values():
        assert {"median_wall_s", "ratio_vs_cp", "peak_rss_mib", "gb_per_s", "runs"} <= s.keys()
        assert s["runs"] == 1 and s["median_wall_s"] > 0 and s["peak_rss_mib"] > 0
    assert d["summary"]["cp"]["ratio_vs_cp"] == 1.0
    assert [r["name"] for r in d["runs"]] == ["cp", "stream-merge", "sm-checksums", "startup"]
    assert all(r["rc"] == 0 for r in d["runs"])
    assert d["params"]["shards"] >= 3 and d["params"]["rank"] == 16
    # no --keep: the inputs it made and every output are gone, only the (empty) workdir is left
    assert not any((tmp_path / "work").rglob("*.safetensors"))


def test_inputs_are_reused_only_with_the_same_parameters(tmp_path: Path) -> None:
    kw = dict(size=2_000_000, hidden=128, intermediate=344, vocab=512, heads=1, kv_heads=1, shard_bytes=1_000_000,
              rank=4, quiet=True)
    base, adapter, info, made = bench.make_inputs(tmp_path, **kw)
    assert made and (base / "model.safetensors.index.json").exists() and (adapter / "adapter_config.json").exists()
    assert info["shards"] >= 2 and info["params"]["rank"] == 4
    again = bench.make_inputs(tmp_path, **kw)
    assert again[0] == base and again[3] is False
    other = bench.make_inputs(tmp_path, **{**kw, "rank": 8})
    assert other[0] != base and other[3] is True


@pytest.mark.slow
def test_peft_child_loads_and_merges_the_synthetic_model(tmp_path: Path) -> None:
    """The --peft baseline: transformers must load the synthetic checkpoint with no missing or unexpected
    keys (the child exits 1 otherwise), PEFT must merge it and save_pretrained must write a checkpoint."""
    if not all(importlib.util.find_spec(m) for m in ("peft", "transformers")):  # not importorskip: slow imports
        pytest.skip("peft/transformers are not installed")
    base, adapter, _, _ = bench.make_inputs(tmp_path, 2_000_000, 128, 344, 512, 1, 1, 1_000_000, 4, quiet=True)
    p = run_script("bench.py", "--peft-child", base, adapter, tmp_path / "out")
    assert p.returncode == 0, p.stderr + p.stdout
    assert list((tmp_path / "out").glob("*.safetensors")) and (tmp_path / "out" / "config.json").exists()


def test_summary_and_table_with_a_peft_row() -> None:
    runs = [{"name": n, "round": r, "wall_s": w, "peak_rss_bytes": m << 20, "vmhwm_bytes": m << 20, "user_s": 1.0,
             "sys_s": 0.5, "rc": 0}
            for r in range(3) for n, w, m in (("cp", 2.0 + r, 10), ("stream-merge", 4.0 + r, 300), ("peft", 8.0, 900))]
    s = bench.summarize(runs, 3_000_000_000)
    assert list(s) == ["cp", "stream-merge", "peft"]
    assert s["cp"]["median_wall_s"] == 3.0 and s["stream-merge"]["ratio_vs_cp"] == round(5 / 3, 3)
    assert s["peft"]["peak_rss_mib"] == 900 and s["cp"]["gb_per_s"] == 1.0
    text = bench.table(s)
    assert "peft" in text and "x cp" in text and "peak RSS MiB" in text


@pytest.mark.slow
def test_memcheck_tiny(tmp_path: Path) -> None:
    out = tmp_path / "mem.json"
    p = run_script("memcheck.py", "--size", "8MB", "--shard-size", "3MB", *TINY, "--workdir", tmp_path / "work",
                   "--json", out)
    assert p.returncode == 0, p.stderr + p.stdout
    assert "peak RSS" in p.stdout and "PASS" in p.stdout
    d = json.loads(out.read_text())
    assert d["passed"] is True and d["limit_mib"] == 700
    run = d["runs"]["S,M"]
    assert {"peak_rss_mib", "wall_s", "base_bytes", "shards", "command"} <= run.keys()
    assert 0 < run["peak_rss_mib"] < 700


def _fake_measure(peaks: list[float]):
    """A stand-in for bench.measure that 'merges' (writes an index into -o OUT) and reports the next peak."""
    calls = []

    def fake(cmd: str, log: Path | None = None, **_: object) -> dict:
        out = Path(cmd.split(" -o ", 1)[1].split()[0])
        out.mkdir(parents=True)
        (out / "model.safetensors.index.json").write_text("{}")
        calls.append(cmd)
        return {"rc": 0, "wall_s": 1.0, "peak_rss_bytes": int(peaks[len(calls) - 1] * 2**20), "vmhwm_bytes": 0,
                "user_s": 1.0, "sys_s": 0.0}

    return fake, calls


SMALL = ["--size", "3MB", "--shard-size", "1MB", "--hidden", "128", "--intermediate", "344", "--vocab", "512"]


@pytest.mark.parametrize("peaks,limit,rc", [([300, 310, 320], 700, 0), ([300, 360, 310], 700, 1),
                                            ([300, 310, 400], 700, 1), ([800, 810, 820], 700, 1)])
def test_memcheck_scaling_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str], peaks: list[float], limit: int, rc: int) -> None:
    """--scaling runs S/M, 2S/M and S/2M, and fails on more than 15% growth or a peak over the limit (the real
    merges are measured by test_memcheck_tiny; here measure() is faked to pin the verdict logic)."""
    import memcheck

    fake, calls = _fake_measure(peaks)
    monkeypatch.setattr(memcheck, "measure", fake)
    out = tmp_path / "mem.json"
    got = memcheck.main([*SMALL, "--scaling", "--limit-mib", str(limit), "--workdir", str(tmp_path / "w"),
                         "--json", str(out)])
    text = capsys.readouterr().out
    assert got == rc, text
    assert len(calls) == 3 and "shard size x2" in text and "model size x2" in text
    assert ("FAIL" in text) == bool(rc)
    d = json.loads(out.read_text())
    assert set(d["runs"]) == {"S,M", "2S,M", "S,2M"} and set(d["growth"]) == {"2S,M", "S,2M"}
    assert d["runs"]["S,2M"]["base_bytes"] > d["runs"]["S,M"]["base_bytes"]
    assert d["runs"]["2S,M"]["shards"] < d["runs"]["S,M"]["shards"]
    assert d["passed"] is (rc == 0)
    assert not any((tmp_path / "w").rglob("*.safetensors"))  # inputs made without --keep are removed
