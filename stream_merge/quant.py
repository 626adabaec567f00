"""fp8 block quantization math (DeepSeek-V3 / Qwen3-FP8 / Kimi-K2 layout). Pure: tensors in, tensors out.

A weight is stored as float8_e4m3fn `q` with an fp32 `weight_scale_inv` holding one multiplier per
(bm x bn) block: W = q * s. Re-quantizing picks fresh scales s = amax(|W_block|) / 448, the largest e4m3fn
magnitude, so every block uses the full fp8 range.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def _expand(scale: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    bm, bn = block
    return scale.repeat_interleave(bm, dim=0)[:rows].repeat_interleave(bn, dim=1)[:, :cols]


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fp32 values of rows of an fp8 weight; `scale` holds the scale rows covering exactly those rows
    (the block starts on a multiple of bm)."""
    return q.float() * _expand(scale.float(), q.shape[0], q.shape[1], block)


def quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn values, fp32 scales) with one scale per block, scale = amax / 448 (1.0 for all-zero
    blocks, so that zeros stay zeros)."""
    bm, bn = block
    rows, cols = w.shape
    rb, cb = -(-rows // bm), -(-cols // bn)
    padded = torch.zeros(rb * bm, cb * bn, dtype=torch.float32, device=w.device)
    padded[:rows, :cols] = w
    amax = padded.abs().reshape(rb, bm, cb, bn).amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / _expand(scale, rows, cols, block)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale
