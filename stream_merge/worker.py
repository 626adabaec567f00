"""Merges one shard to a file: the shard's chunks (see `pipeline`) written, in order, on a writer thread.

The writer overlaps disk writes with reading and computing the next blocks (hashlib, os.write and torch all
release the GIL). Its queue is bounded (`Compute.queue_bound`): when the disk is the slow side, the producer
waits instead of piling up maps of untouched bytes. The rest of the package imports the merge machinery from
here (`Compute`, `torch_settings`, `shard_chunks`, ...), whichever module holds it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .adapter import AdapterReader
from .compute import BufferPool, Compute, Scratch, compute_threads, frozen_gc, torch_settings
from .pipeline import Chunk, out_header, shard_chunks, shard_jobs
from .recipes import Recipe, cannot_overflow, choose_recipe
from .records import ShardPlan, ShardResult
from .fileio import AtomicFile
from .interrupts import check as check_interrupt
from .safetensors_io import ShardReader
from .shard_inputs import Readers
from .shard_rows import OtherShards

__all__ = ["BufferPool", "Chunk", "Compute", "Recipe", "Scratch", "cannot_overflow", "choose_recipe",
           "compute_threads", "frozen_gc", "merge_shard", "out_header", "publish", "shard_chunks", "shard_jobs",
           "torch_settings", "write_shard"]

class _Writer:
    """A thread that writes (and hashes) buffers in order and gives them back to the pool. At most `bound`
    buffers wait in its queue: `submit` blocks beyond that (back-pressure). `high_water` is the most that
    ever waited."""

    def __init__(self, out: AtomicFile, pool: BufferPool, on_bytes: Callable[[int], None], bound: int) -> None:
        self.out = out
        self.pool = pool
        self.on_bytes = on_bytes
        self.bound = bound
        self.todo: queue.Queue[tuple[bytearray | memoryview, int] | None] = queue.Queue(maxsize=bound)
        self.high_water = 0
        self.error: BaseException | None = None
        self.cancelled = False
        self.thread = threading.Thread(target=self._run, name="stream-merge-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.todo.get()) is not None:
            buf, n = item
            if self.error is None and not self.cancelled:
                try:
                    self.out.write(memoryview(buf)[:n])
                    self.on_bytes(n)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the producer thread
                    self.error = exc
            self.pool.put(buf)

    def _put(self, item: tuple[bytearray | memoryview, int] | None) -> None:
        """Queue an item, waiting for room; gives up only if the writer thread is gone (nothing would drain)."""
        while True:
            try:
                self.todo.put(item, timeout=0.5)
                return
            except queue.Full:
                if not self.thread.is_alive():
                    raise RuntimeError("the shard writer thread ended unexpectedly") from None

    def submit(self, buf: bytearray | memoryview, n: int) -> None:
        """Queue a buffer for writing (blocks while `bound` buffers wait); raises the writer's error, if any,
        and an interrupt that Python may have dropped (`interrupts`)."""
        if self.error is None:
            try:
                check_interrupt()
            except KeyboardInterrupt:
                self.pool.put(buf)
                raise
        if self.error is not None:
            self.pool.put(buf)
            raise self.error
        self._put((buf, n))
        self.high_water = max(self.high_water, self.todo.qsize())

    def finish(self) -> None:
        self._put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """After a failure or an interrupt: drop what is queued and wait until the thread has ended, even
        through a second Ctrl-C (the first one is already on its way up)."""
        self.cancelled = True
        while self.thread.is_alive():
            try:
                self.todo.put(None, timeout=0.1)
                self.thread.join()
            except (KeyboardInterrupt, queue.Full):
                continue


def write_shard(shard: ShardPlan, readers: ShardReader | Readers, adapters: Sequence[AdapterReader],
                out_path: Path, compute: Compute, on_bytes: Callable[[int], None] = lambda n: None,
                checksum: bool = True, others: OtherShards | None = None) -> tuple[AtomicFile, ShardResult]:
    """Write the merged shard to a temp file beside `out_path`; it is published (fsync, rename) by
    `commit()` on the returned AtomicFile, which the runner does on another thread while the next shard is
    merged. `readers` are the base shards it reads (or the one reader of a shard that reads one). The
    result's size and XXH3-128 (and sha256, with `checksum`) are already final. `others` reads tensors of other shards
    (fp8 scales stored apart from their weight; default: the files beside this one)."""
    t0 = time.perf_counter()
    out = AtomicFile(out_path, digest=checksum, direct=compute.direct_io)
    writer: _Writer | None = None
    try:
        pool = compute.pool()
        writer = _Writer(out, pool, on_bytes, compute.queue_bound)
        chunks = shard_chunks(shard, readers, adapters, compute, pool, others)
        try:
            for _, buf, n in chunks:
                writer.submit(buf, n)
        finally:
            chunks.close()  # stops the compute threads first when the writer failed
        writer.finish()
    except BaseException:
        if writer is not None:
            writer.stop()  # the file is closed only once nothing writes to it any more
        out.abort()
        raise
    touched = len(shard.touched)
    return out, ShardResult(file=shard.file, size=out.size, sha256=out.hexdigest(), patched=touched,
                            copied=len(shard.tensors) - touched, seconds=time.perf_counter() - t0,
                            xxh3_128=out.xxh3_128())


def merge_shard(shard: ShardPlan, readers: ShardReader | Readers, adapters: Sequence[AdapterReader],
                out_path: Path, compute: Compute, on_bytes: Callable[[int], None] = lambda n: None,
                checksum: bool = True, others: OtherShards | None = None) -> ShardResult:
    """Write the merged version of one shard to `out_path` atomically and return its size and digests."""
    out, result = write_shard(shard, readers, adapters, out_path, compute, on_bytes, checksum, others)
    publish(out)
    return result


def publish(out: AtomicFile) -> None:
    """Make a written shard durable and visible (fsync, rename, fsync the folder); on failure remove it."""
    try:
        out.commit()
    except BaseException:
        out.abort()
        raise
