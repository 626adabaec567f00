"""One output shard as a stream of chunks in file order: its header, untouched byte ranges, merged blocks.

`shard_jobs` lists the shard's jobs (see `tensor_jobs` for one tensor's); `shard_chunks` runs them on
`Compute.threads` threads, each filling one buffer from a small pool, and hands the buffers on in file order:
`worker.write_shard` writes them on a writer thread while the next blocks are read and computed, `verify
--full` compares them with an existing output. Memory is the pool plus per-thread fp32 scratch and one
tensor's adapter factors, whatever the shard or tensor size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from .adapter import AdapterReader
from .compute import BufferPool, Compute, Job, Scratch
from .records import ShardPlan, TensorPlan
from .safetensors_io import ShardReader, header_bytes
from .shard_inputs import Readers, as_readers
from .shard_rows import OtherShards
from .tensor_jobs import convert_jobs, merged_jobs

Chunk = tuple[str | None, "bytearray | memoryview", int]  # (tensor name or None, buffer, valid bytes)


def out_header(shard: ShardPlan, readers: ShardReader | Readers) -> bytes:
    """The output header: the input's own bytes when nothing changes, else built from the plan (names,
    dtypes, shapes in the plan's order, offsets of the output data order, the plan's metadata)."""
    if shard.header_unchanged:
        return as_readers(readers).get(shard.inputs[0]).raw_header()
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for t in data_order(shard):
        offsets[t.name] = (pos, pos + t.out_nbytes)
        pos += t.out_nbytes
    return header_bytes([(t.name, t.dtype, t.shape, *offsets[t.name]) for t in shard.tensors], shard.metadata)


def data_order(shard: ShardPlan) -> list[TensorPlan]:
    """Output data order (see `ShardPlan.data_order`): an input's order, an added tensor right after its source."""
    return list(shard.data_order)


def _raw(tp: TensorPlan) -> bool:
    """Copied byte for byte (no merge, no dtype conversion)."""
    return tp.action == "copy" and tp.dtype == tp.source.dtype


def _copy_jobs(reader: ShardReader, start: int, end: int, chunk: int) -> Iterator[Job]:
    for pos in range(start, end, chunk):
        n = min(chunk, end - pos)
        yield Job(None, n, source=lambda pos=pos, n=n: reader.view(pos, n))


def shard_jobs(shard: ShardPlan, readers: ShardReader | Readers, adapters: Sequence[AdapterReader],
               compute: Compute, scratch: Scratch | None = None, others: OtherShards | None = None
               ) -> Iterator[Job]:
    """The output shard as jobs in file order, each tensor read from its own base shard (`readers`; a single
    reader for a shard that reads one); adjacent untouched tensors of one input, contiguous there and in the
    output, become one byte range. `others` reads tensors of other shards (an fp8 weight's scales stored
    elsewhere; default: the files beside the tensor's own)."""
    scratch = scratch if scratch is not None else Scratch()
    readers = as_readers(readers)
    header = out_header(shard, readers)

    def put_header(buf: bytearray) -> None:
        buf[:len(header)] = header

    yield Job(None, len(header), put_header)
    ordered = data_order(shard)
    i = 0
    while i < len(ordered):
        tp = ordered[i]
        i += 1
        reader = readers.get(tp.source_file)
        if tp.action != "copy":
            yield from merged_jobs(tp, reader, adapters, compute, scratch, others)
            continue
        if not _raw(tp):
            yield from convert_jobs(tp, reader, compute)
            continue
        start, end = tp.source.start, tp.source.end
        while (i < len(ordered) and _raw(ordered[i]) and ordered[i].source_file == tp.source_file
               and ordered[i].source.start == end):
            end = ordered[i].source.end
            i += 1
        yield from _copy_jobs(reader, start, end, compute.copy_bytes)


def shard_chunks(shard: ShardPlan, readers: ShardReader | Readers, adapters: Sequence[AdapterReader],
                 compute: Compute, pool: BufferPool, others: OtherShards | None = None) -> Iterator[Chunk]:
    """The output shard as (tensor name or None, buffer, valid bytes), in file order. Jobs run on
    `compute.threads` threads (torch releases the GIL); each buffer belongs to the consumer, who gives it
    back with `pool.put`. The pool must hold more than `compute.depth` buffers plus those the consumer keeps."""
    inputs = as_readers(readers)
    jobs = shard_jobs(shard, inputs, adapters, compute, Scratch(), others)
    if compute.threads <= 1:
        for job in jobs:
            yield job.name, job.run(None if job.source else pool.get(job.nbytes)), job.nbytes
        return
    inflight: deque[tuple[Job, Future[bytearray | memoryview]]] = deque()
    with ThreadPoolExecutor(compute.threads, thread_name_prefix="stream-merge-compute") as ex:
        try:
            for job in jobs:
                if len(inflight) >= compute.depth:
                    done, fut = inflight.popleft()
                    yield done.name, fut.result(), done.nbytes
                # pool buffers are taken here, in file order: the oldest job always has one
                inflight.append((job, ex.submit(job.run, None if job.source else pool.get(job.nbytes))))
            while inflight:
                done, fut = inflight.popleft()
                yield done.name, fut.result(), done.nbytes
        except BaseException:  # a failure, Ctrl-C, or the consumer stopped: jobs waiting for bytes of a
            inputs.abandon()   # download in progress must not hold the pool's shutdown until they arrive
            raise
        finally:
            for _, fut in inflight:
                fut.cancel()
