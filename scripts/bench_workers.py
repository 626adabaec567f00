"""Speed-up of a partitioned merge on this machine: one `stream-merge merge` process against N
`--worker I/N` processes started together on the same OUT, as whole processes, alternating rounds, medians.

    python scripts/bench_workers.py [--size 2GB] [--workers 2] [--repeats 3] [--workdir DIR] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from stream_merge.synthetic import LlamaShape, shape_for_size, write_adapter, write_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import parse_size  # noqa: E402


def run_once(base: Path, adapter: Path, out: Path, workers: int) -> float:
    exe = [sys.executable, "-m", "stream_merge", "merge", str(base), str(adapter), "-o", str(out), "--quiet"]
    t0 = time.perf_counter()
    if workers == 1:
        subprocess.run(exe, check=True)
    else:
        procs = [subprocess.Popen(exe + ["--worker", f"{i}/{workers}"]) for i in range(workers)]
        if any(p.wait() for p in procs):
            raise SystemExit("a worker failed")
    subprocess.run(["sync"], check=True)
    wall = time.perf_counter() - t0
    if not (out / "model.safetensors.index.json").exists():
        raise SystemExit("the partitioned merge did not finalize")
    shutil.rmtree(out)
    return wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="2GB")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shard-size", default="500MB")
    ap.add_argument("--workdir", default="/tmp/stream-merge-bench-workers")
    ap.add_argument("--json")
    args = ap.parse_args()
    root = Path(args.workdir)
    shape = shape_for_size(parse_size(args.size), LlamaShape())
    base, adapter = root / "base", root / "adapter"
    if not base.exists():
        write_checkpoint(base, shape, max_shard_bytes=parse_size(args.shard_size))
        write_adapter(adapter, shape, r=16, alpha=32)
    times: dict[int, list[float]] = {1: [], args.workers: []}
    for rnd in range(args.repeats):
        for n in ((1, args.workers) if rnd % 2 == 0 else (args.workers, 1)):
            times[n].append(run_once(base, adapter, root / "out", n))
            print(f"round {rnd + 1}: {n} process(es) {times[n][-1]:.2f} s", flush=True)
    med = {n: statistics.median(v) for n, v in times.items()}
    speedup = med[1] / med[args.workers]
    print(f"{shape.nbytes() / 1e9:.2f} GB, {os.cpu_count()} cores: 1 process {med[1]:.2f} s, {args.workers} workers "
          f"{med[args.workers]:.2f} s (medians of {args.repeats}); speed-up x{speedup:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"size_bytes": shape.nbytes(), "times": times, "medians": med,
                                               "speedup": speedup}, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
