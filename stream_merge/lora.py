"""LoRA delta formulas, bit-for-bit as PEFT computes them. Pure: tensors and numbers in, tensors out.

Every delta is computed in fp32 from exact fp32 copies of the factors, as two separate ops (`B @ A`, then
`* scale`) because fusing them (addmm, folded scales) changes the last bit (PEFT_SEMANTICS §0). A row block of
the delta is a row block of B (Linear) or a column block of A (Conv1D, Embedding): both reproduce the full
GEMM bitwise on CPU, which is what lets us merge a 128k-row lm_head in bounded memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


ROW_ALIGN = {"linear": 64, "bias": 64, "param": 64, "conv1d": 1024, "embedding": 1024}
WHOLE_TENSOR = {"conv"}  # kinds whose delta is computed for the whole tensor at once


def row_blocks(rows: int, want: int, kinds: Sequence[str], align: int = 1) -> list[tuple[int, int]]:
    """Split `rows` into blocks of about `want` rows that keep PEFT's bits.

    MKL takes other code paths for very thin GEMMs (a 1..9-wide last block, or GEMV for one row), which
    changes the last bit; so every block is a multiple of the kind's alignment and the last block absorbs
    the remainder instead of being thin. Row blocks of B (Linear) are safe from 64 rows, column blocks of A
    (Conv1D, Embedding) from 1024 columns at 1024-aligned offsets (measured: scripts/check_chunking.py).
    `align` adds a layout constraint (fp8 scale blocks).
    """
    if any(k in WHOLE_TENSOR for k in kinds):
        return [(0, rows)]
    align = math.lcm(align, max((ROW_ALIGN[k] for k in kinds), default=64))
    size = max(align, want // align * align)
    if rows < 2 * size:
        return [(0, rows)]
    starts = list(range(0, rows - size + 1, size))
    return list(zip(starts, starts[1:] + [rows]))


def conv_delta(a: torch.Tensor, b: torch.Tensor, scale: float, base_shape: Sequence[int]) -> torch.Tensor:
    """ConvNd delta exactly as PEFT computes it: a matmul for 1x1 Conv2d, else convNd(Aᵀ, B)ᵀ (einsum would
    differ by an ulp)."""
    if tuple(base_shape[2:4]) == (1, 1):
        return (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scale
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[len(base_shape)]
    return conv(a.transpose(0, 1), b).transpose(0, 1) * scale


def param_delta_rows(a: torch.Tensor, b: torch.Tensor, scale: float, experts: int, expert: int, row_offset: int,
                     r0: int, r1: int) -> torch.Tensor:
    """LoRA on a raw (E, out, in) parameter (PEFT's ParamWrapper) whose experts are stored one by one on disk:
    A reshapes expert-major to (E, r, in), B rank-major to (out, r, E), Δ[e] = B[:, :, e] @ A[e] * s (bitwise
    the same as PEFT's einsum); rows [r0, r1) of the target are rows row_offset+r0.. of Δ[expert]."""
    a3 = a.reshape(experts, -1, a.shape[-1])
    b3 = b.reshape(b.shape[0], -1, experts)
    return (b3[row_offset + r0:row_offset + r1, :, expert] @ a3[expert]) * scale


def param_delta_flat_rows(a: torch.Tensor, b: torch.Tensor, scale: float, experts: int, rows: int, r0: int,
                          r1: int, transposed: bool = False) -> torch.Tensor:
    """Rows [r0, r1) of the (E·out, in) view of a fused (E, out, in) parameter's delta: Δ[e] = B[:, :, e] @ A[e]
    * s per expert, as `param_delta_rows`, for the experts the rows touch (`rows` = out rows per expert).
    A block is whole experts or 64-aligned rows inside one expert (`expert_blocks`): both keep PEFT's bits.
    `transposed`: the parameter is (E, in, out) (GPT-OSS; PEFT's einsum "ore,eri->eio"), the view is
    (E·in, out) and its rows are rows of Δ[e]ᵀ = A[e]ᵀ @ B[:, :, e]ᵀ (the same bits as PEFT's einsum)."""
    a3 = a.reshape(experts, -1, a.shape[-1])
    b3 = b.reshape(b.shape[0], -1, experts)
    parts = []
    for e in range(r0 // rows, -(-r1 // rows)):
        lo, hi = max(r0, e * rows) - e * rows, min(r1, (e + 1) * rows) - e * rows
        if transposed:
            parts.append((a3[e][:, lo:hi].T @ b3[:, :, e].T) * scale)
        else:
            parts.append((b3[lo:hi, :, e] @ a3[e]) * scale)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def expert_blocks(experts: int, rows: int, want: int) -> list[tuple[int, int]]:
    """Row blocks of the (E·rows, in) view of a fused expert tensor, about `want` rows each: several whole
    experts when an expert is small, else `row_blocks` inside each expert (never across an expert boundary,
    so memory stays about one block however many experts there are)."""
    if rows == 0 or experts == 0:
        return [(0, experts * rows)]
    if rows <= want:
        group = max(1, want // rows)
        return [(e * rows, min(e + group, experts) * rows) for e in range(0, experts, group)]
    return [(e * rows + r0, e * rows + r1) for e in range(experts) for r0, r1 in row_blocks(rows, want, ["param"])]


def delta_rows(kind: str, a: torch.Tensor | None, b: torch.Tensor, scale: float, r0: int, r1: int) -> torch.Tensor:
    """Rows [r0, r1) of the fp32 delta, laid out like the base tensor.

    linear:    W (out, in),   ΔW = (B @ A) * s
    conv1d:    W (in, out),   ΔW = (B @ A).T * s          (HF Conv1D, fan_in_fan_out)
    embedding: W (vocab, d),  ΔW = (B_emb @ A_emb).T * s
    bias:      b (out,),      Δb = lora_B.bias * s
    ("conv" and "param" have their own functions: they need the base shape / expert layout.)
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


def dora_apply(kind: str, w: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA merge, op for op as PEFT: the norm of the unmerged W + ΔW per output channel (per embedding
    column for Embedding), W' = (m / norm) * (W + ΔW), rounded once to W's dtype. For "linear" the rows of
    `w`, `delta` and `magnitude` may be a row block: each row's norm only needs that row."""
    if kind == "linear":
        x = w + 1 * delta
        norm = torch.linalg.norm(x, dim=1).to(x.dtype)
        factor = (magnitude / norm).view(-1, 1)
    elif kind in ("conv1d", "embedding"):
        x = w.T + 1 * delta.T
        norm = torch.linalg.norm(x, dim=1).to(x.dtype)
        factor = (magnitude / norm).view(-1, 1).T if kind == "conv1d" else (magnitude / norm).view(1, -1)
    elif kind == "conv":
        norm = (w + 1 * delta).norm(p=2, dim=tuple(range(1, w.dim())), keepdim=True).transpose(1, 0)
        factor = (magnitude / norm).view(-1, *([1] * (w.dim() - 1)))
    else:
        raise ValueError(f"DoRA is not defined for {kind!r}")
    return (factor * (w + delta)).to(w.dtype)


def apply_delta(w: torch.Tensor, delta: torch.Tensor, double_round: bool) -> torch.Tensor:
    """Add an fp32 delta to a block of the base in its own dtype.

    Single rounding `(W.float() + Δ).to(T)` is what PEFT's in-place add does for Linear/Conv1D/bias;
    PEFT's Embedding merge rounds the delta first: `W + Δ.to(T)`.
    """
    if double_round:
        return w + delta.to(w.dtype)
    return (w.float() + delta).to(w.dtype)
