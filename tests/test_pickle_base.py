"""PyTorch pickle (.bin) bases with --allow-pickle (issue 15 item 8).

The parser (`pickle_io`) is checked against torch.load byte for byte; bad files are refused by name without
running anything; merges of a .bin base (single and sharded, tied and untied, local and from the Hub) equal
what PEFT + transformers produce from the same .bin base, saved as safetensors."""

from __future__ import annotations

import collections
import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from stream_merge.checkpoint import read_index
from stream_merge.errors import CheckpointFormatError, InputError
from stream_merge.pickle_io import read_pickle_file, read_pickle_header

PICKLE_INDEX = "pytorch_model.bin.index.json"


def _state() -> collections.OrderedDict[str, torch.Tensor]:
    """Every dtype a state dict holds, a 0-d and an empty tensor, a view at an offset, a Parameter, a tie."""
    gen = torch.Generator().manual_seed(0)
    sd: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
    sd["embed.weight"] = torch.randn(16, 8, generator=gen)
    for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16, torch.int8,
                  torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2):
        sd[f"t.{str(dtype)[6:]}"] = (torch.randn(3, 5, generator=gen) * 4).to(dtype)
    sd["t.uint16"] = torch.arange(7).to(torch.uint16)
    sd["scalar"] = torch.tensor(2.5)
    sd["empty"] = torch.zeros(0, 4)
    sd["view"] = torch.randn(20, generator=gen).to(torch.bfloat16)[3:13].view(2, 5)  # storage offset 3
    sd["param"] = torch.nn.Parameter(torch.randn(4, 4, generator=gen))
    sd["head.weight"] = sd["embed.weight"]  # a tie: one storage, two names
    return sd


def _raw(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def test_parser_matches_torch_load_for_every_tensor(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    state = _state()
    state["big"] = torch.zeros(1 << 20)  # 4 MiB that a header read must not fetch
    torch.save(state, path)
    header = read_pickle_file(path, path.name)
    loaded = torch.load(path, weights_only=True, mmap=True)
    data = path.read_bytes()
    assert [t.name for t in header.tensors] == list(loaded)
    assert header.data_offset == 0 and not header.safetensors and header.size == len(data)
    for t in header.tensors:
        ref = loaded[t.name]
        assert data[t.start:t.end] == _raw(ref), t.name
        assert t.shape == tuple(ref.shape)
    by = header.by_name
    assert (by["head.weight"].start, by["head.weight"].end) == (by["embed.weight"].start, by["embed.weight"].end)
    # the same parse over range reads (what the Hub source does), counting the bytes it fetched
    fetched = []

    def read(start: int, end: int) -> bytes:
        fetched.append(end - start)
        return data[start:end]

    assert read_pickle_header(read, len(data), path.name) == header
    assert sum(fetched) < len(data) // 10  # the directory, data.pkl and local headers, not the tensors


def test_legacy_format_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointFormatError, match="legacy torch.save format") as err:
        read_pickle_file(path, path.name)
    assert "torch>=1.6" in err.value.one_line() and "pytorch_model.bin" in err.value.one_line()


def test_non_contiguous_tensor_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"ok": torch.ones(3, 4), "bad.weight": torch.randn(3, 4).t()}, path)
    with pytest.raises(CheckpointFormatError, match="not contiguous") as err:
        read_pickle_file(path, path.name)
    assert "bad.weight" in err.value.one_line() and ".contiguous()" in err.value.one_line()
    torch.save({"ok": torch.ones(3, 4), "col": torch.randn(3, 1).t()}, path)  # size-1 dims: still contiguous
    assert [t.shape for t in read_pickle_file(path, path.name).tensors] == [(3, 4), (1, 3)]


class _Hostile:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        import os

        return (os.system, ("touch PWNED",))


def _rewrite(src: Path, dst: Path, change) -> None:  # type: ignore[no-untyped-def]
    """Copy a torch.save zip member by member; `change(name, bytes) -> (bytes, compress_type)`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data, kind = change(info.filename, zin.read(info))
            zout.writestr(zipfile.ZipInfo(info.filename), data, compress_type=kind)


def test_hostile_pickle_is_refused_without_running_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    good = tmp_path / "good.bin"
    torch.save({"w": torch.ones(2)}, good)
    evil = tmp_path / "pytorch_model.bin"
    payload = pickle.dumps({"w": _Hostile()}, protocol=2)
    _rewrite(good, evil, lambda n, d: (payload if n.endswith("data.pkl") else d, zipfile.ZIP_STORED))
    with pytest.raises(CheckpointFormatError, match=r"calls (posix|os)\.system") as err:
        read_pickle_file(evil, evil.name)
    assert "pytorch_model.bin" in err.value.one_line()
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("what", ["big-endian", "compressed", "short storage", "no data.pkl", "training checkpoint"])
def test_malformed_archives_are_refused_by_name(tmp_path: Path, what: str) -> None:
    good = tmp_path / "good.bin"
    torch.save({"w": torch.ones(64)} if what != "training checkpoint" else {"model": {"w": torch.ones(2)},
                                                                           "step": 3}, good)
    bad = tmp_path / "pytorch_model.bin"

    def change(name: str, data: bytes) -> tuple[bytes, int]:
        if what == "big-endian" and name.endswith("/byteorder"):
            return b"big", zipfile.ZIP_STORED
        if what == "compressed" and "/data/" in name:
            return data, zipfile.ZIP_DEFLATED
        if what == "short storage" and "/data/" in name:
            return data[:100], zipfile.ZIP_STORED
        if what == "no data.pkl" and name.endswith("data.pkl"):
            return data, zipfile.ZIP_STORED
        return data, zipfile.ZIP_STORED

    if what == "no data.pkl":
        with zipfile.ZipFile(bad, "w") as z:
            z.writestr("archive/other.pkl", b"x")
    else:
        _rewrite(good, bad, change)
    words = {"big-endian": "'big'-endian", "compressed": "compressed", "short storage": "fewer than the tensor",
             "no data.pkl": "data.pkl", "training checkpoint": "not a tensor"}[what]
    with pytest.raises(CheckpointFormatError, match=words) as err:
        read_pickle_file(bad, bad.name)
    assert "pytorch_model.bin" in err.value.one_line() and "Traceback" not in err.value.one_line()


@pytest.mark.parametrize("keep", [0, 1000, -200, -22])
def test_truncated_bin_is_refused_naming_the_file(tmp_path: Path, keep: int) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save(_state(), path)
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    with pytest.raises(CheckpointFormatError) as err:
        read_pickle_file(path, path.name)
    assert "pytorch_model.bin" in err.value.one_line()
