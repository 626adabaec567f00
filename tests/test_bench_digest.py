"""scripts/bench.py's --digest-cost and --verify modes (issue 15 item 9): tiny sizes, whole subprocesses, no
timing assertions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_scripts import TINY, bench, run_script


def test_paired_ratio_pairs_runs_of_the_same_round() -> None:
    runs = [{"round": 0, "name": "a", "wall_s": 3.0, "user_s": 2.0, "sys_s": 1.0},
            {"round": 0, "name": "b", "wall_s": 2.0, "user_s": 1.0, "sys_s": 0.5},
            {"round": 1, "name": "a", "wall_s": 9.0, "user_s": 2.0, "sys_s": 1.0},
            {"round": 1, "name": "b", "wall_s": 10.0, "user_s": 1.0, "sys_s": 0.5},
            {"round": 2, "name": "a", "wall_s": 1.0, "user_s": 2.0, "sys_s": 1.0}]  # round 2 has no b: left out
    assert bench.paired_ratio(runs, "a", "b") == {"ratios": [1.5, 0.9], "median_ratio": 1.2, "median_cpu_s": 1.5}
    assert bench.paired_ratio(runs, "a", "c") is None


@pytest.mark.slow
def test_bench_digest_cost_and_verify_tiny(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    p = run_script("bench.py", "--size", "8MB", "--shard-size", "3MB", "--repeats", "1", *TINY,
                   "--workdir", tmp_path / "work", "--json", out, "--digest-cost", "--verify", timeout=300)
    assert p.returncode == 0, p.stderr + p.stdout
    d = json.loads(out.read_text())
    assert set(d["summary"]) == {"cp", "stream-merge", "sm-digest", "sm-no-digest", "verify", "verify-full"}
    assert all(r["rc"] == 0 for r in d["runs"])
    assert " verify " in d["commands"]["verify"] and "--full" in d["commands"]["verify-full"]
    assert len(d["digest_cost"]["ratios"]) == 1 and "digest cost: " in p.stdout
    assert not any((tmp_path / "work").rglob("*.safetensors"))  # the verified output is gone with the rest


def test_the_digest_launcher_runs_the_default_or_no_shard_digest(tmp_path: Path) -> None:
    """sm-digest is the merge as shipped (each shard's xxh3_128, no sha256); sm-no-digest hashes no shard."""
    import os
    import subprocess
    import sys

    import xxhash

    from conftest import make_pair

    base, adapter = make_pair(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for on in (True, False):
        out = tmp_path / f"out-{on}"
        r = subprocess.run([*bench.digest_cmd(on), "merge", str(base), str(adapter), "-o", str(out), "--quiet",
                            "--device", "cpu"], capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        entries = json.loads((out / "stream_merge.json").read_text())["shards"]
        assert len(entries) > 1 and all(e["sha256"] is None for e in entries)
        for e in entries:
            want = xxhash.xxh3_128((out / e["file"]).read_bytes()).hexdigest() if on else None
            assert e["xxh3_128"] == want, (on, e["file"])
