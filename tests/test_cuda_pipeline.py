"""The device pipeline (stream_merge.cuda_pipeline) run on the CPU: the same scheduling as on a GPU, its streams
simulated. Every recipe gives the bytes of the synchronous path; blocks come back in file order whatever the
block sizes and the order the simulated streams run in; a staging slot is never reused before its block is
consumed; a missing stream dependency is caught (so the simulation can fail)."""

from __future__ import annotations

import json
import random
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import stream_merge
from conftest import make_pair, rewrite_adapter
from stream_merge.adapter import AdapterReader
from stream_merge.cuda_pipeline import STREAMS, RingPool, TensorPipeline
from stream_merge.errors import NonFiniteError
from stream_merge.safetensors_io import ShardReader
from stream_merge.synthetic import LlamaShape
from stream_merge.worker import Compute, shard_chunks, torch_settings

WIDE = LlamaShape(hidden=256, intermediate=320, layers=2, vocab=384, heads=4, kv_heads=2)
CPU = torch.device("cpu")


class DeferredBackend:
    """A simulated GPU: each op waits in its stream's queue and runs later, streams advancing in a random
    order and only past a `wait` whose event has been reached. A pipeline that forgot a dependency reads a
    buffer before it was written (or after it was overwritten) and gives other bytes."""

    def __init__(self, device: torch.device, rng: random.Random, honour_waits: bool = True) -> None:
        self.device, self.rng, self.honour = device, rng, honour_waits
        self.queues: dict[str, deque[Any]] = {s: deque() for s in STREAMS}
        self.queued = dict.fromkeys(STREAMS, 0)
        self.done = dict.fromkeys(STREAMS, 0)

    def _push(self, stream: str, op: Any) -> None:
        self.queues[stream].append(op)
        self.queued[stream] += 1
        for _ in range(self.rng.randint(0, 2)):  # let some earlier work run now, some later
            self._step(self.rng.choice(STREAMS))

    def _step(self, stream: str) -> bool:
        q = self.queues[stream]
        if not q:
            return False
        op = q[0]
        if isinstance(op, tuple):
            ev_stream, pos = op
            if self.done[ev_stream] < pos:
                return False
        else:
            op()
        q.popleft()
        self.done[stream] += 1
        return True

    def run(self, stream: str, fn: Callable[[], None]) -> None:
        self._push(stream, fn)

    def record(self, stream: str) -> object:
        return (stream, self.queued[stream])

    def wait(self, stream: str, event: object) -> None:
        if self.honour:
            self._push(stream, event)

    def sync(self, event: object) -> None:
        ev_stream, pos = event  # type: ignore[misc]
        while self.done[ev_stream] < pos:
            if not any(self._step(s) for s in self.rng.sample(STREAMS, len(STREAMS))):
                raise AssertionError("deadlock: no stream can advance")

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.full((nbytes,), 0xA5, dtype=torch.uint8)  # never zeros: a stale read shows

    def join_current(self) -> None:
        return None


def _merged_bytes(base: Path, adapter: Path | list[Path], compute: Compute, **options: Any) -> dict[str, bytes]:
    """Every output shard's bytes as `shard_chunks` yields them with `compute`."""
    plan = stream_merge.plan(str(base), [str(a) for a in adapter] if isinstance(adapter, list) else str(adapter),
                             **options)
    assert not plan.problems, plan.problems
    adapters = [AdapterReader(spec) for spec in plan.adapters]
    out: dict[str, bytes] = {}
    try:
        with torch_settings():
            for shard in plan.shards:
                header = next(h for h in plan.base.shards if h.file == shard.file)
                pool = compute.pool()
                data = bytearray()
                with ShardReader(base / shard.file, header) as reader:
                    for _, buf, n in shard_chunks(shard, reader, adapters, compute, pool):
                        data += memoryview(buf)[:n]
                        pool.put(buf)
                out[shard.file] = bytes(data)
    finally:
        for a in adapters:
            a.close()
    return out


def _pipelined(device_block_bytes: int = 40 * 1024, slots: int = 3, threads: int = 1,
               backend: Callable[[torch.device], Any] | None = None) -> Compute:
    c = Compute(pipeline=True, device_block_bytes=device_block_bytes, ring_slots=slots, threads=threads,
                copy_bytes=5000)
    if backend is not None:
        c.rings = RingPool(CPU, slots, backend=backend)
    return c


# --- inputs, one per recipe ----------------------------------------------------------------------------------

def _linear(tmp: Path) -> tuple[Path, Path, dict]:
    base, adapter = make_pair(tmp, shape=WIDE, shard_bytes=600_000, r=8, alpha=12.0)
    return base, adapter, {}


def _embedding_and_head(tmp: Path) -> tuple[Path, Path, dict]:
    """Embedding LoRA (rounded twice, column blocks of A) and the lm_head."""
    base, adapter = make_pair(tmp, shape=WIDE, shard_bytes=600_000, r=8, alpha=12.0)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "embed_tokens", "lm_head"]
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(3)
    p = "base_model.model."

    def mutate(sd: dict) -> None:
        for k in [k for k in sd if "q_proj" not in k]:
            del sd[k]
        sd[p + "model.embed_tokens.lora_embedding_A"] = torch.randn(8, WIDE.vocab, generator=g)
        sd[p + "model.embed_tokens.lora_embedding_B"] = torch.randn(WIDE.hidden, 8, generator=g)
        sd[p + "lm_head.lora_A.weight"] = torch.randn(8, WIDE.hidden, generator=g)
        sd[p + "lm_head.lora_B.weight"] = torch.randn(WIDE.vocab, 8, generator=g)
    rewrite_adapter(adapter, mutate)
    return base, adapter, {}


def _peft(tmp: Path, family: str, dtype: torch.dtype = torch.bfloat16, **lora: Any) -> tuple[Path, Path, dict]:
    pytest.importorskip("peft")
    from oracle import make_adapter, make_base

    base = make_base(tmp / "base", family, dtype, shards=2)
    return base, make_adapter(base, tmp / "adapter", **lora), {}


def _moe(tmp: Path) -> tuple[Path, Path, dict]:
    from test_pipeline import _fused_moe_pair

    base, adapter, _ = _fused_moe_pair(tmp, experts=8, rows=200, cols=48, r=4)
    return base, adapter, {}


def _fp8(tmp: Path) -> tuple[Path, Path, dict]:
    from test_fp8 import _adapter, _fp8_base

    return _fp8_base(tmp / "base"), _adapter(tmp / "adapter")[0], {"dequantize": True}


def _two_adapters_fp32_out(tmp: Path) -> tuple[Path, list[Path], dict]:
    """A weighted sum of two adapters, written as fp32 (`--dtype`: merged in bf16, then converted)."""
    base, a1 = make_pair(tmp, shape=WIDE, shard_bytes=600_000, r=8, alpha=12.0)
    from stream_merge.synthetic import write_adapter

    a2 = tmp / "adapter2"
    write_adapter(a2, WIDE, r=4, alpha=5.0, base_name=str(base))
    rewrite_adapter(a2, lambda sd: sd.update({k: v * 0.7 for k, v in sd.items()}))
    return base, [a1, a2], {"weights": [0.6, 0.3], "dtype": "fp32"}


RECIPES: dict[str, Callable[[Path], tuple[Path, Any, dict]]] = {
    "linear": _linear,
    "embedding-and-head": _embedding_and_head,
    "conv1d": lambda t: _peft(t, "gpt2", r=8, lora_alpha=12, target_modules=["c_attn", "c_proj", "c_fc"],
                              fan_in_fan_out=True),
    "conv1d-bias": lambda t: _peft(t, "gpt2", r=8, lora_alpha=12, target_modules=["c_attn"], fan_in_fan_out=True,
                                   bias="all"),
    "dora-linear": lambda t: _peft(t, "llama", r=8, lora_alpha=12, target_modules=["q_proj", "down_proj"],
                                   use_dora=True),
    "dora-conv1d": lambda t: _peft(t, "gpt2", r=8, lora_alpha=12, target_modules=["c_attn"], fan_in_fan_out=True,
                                   use_dora=True),
    "fp16-base": lambda t: _peft(t, "llama", torch.float16, r=8, lora_alpha=12,
                                 target_modules=["q_proj", "gate_proj", "embed_tokens"]),
    "moe-param": _moe,
    "fp8-dequant": _fp8,
    "two-adapters-fp32-out": _two_adapters_fp32_out,
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Any, dict, dict[str, bytes]]]:
    """(base, adapter, plan options, the synchronous path's output bytes) per recipe, made once."""
    cache: dict[str, tuple[Path, Any, dict, dict[str, bytes]]] = {}

    def get(name: str) -> tuple[Path, Any, dict, dict[str, bytes]]:
        if name not in cache:
            base, adapter, opts = RECIPES[name](tmp_path_factory.mktemp(name))
            cache[name] = (base, adapter, opts, _merged_bytes(base, adapter, Compute(copy_bytes=5000), **opts))
        return cache[name]
    return get


@pytest.mark.parametrize("name", list(RECIPES))
def test_the_pipeline_gives_the_bytes_of_the_synchronous_path(name: str, inputs: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    base, adapter, opts, want = inputs(name)
    launched: list[str] = []
    real = TensorPipeline._launch

    def counting(self: TensorPipeline, j: int) -> None:
        launched.append(self.math.name)
        real(self, j)
    monkeypatch.setattr(TensorPipeline, "_launch", counting)
    for compute in (_pipelined(), _pipelined(8 * 1024, slots=2, threads=3),
                    _pipelined(backend=lambda d: DeferredBackend(d, random.Random(7)))):
        assert _merged_bytes(base, adapter, compute, **opts) == want, compute
    if name != "fp8-dequant":  # fp8 blocks are merged by their own path, synchronously
        assert launched, "no tensor went through the pipeline"


@pytest.mark.parametrize("seed", range(12))
def test_blocks_come_back_in_file_order_under_any_schedule(seed: int, inputs: Any) -> None:
    """Random block budgets (many blocks, a last one that absorbs a remainder), ring sizes and stream
    interleavings: the output is the synchronous path's, byte for byte."""
    rng = random.Random(seed)
    base, adapter, opts, want = inputs(rng.choice(["linear", "embedding-and-head", "moe-param"]))
    compute = _pipelined(rng.choice([4, 9, 16, 33, 100]) * 1024, slots=rng.choice([2, 3, 4]),
                         backend=lambda d: DeferredBackend(d, random.Random(seed)))
    assert _merged_bytes(base, adapter, compute, **opts) == want


def test_a_missing_stream_dependency_is_caught(inputs: Any) -> None:
    """The simulation can fail: with the pipeline's `wait`s ignored, a block is merged from staging bytes
    not yet copied (or copied back before it was merged) under some schedule."""
    base, adapter, opts, want = inputs("linear")
    wrong = 0
    for seed in range(4):
        compute = _pipelined(16 * 1024, backend=lambda d, s=seed: DeferredBackend(d, random.Random(s), False))
        wrong += _merged_bytes(base, adapter, compute, **opts) != want
    assert wrong


def test_a_slot_is_never_reused_before_its_block_is_consumed(inputs: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """At every launch, the blocks in flight are the consecutive ones after the last consumed, at most one
    per slot; and a pipeline that tried to launch one more is refused."""
    base, adapter, opts, want = inputs("linear")
    seen: list[tuple[int, int]] = []
    real = TensorPipeline._launch

    def checked(self: TensorPipeline, j: int) -> None:
        assert self.ring is not None
        owners = sorted(s.owner for s in self.ring.slots if s.owner is not None)
        assert owners == list(range(self.consumed, j)) and len(owners) < self.ring.count, (owners, j)
        seen.append((self.consumed, j))
        real(self, j)
    monkeypatch.setattr(TensorPipeline, "_launch", checked)
    compute = _pipelined(8 * 1024, slots=3, backend=lambda d: DeferredBackend(d, random.Random(1)))
    assert _merged_bytes(base, adapter, compute, **opts) == want
    assert max(j - c for c, j in seen) == 2  # three blocks really were in flight at once

    monkeypatch.setattr(TensorPipeline, "_launch", real)
    pipe = next(iter(_one_pipeline(base, adapter, compute)))
    pipe.ring = compute.rings.take()  # type: ignore[union-attr]
    pipe.ring.reserve(1 << 16)
    for j in range(pipe.ring.count):
        pipe._launch(j)
    with pytest.raises(AssertionError, match="before it was consumed"):
        pipe._launch(pipe.ring.count)


def _one_pipeline(base: Path, adapter: Path, compute: Compute) -> list[TensorPipeline]:
    from stream_merge.tensor_jobs import _TensorMerge
    from stream_merge.compute import Scratch

    plan = stream_merge.plan(str(base), str(adapter))
    shard = next(s for s in plan.shards if s.touched)
    header = next(h for h in plan.base.shards if h.file == shard.file)
    reader = ShardReader(base / shard.file, header)
    merge = _TensorMerge(shard.touched[0], reader, [AdapterReader(s) for s in plan.adapters], compute, Scratch())
    assert len(merge.blocks) > compute.ring_slots
    return [TensorPipeline(merge, compute.rings)]  # type: ignore[arg-type]


@pytest.mark.parametrize("threads", [1, 3])
def test_an_overflow_is_named_and_later_blocks_do_not_wait_forever(tmp_path: Path, threads: int) -> None:
    """fp16 overflow in a pipelined block: NonFiniteError naming the tensor, also with jobs on 3 threads
    (blocks waiting for their turn give up instead of hanging)."""
    base, adapter, _ = _peft(tmp_path, "llama", torch.float16, r=8, lora_alpha=12, target_modules=["q_proj"])
    rewrite_adapter(adapter, lambda sd: sd.update({k: v * 1e6 for k, v in sd.items() if "lora_B" in k}))
    with pytest.raises(NonFiniteError, match="q_proj"):
        _merged_bytes(base, adapter, _pipelined(4 * 1024, threads=threads))


def test_device_blocks_have_their_own_budget() -> None:
    """Pipelined merges block by `device_block_bytes` (tens of MiB), the CPU by `block_bytes`; pool buffers
    hold the largest block either way. A GPU pipelines by default, the CPU does not."""
    cpu, gpu = Compute(), Compute(device=torch.device("cuda"))
    assert not cpu.pipelined and gpu.pipelined and Compute(pipeline=True).pipelined
    assert cpu.row_block_bytes == cpu.block_bytes and gpu.row_block_bytes == gpu.device_block_bytes >= 32 << 20
    assert gpu.buffer_bytes >= 2 * gpu.device_block_bytes
    from stream_merge.compute import compute_threads

    assert compute_threads(torch.device("cuda")) == 2  # two tensors' rings in flight: one fills, one drains


@pytest.mark.slow
def test_bench_cuda_runs_on_the_cpu(tmp_path: Path) -> None:
    """scripts/bench_cuda.py, the one script for a GPU machine, works end to end with --device cpu: read rate,
    merges, PEFT's merge and a bitwise parity verdict in its JSON."""
    import subprocess
    import sys

    pytest.importorskip("peft")
    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_cuda.py"
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, str(script), "--device", "cpu", "--size", "8MB", "--hidden", "128",
                        "--intermediate", "344", "--vocab", "512", "--shard-size", "3MB", "--repeats", "1",
                        "--workdir", str(tmp_path / "work"), "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr + p.stdout
    d = json.loads(out.read_text())
    assert d["parity"]["bitwise_equal"] and d["parity"]["elements"] > 0 and not d["parity"]["tensors_differ"]
    assert len(d["read"]["runs"]) == 2 and d["merge"]["in_process_gb_per_s"] > 0 and "merge_s" in d["peft"]
