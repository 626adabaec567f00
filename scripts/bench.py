"""Benchmark `stream-merge merge` against the `cp -r && sync` floor (and optionally PEFT) on a synthetic model.

Makes (or reuses, when WORKDIR already holds one with the same parameters) a Llama-shaped bf16 checkpoint of
about --size bytes and a rank --rank LoRA adapter on q/k/v/o/gate/up/down, then runs, alternating for
--repeats rounds, each as a whole subprocess into a fresh destination deleted afterwards:

    cp -r BASE DEST && sync                                                   (the floor)
    stream-merge merge BASE ADAPTER -o DEST --device DEV --quiet && sync
    ... the same with --checksums                                             (--checksums)
    ... the same as shipped (XXH3-128 of every shard), and with no digest     (--digest-cost: what hashing
                                                                               every output byte while writing costs)
    stream-merge verify OUT, and verify OUT --full                            (--verify: on one output merged
                                                                               before the rounds)
    python -c 'import stream_merge.runner'                                    (--startup: Python + torch import,
                                                                               the floor of any torch-based tool)
    python scripts/bench.py --peft-child BASE ADAPTER DEST && sync            (--peft: transformers + PEFT
                                                                               from_pretrained, merge_and_unload,
                                                                               save_pretrained; always on CPU)

Each run's wall time and peak RSS are measured from outside, through a tiny wrapper process (see WRAPPER):
peak RSS is the ru_maxrss that os.wait4 gives the wrapper for its one child (the largest RSS high-water mark
of the child and its waited-for descendants, file-backed mapped pages included, like VmHWM), cross-checked
by polling /proc/PID/status VmHWM of the process tree. Prints a table (median wall, ratio vs the cp median of the same invocation, peak RSS,
GB/s of base checkpoint) with the machine and the exact commands, and writes JSON with every run.

    python scripts/bench.py [--size 4.5GB] [--hidden 4096 --intermediate 11008 --vocab 32000] [--shard-size 2GB]
                            [--rank 16] [--repeats 3] [--peft] [--checksums] [--startup] [--device cpu|cuda]
                            [--digest-cost] [--verify]
                            [--workdir DIR]
                            [--json OUT.json] [--keep]

Inputs are kept in WORKDIR with --keep (so the next run reuses them) and otherwise deleted at the end when this
run made them. The page cache is warm after the first round (the inputs fit in RAM on most machines); the
alternation makes every command see the same cache state.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve()
INPUTS_MARKER = "bench-inputs.json"
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "stream-merge-bench"

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9, "T": 10**12,
          "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'4.5GB' -> 4_500_000_000, '700MB', '1GiB' -> 2**30, '123' -> 123 bytes (GB decimal, GiB binary)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 4.5GB, 700MB, 1GiB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[unit])


def human(n: float) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= f:
            return f"{n / f:.2f} {unit}"
    return f"{n:.0f} B"


# ---------------------------------------------------------------- machine

def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import torch

        torch_version = torch.__version__
        threads = torch.get_num_threads()
        cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        torch_version, threads, cuda = None, None, None
    return {"cpu": cpu, "cores": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "loadavg": loadavg(),
            "ram_gib": round(mem / 2**30, 1), "torch": torch_version, "torch_threads": threads, "cuda": cuda,
            "python": platform.python_version(), "platform": platform.platform(), "hostname": platform.node()}


def loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def engine_info() -> dict:
    """Which stream-merge was measured: version, git commit and whether stream_merge/ had local changes."""
    info: dict = {}
    try:
        import stream_merge

        info["version"] = stream_merge.__version__
        pkg = Path(stream_merge.__file__).resolve().parent
        info["path"] = str(pkg)
        git = ["git", "-C", str(pkg.parent)]
        info["commit"] = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                        timeout=10).stdout.strip() or None
        dirty = subprocess.run([*git, "status", "--porcelain", "--", str(pkg)], capture_output=True, text=True,
                               timeout=10).stdout.splitlines()
        info["uncommitted_files"] = len(dirty)
        info["tree_sha256"] = source_digest(pkg)
    except Exception:  # noqa: BLE001
        pass
    return info


def source_digest(pkg: Path | None = None) -> str | None:
    """A digest of stream_merge/*.py: recorded per run, since the engine may be edited while we measure."""
    try:
        if pkg is None:
            import stream_merge

            pkg = Path(stream_merge.__file__).resolve().parent
        return hashlib.sha256(b"".join(f.name.encode() + f.read_bytes()
                                       for f in sorted(pkg.glob("*.py")))).hexdigest()[:16]
    except Exception:  # noqa: BLE001
        return None


def machine_line(m: dict) -> str:
    gpu = f", GPU {m['cuda']}" if m.get("cuda") else ", no GPU"
    return (f"{m['cpu']}, {m['cores']} cores ({m['affinity']} usable), {m['ram_gib']} GiB RAM{gpu}; "
            f"torch {m['torch']} ({m['torch_threads']} threads), Python {m['python']}")


# ---------------------------------------------------------------- measuring one whole process

def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def _vmhwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


# A tiny wrapper between us and the measured command. os.wait4 in this (big, torch-importing) process would
# not do: the kernel seeds a child's RSS high-water mark from the process that forked/exec'd it, so every child
# of a 400 MiB parent reports >= 400 MiB. The wrapper is a bare interpreter (-I -S, a few MiB) that spawns
# `/bin/sh -c CMD`, waits for it with os.wait4 and writes that child's rusage (the largest ru_maxrss of the
# shell and its waited-for descendants) and wall time as JSON to the file named by its first argument.
WRAPPER = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.posix_spawn('/bin/sh', ['/bin/sh', '-c', sys.argv[2]], os.environ)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(sys.argv[1], 'w') as f:
    json.dump({'rc': os.waitstatus_to_exitcode(status), 'wall_s': wall, 'maxrss_kib': ru.ru_maxrss,
               'user_s': ru.ru_utime, 'sys_s': ru.ru_stime, 'minflt': ru.ru_minflt, 'majflt': ru.ru_majflt,
               'inblock': ru.ru_inblock, 'oublock': ru.ru_oublock, 'nvcsw': ru.ru_nvcsw, 'nivcsw': ru.ru_nivcsw}, f)
"""


def measure(cmd: str, log: Path | None = None, poll_s: float = 0.05, env: dict | None = None) -> dict:
    """Run `cmd` (a /bin/sh command line) as one whole process tree under WRAPPER: exit code, wall time, peak
    RSS from the wrapper's wait4 (`peak_rss_bytes`) and the largest VmHWM polled in the tree (`vmhwm_bytes`;
    a cross-check that can miss processes living less than `poll_s`)."""
    fd, result_path = tempfile.mkstemp(prefix="bench-rusage-", suffix=".json")
    os.close(fd)
    out = open(log, "wb") if log else subprocess.DEVNULL
    hwm = {"max": 0}
    try:
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-I", "-S", "-c", WRAPPER, result_path, cmd], stdout=out,
                             stderr=subprocess.STDOUT, env=env)
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                todo, seen = _children(p.pid), set()  # the wrapper itself is not measured
                while todo:
                    pid = todo.pop()
                    if pid in seen:
                        continue
                    seen.add(pid)
                    hwm["max"] = max(hwm["max"], _vmhwm(pid))
                    todo += _children(pid)
                done.wait(poll_s)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        p.wait()
        outer = time.perf_counter() - t0
        done.set()
        th.join()
        try:
            res = json.loads(Path(result_path).read_text())
        except (OSError, ValueError):
            res = {"rc": p.returncode or -1, "wall_s": outer, "maxrss_kib": 0, "user_s": 0.0, "sys_s": 0.0}
    finally:
        if log:
            out.close()
        os.unlink(result_path)
    extra = {k: res[k] for k in ("minflt", "majflt", "inblock", "oublock", "nvcsw", "nivcsw") if k in res}
    return {"rc": res["rc"], "wall_s": res["wall_s"], "peak_rss_bytes": res["maxrss_kib"] * 1024,
            "vmhwm_bytes": hwm["max"], "user_s": res["user_s"], "sys_s": res["sys_s"], **extra}


def tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_bytes()[-n:].decode("utf-8", "replace")
    except OSError:
        return ""


# ---------------------------------------------------------------- inputs

def stream_merge_cmd() -> list[str]:
    """The installed `stream-merge` script next to this interpreter, else `python -m stream_merge`."""
    exe = Path(sys.executable).parent / "stream-merge"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "stream_merge"]


# `stream-merge` as shipped (DIGEST True: the writer hashes every shard with XXH3-128, and with sha256 only for a
# push or --checksums) or with the shard writer hashing nothing (False): what the default digest costs, measured
# in one invocation. Small files (index, record) are written as always; only the shard writer's hashing changes.
DIGEST_LAUNCHER = (
    "import sys; import stream_merge.fileio as f; init = f.AtomicFile.__init__\n"
    "class Null:\n"
    "    update = lambda self, b: None\n"
    "    hexdigest = lambda self: None\n"
    "def no_digest(s, final, digest=True, direct=False):\n"
    "    init(s, final, digest, direct)\n"
    "    if str(final).endswith('.safetensors'): s.hash, s.xxh = None, Null()\n"
    "if not DIGEST: f.AtomicFile.__init__ = no_digest\n"
    "sys.argv[0] = 'stream-merge'; from stream_merge.cli import entry; entry()")


def digest_cmd(on: bool) -> list[str]:
    """`python -c LAUNCHER` running the stream-merge CLI with the shard digests as shipped (`on`) or none."""
    return [sys.executable, "-c", DIGEST_LAUNCHER.replace("DIGEST", str(on))]


def make_inputs(workdir: Path, size: int, hidden: int, intermediate: int, vocab: int, heads: int, kv_heads: int,
                shard_bytes: int, rank: int, dtype: str = "BF16", alpha: float | None = None,
                quiet: bool = False) -> tuple[Path, Path, dict, bool]:
    """(base, adapter, params, made_now): a synthetic checkpoint + adapter in WORKDIR, reused when an earlier
    run left one with exactly these parameters (its marker file is written last, so it is complete)."""
    from stream_merge.synthetic import LlamaShape, shape_for_size, write_adapter, write_checkpoint

    shape = shape_for_size(size, LlamaShape(hidden=hidden, intermediate=intermediate, layers=1, vocab=vocab,
                                            heads=heads, kv_heads=kv_heads), dtype)
    alpha = float(2 * rank if alpha is None else alpha)
    params = {"shape": {"hidden": shape.hidden, "intermediate": shape.intermediate, "layers": shape.layers,
                        "vocab": shape.vocab, "heads": shape.heads, "kv_heads": shape.kv_heads},
              "dtype": dtype, "max_shard_bytes": shard_bytes, "rank": rank, "alpha": alpha, "seed": 0}
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    root = workdir / f"inputs-{key}"
    base, adapter = root / "base", root / "adapter"
    marker = root / INPUTS_MARKER
    try:
        old = json.loads(marker.read_text())
    except (OSError, ValueError):
        old = None
    if old and old.get("params") == params and base.is_dir() and adapter.is_dir():
        if not quiet:
            print(f"reusing inputs in {root}", flush=True)
        return base, adapter, old, False
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    need = shape.nbytes(dtype) * 1.05 + 2**28
    free = shutil.disk_usage(root).free
    if free < need:
        raise SystemExit(f"not enough disk in {root}: {free / 2**30:.1f} GiB free, {need / 2**30:.1f} GiB needed")
    if not quiet:
        print(f"making a {human(shape.nbytes(dtype))} checkpoint ({shape.layers} layers, hidden {shape.hidden}) and a "
              f"rank-{rank} adapter in {root} ...", flush=True)
    t0 = time.perf_counter()
    shards = write_checkpoint(base, shape, dtype=dtype, max_shard_bytes=shard_bytes)
    write_adapter(adapter, shape, r=rank, alpha=alpha, base_name=str(base))
    info = {"params": params, "shards": len(shards), "base_bytes": dir_bytes(base),
            "adapter_bytes": dir_bytes(adapter), "make_seconds": round(time.perf_counter() - t0, 2)}
    marker.write_text(json.dumps(info, indent=2))
    return base, adapter, info, True


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# ---------------------------------------------------------------- the PEFT baseline child

def peft_child(base: str, adapter: str, out: str) -> int:
    """transformers + PEFT, the way a user merges: load bf16, wrap, merge_and_unload, save_pretrained."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        print(f"the synthetic checkpoint did not load cleanly: {bad}", file=sys.stderr)
        return 1
    model = PeftModel.from_pretrained(model, adapter)
    merged = model.merge_and_unload()
    merged.save_pretrained(out)
    return 0


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


# ---------------------------------------------------------------- main

def summarize(runs: list[dict], base_bytes: int) -> dict:
    names = list(dict.fromkeys(r["name"] for r in runs))
    walls = {n: [r["wall_s"] for r in runs if r["name"] == n] for n in names}
    floor = statistics.median(walls["cp"]) if walls.get("cp") else None
    out = {}
    for n in names:
        rs = [r for r in runs if r["name"] == n]
        med = statistics.median(walls[n])
        rss = [r["peak_rss_bytes"] for r in rs]
        out[n] = {"runs": len(rs), "median_wall_s": round(med, 3), "min_wall_s": round(min(walls[n]), 3),
                  "max_wall_s": round(max(walls[n]), 3),
                  "ratio_vs_cp": round(med / floor, 3) if floor else None,
                  "peak_rss_mib": round(max(rss) / 2**20, 1), "median_peak_rss_mib": round(statistics.median(rss) / 2**20, 1),
                  "vmhwm_mib": round(max(r["vmhwm_bytes"] for r in rs) / 2**20, 1),
                  "gb_per_s": round(base_bytes / med / 1e9, 3),
                  "median_cpu_s": round(statistics.median(r["user_s"] + r["sys_s"] for r in rs), 2),
                  "median_minor_faults": statistics.median(r.get("minflt", 0) for r in rs),
                  "median_involuntary_switches": statistics.median(r.get("nivcsw", 0) for r in rs)}
    return out


def patched_bytes(base: Path, adapter: Path) -> int | None:
    """Bytes of the base tensors the merge patches (from its plan), or None if it cannot be planned here."""
    try:
        import stream_merge

        plan = stream_merge.plan(str(base), str(adapter))
        return sum(t.source.end - t.source.start for s in plan.shards for t in s.touched)
    except Exception as exc:  # noqa: BLE001 - a report line, not the benchmark
        print(f"patched bytes: not computed ({exc})", file=sys.stderr)
        return None


def cpu_per_patched_gb(summary: dict, patched: int | None) -> None:
    """Add and print the merge's CPU-seconds per GB of patched tensors: the command's median CPU time (user +
    sys) less the `startup` command's (Python + torch import) when measured, over the bytes the plan patches."""
    fixed = summary["startup"]["median_cpu_s"] if "startup" in summary else 0.0
    for name in ("stream-merge", "sm-checksums"):
        if name in summary and patched:
            value = (summary[name]["median_cpu_s"] - fixed) / (patched / 1e9)
            summary[name]["cpu_s_per_patched_gb"] = round(value, 3)
            print(f"CPU-seconds per patched GB ({name}): {value:.2f} ({human(patched)} patched; median CPU s"
                  f"{' less the startup median' if fixed else ''})")


def paired_ratio(runs: list[dict], name: str, against: str) -> dict | None:
    """`name`'s wall time over `against`'s in the same round, for every round that ran both, and their median
    (fairer than a ratio of medians while other work on the machine comes and goes); also the CPU seconds."""
    rounds: dict[int, dict[str, dict]] = {}
    for r in runs:
        rounds.setdefault(r["round"], {})[r["name"]] = r
    pairs = [(rs[name], rs[against]) for rs in rounds.values() if name in rs and against in rs]
    if not pairs:
        return None
    ratios = [round(a["wall_s"] / b["wall_s"], 3) for a, b in pairs]
    cpu = [(a["user_s"] + a["sys_s"]) - (b["user_s"] + b["sys_s"]) for a, b in pairs]
    return {"ratios": ratios, "median_ratio": round(statistics.median(ratios), 3),
            "median_cpu_s": round(statistics.median(cpu), 2)}


def table(summary: dict) -> str:
    lines = [f"{'command':<14} {'runs':>4} {'median wall s':>14} {'min..max s':>15} {'x cp':>7} {'peak RSS MiB':>13} "
             f"{'VmHWM MiB':>10} {'GB/s':>7} {'CPU s':>7}"]
    for n, s in summary.items():
        ratio = f"{s['ratio_vs_cp']:.2f}" if s["ratio_vs_cp"] is not None else "-"
        lines.append(f"{n:<14} {s['runs']:>4} {s['median_wall_s']:>14.2f} "
                     f"{s['min_wall_s']:>7.2f}..{s['max_wall_s']:<7.2f} {ratio:>7} {s['peak_rss_mib']:>13.0f} "
                     f"{s['vmhwm_mib']:>10.0f} {s['gb_per_s']:>7.3f} {s['median_cpu_s']:>7.1f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=parse_size("4.5GB"), help="checkpoint size (default 4.5GB)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=None, help="attention heads (default hidden/128, at least 1)")
    ap.add_argument("--kv-heads", type=int, default=None, help="KV heads (default = heads)")
    ap.add_argument("--shard-size", type=parse_size, default=parse_size("2GB"))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peft", action="store_true", help="also run the transformers+PEFT baseline (CPU)")
    ap.add_argument("--checksums", action="store_true", help="also run stream-merge --checksums (sha256 of every byte)")
    ap.add_argument("--digest-cost", action="store_true",
                    help="also run the merge as shipped (XXH3-128 of every output shard) and with the shard "
                         "writer hashing nothing")
    ap.add_argument("--verify", action="store_true",
                    help="also run `verify OUT` and `verify OUT --full` on an output merged before the rounds")
    ap.add_argument("--startup", action="store_true",
                    help="also run the fixed cost of any torch-based merge: start Python and import stream_merge.runner")
    ap.add_argument("--device", default="cpu", help="stream-merge --device (cpu, cuda, cuda:N, auto)")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help=f"default {DEFAULT_WORKDIR}")
    ap.add_argument("--json", type=Path, metavar="OUT.json", help="write every run and the summary here")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic inputs in WORKDIR for reuse")
    ap.add_argument("--peft-child", nargs=3, metavar=("BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.peft_child:
        return peft_child(*args.peft_child)
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    heads = args.heads or max(1, args.hidden // 128)
    if args.hidden % heads:
        raise SystemExit(f"--hidden {args.hidden} is not a multiple of --heads {heads}")
    kv_heads = args.kv_heads or heads
    if args.peft and not peft_available():
        print("--peft: peft/transformers are not importable here; skipping the PEFT baseline", file=sys.stderr)
        args.peft = False
    invocation = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) if argv is None else \
        " ".join(shlex.quote(a) for a in [sys.executable, str(SCRIPT), *argv])
    machine = machine_info()
    engine = engine_info()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    base, adapter, info, made = make_inputs(workdir, args.size, args.hidden, args.intermediate, args.vocab, heads,
                                            kv_heads, args.shard_size, args.rank)
    base_bytes = dir_bytes(base)
    patched = patched_bytes(base, adapter)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    q = shlex.quote
    commands = {
        "cp": f"cp -r {q(str(base))} {{out}} && sync",
        "stream-merge": " ".join(q(a) for a in stream_merge_cmd()) +
                        f" merge {q(str(base))} {q(str(adapter))} -o {{out}} --device {q(args.device)} --quiet && sync",
    }
    if args.checksums:
        commands["sm-checksums"] = commands["stream-merge"].replace(" --quiet", " --quiet --checksums")
    merge_args = f" merge {q(str(base))} {q(str(adapter))} -o {{out}} --device {q(args.device)} --quiet && sync"
    if args.digest_cost:
        commands["sm-digest"] = " ".join(q(a) for a in digest_cmd(True)) + merge_args
        commands["sm-no-digest"] = " ".join(q(a) for a in digest_cmd(False)) + merge_args
    verified = scratch / "verified"
    if args.verify:
        print("merging once for --verify ...", flush=True)
        made_out = measure(commands["stream-merge"].format(out=q(str(verified))), log=scratch / "verified.log")
        if made_out["rc"] != 0:
            raise SystemExit(f"the merge for --verify failed:\n{tail(scratch / 'verified.log')}")
        sm = " ".join(q(a) for a in stream_merge_cmd())
        commands["verify"] = f"{sm} verify {q(str(verified))} --quiet && mkdir {{out}}"
        commands["verify-full"] = f"{sm} verify {q(str(verified))} --full --quiet && mkdir {{out}}"
    if args.startup:
        commands["startup"] = f"{q(sys.executable)} -c 'import stream_merge.runner' && mkdir {{out}}"
    if args.peft:
        commands["peft"] = (f"{q(sys.executable)} {q(str(SCRIPT))} --peft-child {q(str(base))} {q(str(adapter))} "
                            "{out} && sync")
    free = shutil.disk_usage(workdir).free
    need = base_bytes * (2.2 if args.peft else 1.1)
    if free < need:
        raise SystemExit(f"not enough disk for one output in {workdir}: {free / 2**30:.1f} GiB free, "
                         f"{need / 2**30:.1f} GiB needed")
    print(f"machine: {machine_line(machine)}")
    print(f"model:   {human(base_bytes)} bf16, {info['params']['shape']}, {info['shards']} shard(s) of at most "
          f"{human(args.shard_size)}; adapter rank {args.rank} on q/k/v/o/gate/up/down ({human(info['adapter_bytes'])})")
    print(f"engine:  stream-merge {engine.get('version')} at {(engine.get('commit') or '?')[:12]} "
          f"({engine.get('uncommitted_files', '?')} uncommitted file(s) in stream_merge/, source "
          f"sha256 {engine.get('tree_sha256')}); load average {machine['loadavg']}")
    print(f"command: {invocation}", flush=True)
    names = list(commands)
    runs: list[dict] = []
    failed = None
    try:
        for rnd in range(args.repeats):
            order = names[rnd % len(names):] + names[:rnd % len(names)]  # rotate: no command is always first
            for name in order:
                dest = scratch / f"out-{name}"
                log = scratch / f"{name}.log"
                shutil.rmtree(dest, ignore_errors=True)
                os.sync()
                src = source_digest()
                r = measure(commands[name].format(out=q(str(dest))), log=log)
                r.update(name=name, round=rnd, engine_sha256=src, loadavg=loadavg())
                if src != source_digest():
                    r["engine_changed_during_run"] = True
                if r["rc"] != 0:
                    failed = (name, r["rc"], tail(log))
                    break
                if name not in ("cp", "startup", "verify", "verify-full") and not (dest / "model.safetensors.index.json").exists() and \
                        not (dest / "model.safetensors").exists():
                    failed = (name, "no checkpoint in the output", tail(log))
                    break
                runs.append(r)
                print(f"  round {rnd + 1}/{args.repeats} {name:<13} {r['wall_s']:8.2f} s  peak RSS "
                      f"{r['peak_rss_bytes'] / 2**20:8.0f} MiB  (VmHWM {r['vmhwm_bytes'] / 2**20:.0f} MiB)  load "
                      f"{(r['loadavg'] or ['?'])[0]}", flush=True)
                shutil.rmtree(dest, ignore_errors=True)
            if failed:
                break
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if made and not args.keep:
            shutil.rmtree(base.parent, ignore_errors=True)
    if failed:
        print(f"error: {failed[0]} failed ({failed[1]}):\n{failed[2]}", file=sys.stderr)
        return 1
    summary = summarize(runs, base_bytes)
    print()
    print(table(summary))
    cpu_per_patched_gb(summary, patched)
    paired = paired_ratio(runs, "sm-digest", "sm-no-digest")
    if paired:
        print(f"\ndigest cost: sm-digest / sm-no-digest wall, per round {paired['ratios']}, median "
              f"{paired['median_ratio']}; CPU +{paired['median_cpu_s']} s per merge (median of the rounds)")
    print(f"\nratios are medians against the median of `cp -r && sync` in this invocation; GB/s = base checkpoint "
          f"bytes / median wall; peak RSS = max over runs of the command tree's ru_maxrss (wait4 in a tiny wrapper)")
    print("commands ({out} is a fresh folder each run):")
    for n, c in commands.items():
        print(f"  {n}: {c}")
    machine["loadavg_end"] = loadavg()
    print(f"load average at the end: {machine['loadavg_end']} (other work on the machine skews wall times)")
    engines = sorted({r["engine_sha256"] for r in runs if r["name"] == "stream-merge"} - {None})
    if len(engines) > 1 or any(r.get("engine_changed_during_run") for r in runs):
        print(f"WARNING: stream_merge/ changed while measuring ({len(engines)} versions: {', '.join(engines)}); "
              "the stream-merge runs are not all of the same code")
    engine["versions_measured"] = engines
    result = {"machine": machine, "engine": engine, "invocation": invocation, "commands": commands,
              "params": {**info["params"], "size_arg": args.size, "shards": info["shards"], "base_bytes": base_bytes,
                         "adapter_bytes": info["adapter_bytes"], "device": args.device, "repeats": args.repeats,
                         "inputs_reused": not made},
              "runs": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in runs],
              "summary": summary, "digest_cost": paired}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
