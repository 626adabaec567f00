"""Does this machine's BLAS give the same bits for a blocked LoRA delta as for the full GEMM PEFT computes?

Random shapes; for each kind the delta is computed whole and in stream-merge's row blocks
(stream_merge.lora.row_blocks) and compared with torch.equal. Also shows what naive blocking (fixed step,
thin last block) would do. Exit 1 if stream-merge's blocking ever differs.

    python scripts/check_chunking.py [--trials 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import random

import torch

from stream_merge.lora import delta_rows, row_blocks


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    ours = naive = 0
    for _ in range(args.trials):
        kind = rnd.choice(["linear", "conv1d", "embedding"])
        r = rnd.choice([1, 2, 4, 8, 12, 16, 24, 32, 64, 128])
        rows, cols = rnd.randint(2, 40000), rnd.randint(16, 4096)
        want = rnd.choice([16, 64, 100, 1000, 1024, 4096])
        if kind == "linear":
            a, b = torch.randn(r, cols, generator=g), torch.randn(rows, r, generator=g)
        else:
            a, b = torch.randn(r, rows, generator=g), torch.randn(cols, r, generator=g)
        full = delta_rows(kind, a, b, 1.5, 0, rows)
        mine = torch.cat([delta_rows(kind, a, b, 1.5, r0, r1) for r0, r1 in row_blocks(rows, want, [kind])])
        plain = torch.cat([delta_rows(kind, a, b, 1.5, r0, min(rows, r0 + want)) for r0 in range(0, rows, want)])
        ours += not torch.equal(mine, full)
        naive += not torch.equal(plain, full)
    print(f"{args.trials} random deltas: stream-merge blocking differs in {ours}, naive fixed-step blocking in {naive}")
    return 1 if ours else 0


if __name__ == "__main__":
    raise SystemExit(main())
