"""LoRA delta formulas, bit-for-bit as PEFT computes them. Pure: tensors and numbers in, tensors out.

Every delta is computed in fp32 from exact fp32 copies of the factors, as two separate ops (`B @ A`, then
`* scale`) because fusing them (addmm, folded scales) changes the last bit (PEFT_SEMANTICS §0). A row block of
the delta is a row block of B (Linear) or a column block of A (Conv1D, Embedding): both reproduce the full
GEMM bitwise on CPU, which is what lets us merge a 128k-row lm_head in bounded memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


ROW_ALIGN = {"linear": 64, "bias": 64, "conv1d": 1024, "embedding": 1024}


def row_blocks(rows: int, want: int, kinds: Sequence[str]) -> list[tuple[int, int]]:
    """Split `rows` into blocks of about `want` rows that keep PEFT's bits.

    MKL takes other code paths for very thin GEMMs (a 1..9-wide last block, or GEMV for one row), which
    changes the last bit; so every block is a multiple of the kind's alignment and the last block absorbs
    the remainder instead of being thin. Row blocks of B (Linear) are safe from 64 rows, column blocks of A
    (Conv1D, Embedding) from 1024 columns at 1024-aligned offsets (measured: scripts/check_chunking.py).
    """
    align = max((ROW_ALIGN[k] for k in kinds), default=64)
    size = max(align, want // align * align)
    if rows < 2 * size:
        return [(0, rows)]
    starts = list(range(0, rows - size + 1, size))
    return list(zip(starts, starts[1:] + [rows]))


def delta_rows(kind: str, a: torch.Tensor | None, b: torch.Tensor, scale: float, r0: int, r1: int) -> torch.Tensor:
    """Rows [r0, r1) of the fp32 delta, laid out like the base tensor.

    linear:    W (out, in),   ΔW = (B @ A) * s
    conv1d:    W (in, out),   ΔW = (B @ A).T * s          (HF Conv1D, fan_in_fan_out)
    embedding: W (vocab, d),  ΔW = (B_emb @ A_emb).T * s
    bias:      b (out,),      Δb = lora_B.bias * s
    """
    if kind == "linear":
        assert a is not None
        return (b[r0:r1] @ a) * scale
    if kind in ("conv1d", "embedding"):
        assert a is not None
        return (b @ a[:, r0:r1]).T * scale
    if kind == "bias":
        return b[r0:r1] * scale
    raise ValueError(f"unknown LoRA kind {kind!r}")


def combine(deltas: Sequence[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """Σ wᵢ·ΔWᵢ in fp32. A single delta with weight 1 is returned untouched (keeps PEFT's bits)."""
    if len(deltas) == 1 and deltas[0][1] == 1.0:
        return deltas[0][0]
    total = torch.zeros_like(deltas[0][0])
    for d, w in deltas:
        total += d * w if w != 1.0 else d
    return total


def apply_delta(w: torch.Tensor, delta: torch.Tensor, double_round: bool) -> torch.Tensor:
    """Add an fp32 delta to a block of the base in its own dtype.

    Single rounding `(W.float() + Δ).to(T)` is what PEFT's in-place add does for Linear/Conv1D/bias;
    PEFT's Embedding merge rounds the delta first: `W + Δ.to(T)`.
    """
    if double_round:
        return w + delta.to(w.dtype)
    return (w.float() + delta).to(w.dtype)
