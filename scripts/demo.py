"""Make a small Llama-shaped checkpoint and a PEFT-format LoRA adapter (no network), merge them with the
stream-merge CLI, and check one merged tensor against W + (alpha/r)·B·A computed directly.

    python scripts/demo.py [OUT_DIR]      # default: ./demo-out
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from stream_merge.cli import main as cli
from stream_merge.synthetic import LlamaShape, write_adapter, write_checkpoint


def tensor(folder: Path, name: str) -> torch.Tensor:
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            if name in st.keys():
                return st.get_tensor(name)
    raise KeyError(name)


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-out")
    shutil.rmtree(root, ignore_errors=True)
    shape = LlamaShape(hidden=256, intermediate=688, layers=4, vocab=1024, heads=8, kv_heads=4)
    shards = write_checkpoint(root / "base", shape, dtype="BF16", max_shard_bytes=1_500_000)
    write_adapter(root / "adapter", shape, r=16, alpha=24.0, base_name=str(root / "base"))
    print(f"made {root / 'base'} ({len(shards)} shards, {shape.nbytes() / 1e6:.1f} MB bf16) and a LoRA adapter "
          f"(r=16, alpha=24) in {root / 'adapter'}")
    argv = ["merge", str(root / "base"), str(root / "adapter"), "-o", str(root / "merged"), "--device", "cpu"]
    print("$ stream-merge " + " ".join(argv))
    rc = cli(argv)
    if rc:
        return rc
    name = "model.layers.2.self_attn.q_proj.weight"
    key = "base_model.model.model.layers.2.self_attn.q_proj"
    w = tensor(root / "base", name)
    with safe_open(str(root / "adapter" / "adapter_model.safetensors"), "pt") as st:
        a, b = st.get_tensor(key + ".lora_A.weight"), st.get_tensor(key + ".lora_B.weight")
    expected = (w.float() + (b @ a) * (24.0 / 16)).to(w.dtype)
    ok = torch.equal(tensor(root / "merged", name), expected)
    print(f"check {name}: merged == (W + 1.5·B·A) in bf16: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
