"""Golden math: hand-computed matrices for every formula, and the block decomposition is exact."""

from __future__ import annotations

import pytest
import torch

from stream_merge.lora import apply_delta, combine, delta_rows, row_blocks

A = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])          # r=2, in=3
B = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, -1.0], [1.0, 3.0]])  # out=4, r=2
BA = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 4.0], [0.0, -1.0, 1.0], [1.0, 3.0, -1.0]])


def test_linear_delta_is_b_at_a_times_scale() -> None:
    assert torch.equal(B @ A, BA)
    assert torch.equal(delta_rows("linear", A, B, 0.5, 0, 4), BA * 0.5)
    assert torch.equal(delta_rows("linear", A, B, 0.5, 1, 3), BA[1:3] * 0.5)


def test_conv1d_and_embedding_deltas_are_transposed() -> None:
    for kind in ("conv1d", "embedding"):
        assert torch.equal(delta_rows(kind, A, B, 2.0, 0, 3), BA.T * 2.0)
        assert torch.equal(delta_rows(kind, A, B, 2.0, 2, 3), BA.T[2:3] * 2.0)


def test_bias_delta() -> None:
    bias = torch.tensor([1.0, -2.0, 4.0])
    assert torch.equal(delta_rows("bias", None, bias, 0.25, 0, 3), torch.tensor([0.25, -0.5, 1.0]))


def test_single_rounding_vs_double_rounding_in_bf16() -> None:
    w = torch.tensor([1.0], dtype=torch.bfloat16)
    d = torch.tensor([2.0**-8 * (1 + 2.0**-9)])  # just over half an ulp of 1.0 in bf16 (ulp = 2^-7)
    single = apply_delta(w, d, double_round=False)
    double = apply_delta(w, d, double_round=True)
    assert single.dtype == torch.bfloat16 and single.item() == 1.0078125   # 1 + d rounds up, once
    assert double.item() == 1.0   # d rounds to 2^-8 first; 1 + 2^-8 is a tie and rounds to even (1.0)
    assert torch.equal(apply_delta(w.float(), d, False), w.float() + d)


def test_combine_weights_in_fp32() -> None:
    d1, d2 = torch.tensor([1.0, 2.0]), torch.tensor([4.0, -4.0])
    assert combine([(d1, 1.0)]) is d1
    assert torch.equal(combine([(d1, 0.5), (d2, 0.25)]), torch.tensor([1.5, 0.0]))


def test_row_blocks_are_aligned_and_never_thin() -> None:
    assert row_blocks(100, 64, ["linear"]) == [(0, 100)]
    assert row_blocks(200, 64, ["linear"]) == [(0, 64), (64, 128), (128, 200)]   # no 8-row tail
    assert row_blocks(5000, 100, ["linear"]) == [(r, r + 64) for r in range(0, 4928 - 64 + 1, 64)] + [(4928, 5000)]
    blocks = row_blocks(70000, 3000, ["embedding"])
    assert all(r0 % 1024 == 0 for r0, _ in blocks) and blocks[-1][1] == 70000
    assert all(r1 - r0 >= 2048 for r0, r1 in blocks)
    assert row_blocks(10, 1, []) == [(0, 10)]


@pytest.mark.parametrize("kind,rows,cols,want", [
    ("linear", 3209, 300, 64),      # a plain 64-step split leaves a 9-row tail, which MKL computes differently
    ("linear", 4460, 1000, 100),
    ("conv1d", 29697, 1024, 1024),  # a 1024-step split leaves a 1-column tail
    ("embedding", 906, 4096, 64),
])
def test_row_blocks_reproduce_the_full_delta_bitwise(kind: str, rows: int, cols: int, want: int) -> None:
    g = torch.Generator().manual_seed(0)
    r, s = 8, 24 / 16
    if kind == "linear":
        a, b = torch.randn(r, cols, generator=g), torch.randn(rows, r, generator=g)
        ref = (b @ a) * s
    else:
        a, b = torch.randn(r, rows, generator=g), torch.randn(cols, r, generator=g)
        ref = (b @ a).T * s
    blocks = torch.cat([delta_rows(kind, a, b, s, r0, r1) for r0, r1 in row_blocks(rows, want, [kind])])
    assert torch.equal(blocks, ref)
