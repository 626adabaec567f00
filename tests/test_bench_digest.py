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
