"""Every safetensors dtype (issue 12 item 9): a tensor that is only copied needs just its byte length, sub-byte
dtypes included; a patched or replaced tensor needs a float dtype, and a refusal names the tensor."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import folder_tensors, rewrite_adapter, run_cli
from stream_merge.adapter import load_adapter
from stream_merge.checkpoint import read_index
from stream_merge.errors import CheckpointFormatError
from stream_merge.planner import build_plan
from stream_merge.records import DTYPE_BITS, tensor_nbytes
from stream_merge.safetensors_io import header_bytes, parse_header, read_header_file

# dtype -> (shape, bytes): every dtype the safetensors library knows but torch math does not need
EXOTIC = {
    "F8_E8M0": ((4, 8), 32), "F4": ((4, 8), 16), "F6_E2M3": ((4, 4), 12), "F6_E3M2": ((2, 8), 12),
    "C64": ((2, 3), 48), "F8_E5M2": ((3, 5), 15), "F8_E4M3FNUZ": ((1, 7), 7), "F8_E5M2FNUZ": ((9,), 9),
    "U64": ((2,), 16), "BOOL": ((5,), 5),
}


def test_every_safetensors_dtype_has_a_size() -> None:
    """The table covers the safetensors library's own dtype list (its Rust enum, 22 variants)."""
    from safetensors import torch as st_torch

    known = set(st_torch._TYPES)  # the dtypes safetensors maps to torch: a subset of the format's
    assert known <= set(DTYPE_BITS), known - set(DTYPE_BITS)
    assert len(DTYPE_BITS) == 22
    for dtype, (shape, nbytes) in EXOTIC.items():
        assert tensor_nbytes(dtype, shape) == nbytes, dtype
    assert tensor_nbytes("F4", (3,)) is None and tensor_nbytes("F6_E2M3", (2, 3)) is None  # not whole bytes
    assert tensor_nbytes("F6_E2M3", (4,)) == 3 and tensor_nbytes("F4", ()) is None
    assert tensor_nbytes("F32", (0, 5)) == 0 and tensor_nbytes("F64", ()) == 8
    assert tensor_nbytes("Q4_K", (4,)) is None


def _header(entries: list[tuple[str, str, tuple[int, ...], int]]) -> tuple[bytes, int]:
    rows, pos = [], 0
    for name, dtype, shape, n in entries:
        rows.append((name, dtype, shape, pos, pos + n))
        pos += n
    return header_bytes(rows, None), pos


def test_headers_with_every_dtype_parse() -> None:
    raw, data = _header([(f"t.{d}", d, shape, n) for d, (shape, n) in EXOTIC.items()])
    header = parse_header(raw, len(raw) + data, "x.safetensors")
    assert {t.dtype: t.nbytes for t in header.tensors} == {d: n for d, (_, n) in EXOTIC.items()}


@pytest.mark.parametrize("dtype,shape,nbytes,why", [
    ("F4", (3,), 2, "do not fit"), ("F6_E2M3", (2, 3), 5, "do not fit"), ("F8_E8M0", (4,), 3, "do not fit"),
    ("F3", (4,), 2, "unknown dtype"), ("f32", (1,), 4, "unknown dtype"),
])
def test_bad_sizes_and_unknown_dtypes_are_still_refused(dtype: str, shape: tuple[int, ...], nbytes: int,
                                                        why: str) -> None:
    raw, data = _header([("w", dtype, shape, nbytes)])
    with pytest.raises(CheckpointFormatError, match=why):
        parse_header(raw, len(raw) + data, "x.safetensors")


def _add_tensors(base: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> str:
    """Append raw tensors to the base's first shard (header rewritten, index updated); returns the shard."""
    index = json.loads((base / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    path = base / shard
    header = read_header_file(path, shard)
    blob = path.read_bytes()[header.data_offset:]
    rows = [(t.name, t.dtype, t.shape, t.start, t.end) for t in header.tensors]
    for name, (dtype, shape, data) in tensors.items():
        rows.append((name, dtype, shape, len(blob), len(blob) + len(data)))
        blob += data
        index["weight_map"][name] = shard
    path.write_bytes(header_bytes(rows, header.metadata) + blob)
    index["metadata"]["total_size"] += sum(len(d) for _, _, d in tensors.values())
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    return shard


def _raw_tensor(folder: Path, name: str) -> tuple[str, tuple[int, ...], bytes]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    path = folder / index["weight_map"][name]
    info = read_header_file(path, name).by_name[name]
    data = path.read_bytes()[read_header_file(path, name).data_offset:]
    return info.dtype, info.shape, data[info.start:info.end]


def test_copied_tensors_of_any_dtype_merge_and_verify(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = pair
    plain = tmp_path / "plain"
    assert run_cli("merge", base, adapter, "-o", plain, "--device", "cpu").returncode == 0
    extra = {f"model.extra.{d.lower()}": (d, shape, os.urandom(n)) for d, (shape, n) in EXOTIC.items()}
    _add_tensors(base, extra)
    out = tmp_path / "out"
    proc = run_cli("merge", base, adapter, "-o", out, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    for name, want in extra.items():
        assert _raw_tensor(out, name) == want, name
    got, expected = folder_tensors_float(out), folder_tensors(plain)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    proc = run_cli("verify", out, "--full")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def folder_tensors_float(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors torch can load (the float ones of the synthetic model), read by name from the raw files."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        header = read_header_file(f, f.name)
        names = [t.name for t in header.tensors if not t.name.startswith("model.extra.")]
        if len(names) == len(header.tensors):
            out.update(load_file(str(f)))
            continue
        for t in header.tensors:
            if t.name in names:
                raw = f.read_bytes()[header.data_offset + t.start:header.data_offset + t.end]
                out[t.name] = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).reshape(t.shape)
    return out


@pytest.mark.parametrize("dtype", ["F8_E5M2", "F8_E8M0", "C64", "F4", "I8"])
def test_a_patched_tensor_needs_a_float_dtype(dtype: str, pair: tuple[Path, Path]) -> None:
    """A LoRA on a tensor of a non-math dtype is refused naming the tensor (planning only: no bytes read)."""
    base, adapter = pair
    target = "model.layers.0.self_attn.q_proj.weight"
    shape = read_index(base).tensors[target].shape
    fake_bytes = tensor_nbytes(dtype, shape)
    assert fake_bytes is not None
    _add_tensors(base, {"model.layers.0.self_attn.q_proj2.weight": (dtype, shape, bytes(fake_bytes))})

    def retarget(sd: dict) -> None:
        for x in "AB":
            sd[f"base_model.model.model.layers.0.self_attn.q_proj2.lora_{x}.weight"] = \
                sd[f"base_model.model.model.layers.0.self_attn.q_proj.lora_{x}.weight"].clone()
    rewrite_adapter(adapter, retarget)
    plan = build_plan(read_index(base), [load_adapter(adapter)])
    assert len(plan.problems) == 1, plan.problems
    assert "model.layers.0.self_attn.q_proj2.weight" in plan.problems[0] and dtype in plan.problems[0]


@pytest.mark.parametrize("dtype", ["C64", "F8_E8M0"])
def test_a_replaced_tensor_needs_a_float_dtype(dtype: str, pair: tuple[Path, Path]) -> None:
    base, adapter = pair
    _add_tensors(base, {"model.extra.table": (dtype, (4, 2), bytes(tensor_nbytes(dtype, (4, 2)) or 0))})
    rewrite_adapter(adapter, lambda sd: sd.update({"base_model.model.model.extra.table": torch.zeros(4, 2)}))
    plan = build_plan(read_index(base), [load_adapter(adapter)])
    assert len(plan.problems) == 1 and "model.extra.table" in plan.problems[0] and dtype in plan.problems[0]


def test_adapter_factors_of_a_non_float_dtype_are_named(pair: tuple[Path, Path]) -> None:
    base, adapter = pair
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"
    rewrite_adapter(adapter, lambda sd: sd.update({key: sd[key].to(torch.int8)}))
    plan = build_plan(read_index(base), [load_adapter(adapter)])
    assert len(plan.problems) == 1 and key in plan.problems[0] and "I8" in plan.problems[0]
