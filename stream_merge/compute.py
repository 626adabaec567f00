"""Where and how a shard's jobs run: the compute settings, the job value, output buffers and fp32 scratch.

An output shard is a list of `Job`s in file order (see `pipeline`); each fills one fixed-size buffer from a
`BufferPool` (or hands back a view of the base for untouched bytes). `Scratch` holds per-thread fp32 tensors
reused from block to block. Nothing here knows about tensor plans or LoRA: it is the machinery the jobs run on.
"""

from __future__ import annotations

import contextlib
import gc
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .records import numel
from .safetensors_io import unmap


@dataclass
class Compute:
    """Where and how: the device for the fp32 math; the row-block budget in bytes of fp32 (small blocks keep
    the delta, the sum and the cast in the CPU caches once the fp32 scratch is reused); the chunk size for
    copying untouched bytes; how many jobs run at once (CPU: one per core, each on one torch thread, which
    beats one job on several intra-op threads)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    block_bytes: int = 2 * 1024 * 1024
    check_finite: bool = True
    copy_bytes: int = 4 * 1024 * 1024
    threads: int = 1
    direct_io: bool = True  # write shards with O_DIRECT where the file system allows (see direct_io)
    pipeline: bool | None = None  # patched blocks through cuda_pipeline's staging ring; None: on a GPU only
    device_block_bytes: int = 64 * 1024 * 1024  # the row-block budget (fp32 bytes) of a pipelined merge
    ring_slots: int = 3  # blocks in flight in the pipeline: H2D of one, merge of the next, D2H of a third
    rings: object = field(default=None, repr=False, compare=False)  # cuda_pipeline.RingPool, made on first use

    @property
    def pipelined(self) -> bool:
        """Whether patched tensors go through the device pipeline (by default on a GPU: a transfer per
        small block, one at a time, would leave the copy engines and the SMs idle)."""
        return self.device.type == "cuda" if self.pipeline is None else self.pipeline

    @property
    def row_block_bytes(self) -> int:
        """The row-block budget in fp32 bytes: cache-sized on CPU, tens of MiB for the device pipeline."""
        return self.device_block_bytes if self.pipelined else self.block_bytes

    @property
    def buffer_bytes(self) -> int:
        """Pool buffer size: a copy chunk, or the largest output block (the last block absorbs a remainder of
        up to one block, see row_blocks)."""
        return max(self.copy_bytes, 2 * self.row_block_bytes + 8)

    @property
    def depth(self) -> int:
        """Jobs in flight: enough to keep every thread busy while the oldest result waits for the writer."""
        return 2 * max(1, self.threads)

    @property
    def queue_bound(self) -> int:
        """Most chunks waiting for the writer at once (back-pressure: the producer blocks beyond it). Pool
        buffers are bounded by the pool anyway; this also bounds maps of untouched bytes."""
        return self.depth + 1

    def pool(self, spare: int = 2) -> "BufferPool":
        """A pool big enough for `depth` jobs in flight plus `spare` buffers held by the consumer."""
        return BufferPool(self.buffer_bytes, self.depth + spare + 1)


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """Move every object alive now (torch's own: hundreds of thousands) out of the cyclic collector's reach
    for the duration of a merge: the jobs allocate many small objects, and each full collection would walk
    all of torch. Undone afterwards."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def torch_settings() -> Iterator[None]:
    """The torch settings every merge runs under, restored afterwards. One intra-op thread: row blocks run on
    `Compute.threads` threads of their own, cache-sized tiles gain nothing from intra-op threads, and
    OpenMP's spinning threads collapse under contention with the writer. TF32 off for matmuls and cuDNN
    convolutions: it would change the bits (PEFT_SEMANTICS §0)."""
    threads = torch.get_num_threads()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        torch.set_num_threads(threads)


def compute_threads(device: torch.device) -> int:
    """Jobs to run at once: one per usable core on CPU (at most 8: past that the writer is the limit); two on
    a GPU (each tensor's blocks go through their own staging ring and streams (cuda_pipeline), so the next
    tensor's first blocks are copied in while this one's last blocks are merged and copied back)."""
    if device.type != "cpu":
        return 2
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


class BufferPool:
    """Fixed-size reusable output buffers; `get` blocks until the consumer gives one back."""

    def __init__(self, size: int, count: int) -> None:
        self.size = size
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(count):
            self._free.put(bytearray(size))

    def get(self, nbytes: int) -> bytearray:
        """A pool buffer, or a one-off one for a chunk larger than the pool's buffers."""
        return self._free.get() if nbytes <= self.size else bytearray(nbytes)

    def put(self, buf: bytearray | memoryview) -> None:
        """Take a buffer back: pool buffers are reused, views of the base (untouched bytes) unmapped."""
        if isinstance(buf, memoryview):
            unmap(buf)
        elif len(buf) == self.size:
            self._free.put(buf)


@dataclass(frozen=True)
class Job:
    """One chunk of the output: `fill(buf)` writes its `nbytes` bytes to the start of a pool buffer, or
    `source()` returns them as a view of the base (untouched bytes: no copy of ours at all)."""

    name: str | None
    nbytes: int
    fill: Callable[[bytearray], None] | None = None
    source: Callable[[], memoryview] | None = None

    def run(self, buf: bytearray | None) -> bytearray | memoryview:
        """The chunk's bytes: a view of the base, or `buf` once filled."""
        if self.source is not None:
            return self.source()
        assert self.fill is not None and buf is not None
        self.fill(buf)
        return buf


class Scratch(threading.local):
    """Per-thread reusable fp32 tensors: allocating a fresh block-sized tensor per block costs page faults
    and zeroing that rival the math itself."""

    def __init__(self) -> None:
        self.bufs: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def take(self, slot: str, shape: Sequence[int], device: torch.device, dtype: torch.dtype = torch.float32
             ) -> torch.Tensor:
        """An uninitialised tensor of `shape` (a view of this thread's buffer for `slot`, grown as needed)."""
        n = numel(tuple(shape))
        key = (slot, device, dtype)
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = self.bufs[key] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(tuple(shape))
