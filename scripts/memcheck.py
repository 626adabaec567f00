"""The memory acceptance check: "merging a synthetic checkpoint with 1 GiB shards keeps peak RSS under 700 MiB".

Makes a synthetic Llama-shaped bf16 checkpoint (shards of at most --shard-size) and a rank-16 LoRA adapter on
q/k/v/o/gate/up/down, runs `stream-merge merge BASE ADAPTER -o OUT --device cpu --quiet` as a whole subprocess
and measures its peak RSS from outside (ru_maxrss through a tiny wrapper, as scripts/bench.py does; it
includes file-backed mapped pages, like VmHWM, and a floor of about 10 MiB from the wrapper interpreter).
Prints the figure and the wall time; exit 1 when the peak is over --limit-mib.

--scaling also merges with shard size 2S (same model) and model size 2M (same shards) and prints how the
peak changes; the target is less than --max-growth (15%) growth for both, else exit 1.

--pickle merges the same checkpoint re-saved as PyTorch pickle shards (`pytorch_model-0000i-of-0000n.bin`
written by torch.save, with `pytorch_model.bin.index.json`) with --allow-pickle: the .bin shards are read
tensor by tensor, so the peak must stay about that of the safetensors merge (issue 15: a shard of >= 1 GB).

--max-shard-size SIZE re-shards the output (stream-merge's --max-shard-size): with S > SIZE each base shard is
split, with S < SIZE base shards are joined; the peak must stay that of a plain merge (no whole shard in RAM).

--moe E,OUT,IN instead merges one fused MoE expert tensor (E, OUT, IN) in bf16 (default 128,2048,2048: 1 GiB,
a Qwen3-30B-A3B-sized gate_up_proj) with a rank-16 `target_parameters` adapter: the tensor must be blocked inside
experts, so the peak stays about that of a plain merge, not a block of 64 experts.

    python scripts/memcheck.py [--shard-size 1GiB] [--size 3GiB] [--limit-mib 700] [--scaling]
                               [--hidden 4096 --intermediate 11008 --vocab 32000] [--rank 16]
                               [--max-shard-size SIZE] [--moe [E,OUT,IN]] [--pickle] [--workdir DIR]
                               [--json OUT.json] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (DEFAULT_WORKDIR, engine_info, human, loadavg, machine_info, machine_line,  # noqa: E402
                   make_inputs, measure, parse_size, source_digest, stream_merge_cmd, tail)


def merge_command(args: argparse.Namespace, base: Path, adapter: Path, workdir: Path) -> tuple[str, Path, Path]:
    """The measured `stream-merge merge` command line, its (not yet existing) output folder and its log."""
    out = Path(tempfile.mkdtemp(prefix="memcheck-out-", dir=workdir))
    shutil.rmtree(out)
    q = shlex.quote
    cmd = (" ".join(q(a) for a in stream_merge_cmd()) + f" merge {q(str(base))} {q(str(adapter))} -o {q(str(out))} "
           f"--device {q(args.device)} --quiet" + (f" --block-size-mb {args.block_size_mb}" if args.block_size_mb else "")
           + (" --allow-pickle" if getattr(args, "pickle", False) else "")
           + (f" --max-shard-size {q(args.max_shard_size)}" if getattr(args, "max_shard_size", None) else ""))
    return cmd, out, workdir / "memcheck-merge.log"


def pickle_base(base: Path) -> Path:
    """`base` re-saved with torch.save, shard by shard (one shard in memory at a time), as transformers 4 wrote
    sharded .bin checkpoints: `pytorch_model-0000i-of-0000n.bin` and `pytorch_model.bin.index.json`. Made once
    next to `base` (a marker file last) and removed with it."""
    import torch
    from safetensors.torch import load_file

    out = base.parent / "base-bin"
    if (out / "complete").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    index = json.loads((base / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    names = {s: f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin" for i, s in enumerate(shards)}
    for s in shards:
        state = load_file(str(base / s))
        torch.save(state, out / names[s])
        del state
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": index.get("metadata", {}), "weight_map": {k: names[v] for k, v in index["weight_map"].items()}}))
    for p in base.iterdir():
        if p.suffix == ".json" and p.name != "model.safetensors.index.json":
            shutil.copy(p, out / p.name)
    (out / "complete").write_text("")
    return out


def one(args: argparse.Namespace, size: int, shard: int, workdir: Path) -> dict:
    heads = args.heads or max(1, args.hidden // 128)
    base, adapter, info, made = make_inputs(workdir, size, args.hidden, args.intermediate, args.vocab, heads, heads,
                                            shard, args.rank)
    if args.pickle:
        base = pickle_base(base)
    weights = [p.stat().st_size for p in base.iterdir() if p.suffix in (".bin", ".safetensors")]
    largest = max(weights)
    cmd, out, log = merge_command(args, base, adapter, workdir)
    try:
        src = source_digest()
        r = measure(cmd, log=log)
        ok_out = (out / "model.safetensors.index.json").exists()
        out_shards = len(list(out.glob("*.safetensors")))
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if made and not args.keep:
            shutil.rmtree(base.parent, ignore_errors=True)
    if r["rc"] != 0 or not ok_out:
        raise SystemExit(f"the merge failed (exit {r['rc']}):\n{tail(log)}")
    log.unlink(missing_ok=True)
    res = {"size_arg": size, "shard_size": shard, "base_bytes": sum(weights), "shards": info["shards"],
           "layers": info["params"]["shape"]["layers"], "largest_shard_bytes": largest,
           "max_shard_size": args.max_shard_size, "out_shards": out_shards,
           "format": "pickle (.bin)" if args.pickle else "safetensors", "command": cmd, "wall_s": round(r["wall_s"], 3),
           "peak_rss_mib": round(r["peak_rss_bytes"] / 2**20, 1), "vmhwm_mib": round(r["vmhwm_bytes"] / 2**20, 1),
           "cpu_s": round(r["user_s"] + r["sys_s"], 2), "engine_sha256": src, "loadavg": loadavg()}
    print(f"  {human(res['base_bytes']):>10} in {res['shards']} {res['format']} shard(s) (largest "
          f"{human(largest)}): peak RSS "
          f"{res['peak_rss_mib']:7.1f} MiB (VmHWM {res['vmhwm_mib']:.1f}), wall {res['wall_s']:.1f} s"
          + (f", re-sharded into {out_shards} shard(s) of <= {args.max_shard_size}" if args.max_shard_size else ""),
          flush=True)
    return res


def make_moe_inputs(workdir: Path, experts: int, rows: int, cols: int, rank: int) -> tuple[Path, Path]:
    """A single-file base holding one fused (E, OUT, IN) bf16 expert tensor (written expert by expert, so
    making it needs one expert of memory) and a target_parameters LoRA adapter for it."""
    import torch
    from safetensors.torch import save_file

    from stream_merge.fileio import AtomicFile
    from stream_merge.safetensors_io import header_bytes
    from stream_merge.torch_dtypes import tensor_bytes

    root = workdir / f"moe-{experts}x{rows}x{cols}-r{rank}"
    base, adapter = root / "base", root / "adapter"
    if (root / "complete").exists():
        return base, adapter
    shutil.rmtree(root, ignore_errors=True)
    base.mkdir(parents=True)
    adapter.mkdir()
    name = "model.layers.0.mlp.experts.gate_up_proj"
    nbytes = experts * rows * cols * 2
    g = torch.Generator().manual_seed(0)
    with AtomicFile(base / "model.safetensors") as f:
        f.write(header_bytes([(name, "BF16", (experts, rows, cols), 0, nbytes)], {"format": "pt"}))
        for _ in range(experts):
            f.write(tensor_bytes((torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)))
        f.commit()
    (base / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "hidden_size": cols,
                                                  "num_experts": experts, "moe_intermediate_size": rows // 2}))
    save_file({"base_model.model.model.layers.0.mlp.experts.lora_A.weight":
               torch.randn(rank * experts, cols, generator=g) * 0.01,
               "base_model.model.model.layers.0.mlp.experts.lora_B.weight":
               torch.randn(rows, rank * experts, generator=g) * 0.01},
              str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": [],
        "target_parameters": ["mlp.experts.gate_up_proj"]}))
    (root / "complete").write_text("")
    return base, adapter


def one_moe(args: argparse.Namespace, workdir: Path) -> dict:
    """Merge the fused-MoE case and measure it like `one`."""
    experts, rows, cols = args.moe
    base, adapter = make_moe_inputs(workdir, experts, rows, cols, args.rank)
    cmd, out, log = merge_command(args, base, adapter, workdir)
    try:
        r = measure(cmd, log=log)
        ok_out = (out / "model.safetensors.index.json").exists() or (out / "model.safetensors").exists()
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(base.parent, ignore_errors=True)
    if r["rc"] != 0 or not ok_out:
        raise SystemExit(f"the merge failed (exit {r['rc']}):\n{tail(log)}")
    log.unlink(missing_ok=True)
    tensor = experts * rows * cols * 2
    res = {"moe": [experts, rows, cols], "tensor_bytes": tensor, "base_bytes": tensor, "shards": 1, "command": cmd,
           "wall_s": round(r["wall_s"], 3), "peak_rss_mib": round(r["peak_rss_bytes"] / 2**20, 1),
           "vmhwm_mib": round(r["vmhwm_bytes"] / 2**20, 1), "cpu_s": round(r["user_s"] + r["sys_s"], 2),
           "engine_sha256": source_digest(), "loadavg": loadavg()}
    print(f"  fused MoE tensor ({experts}, {rows}, {cols}) bf16, {human(tensor)}: peak RSS {res['peak_rss_mib']:7.1f} MiB "
          f"(VmHWM {res['vmhwm_mib']:.1f}), wall {res['wall_s']:.1f} s", flush=True)
    return res


def _moe_shape(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--moe wants E,OUT,IN (three positive integers), got {text!r}")
    e, o, i = (int(p) for p in parts)
    return e, o, i


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shard-size", type=parse_size, default=parse_size("1GiB"))
    ap.add_argument("--size", type=parse_size, default=parse_size("3GiB"), help="model size M (default 3GiB)")
    ap.add_argument("--limit-mib", type=float, default=700.0)
    ap.add_argument("--scaling", action="store_true", help="also run with 2x shard size and 2x model size")
    ap.add_argument("--max-growth", type=float, default=0.15, help="--scaling target (default 0.15 = 15%%)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=None, help="default hidden/128")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--block-size-mb", type=int, default=None, help="pass --block-size-mb to stream-merge")
    ap.add_argument("--max-shard-size", default=None, metavar="SIZE",
                    help="pass --max-shard-size SIZE to stream-merge (re-shard the output)")
    ap.add_argument("--moe", type=_moe_shape, nargs="?", const=(128, 2048, 2048), default=None, metavar="E,OUT,IN",
                    help="merge one fused MoE expert tensor of this shape instead (default 128,2048,2048: 1 GiB)")
    ap.add_argument("--pickle", action="store_true",
                    help="merge the checkpoint re-saved as torch.save .bin shards, with --allow-pickle")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--json", type=Path, metavar="OUT.json")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic inputs for reuse")
    args = ap.parse_args(argv)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    engine = engine_info()
    print(f"machine: {machine_line(machine)}")
    print(f"engine:  stream-merge {engine.get('version')} at {str(engine.get('commit'))[:12]} "
          f"({engine.get('uncommitted_files', '?')} uncommitted file(s) in stream_merge/, source sha256 "
          f"{engine.get('tree_sha256')}); load average {machine['loadavg']}")
    print(f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *(sys.argv if argv is None else ['memcheck.py', *argv])])}")
    if args.moe:
        print(f"memcheck: fused MoE tensor {args.moe}, limit {args.limit_mib:g} MiB", flush=True)
        runs = {"moe": one_moe(args, workdir)}
    else:
        print(f"memcheck: shard size S={human(args.shard_size)}, model size M={human(args.size)}, "
              f"limit {args.limit_mib:g} MiB", flush=True)
        runs = {"S,M": one(args, args.size, args.shard_size, workdir)}
    if args.scaling and not args.moe:
        runs["2S,M"] = one(args, args.size, 2 * args.shard_size, workdir)
        runs["S,2M"] = one(args, 2 * args.size, args.shard_size, workdir)
    failures = [f"{k}: peak RSS {r['peak_rss_mib']:.1f} MiB > {args.limit_mib:g} MiB"
                for k, r in runs.items() if r["peak_rss_mib"] > args.limit_mib]
    growth = {}
    if args.scaling:
        ref = runs["S,M"]["peak_rss_mib"]
        for k, label in (("2S,M", "shard size x2"), ("S,2M", "model size x2")):
            g = runs[k]["peak_rss_mib"] / ref - 1
            growth[k] = round(g, 4)
            print(f"  {label}: peak RSS {ref:.1f} -> {runs[k]['peak_rss_mib']:.1f} MiB ({g:+.1%}, target < "
                  f"{args.max_growth:.0%})")
            if g >= args.max_growth:
                failures.append(f"{label}: peak RSS grew {g:+.1%} (target < {args.max_growth:.0%})")
    main_run = runs["moe" if args.moe else "S,M"]
    print(f"peak RSS {main_run['peak_rss_mib']:.1f} MiB (limit {args.limit_mib:g} MiB), wall {main_run['wall_s']:.1f} s "
          f"for {human(main_run['base_bytes'])}: {'FAIL' if failures else 'PASS'}")
    for f in failures:
        print(f"  FAIL {f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "engine": engine, "limit_mib": args.limit_mib, "runs": runs,
                                         "growth": growth, "max_growth": args.max_growth, "passed": not failures,
                                         "failures": failures}, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
