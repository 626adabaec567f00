"""torch's dtypes for safetensors dtype codes, and a tensor's raw bytes (the torch half of `safetensors_io`,
kept apart so that reading headers and planning never import torch)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

TORCH_DTYPES: Mapping[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
DTYPE_CODES: Mapping[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}


def tensor_bytes(t: torch.Tensor) -> bytearray:
    """A tensor's raw little-endian bytes in a fresh buffer (no numpy needed, works for bf16/fp8)."""
    flat = t.contiguous().reshape(-1).view(torch.uint8)
    buf = bytearray(flat.numel())
    if buf:
        torch.frombuffer(buf, dtype=torch.uint8).copy_(flat)
    return buf
