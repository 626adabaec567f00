"""The device pipeline: a patched tensor's row blocks through a ring of staging buffers on three streams.

A GPU merge is bound by moving bytes, not by the math: for each block the base rows are copied host -> device,
merged (GEMM + add + round) and copied back. Run one block at a time and each engine idles two thirds of the
time. Here block j is *launched* (staged into a pinned host buffer, then H2D on the "h2d" stream, the recipe on
the "compute" stream, D2H on the "d2h" stream, each stream waiting on the previous one's event) up to
`slots - 1` blocks before it is *consumed* (the host waits for its D2H event, checks it and copies it into the
output buffer), so the copy engines and the SMs work on three blocks at once.

The scheduling (which block is in which slot, what waits on what, results in file order) is plain Python on a
`Backend`: `CudaBackend` is a thin layer over CUDA streams and events; `ImmediateBackend` runs every op at once
(the same pipeline on the CPU, which is how it is tested without a GPU). A slot is reused only after the host
consumed the block that held it, and every device op waits on the event of the op whose output it reads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from .compute import Compute, Job

STREAMS = ("h2d", "compute", "d2h")


class Backend(Protocol):
    """Where device ops run: `run` enqueues `fn` on a stream; `record` marks the stream's position; `wait`
    makes a stream wait for a mark; `sync` makes the host wait for it; `host_buffer` is a staging buffer."""

    device: torch.device

    def run(self, stream: str, fn: Callable[[], None]) -> None: ...
    def record(self, stream: str) -> object: ...
    def wait(self, stream: str, event: object) -> None: ...
    def sync(self, event: object) -> None: ...
    def host_buffer(self, nbytes: int) -> torch.Tensor: ...
    def join_current(self) -> None: ...


class ImmediateBackend:
    """Every op runs when enqueued (a CPU device, or a GPU used synchronously): events are already done."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def run(self, stream: str, fn: Callable[[], None]) -> None:
        fn()

    def record(self, stream: str) -> object:
        return None

    def wait(self, stream: str, event: object) -> None:
        return None

    def sync(self, event: object) -> None:
        return None

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def join_current(self) -> None:
        return None


class CudaBackend:
    """Three CUDA streams of one device; pinned host buffers (so the copies are asynchronous DMA)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.streams = {name: torch.cuda.Stream(device=device) for name in STREAMS}

    def run(self, stream: str, fn: Callable[[], None]) -> None:
        with torch.cuda.stream(self.streams[stream]):
            fn()

    def record(self, stream: str) -> object:
        event = torch.cuda.Event()
        event.record(self.streams[stream])
        return event

    def wait(self, stream: str, event: object) -> None:
        self.streams[stream].wait_event(event)  # type: ignore[arg-type]

    def sync(self, event: object) -> None:
        event.synchronize()  # type: ignore[attr-defined]

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def join_current(self) -> None:
        """Every stream waits for the work already queued on the current stream (factors copied there)."""
        current = torch.cuda.current_stream(self.device)
        for s in self.streams.values():
            s.wait_stream(current)


def make_backend(device: torch.device) -> Backend:
    """The backend for a device: CUDA streams on a GPU, immediate ops elsewhere."""
    return CudaBackend(device) if device.type == "cuda" else ImmediateBackend(device)


_POOLS_LOCK = threading.Lock()


def ring_pool(compute: Compute) -> RingPool:
    """The merge's rings (made on first use, then reused from tensor to tensor and shard to shard)."""
    with _POOLS_LOCK:
        if compute.rings is None:
            compute.rings = RingPool(compute.device, compute.ring_slots)
        return compute.rings  # type: ignore[return-value]


@dataclass
class Slot:
    """One ring entry: host staging in/out (pinned on CUDA), device in/out, the block's finite-check sum, the
    event after which the host may read `host_out`, and the block that owns the slot (None: free)."""

    host_in: torch.Tensor
    host_out: torch.Tensor
    dev_in: torch.Tensor
    dev_out: torch.Tensor
    stat: torch.Tensor
    stat_host: torch.Tensor
    done: object = None
    owner: int | None = None


class Ring:
    """`slots` staging slots of `nbytes` each on one backend, reused from tensor to tensor (pinned memory is
    slow to allocate). Grown, never shrunk, when a larger block comes."""

    def __init__(self, backend: Backend, slots: int) -> None:
        self.backend = backend
        self.slots: list[Slot] = []
        self.count = max(2, slots)
        self.nbytes = 0

    def reserve(self, nbytes: int) -> None:
        """Make every slot hold at least `nbytes`; only called while no slot is owned."""
        assert all(s.owner is None for s in self.slots), "ring resized while in use"
        if nbytes <= self.nbytes:
            return
        b, dev = self.backend, self.backend.device
        self.slots = [Slot(b.host_buffer(nbytes), b.host_buffer(nbytes), torch.empty(nbytes, dtype=torch.uint8,
                           device=dev), torch.empty(nbytes, dtype=torch.uint8, device=dev),
                           torch.zeros(1, device=dev), b.host_buffer(4).view(torch.float32))
                      for _ in range(self.count)]
        self.nbytes = nbytes


class RingPool:
    """Rings handed to one tensor pipeline at a time (pipelines of different tensors may be in flight at once
    on several job threads)."""

    def __init__(self, device: torch.device, slots: int, backend: Callable[[torch.device], Backend] = make_backend
                 ) -> None:
        self.device, self.slots, self.backend = device, slots, backend
        self._free: list[Ring] = []
        self._lock = threading.Lock()

    def take(self) -> Ring:
        with self._lock:
            if self._free:
                return self._free.pop()
        return Ring(self.backend(self.device), self.slots)

    def give(self, ring: Ring) -> None:
        with self._lock:
            self._free.append(ring)


class BlockMath(Protocol):
    """What the pipeline needs from one tensor's merge (tensor_jobs._TensorMerge provides it)."""

    name: str
    blocks: list[tuple[int, int]]
    row_elems: int  # elements per row (a block is rows x row_elems elements)
    dtype: torch.dtype  # the base dtype: what is staged, merged into and copied back
    out_itemsize: int  # bytes per element of the output (another dtype with --dtype)

    def block_shape(self, r0: int, r1: int) -> tuple[int, ...]: ...
    def base_view(self, r0: int, r1: int) -> memoryview: ...
    def release_view(self, view: memoryview) -> None: ...
    def compute_block(self, base: torch.Tensor, out: torch.Tensor, r0: int, r1: int) -> torch.Tensor | None: ...
    def finish(self, stat: torch.Tensor | None, out: torch.Tensor, r0: int, r1: int, buf: bytearray) -> None: ...


class TensorPipeline:
    """One tensor's blocks through a `Ring`: `jobs()` yields one Job per block, in file order. Filling job i
    launches blocks up to i + slots - 1, then consumes block i. Fills are taken in block order even when jobs
    run on several threads (each waits for its turn), since a slot is only free once its block is consumed."""

    def __init__(self, math: BlockMath, rings: RingPool) -> None:
        self.math, self.rings = math, rings
        self.ring: Ring | None = None
        self.launched = 0
        self.consumed = 0
        self.turn = threading.Condition()
        self.failed: BaseException | None = None
        self.itemsize = math.dtype.itemsize

    def _nbytes(self, i: int) -> int:
        r0, r1 = self.math.blocks[i]
        return (r1 - r0) * self.math.row_elems * self.itemsize

    def _launch(self, j: int) -> None:
        """Stage block j into its slot and queue H2D, the merge and D2H, each waiting for the one before."""
        assert self.ring is not None
        ring, b, m = self.ring, self.ring.backend, self.math
        slot = ring.slots[j % ring.count]
        assert slot.owner is None, f"slot of block {slot.owner} reused by block {j} before it was consumed"
        slot.owner = j
        r0, r1 = m.blocks[j]
        n, shape = self._nbytes(j), m.block_shape(r0, r1)
        view = m.base_view(r0, r1)
        try:
            slot.host_in[:n].copy_(torch.frombuffer(view, dtype=torch.uint8))
        finally:
            m.release_view(view)
        b.run("h2d", lambda: slot.dev_in[:n].copy_(slot.host_in[:n], non_blocking=True))
        b.wait("compute", b.record("h2d"))

        def merge() -> None:
            base, out = slot.dev_in[:n].view(m.dtype).view(shape), slot.dev_out[:n].view(m.dtype).view(shape)
            merged = m.compute_block(base, out, r0, r1)
            if merged is not None:
                slot.stat.copy_(torch.sum(merged, dtype=torch.float32).reshape(1))
        b.run("compute", merge)
        b.wait("d2h", b.record("compute"))

        def back() -> None:
            slot.host_out[:n].copy_(slot.dev_out[:n], non_blocking=True)
            slot.stat_host.copy_(slot.stat, non_blocking=True)
        b.run("d2h", back)
        slot.done = b.record("d2h")

    def _consume(self, i: int, buf: bytearray) -> None:
        assert self.ring is not None
        slot = self.ring.slots[i % self.ring.count]
        assert slot.owner == i, f"block {i} expected in its slot, found block {slot.owner}"
        self.ring.backend.sync(slot.done)
        r0, r1 = self.math.blocks[i]
        out = slot.host_out[:self._nbytes(i)].view(self.math.dtype).view(self.math.block_shape(r0, r1))
        self.math.finish(slot.stat_host, out, r0, r1, buf)
        slot.owner = None

    def fill(self, i: int, buf: bytearray) -> None:
        """Write block i's output rows to the start of `buf` (in block order: waits for block i - 1)."""
        with self.turn:
            self.turn.wait_for(lambda: self.consumed == i or self.failed is not None)
            if self.failed is not None:
                raise RuntimeError(f"{self.math.name}: an earlier block failed") from self.failed
            try:
                if self.ring is None:
                    self.ring = self.rings.take()
                    self.ring.reserve(max(self._nbytes(k) for k in range(len(self.math.blocks))))
                    self.ring.backend.join_current()
                last = min(len(self.math.blocks), i + self.ring.count)
                while self.launched < last:
                    self._launch(self.launched)
                    self.launched += 1
                self._consume(i, buf)
                self.consumed += 1
                if self.consumed == len(self.math.blocks):
                    self.rings.give(self.ring)
                    self.ring = None
            except BaseException as exc:
                self.failed = exc  # later blocks stop waiting for a turn that will never come
                raise
            finally:
                self.turn.notify_all()

    def jobs(self) -> Iterator[Job]:
        for i, (r0, r1) in enumerate(self.math.blocks):
            nbytes = (r1 - r0) * self.math.row_elems * self.math.out_itemsize
            yield Job(self.math.name, nbytes, lambda buf, i=i: self.fill(i, buf))
