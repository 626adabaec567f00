"""The shard pipeline: parallel row-block jobs, the O_DIRECT sink and its fallbacks, checksums and resume."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
import xxhash

import stream_merge
from conftest import forget_digests, make_pair, run_cli
from stream_merge import direct_io
from stream_merge.adapter import AdapterReader
from stream_merge.direct_io import ALIGN, FileSink
from stream_merge.journal import SHARDS_DIR
from stream_merge.safetensors_io import ShardReader
from stream_merge.synthetic import LlamaShape
from stream_merge.worker import Compute, merge_shard

WIDE = LlamaShape(hidden=256, intermediate=320, layers=2, vocab=384, heads=4, kv_heads=2)


def _chunks(seed: int, staging: int) -> list[bytes | bytearray]:
    rng = random.Random(seed)
    sizes = [0, 1, 7, ALIGN - 1, ALIGN, ALIGN + 1, staging - 1, staging, staging + 3, 3 * staging + 5, 100_000]
    out: list[bytes | bytearray] = []
    for _ in range(rng.randint(1, 25)):
        data = rng.randbytes(rng.choice(sizes))
        out.append(bytearray(data) if rng.random() < 0.5 else data)  # writable (memmove) and read-only sources
    return out


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("staging", [ALIGN, 3 * ALIGN, 1 << 20])
def test_file_sink_writes_exactly_the_bytes_given(tmp_path: Path, direct: bool, staging: int) -> None:
    for seed in range(6):
        path = tmp_path / f"f{seed}"
        chunks = _chunks(seed, staging)
        sink = FileSink(path, direct=direct, staging_bytes=staging)
        for c in chunks:
            sink.write(c)
        sink.finish()
        sink.close()
        want = b"".join(chunks)
        assert path.stat().st_size == len(want)  # nothing written past the end, no padding left
        assert path.read_bytes() == want


def test_file_sink_falls_back_when_open_refuses_o_direct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def no_direct(path, flags, *args):  # type: ignore[no-untyped-def]
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_io.os, "open", no_direct)
    chunks = _chunks(1, ALIGN)
    sink = FileSink(tmp_path / "f", staging_bytes=ALIGN)
    assert not sink.direct
    for c in chunks:
        sink.write(c)
    sink.finish()
    sink.close()
    assert (tmp_path / "f").read_bytes() == b"".join(chunks)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
@pytest.mark.parametrize("total", [ALIGN // 2, 3 * ALIGN + 17, 40 * ALIGN + 1])
def test_file_sink_falls_back_when_the_first_write_refuses_o_direct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    total: int) -> None:
    real_pwrite = os.pwrite
    refused = []

    def refuse_once(fd: int, data, pos: int) -> int:  # type: ignore[no-untyped-def]
        if not refused and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(pos)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, pos)

    monkeypatch.setattr(direct_io.os, "pwrite", refuse_once)
    data = random.Random(total).randbytes(total)
    sink = FileSink(tmp_path / "f", staging_bytes=4 * ALIGN)
    for i in range(0, total, 5000):
        sink.write(bytearray(data[i:i + 5000]))
    sink.finish()
    sink.close()
    assert refused == ([0] if total >= ALIGN else [])  # the part below one block never goes direct
    assert not sink.direct
    assert (tmp_path / "f").read_bytes() == data


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_a_later_write_error_is_raised_not_swallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_pwrite = os.pwrite

    def full_after_first(fd: int, data, pos: int) -> int:  # type: ignore[no-untyped-def]
        if pos > 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, pos)

    monkeypatch.setattr(direct_io.os, "pwrite", full_after_first)
    sink = FileSink(tmp_path / "f", staging_bytes=ALIGN)
    if not sink.direct:
        pytest.skip("this file system does not do O_DIRECT")
    with pytest.raises(OSError) as exc:
        for _ in range(8):
            sink.write(bytearray(ALIGN))
        sink.finish()
    assert exc.value.errno == errno.ENOSPC
    sink.close()


def _plan_and_readers(base: Path, adapter: Path):  # type: ignore[no-untyped-def]
    plan = stream_merge.plan(str(base), str(adapter))
    return plan, [AdapterReader(spec) for spec in plan.adapters]


@pytest.mark.parametrize("kinds", ["linear", "embedding-and-head"])
def test_parallel_small_blocks_give_the_bytes_of_a_plain_merge(tmp_path: Path, kinds: str) -> None:
    """Many row blocks per tensor, run on 1 and 3 threads, direct and buffered: every output shard is
    byte-identical to what the CLI writes with its defaults."""
    base, adapter = make_pair(tmp_path, shape=WIDE, shard_bytes=600_000, r=8, alpha=16.0)
    if kinds == "embedding-and-head":
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        cfg["target_modules"] = ["q_proj", "down_proj", "embed_tokens", "lm_head"]
        (adapter / "adapter_config.json").write_text(json.dumps(cfg))
        from safetensors.torch import load_file, save_file

        weights = {k: v for k, v in load_file(adapter / "adapter_model.safetensors").items()
                   if any(m in k for m in ("q_proj", "down_proj"))}
        g = torch.Generator().manual_seed(3)
        prefix = "base_model.model."
        weights[prefix + "model.embed_tokens.lora_embedding_A"] = torch.randn(8, WIDE.vocab, generator=g)
        weights[prefix + "model.embed_tokens.lora_embedding_B"] = torch.randn(WIDE.hidden, 8, generator=g)
        weights[prefix + "lm_head.lora_A.weight"] = torch.randn(8, WIDE.hidden, generator=g)
        weights[prefix + "lm_head.lora_B.weight"] = torch.randn(WIDE.vocab, 8, generator=g)
        save_file(weights, adapter / "adapter_model.safetensors")
    ref = tmp_path / "ref"
    r = run_cli("merge", base, adapter, "-o", ref, "--quiet")
    assert r.returncode == 0, r.stderr
    plan, adapters = _plan_and_readers(base, adapter)
    blocks = 0
    for threads in (1, 3):
        for direct in (True, False):
            out = tmp_path / f"t{threads}-{direct}"
            out.mkdir()
            compute = Compute(block_bytes=8 * 1024, copy_bytes=5000, threads=threads, direct_io=direct)
            for shard in plan.shards:
                header = next(h for h in plan.base.shards if h.file == shard.file)
                with ShardReader(base / shard.file, header) as reader:
                    res = merge_shard(shard, reader, adapters, out / shard.file, compute, checksum=True)
                data = (out / shard.file).read_bytes()
                assert data == (ref / shard.file).read_bytes(), (threads, direct, shard.file)
                assert res.sha256 == hashlib.sha256(data).hexdigest() and res.size == len(data)
                assert res.xxh3_128 == xxhash.xxh3_128(data).hexdigest()
                blocks = max(blocks, max((t.shape[0] * 4 * (t.shape[1] if len(t.shape) > 1 else 1)) // (8 * 1024)
                                         for t in shard.touched) if shard.touched else 0)
    assert blocks >= 8  # the small budget really split tensors into many blocks
    for a in adapters:
        a.close()


def test_output_xxh3_128_is_always_recorded_and_checksums_adds_sha256s(pair: tuple[Path, Path],
                                                                       tmp_path: Path) -> None:
    base, adapter = pair
    plain, summed = tmp_path / "plain", tmp_path / "summed"
    assert run_cli("merge", base, adapter, "-o", plain, "--quiet").returncode == 0
    assert run_cli("merge", base, adapter, "-o", summed, "--quiet", "--checksums").returncode == 0
    rec_plain = json.loads((plain / "stream_merge.json").read_text())
    rec_summed = json.loads((summed / "stream_merge.json").read_text())
    # the same entries but for the output sha256, which only --checksums (or a push) computes
    assert [{**e, "sha256": None} for e in rec_summed["shards"]] == rec_plain["shards"]
    for e in rec_summed["shards"]:
        assert e["sha256"] == hashlib.sha256((summed / e["file"]).read_bytes()).hexdigest()
        assert e["xxh3_128"] == xxhash.xxh3_128((summed / e["file"]).read_bytes()).hexdigest()
        assert (plain / e["file"]).read_bytes() == (summed / e["file"]).read_bytes()
    # --checksums: the base files' sha256 too (a copied base is then recognised by content on resume)
    assert not any("sha256" in f for f in rec_plain["inputs"]["base"]["files"].values())
    for name, f in rec_summed["inputs"]["base"]["files"].items():
        assert f["sha256"] == hashlib.sha256((base / name).read_bytes()).hexdigest()




def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x10
    path.write_bytes(bytes(data))


def test_verify_without_checksums_recomputes_or_says_what_it_could_not_check(tmp_path: Path) -> None:
    base, adapter = make_pair(tmp_path)
    plain, summed = tmp_path / "plain", tmp_path / "summed"
    assert run_cli("merge", base, adapter, "-o", plain, "--quiet").returncode == 0
    assert run_cli("merge", base, adapter, "-o", summed, "--quiet", "--checksums").returncode == 0
    forget_digests(plain)
    ok = run_cli("verify", plain)
    assert ok.returncode == 0 and "recomputed" in ok.stdout and "note:" not in ok.stdout
    shard = sorted(plain.glob("*.safetensors"))[0]
    _flip(shard)
    _flip(summed / shard.name)
    bad = run_cli("verify", plain)
    assert bad.returncode == 1 and shard.name in bad.stderr and "differs from a fresh merge" in bad.stderr
    # without the inputs: checksums still catch the flipped byte; without them, verify says what it skipped
    shutil.rmtree(base)
    bad = run_cli("verify", summed)
    assert bad.returncode == 1 and shard.name in bad.stderr and "sha256" in bad.stderr
    _flip(shard)
    note = run_cli("verify", plain)
    assert note.returncode == 0 and "note:" in note.stdout and "not checked" in note.stdout, note.stdout


def test_resume_redoes_a_finished_shard_that_was_changed_since(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = pair
    out = tmp_path / "out"
    assert run_cli("merge", base, adapter, "-o", out, "--quiet").returncode == 0
    ref = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    shards = sorted(ref)
    for digests in (False, True):  # an older merge's record first; the shards it redoes get an xxh3_128
        (out / "model.safetensors.index.json").unlink()  # "unfinished": the next run resumes
        if not digests:
            forget_digests(out)  # as an older merge left it
        _flip(out / shards[0])  # same size, new mtime: redone
        os.utime(out / shards[1], ns=(0, 0))  # only the mtime changed: kept when its digest still matches,
        r = run_cli("merge", base, adapter, "-o", out)  # redone without one (nothing proves it unchanged)
        assert r.returncode == 0, r.stderr
        assert f"({len(shards) - (1 if digests else 2)} resumed)" in r.stdout, r.stdout
        assert {p.name: p.read_bytes() for p in out.glob("*.safetensors")} == ref


def test_resume_of_a_copied_output_keeps_shards_whose_checksum_matches(pair: tuple[Path, Path],
                                                                       tmp_path: Path) -> None:
    base, adapter = pair
    out, copy = tmp_path / "out", tmp_path / "copy"
    assert run_cli("merge", base, adapter, "-o", out, "--quiet", "--checksums").returncode == 0
    shutil.copytree(out, copy)  # new mtimes everywhere
    (copy / "model.safetensors.index.json").unlink()
    for p in copy.glob("*.safetensors"):
        os.utime(p, ns=(1, 1))
    r = run_cli("merge", base, adapter, "-o", copy, "--checksums")
    n = len(list(out.glob("*.safetensors")))
    assert r.returncode == 0 and f"({n} resumed)" in r.stdout, r.stdout
    assert not (copy / SHARDS_DIR).exists()  # the journal is removed on completion; the record keeps the digests
    entries = json.loads((copy / "stream_merge.json").read_text())["shards"]
    assert len(entries) == n and all(e["sha256"] for e in entries)


def test_the_finite_check_is_skipped_only_when_overflow_is_impossible() -> None:
    from stream_merge.records import LoraPatch
    from stream_merge.recipes import cannot_overflow as _cannot_overflow

    p = LoraPatch(module="m", target="m.weight", kind="linear", adapter=0, a_key="a", b_key="b", rank=16, alpha=32.0,
                  scale=2.0)
    a, b = torch.full((16, 8), 0.1), torch.full((8, 16), 0.1)
    assert _cannot_overflow((p, a, b), torch.bfloat16) and _cannot_overflow((p, a, b), torch.float32)
    assert not _cannot_overflow((p, a, b), torch.float16)  # fp16 overflows at 65504: always checked
    assert not _cannot_overflow((p, a * 1e16, b * 1e16), torch.bfloat16)
    assert not _cannot_overflow((p, None, b), torch.bfloat16)


def test_gc_is_frozen_only_during_a_shard() -> None:
    import gc

    from stream_merge.worker import frozen_gc

    assert gc.get_freeze_count() == 0
    with frozen_gc():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0


def _fused_moe_pair(root: Path, experts: int = 8, rows: int = 200, cols: int = 48, r: int = 4
                    ) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A base holding one fused (E, out, in) expert tensor and a target_parameters adapter for it."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    base, adapter = root / "base", root / "adapter"
    base.mkdir()
    adapter.mkdir()
    sd = {name: torch.randn(experts, rows, cols, generator=g).to(torch.bfloat16),
          "model.norm.weight": torch.ones(cols, dtype=torch.bfloat16)}
    save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "hidden_size": cols}))
    ad = {"base_model.model.model.layers.0.mlp.experts.lora_A.weight": torch.randn(r * experts, cols, generator=g),
          "base_model.model.model.layers.0.mlp.experts.lora_B.weight": torch.randn(rows, r * experts, generator=g)}
    save_file(ad, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": [],
        "target_parameters": ["mlp.experts.gate_up_proj"]}))
    return base, adapter, {"W": sd[name], **ad}


def test_a_fused_moe_tensor_is_blocked_inside_experts(tmp_path: Path) -> None:
    """Blocks of a fused (E, out, in) tensor stay about one block (rows inside one expert), not 64 experts
    at a time, and give PEFT's bits: Δ[e] = B[:, :, e] @ A[e] * s, then W + Δ.to(bf16) (PEFT_SEMANTICS §5)."""
    from safetensors.torch import load_file

    from stream_merge.pipeline import shard_jobs

    experts, rows, cols, r = 8, 200, 48, 4
    base, adapter, t = _fused_moe_pair(tmp_path, experts, rows, cols, r)
    a3 = t["base_model.model.model.layers.0.mlp.experts.lora_A.weight"].reshape(experts, r, cols)
    b3 = t["base_model.model.model.layers.0.mlp.experts.lora_B.weight"].reshape(rows, r, experts)
    delta = torch.stack([(b3[:, :, e] @ a3[e]) * 2.0 for e in range(experts)])
    want = t["W"] + delta.to(torch.bfloat16)
    plan, adapters = _plan_and_readers(base, adapter)
    assert not plan.problems, plan.problems
    shard = plan.shards[0]
    header = plan.base.shards[0]
    compute = Compute(block_bytes=64 * cols * 4, copy_bytes=5000)
    with ShardReader(base / shard.file, header) as reader:
        sizes = [j.nbytes for j in shard_jobs(shard, reader, adapters, compute) if j.name == shard.touched[0].name]
        assert len(sizes) == experts * 3 and max(sizes) <= compute.buffer_bytes, sizes  # 64, 64, 72 rows each
        out = tmp_path / "out"
        out.mkdir()
        merge_shard(shard, reader, adapters, out / shard.file, compute)
    got = load_file(str(out / shard.file))["model.layers.0.mlp.experts.gate_up_proj"]
    assert torch.equal(got, want)
    for a in adapters:
        a.close()


def test_the_writer_queue_never_exceeds_its_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow disk makes the producer wait (back-pressure) instead of queueing every chunk of the shard, maps
    of untouched bytes included; the output is still byte-identical."""
    import time

    from stream_merge import worker

    base, adapter = make_pair(tmp_path, shape=WIDE, shard_bytes=600_000, r=8, alpha=16.0)
    plan, adapters = _plan_and_readers(base, adapter)
    ref = tmp_path / "ref"
    assert run_cli("merge", base, adapter, "-o", ref, "--quiet").returncode == 0
    writers: list = []

    class Recording(worker._Writer):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, **kwargs)
            writers.append(self)

    monkeypatch.setattr(worker, "_Writer", Recording)
    shard = max(plan.shards, key=lambda s: s.in_bytes)
    header = next(h for h in plan.base.shards if h.file == shard.file)
    for threads in (1, 3):
        compute = Compute(block_bytes=8 * 1024, copy_bytes=4096, threads=threads)
        out = tmp_path / f"out{threads}"
        out.mkdir()
        with ShardReader(base / shard.file, header) as reader:
            merge_shard(shard, reader, adapters, out / shard.file, compute, on_bytes=lambda n: time.sleep(0.002))
        assert (out / shard.file).read_bytes() == (ref / shard.file).read_bytes()
        w = writers[-1]
        assert w.bound == compute.queue_bound and w.todo.maxsize == w.bound
        assert w.high_water == w.bound, (w.high_water, w.bound)  # reached (the disk was slow), never passed
    for a in adapters:
        a.close()


def _change(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        os.truncate(path, len(data) // 2)
    elif how == "extended":
        with open(path, "ab") as f:
            f.write(b"\0" * 4096)
    elif how == "replaced":  # another file renamed over it (same size, same bytes even)
        tmp = path.with_suffix(".new")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    elif how == "rewritten":  # the same size rewritten in place
        st = path.stat()
        with open(path, "r+b") as f:
            f.seek(len(data) - 8)
            f.write(b"\x01" * 8)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    elif how == "deleted":
        path.unlink()


@pytest.mark.parametrize("how", ["truncated", "extended", "replaced", "rewritten", "deleted"])
@pytest.mark.parametrize("after", [0, 3, 9])
def test_a_base_shard_changed_during_the_merge_is_named_not_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    how: str, after: int) -> None:
    """A shard truncated, extended, replaced, rewritten or deleted between two blocks: a CheckpointFormatError
    (exit 2) naming the shard, never SIGBUS, `ValueError: mmap length ...` or a shard of mixed bytes; the
    output is not published."""
    from stream_merge.errors import CheckpointFormatError
    from stream_merge.safetensors_io import ShardReader as Reader

    base, adapter = make_pair(tmp_path, shape=WIDE, shard_bytes=600_000, r=8, alpha=16.0)
    plan, adapters = _plan_and_readers(base, adapter)
    shard = max(plan.shards, key=lambda s: s.in_bytes)
    header = next(h for h in plan.base.shards if h.file == shard.file)
    real_view = Reader.view
    calls = []

    def view(self, data_offset: int, nbytes: int):  # type: ignore[no-untyped-def]
        calls.append(data_offset)
        if len(calls) == after + 1 and self.path == base / shard.file:
            _change(self.path, how)
        return real_view(self, data_offset, nbytes)

    monkeypatch.setattr(Reader, "view", view)
    out = tmp_path / "out"
    out.mkdir()
    with ShardReader(base / shard.file, header) as reader:
        with pytest.raises(CheckpointFormatError, match="changed during the merge") as exc:
            merge_shard(shard, reader, adapters, out / shard.file, Compute(block_bytes=8 * 1024, copy_bytes=5000))
    assert exc.value.file == str(base / shard.file) and shard.file in str(exc.value)
    assert not list(out.iterdir())  # nothing published, no temp file left
    for a in adapters:
        a.close()


def test_a_shard_that_shrank_before_a_map_is_named(tmp_path: Path) -> None:
    """The map itself (not only the check before it) turns a shrunken file into the same clear error."""
    from stream_merge.errors import CheckpointFormatError

    base, adapter = make_pair(tmp_path)
    plan = stream_merge.plan(str(base), str(adapter))
    header = plan.base.shards[0]
    with ShardReader(base / header.file, header) as reader:
        os.truncate(base / header.file, header.data_offset + 8)
        with pytest.raises(CheckpointFormatError, match="truncated"):
            reader.view(header.size - header.data_offset - 64, 64)
        with pytest.raises(CheckpointFormatError, match="truncated"):
            reader.read_rows(header.tensors[-1], 0, 1)
