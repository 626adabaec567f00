"""fp8 block-scaled bases against the bf16 path: the same Llama-shaped model stored as DeepSeek-style fp8
(128x128 block scales) and as bf16, the same LoRA; whole `stream-merge merge` processes, alternating rounds,
medians, reported as ratios to the bf16 merge. Also reports the re-quantization error of the default mode in
fp8 steps of the fp32 target, and checks --dequantize against W·s + ΔW.

    python scripts/bench_fp8.py [--layers 4] [--repeats 3] [--workdir DIR] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from stream_merge.quant import dequantize, quantize
from stream_merge.synthetic import LlamaShape, write_adapter

BLOCK = (128, 128)


def make(root: Path, shape: LlamaShape, fp8: bool) -> Path:
    g = torch.Generator().manual_seed(0)
    wmap, shard, n = {}, {}, 0
    out = root / ("fp8" if fp8 else "bf16")
    out.mkdir(parents=True)
    tensors = shape.tensors()
    for i, (name, shp) in enumerate(tensors):
        w = torch.randn(shp, generator=g) * 0.02 if len(shp) == 2 else torch.ones(shp)
        if fp8 and len(shp) == 2 and "embed" not in name and "lm_head" not in name:
            q, s = quantize(w, BLOCK)
            shard[name], shard[name + "_scale_inv"] = q, s
        else:
            shard[name] = (dequantize(*quantize(w, BLOCK), BLOCK) if len(shp) == 2 else w).to(torch.bfloat16)
        if sum(t.numel() * t.element_size() for t in shard.values()) > 500_000_000 or i == len(tensors) - 1:
            n += 1
            fname = f"model-{n:05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            wmap.update({k: fname for k in shard})
            shard = {}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    cfg = shape.config("BF16")
    if fp8:
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": list(BLOCK)}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def merge(base: Path, adapter: Path, out: Path, *extra: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "stream_merge", "merge", str(base), str(adapter), "-o", str(out),
                    "--quiet", *extra], check=True)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - t0


def load(folder: Path, name: str) -> torch.Tensor:
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            if name in st.keys():
                return st.get_tensor(name)
    raise KeyError(name)


def errors(base: Path, adapter: Path, requant: Path, dequant: Path, name: str) -> dict[str, float]:
    mod = "base_model.model." + name[: -len(".weight")]
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as st:
        delta = (st.get_tensor(mod + ".lora_B.weight") @ st.get_tensor(mod + ".lora_A.weight")) * 2.0
    target = dequantize(load(base, name), load(base, name + "_scale_inv"), BLOCK) + delta
    q, s = load(requant, name), load(requant, name + "_scale_inv")
    v = target / dequantize(torch.ones_like(q, dtype=torch.float32), s, BLOCK)
    step = torch.exp2(torch.floor(torch.log2(v.abs().clamp(min=2.0**-6))) - 3)
    steps = ((q.float() - v).abs() / step)
    got = dequantize(q, s, BLOCK)
    return {"max_error_in_fp8_steps": float(steps.max()), "mean_error_in_fp8_steps": float(steps.mean()),
            "rel_rms_error": float((got - target).norm() / target.norm()),
            "dequantize_equals_reference": bool(torch.equal(load(dequant, name), target.to(torch.bfloat16)))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/stream-merge-bench-fp8")
    ap.add_argument("--json")
    args = ap.parse_args()
    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    shape = LlamaShape(layers=args.layers)
    fp8, bf16 = make(root, shape, True), make(root, shape, False)
    adapter = write_adapter(root / "adapter", shape, r=16, alpha=32)
    runs: dict[str, list[float]] = {"bf16": [], "fp8 requant": [], "fp8 --dequantize": []}
    cases = {"bf16": (bf16, ()), "fp8 requant": (fp8, ()), "fp8 --dequantize": (fp8, ("--dequantize",))}
    for rnd in range(args.repeats):
        order = list(cases) if rnd % 2 == 0 else list(reversed(cases))
        for name in order:
            base, extra = cases[name]
            out = root / f"out-{name.replace(' ', '_')}"
            runs[name].append(merge(base, adapter, out, *extra))
            if rnd < args.repeats - 1:
                shutil.rmtree(out)
    med = {k: statistics.median(v) for k, v in runs.items()}
    err = errors(fp8, adapter, root / "out-fp8_requant", root / "out-fp8_--dequantize",
                 "model.layers.0.mlp.down_proj.weight")
    for k, v in med.items():
        print(f"{k:18s} median {v:7.2f} s  x{v / med['bf16']:.2f} of the bf16 merge")
    print("re-quantization (model.layers.0.mlp.down_proj): " + ", ".join(f"{k} {v}" for k, v in err.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "medians": med, "errors": err}, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
