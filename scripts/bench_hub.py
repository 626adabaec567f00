"""Hub benchmark: stream-merge against a throttled, procedural test Hub, with its baselines in the same run.

    python scripts/bench_hub.py --shape 4.5gb --rate 150MB/s --json scripts/results/hub-4.5gb.json

The server (tests/hub_procedural.py, a subprocess) serves a Llama-shaped base whose bytes are made on demand,
limits downloads and uploads separately (`--rate`, or `--rate-down` / `--rate-up`), hashes uploads and drops
them. Phases, each a whole process:
  1. T_dl: `snapshot_download` of the base; T_ul: `upload_folder` of that snapshot to another repo (or, when
     the base does not fit on disk, `--baselines floor`: size / rate, which a measured baseline cannot beat);
  2. Hub -> local: `stream_merge merge BASE ADAPTER -o OUT` (skipped with the floor baselines);
  3. Hub -> Hub: `--push-to-hub bench/merged --no-local-copy`, optionally SIGKILLed after N pushed shards
     and re-run (`--kill-after-shards`): no shard pushed before the kill may be downloaded or uploaded again;
  4. `--sample-verify K`: the sha256 of K pushed shards against a Hub -> local merge of the same shards.
Reported: wall times, ratios (merge / T_dl, hub2hub / max(T_dl, T_ul)), peak disk of OUT + the HF cache
(polled), the child's peak RSS (ru_maxrss), and where the time went: download / merge / upload busy time
(the server's event log and the output's temp files) and time with none of them busy (waiting).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from hub_procedural import ProceduralRepo, make_spec, parse_rate, spec_key  # noqa: E402

from stream_merge.synthetic import LORA_TARGETS, LlamaShape, shape_for_size, write_adapter  # noqa: E402
from stream_merge.synthetic_moe import (HF_MAX_SHARD_BYTES, MIXTRAL_8X22B, MIXTRAL_LORA_TARGETS,  # noqa: E402
                                        MixtralShape)


class BenchShape(NamedTuple):
    """A benchmark model: its shape, how its files are cut, and the adapter's `target_modules`."""

    shape: LlamaShape
    shards: int = 0  # this many files of about equal size (scaled with --layers) ...
    max_shard_bytes: int | None = None  # ... or huggingface_hub's greedy split, as save_pretrained cuts them
    targets: tuple[str, ...] = LORA_TARGETS


SHAPES: dict[str, BenchShape] = {
    "tiny": BenchShape(LlamaShape(512, 1376, 12, 8000, 8, 8), 6),
    "4.5gb": BenchShape(shape_for_size(int(4.5e9), LlamaShape(4096, 11008, 1, 32000, 32, 32)), 8),
    "llama70b": BenchShape(LlamaShape(8192, 28672, 80, 128256, 64, 8), 30),
    # Mixtral-8x22B-v0.1 as stored on the Hub: 281 GB in 59 shards of <= 5 GB (a layer's 24 experts are 4.8 GB)
    "mixtral8x22b": BenchShape(MIXTRAL_8X22B, max_shard_bytes=HF_MAX_SHARD_BYTES, targets=MIXTRAL_LORA_TARGETS),
    # the same layout, tiny (CI): 4 experts, 2 layers, several shards, a layer's experts across shard bounds
    "tiny-moe": BenchShape(MixtralShape(64, 128, 2, 256, 4, 2, experts=4), max_shard_bytes=100_000,
                           targets=MIXTRAL_LORA_TARGETS),
}
BASE, MERGED, UPLOAD = "bench/base", "bench/merged", "bench/upload-baseline"
TMP_PREFIX = ".stream-merge-tmp."
DOWNLOADS = ".stream-merge-downloads"


def shape_for(shape_name: str, layers: int | None = None) -> LlamaShape:
    """The shape, or a slice of the model: its first `layers` layers."""
    shape = SHAPES[shape_name].shape
    return shape if layers is None else dataclasses.replace(shape, layers=layers)


def spec_for(shape_name: str, layers: int | None = None) -> dict[str, Any]:
    bench = SHAPES[shape_name]
    shape = shape_for(shape_name, layers)
    shards = bench.shards
    if layers is not None:  # a slice of the model: shards scaled to match (a greedy split cuts it as it is)
        shards = max(1, round(shards * layers / bench.shape.layers))
    return make_spec(shape.tensors(), "BF16", shards, shape.config("BF16"), max_shard_bytes=bench.max_shard_bytes
                     ) | {"shape": shape.__dict__}


# ------------------------------------------------------------------------------------------------ processes
class Server:
    """tests/hub_procedural.py serve, as a subprocess."""

    def __init__(self, work: Path, spec_path: Path, down: str, up: str, cache: Path) -> None:
        self.log = work / "server-events.jsonl"
        self.log.unlink(missing_ok=True)
        root = work / "server"
        shutil.rmtree(root, ignore_errors=True)
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "hub_procedural.py"), "serve", str(spec_path), "--repo", BASE,
             "--root", str(root), "--rate-down", down, "--rate-up", up, "--log", str(self.log), "--cache",
             str(cache)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.hash_seconds = 0.0
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("HASHED"):
                self.hash_seconds = float(line.split()[1])
            if line.startswith("PORT"):
                self.endpoint = f"http://127.0.0.1:{int(line.split()[1])}"
                return
        raise RuntimeError("the bench server did not start")

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def hub_env(endpoint: str, hf_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1",
               HF_TOKEN="hf_bench", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return env


def disk_bytes(paths: list[Path]) -> int:
    """Allocated bytes under `paths` (files may vanish while we walk)."""
    total = 0
    for p in paths:
        for dirpath, _, files in os.walk(p):
            for f in files:
                try:
                    total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
                except OSError:
                    pass
    return total


class Watch:
    """Polls a child: peak disk of `paths`, output temp files (a shard being merged), and the load."""

    def __init__(self, paths: list[Path], out: Path | None, every: float = 0.25) -> None:
        self.paths, self.out, self.every = paths, out, every
        self.peak_disk = 0
        self.peak_scratch = 0  # the download area and the HF cache: what a merge needs beyond its output
        self.writing: dict[str, list[float]] = {}  # temp file name -> [first seen, last seen]
        self.load: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            scratch = disk_bytes([p for p in self.paths if p != self.out]
                                 + ([self.out / DOWNLOADS] if self.out is not None else []))
            self.peak_scratch = max(self.peak_scratch, scratch)
            self.peak_disk = max(self.peak_disk, disk_bytes(self.paths))
            if self.out is not None and self.out.is_dir():
                for name in os.listdir(self.out):
                    if name.startswith(TMP_PREFIX) and ".safetensors" in name:
                        self.writing.setdefault(name, [now, now])[1] = now
            self.load.append(os.getloadavg()[0])
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_child(cmd: list[str], env: dict[str, str], watch: Watch | None = None, kill_when: Any = None,
              server_pid: int | None = None) -> dict[str, Any]:
    """Run `cmd`; returns wall seconds, exit code, peak RSS (ru_maxrss), CPU seconds (its own and, with
    `server_pid`, the test server's meanwhile: both share this machine's cores) and whether it was killed."""
    t0 = time.time()
    server_cpu0 = proc_cpu_s(server_pid) if server_pid else 0.0
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout or []), daemon=True)
    reader.start()
    killed = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if kill_when is not None and not killed and kill_when():
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
        time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=5)
    if watch is not None:
        watch.stop()
    res = {"wall_s": round(time.time() - t0, 2), "t0": t0, "t1": time.time(), "rc": proc.returncode,
           "peak_rss_bytes": usage.ru_maxrss * 1024, "killed": killed,
           "cpu_s": round(usage.ru_utime + usage.ru_stime, 2)}
    if server_pid:
        res["server_cpu_s"] = round(proc_cpu_s(server_pid) - server_cpu0, 2)
    if watch is not None:
        res["peak_disk_bytes"] = watch.peak_disk
        res["peak_download_area_bytes"] = watch.peak_scratch
        res["writing"] = watch.writing
        res["load_mean"] = round(sum(watch.load) / max(1, len(watch.load)), 2)
    if proc.returncode != 0 and not killed:
        raise RuntimeError(f"{' '.join(cmd[:6])}... failed ({proc.returncode}):\n{''.join(out)[-3000:]}")
    return res


# ------------------------------------------------------------------------------------------------ analysis
def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in union(intervals))


def intersect(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out = []
    for x0, x1 in union(a):
        for y0, y1 in union(b):
            if min(x1, y1) > max(x0, y0):
                out.append((max(x0, y0), min(x1, y1)))
    return out


def breakdown(events: list[dict[str, Any]], runs: list[dict[str, Any]], min_get: int) -> dict[str, float]:
    """Busy time of each stage within the runs, and how much of it overlapped."""
    spans = [(r["t0"], r["t1"]) for r in runs]

    def inside(iv: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return intersect(iv, spans)

    dl = inside([(e["t0"], e["t1"]) for e in events if e["ev"] == "get" and e["end"] - e["start"] >= min_get])
    ul = inside([(e["t0"], e["t1"]) for e in events if e["ev"] == "put"])
    mg = inside([tuple(v) for r in runs for v in r.get("writing", {}).values()])
    wall = sum(b - a for a, b in spans)
    busy = length(dl + ul + mg)
    return {"download_busy_s": round(length(dl), 1), "merge_busy_s": round(length(mg), 1),
            "upload_busy_s": round(length(ul), 1), "all_three_at_once_s": round(length(intersect(intersect(dl, mg),
                                                                                                   ul)), 1),
            "waiting_s": round(wall - busy, 1), "wall_s": round(wall, 1)}


def remote_shas(endpoint: str, repo: str) -> dict[str, str]:
    from huggingface_hub import HfApi

    info = HfApi(endpoint=endpoint, token="hf_bench").model_info(repo, files_metadata=True)
    return {s.rfilename: s.lfs.sha256 for s in info.siblings or [] if s.lfs is not None}


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def no_redo(events: list[dict[str, Any]], kill_t: float, min_get: int) -> dict[str, Any]:
    """Shards pushed before the kill, and any of them downloaded, uploaded or committed again after it."""
    commits = [e for e in events if e["ev"] == "commit" and e["repo"] == MERGED]
    done = {p: oid for e in commits if e["t"] <= kill_t for p, oid in e["files"].items()}
    after = [e for e in events if e.get("t0", e.get("t", 0)) > kill_t]
    redone = sorted({e["path"] for e in after if e["ev"] == "get" and e["path"] in done
                     and e["end"] - e["start"] >= min_get}
                    | {p for e in after if e["ev"] == "put" for p, oid in done.items() if oid == e["oid"]}
                    | {p for e in after if e["ev"] == "commit" and e["repo"] == MERGED for p in e["files"]
                       if p in done})
    return {"pushed_before_kill": len(done), "redone": redone}


def merge_cmd(adapter: Path, out: Path, prefetch: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stream_merge", "merge", BASE, str(adapter), "-o", str(out), "--prefetch",
            str(prefetch), "--quiet", *extra]


def baselines(args: argparse.Namespace, server: Server, work: Path, size: int) -> dict[str, Any]:
    """T_dl and T_ul measured through the same server, or their floor (size / rate)."""
    if args.baselines == "floor":
        down, up = parse_rate(args.rate_down or args.rate), parse_rate(args.rate_up or args.rate)
        if not (down and up):
            raise SystemExit("--baselines floor needs a rate")
        return {"kind": "floor (size / rate)", "t_dl_s": round(size / down, 1), "t_ul_s": round(size / up, 1)}
    snap, home = work / "snapshot", work / "hf-baseline"
    for p in (snap, home):
        shutil.rmtree(p, ignore_errors=True)
    env = hub_env(server.endpoint, home)
    dl = run_child([sys.executable, "-c", "import sys; from huggingface_hub import snapshot_download as s; "
                    f"s({BASE!r}, local_dir=sys.argv[1])", str(snap)], env, server_pid=server.proc.pid)
    ul = run_child([sys.executable, "-c", "import sys; from huggingface_hub import HfApi; a = HfApi(); "
                    f"a.create_repo({UPLOAD!r}, exist_ok=True); a.upload_folder(repo_id={UPLOAD!r}, "
                    "folder_path=sys.argv[1])", str(snap)], env, server_pid=server.proc.pid)
    shutil.rmtree(snap, ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)
    return {"kind": "measured", "t_dl_s": dl["wall_s"], "t_ul_s": ul["wall_s"], "dl_cpu_s": dl["cpu_s"],
            "ul_cpu_s": ul["cpu_s"], "dl_server_cpu_s": dl["server_cpu_s"], "ul_server_cpu_s": ul["server_cpu_s"]}


def hub_to_local(args: argparse.Namespace, server: Server, work: Path, adapter: Path) -> dict[str, Any]:
    out, home = work / "out-local", work / "hf-local"
    for p in (out, home):
        shutil.rmtree(p, ignore_errors=True)
    res = run_child(merge_cmd(adapter, out, args.prefetch), hub_env(server.endpoint, home),
                    Watch([out, home], out), server_pid=server.proc.pid)
    res["breakdown"] = breakdown(server.events(), [res], min_get=1 << 20)
    return res


def hub_to_hub(args: argparse.Namespace, server: Server, work: Path, adapter: Path) -> dict[str, Any]:
    out, home = work / "out-hub", work / "hf-hub"
    for p in (out, home):
        shutil.rmtree(p, ignore_errors=True)
    env = hub_env(server.endpoint, home)
    cmd = merge_cmd(adapter, out, args.prefetch, "--push-to-hub", MERGED, "--no-local-copy")
    runs = []
    kill_t = None
    if args.kill_after_shards:
        def pushed_enough() -> bool:
            n = sum(len(e["files"]) for e in server.events() if e["ev"] == "commit" and e["repo"] == MERGED)
            return n >= args.kill_after_shards

        runs.append(run_child(cmd, env, Watch([out, home], out), kill_when=pushed_enough,
                              server_pid=server.proc.pid))
        kill_t = runs[-1]["t1"]
    runs.append(run_child(cmd, env, Watch([out, home], out), server_pid=server.proc.pid))
    events = server.events()
    res: dict[str, Any] = {"wall_s": round(sum(r["wall_s"] for r in runs), 2), "runs": runs,
                           "peak_disk_bytes": max(r["peak_disk_bytes"] for r in runs),
                           "peak_download_area_bytes": max(r["peak_download_area_bytes"] for r in runs),
                           "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
                           "cpu_s": round(sum(r["cpu_s"] for r in runs), 2),
                           "server_cpu_s": round(sum(r["server_cpu_s"] for r in runs), 2),
                           "breakdown": breakdown(events, runs, min_get=1 << 20)}
    if kill_t is not None:
        res["resume"] = no_redo(events, kill_t, min_get=1 << 20) | {"killed": runs[0]["killed"]}
    return res


def sample_verify(args: argparse.Namespace, server: Server, work: Path, adapter: Path, names: list[str],
                  local: Path | None) -> dict[str, Any]:
    """sha256 of K pushed shards against a Hub -> local merge of the same shards (the full local output, or a
    `--worker` share of the shards when there is none)."""
    remote = remote_shas(server.endpoint, MERGED)
    if local is None:
        local, home = work / "out-verify", work / "hf-verify"
        for p in (local, home):
            shutil.rmtree(p, ignore_errors=True)
        n = max(1, len(names) // max(1, args.sample_verify))
        run_child(merge_cmd(adapter, local, args.prefetch, "--worker", f"0/{n}"), hub_env(server.endpoint, home))
        shutil.rmtree(home, ignore_errors=True)
        picked = [f for f in names if (local / f).is_file()][:args.sample_verify]
    else:
        step = max(1, len(names) // max(1, args.sample_verify))
        picked = names[::step][:args.sample_verify]
    checked = {f: {"local": file_sha(local / f), "pushed": remote.get(f)} for f in picked}
    return {"shards": checked, "all_match": bool(checked) and all(v["local"] == v["pushed"] for v in checked.values())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--layers", type=int, help="only the first N layers of the shape (a slice of the model)")
    ap.add_argument("--rate", default="0", help="both directions, e.g. 150MB/s (0: unthrottled)")
    ap.add_argument("--rate-down")
    ap.add_argument("--rate-up")
    ap.add_argument("--prefetch", type=int, default=1)
    ap.add_argument("--kill-after-shards", type=int, default=0)
    ap.add_argument("--sample-verify", type=int, default=2)
    ap.add_argument("--baselines", choices=("measured", "floor"), default="measured")
    ap.add_argument("--skip-local", action="store_true", help="no Hub -> local merge (it needs the base's size "
                                                                "on disk)")
    ap.add_argument("--work", type=Path)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "stream-merge-bench")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    spec = spec_for(args.shape, args.layers)
    shape = shape_for(args.shape, args.layers)
    work = args.work or Path("/tmp") / f"bench-hub-{args.shape}"
    work.mkdir(parents=True, exist_ok=True)
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    repo = ProceduralRepo.from_spec(spec)
    names = sorted(repo.shards)
    adapter = args.cache / f"adapter-{spec_key(spec)}"
    if not (adapter / "adapter_config.json").is_file():
        shutil.rmtree(adapter, ignore_errors=True)
        write_adapter(adapter.with_suffix(".tmp"), shape, r=16, targets=SHAPES[args.shape].targets)
        os.replace(adapter.with_suffix(".tmp"), adapter)
    result: dict[str, Any] = {
        "shape": args.shape, "layers": shape.layers, "base_bytes": repo.nbytes, "shards": len(names),
        "max_shard_bytes": max(f.size for f in repo.shards.values()), "rate": args.rate,
        "rate_down": args.rate_down or args.rate, "rate_up": args.rate_up or args.rate, "prefetch": args.prefetch,
        "cpus": os.cpu_count(), "load_at_start": os.getloadavg()[0], "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                                time.gmtime())}
    server = Server(work, spec_path, args.rate_down or args.rate, args.rate_up or args.rate, args.cache)
    result["server_hash_s"] = server.hash_seconds
    try:
        result["baselines"] = b = baselines(args, server, work, repo.nbytes)
        local = None
        if not args.skip_local and args.baselines == "measured":
            result["hub_to_local"] = hl = hub_to_local(args, server, work, adapter)
            result["ratio_hub_to_local_over_t_dl"] = round(hl["wall_s"] / b["t_dl_s"], 3)
            local = work / "out-local"
        result["hub_to_hub"] = hh = hub_to_hub(args, server, work, adapter)
        result["ratio_hub_to_hub_over_max_dl_ul"] = round(hh["wall_s"] / max(b["t_dl_s"], b["t_ul_s"]), 3)
        if args.sample_verify:
            result["sample_verify"] = sample_verify(args, server, work, adapter, names, local)
    finally:
        server.stop()
    for section in ("hub_to_local", "hub_to_hub"):
        if section in result:
            sec = result[section]
            sec["peak_disk_shards"] = round(sec["peak_disk_bytes"] / result["max_shard_bytes"], 2)
            sec["peak_download_area_shards"] = round(sec["peak_download_area_bytes"] / result["max_shard_bytes"], 2)
            for r in sec.get("runs", [sec]):
                r.pop("writing", None)
    result["load_at_end"] = os.getloadavg()[0]
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
