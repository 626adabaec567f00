"""scripts/memcheck.py --moe: a fused MoE expert tensor merged as a whole subprocess, its peak RSS reported
(tiny shape here; the 1 GiB default is run by hand: see the script's docstring)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def test_memcheck_moe_tiny(tmp_path: Path) -> None:
    out = tmp_path / "mem.json"
    p = subprocess.run([sys.executable, str(SCRIPTS / "memcheck.py"), "--moe", "4,160,64", "--rank", "4",
                        "--workdir", str(tmp_path / "work"), "--json", str(out)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr + p.stdout
    assert "fused MoE tensor (4, 160, 64)" in p.stdout and "PASS" in p.stdout
    run = json.loads(out.read_text())["runs"]["moe"]
    assert run["tensor_bytes"] == 4 * 160 * 64 * 2 and 0 < run["peak_rss_mib"] < 700
    assert not list((tmp_path / "work").glob("moe-*"))  # inputs removed without --keep


def test_memcheck_moe_rejects_a_bad_shape(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, str(SCRIPTS / "memcheck.py"), "--moe", "4,160", "--workdir",
                        str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "E,OUT,IN" in p.stderr
