"""Each merge recipe on its own: hand-checkable matrices against PEFT_SEMANTICS' formulas, bitwise against
the reference `lora.apply_delta` and the whole-tensor computations the blocked paths replace."""

from __future__ import annotations

import pytest
import torch

from stream_merge.lora import apply_delta, expert_blocks, param_delta_flat_rows, row_blocks
from stream_merge.quant import dequantize, quantize
from stream_merge.recipes import (Recipe, add_delta, add_rounded_delta, choose_recipe, dora_rows, factor_delta,
                                  fp8_encode, fp8_merge, one_delta, replace_rows, sum_delta)
from stream_merge.records import LoraPatch, QuantSpec, Replacement, TensorInfo, TensorPlan

CPU = torch.device("cpu")
HALF_ULP_PLUS = 2.0**-8 * (1 + 2.0**-9)  # just over half an ulp of 1.0 in bf16 (ulp = 2^-7)


def _patch(kind: str = "linear", weight: float = 1.0, double: bool = False, magnitude: str | None = None,
           **kw: object) -> LoraPatch:
    return LoraPatch(module="m", target="m.weight", kind=kind, adapter=0, a_key="a", b_key="b", rank=2, alpha=2.0,
                     scale=kw.pop("scale", 1.0), weight=weight, double_round=double,  # type: ignore[arg-type]
                     magnitude_key=magnitude, **kw)  # type: ignore[arg-type]


def _tp(shape: tuple[int, ...] = (4, 3), patches: tuple[LoraPatch, ...] = (), replace: bool = False,
        quant: QuantSpec | None = None) -> TensorPlan:
    src = TensorInfo("m.weight", "BF16", shape, 0, 2 * max(1, len(shape) and shape[0] * shape[-1]))
    rep = Replacement("m.weight", 0, "k", "modules_to_save", shape) if replace else None
    return TensorPlan("m.weight", "BF16", shape, src, replace=rep, patches=patches, quant=quant)


def _factors(patches: tuple[LoraPatch, ...], scale: float = 1.0) -> list:
    return [(p, torch.full((2, 3), 0.1 * scale), torch.full((4, 2), 0.1 * scale)) for p in patches]


# --- choosing a recipe, once per tensor ---------------------------------------------------------------------

@pytest.mark.parametrize("patches,replace,device,want", [
    ((_patch(),), False, "cpu", Recipe("add", "map", "one", False)),            # bounded: the NaN pass is skipped
    ((_patch(),), False, "cuda", Recipe("add", "map", "sum", True)),
    ((_patch(double=True),), False, "cpu", Recipe("add_rounded", "map", "one", True)),
    ((_patch(weight=0.5),), False, "cpu", Recipe("add", "map", "sum", True)),
    ((_patch(), _patch()), False, "cpu", Recipe("add", "map", "sum", True)),
    ((_patch(double=True), _patch()), False, "cpu", Recipe("add", "map", "sum", True)),  # as before: one rounding
    ((_patch(magnitude="m"),), False, "cpu", Recipe("dora", "map", "sum", True)),
    ((), True, "cpu", Recipe("replace", "adapter", "none", False)),
    ((_patch(),), True, "cpu", Recipe("add", "adapter", "one", True)),
])
def test_choose_recipe(patches: tuple, replace: bool, device: str, want: Recipe) -> None:
    tp = _tp(patches=patches, replace=replace)
    assert choose_recipe(tp, _factors(patches), torch.device(device), torch.bfloat16, True) == want
    assert not choose_recipe(tp, _factors(patches), torch.device(device), torch.bfloat16, False).check_finite


def test_choose_recipe_checks_where_overflow_is_possible() -> None:
    p = (_patch(),)
    assert choose_recipe(_tp(patches=p), _factors(p, 1e16), CPU, torch.bfloat16, True).check_finite
    assert choose_recipe(_tp(patches=p), _factors(p), CPU, torch.float16, True).check_finite
    assert choose_recipe(_tp(shape=(), patches=p), _factors(p), CPU, torch.bfloat16, True) == Recipe(
        "add", "read", "one", True)
    q = QuantSpec("requant", "weight", TensorInfo("m.weight_scale_inv", "F32", (1, 1), 0, 4), (128, 128))
    assert choose_recipe(_tp(patches=p, quant=q), _factors(p), CPU, torch.bfloat16, True).rule == "fp8"


# --- each rule against its formula --------------------------------------------------------------------------

def test_add_rounds_once_from_the_fp32_sum() -> None:
    w = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
    d = torch.tensor([[HALF_ULP_PLUS, 0.5]])
    out = torch.empty_like(w)
    merged = add_delta(w, d.clone(), out)
    assert out.tolist() == [[1.0078125, 2.5]]  # 1 + d rounds up, once
    assert merged.dtype == torch.float32 and merged[0, 0].item() == 1.0 + HALF_ULP_PLUS


def test_add_rounded_rounds_the_delta_first() -> None:
    w = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
    d = torch.tensor([[HALF_ULP_PLUS, 0.5]])
    out = torch.empty_like(w)
    add_rounded_delta(w, d, out)
    assert out.tolist() == [[1.0, 2.5]]  # d -> 2^-8; 1 + 2^-8 is a tie and rounds to even


def test_dora_scales_each_row_to_its_magnitude() -> None:
    w = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[0.0, 4.0], [0.0, 1.0]])  # rows of W + Δ: [3, 4] (norm 5), [0, 2] (norm 2)
    out = torch.empty_like(w)
    dora_rows("linear", w, d, torch.tensor([10.0, 1.0]), out)
    assert out.tolist() == [[6.0, 8.0], [0.0, 1.0]]
    emb = torch.empty_like(w)  # Embedding: per column, over the vocabulary: 3, √20
    dora_rows("embedding", w, d, torch.tensor([3.0, 1.0]), emb)
    torch.testing.assert_close(emb, torch.tensor([[3.0, 4.0 / 20**0.5], [0.0, 2.0 / 20**0.5]]), rtol=0, atol=1e-7)


def test_replace_casts_to_the_base_dtype() -> None:
    out = torch.empty(1, 2, dtype=torch.bfloat16)
    replace_rows(torch.tensor([[1.0 + HALF_ULP_PLUS, -3.0]]), out)
    assert out.tolist() == [[1.0078125, -3.0]]


def test_fp8_dequantizes_adds_and_encodes() -> None:
    q = torch.tensor([[1.0, -2.0], [4.0, 0.5]]).to(torch.float8_e4m3fn)
    scale = torch.tensor([[0.5]])
    w = fp8_merge(q, scale, (2, 2), torch.tensor([[1.0, 0.0], [0.0, -0.25]]))
    assert w.tolist() == [[1.5, -1.0], [2.0, 0.0]]
    assert fp8_encode(w, "dequant", "weight", (2, 2)).dtype == torch.bfloat16
    values, scales = quantize(w, (2, 2))
    assert torch.equal(fp8_encode(w, "requant", "weight", (2, 2)).float(), values.float())
    assert torch.equal(fp8_encode(w, "requant", "scale", (2, 2)), scales) and scales.item() == torch.tensor(2.0 / 448).item()
    torch.testing.assert_close(dequantize(values, scales, (2, 2)), w, rtol=0.07, atol=0)


# --- bitwise against the reference formula and the old whole-tensor paths -----------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("alias", [False, True])
def test_add_rules_equal_the_reference_bitwise(dtype: torch.dtype, alias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g).to(dtype)
    d = torch.randn(64, 48, generator=g) * 0.01
    scratch: dict = {}

    def take(slot: str, shape: tuple) -> torch.Tensor:
        return scratch.setdefault(slot, torch.empty(shape))

    for rule, double in ((add_delta, False), (add_rounded_delta, True)):
        out = w.clone() if alias else torch.empty_like(w)
        base = out if alias else w
        if rule is add_delta:
            rule(base, d.clone(), out, take)
        else:
            rule(base, d.clone(), out)
        assert torch.equal(out, apply_delta(w, d, double)), (rule.__name__, dtype)


@pytest.mark.parametrize("scale", [1.5, 1.0, -1.0])  # 1.0: the scale pass is skipped (x * 1.0 is x)
@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
def test_one_delta_into_scratch_equals_the_plain_delta(kind: str, scale: float) -> None:
    g = torch.Generator().manual_seed(1)
    rows, cols = 2048, 96
    a = torch.randn(8, cols if kind == "linear" else rows, generator=g)
    b = torch.randn(rows if kind == "linear" else cols, 8, generator=g)
    if scale == 1.0:
        a[0, :5] = torch.tensor([1e-39, -1e-39, 0.0, -0.0, 3e38])  # subnormals, signed zeros, near overflow
    p = _patch(kind, scale=scale)
    bufs: dict = {}

    def take(slot: str, shape: tuple) -> torch.Tensor:
        return bufs.setdefault((slot, shape), torch.empty(shape))

    for r0, r1 in row_blocks(rows, 1024, [kind]):
        assert torch.equal(one_delta((p, a, b), (rows, cols), r0, r1, take), factor_delta(p, a, b, (rows, cols), r0, r1))
    both = sum_delta([(p, a, b), (_patch(kind, weight=0.5, scale=scale), a, b)], (rows, cols), 0, rows)
    assert torch.equal(both, factor_delta(p, a, b, (rows, cols), 0, rows) * 1.5)


@pytest.mark.parametrize("experts,rows,cols,want", [
    (8, 200, 48, 64),     # rows inside one expert, a 72-row last block
    (8, 200, 48, 100),
    (16, 24, 40, 100),    # several whole experts per block
    (5, 130, 16, 1000),   # one expert per block... then a remainder group
    (3, 64, 32, 64),
])
def test_fused_expert_blocks_equal_whole_experts_bitwise(experts: int, rows: int, cols: int, want: int) -> None:
    """The old path stacked whole experts, 64 experts per block; blocks by rows inside an expert (or by a few
    whole experts) give the same bits and stay about `want` rows."""
    g = torch.Generator().manual_seed(experts * rows)
    r = 4
    a = torch.randn(r * experts, cols, generator=g)
    b = torch.randn(rows, r * experts, generator=g)
    a3, b3 = a.reshape(experts, -1, cols), b.reshape(rows, -1, experts)
    whole = torch.stack([(b3[:, :, e] @ a3[e]) * 0.75 for e in range(experts)]).reshape(experts * rows, cols)
    peft = torch.einsum("o r e, e r i -> e o i", b3, a3).reshape(experts * rows, cols) * 0.75
    torch.testing.assert_close(whole, peft, rtol=1e-6, atol=1e-6)
    blocks = expert_blocks(experts, rows, want)
    assert blocks[0][0] == 0 and blocks[-1][1] == experts * rows
    assert all(x1 == y0 for (_, x1), (y0, _) in zip(blocks, blocks[1:]))
    for r0, r1 in blocks:
        assert r1 - r0 < 2 * max(want, 64) or (r0 % rows == 0 and r1 - r0 == rows)
        assert r0 // rows == (r1 - 1) // rows or (r0 % rows == 0 and r1 % rows == 0)  # never a partial expert
    got = torch.cat([param_delta_flat_rows(a, b, 0.75, experts, rows, r0, r1) for r0, r1 in blocks])
    assert torch.equal(got, whole)
    p = _patch("param", scale=0.75, experts=experts)
    assert torch.equal(factor_delta(p, a, b, (experts, rows, cols), rows, 3 * rows), whole[rows:3 * rows])


def test_expert_blocks_of_a_big_fused_tensor_stay_about_one_block() -> None:
    """Qwen3-30B-A3B gate_up_proj: 128 experts of (1536, 2048); a 2 MiB fp32 budget is 256 rows."""
    blocks = expert_blocks(128, 1536, 256)
    assert max(r1 - r0 for r0, r1 in blocks) == 256 and len(blocks) == 128 * 6
