"""The header parser rejects every malformed file with its name; the writer matches safetensors' bytes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stream_merge.errors import CheckpointFormatError
from stream_merge.fileio import AtomicFile
from stream_merge.safetensors_io import ShardReader, header_bytes, read_header_file
from stream_merge.torch_dtypes import tensor_bytes


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"b.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16),
            "a.bias": torch.randn(7, generator=g),
            "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
            "d.scale": torch.tensor(2.5, dtype=torch.float16),
            "e.empty": torch.zeros(0, 4)}


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_streaming_writer_bytes_equal_save_file(tmp_path: Path, metadata: dict | None) -> None:
    tensors = _tensors()
    ref = tmp_path / "ref.safetensors"
    save_file(tensors, str(ref), metadata=metadata)
    header = read_header_file(ref)
    ordered = sorted(header.tensors, key=lambda t: t.start)
    out = tmp_path / "ours.safetensors"
    with AtomicFile(out) as f:
        f.write(header_bytes([(t.name, t.dtype, t.shape, t.start, t.end) for t in header.tensors], metadata))
        for t in ordered:
            f.write(tensor_bytes(tensors[t.name]))
        size, digest = f.commit()
    assert out.read_bytes() == ref.read_bytes()
    assert size == ref.stat().st_size and len(digest) == 64
    assert not list(tmp_path.glob(".stream-merge-tmp.*"))


def test_reader_reads_rows_and_scalars(tmp_path: Path) -> None:
    tensors = _tensors()
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    header = read_header_file(path)
    with ShardReader(path, header) as r:
        for t in header.tensors:
            assert torch.equal(r.read_tensor(t), tensors[t.name])
        w = header.by_name["b.weight"]
        assert torch.equal(r.read_rows(w, 1, 3), tensors["b.weight"][1:3])


def test_atomic_file_leaves_nothing_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with AtomicFile(tmp_path / "f.bin") as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def _raw(obj: dict, data: bytes) -> bytes:
    h = json.dumps(obj).encode()
    return struct.pack("<Q", len(h)) + h + data


DUP = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
BAD = {
    "truncated": lambda good: good[:-5],
    "tiny": lambda good: good[:5],
    "zero-filled": lambda good: bytes(len(good)),
    "lfs-pointer": lambda good: b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n",
    "zip": lambda good: b"PK\x03\x04" + bytes(60),
    "pickle": lambda good: b"\x80\x04\x95" + bytes(60),
    "trailing": lambda good: good + b"xx",
    "overlap": lambda good: _raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                  "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)),
    "gap": lambda good: _raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                              "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, bytes(12)),
    "duplicate": lambda good: struct.pack("<Q", len(DUP)) + DUP + bytes(8),
    "control-char": lambda good: _raw({"a\x00b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
    "bad-dtype": lambda good: _raw({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
    "shape-mismatch": lambda good: _raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(4)),
    "not-json": lambda good: struct.pack("<Q", 4) + b"{{{{" + bytes(4),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_files_are_rejected_with_their_name(tmp_path: Path, case: str) -> None:
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(4, 4)}, str(good))
    bad = tmp_path / f"bad-{case}.safetensors"
    bad.write_bytes(BAD[case](good.read_bytes()))
    with pytest.raises(CheckpointFormatError) as exc:
        read_header_file(bad)
    msg = exc.value.one_line()
    assert bad.name in msg
    if case == "lfs-pointer":
        assert "LFS" in msg
    if case in ("zip", "pickle"):
        assert ("zip" if case == "zip" else "pickle") in msg
    if case == "duplicate":
        assert "duplicate" in msg


def test_a_leased_reader_holds_off_a_truncation_and_names_the_file(tmp_path: Path) -> None:
    """With the CLI's lease set-up, another process that truncates a base shard waits until the reader stops:
    the reader sees the lease break, names the file, and no map ever covers bytes that are gone (SIGBUS)."""
    import signal
    import subprocess
    import sys
    import time

    import pytest

    from stream_merge.errors import CheckpointFormatError
    from stream_merge.platform_support import guard_base_files
    from stream_merge.safetensors_io import ShardReader, read_header_file

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(256, 256)}, str(path))
    header = read_header_file(path)
    old = signal.getsignal(signal.SIGIO)
    guard_base_files()
    try:
        reader = ShardReader(path, header)
        if not reader._leased:
            reader.close()
            pytest.skip("this file system grants no leases")
        child = subprocess.Popen([sys.executable, "-c", f"import os; os.truncate({str(path)!r}, 16)"])
        try:
            deadline = time.monotonic() + 30
            with pytest.raises(CheckpointFormatError, match="another process") as exc:
                while time.monotonic() < deadline:
                    reader.check_unchanged()
                    view = reader.view(0, 4096)  # still the whole file: the truncation is waiting for us
                    assert bytes(view[:4]) == bytes(torch.ones(1).numpy().tobytes())
                    del view
                    time.sleep(0.01)
            assert exc.value.file == str(path)
            assert path.stat().st_size == header.size and child.poll() is None
        finally:
            reader.close()  # releases the lease: the truncation goes through
            assert child.wait(timeout=60) == 0
        assert path.stat().st_size == 16
    finally:
        signal.signal(signal.SIGIO, old)
