"""One prepared GPU benchmark: stream-merge `--device cuda` against the machine's read rate and PEFT's CUDA merge.

On a synthetic Llama-shaped bf16 checkpoint of about --size bytes and a rank --rank LoRA on q/k/v/o/gate/up/
down (made as in scripts/bench.py), in one invocation:

  read      `cat SHARDS > /dev/null`, twice (the first read may come from disk, the second from the page cache):
            the rate at which this machine can even look at the base
  merge     stream_merge.merge(BASE, ADAPTER, OUT, device=DEV) in this process (torch already imported), and
            the whole CLI process (`python -m stream_merge merge ... --device DEV && sync`), --repeats times
  peft      transformers + PEFT on DEV: from_pretrained (bf16), PeftModel.from_pretrained, merge_and_unload,
            each timed; TF32 off for matmuls and cuDNN (PEFT_SEMANTICS §0)
  parity    every tensor of the stream-merge output against PEFT's merged state dict, bit for bit

Prints a table and writes JSON (--json). Exit status 0 only if the merge matched PEFT bit for bit. Runs on the
CPU with `--device cpu` (the same steps; PEFT on the CPU), which is how it is known to work without a GPU.

    python scripts/bench_cuda.py [--device cuda] [--size 2GB] [--rank 16] [--repeats 3] [--workdir DIR]
                                 [--json OUT.json] [--keep] [--hidden 4096 --intermediate 11008 --vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (engine_info, human, machine_info, machine_line, make_inputs, measure,  # noqa: E402
                   parse_size, stream_merge_cmd)


def read_rate(base: Path) -> dict:
    """`cat` of the base's shards to /dev/null, twice: seconds and GB/s each time."""
    files = sorted(str(p) for p in base.glob("*.safetensors"))
    total = sum(os.path.getsize(f) for f in files)
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
        dt = time.perf_counter() - t0
        runs.append({"seconds": round(dt, 3), "gb_per_s": round(total / dt / 1e9, 3)})
    return {"bytes": total, "runs": runs}


def sync_device(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def merge_in_process(base: Path, adapter: Path, out: Path, device: str) -> float:
    """Seconds for one stream_merge.merge into a fresh `out`, flushed to disk (torch already imported)."""
    import stream_merge

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    stream_merge.merge(str(base), str(adapter), str(out), device=device)
    os.sync()
    return time.perf_counter() - t0


def peft_merge(base: Path, adapter: Path, device: str) -> tuple[dict, dict]:
    """(timings, merged state dict on the CPU): PEFT's merge_and_unload on `device`, TF32 off."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16).to(device)
    sync_device(device)
    t1 = time.perf_counter()
    model = PeftModel.from_pretrained(model, str(adapter))
    sync_device(device)
    t2 = time.perf_counter()
    merged = model.merge_and_unload()
    sync_device(device)
    t3 = time.perf_counter()
    state = {k: v.detach().to("cpu") for k, v in merged.state_dict().items()}
    times = {"load_base_s": t1 - t0, "load_adapter_s": t2 - t1, "merge_s": t3 - t2,
             "to_host_s": time.perf_counter() - t3}
    del model, merged
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {k: round(v, 3) for k, v in times.items()}, state


def parity(out: Path, expected: dict) -> dict:
    """Bitwise comparison of every output tensor with PEFT's (names PEFT does not hold, e.g. a tied head it
    does not save, are listed, not failed)."""
    import torch
    from safetensors import safe_open

    differ, missing, elements, bad = [], [], 0, 0
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                got = st.get_tensor(name)
                want = expected.get(name)
                if want is None:
                    missing.append(name)
                    continue
                elements += got.numel()
                if got.dtype != want.dtype or got.shape != want.shape:
                    differ.append(f"{name}: {got.dtype}{tuple(got.shape)} vs {want.dtype}{tuple(want.shape)}")
                    continue
                n = int((got.view(torch.uint8) != want.contiguous().view(torch.uint8)).sum())
                if n:
                    bad += n
                    differ.append(f"{name}: {n} byte(s) differ")
    return {"tensors_differ": differ, "not_in_peft": missing, "elements": elements, "bytes_differ": bad,
            "bitwise_equal": not differ and elements > 0}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    ap.add_argument("--size", type=parse_size, default=parse_size("2GB"), help="checkpoint size (default 2GB)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-size", type=parse_size, default=parse_size("1GB"))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-peft", action="store_true", help="skip the PEFT merge and the parity check")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "stream-merge-bench-cuda")
    ap.add_argument("--json", type=Path, metavar="OUT.json")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic inputs for the next run")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here (use --device cpu to check the script)", file=sys.stderr)
        return 2
    machine, engine = machine_info(), engine_info()
    args.workdir.mkdir(parents=True, exist_ok=True)
    heads = max(1, args.hidden // 128)
    base, adapter, info, made = make_inputs(args.workdir, args.size, args.hidden, args.intermediate, args.vocab,
                                            heads, heads, args.shard_size, args.rank)
    out = args.workdir / "out-stream-merge"
    print(f"machine: {machine_line(machine)}")
    print(f"model:   {human(info['base_bytes'])} bf16 {info['params']['shape']} in {info['shards']} shard(s); "
          f"rank-{args.rank} LoRA on q/k/v/o/gate/up/down; device {args.device}", flush=True)
    result: dict = {"machine": machine, "engine": engine, "device": args.device, "inputs": info}
    try:
        result["read"] = read_rate(base)
        print(f"read:    cat twice: {[r['gb_per_s'] for r in result['read']['runs']]} GB/s", flush=True)
        merge_in_process(base, adapter, out, args.device)  # warm-up: CUDA context, kernels, page cache
        inproc = [merge_in_process(base, adapter, out, args.device) for _ in range(args.repeats)]
        cli = " ".join(stream_merge_cmd()) + f" merge {base} {adapter} -o {out} --device {args.device} --quiet && sync"
        whole = []
        for _ in range(args.repeats):
            shutil.rmtree(out, ignore_errors=True)
            r = measure(cli)
            if r["rc"] != 0:
                print(f"error: the CLI merge failed (exit {r['rc']}): {cli}", file=sys.stderr)
                return 1
            whole.append(r)
        size = result["read"]["bytes"]
        med = statistics.median(inproc)
        result["merge"] = {"in_process_s": [round(t, 3) for t in inproc], "in_process_gb_per_s": round(size / med / 1e9, 3),
                           "cli_wall_s": [round(r["wall_s"], 3) for r in whole],
                           "cli_peak_rss_mib": round(max(r["peak_rss_bytes"] for r in whole) / 2**20),
                           "vs_warm_read": round(med / result["read"]["runs"][1]["seconds"], 2)}
        print(f"merge:   in process {human(size / med)}/s (median of {args.repeats}, "
              f"{result['merge']['vs_warm_read']}x the warm read); whole CLI {result['merge']['cli_wall_s']} s, "
              f"peak RSS {result['merge']['cli_peak_rss_mib']} MiB", flush=True)
        if not args.no_peft:
            times, state = peft_merge(base, adapter, args.device)
            result["peft"] = times
            print(f"peft:    {times}", flush=True)
            result["parity"] = parity(out, state)
            p = result["parity"]
            print(f"parity:  {'bitwise equal' if p['bitwise_equal'] else 'DIFFERENT'} over {p['elements']} elements"
                  f"{'; ' + '; '.join(p['tensors_differ'][:5]) if p['tensors_differ'] else ''}"
                  f"{'; not in PEFT: ' + ', '.join(p['not_in_peft']) if p['not_in_peft'] else ''}", flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if made and not args.keep:
            shutil.rmtree(base.parent, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0 if args.no_peft or result["parity"]["bitwise_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
