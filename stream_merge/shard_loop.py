"""The local shard loop: merge the output shards this run owns one after the other, overlapping each shard's
publication (fsync, rename, journal record, upload hand-off) with the next shard's merge. A Hub base's input
shards are fetched ahead for the next output shards, read while they download (`hub_stream`; a shard whose
download cannot vouch for the bytes read is merged again from the checked file), and released once no later
output shard reads them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .adapter import AdapterReader
from .errors import MergeInterrupted, RedoFromFile
from .fileio import AtomicFile
from .interrupts import check as check_interrupt
from .journal import Journal
from .progress import Progress, progress_callback
from .records import MergePlan, ShardPlan, ShardResult
from .shard_inputs import Readers, last_readers
from .shard_rows import OtherShards
from .sources import Source
from .worker import Compute, frozen_gc, publish, write_shard

log = logging.getLogger("stream_merge")


class _Committer:
    """Publishes written shards on one background thread: the disk flushes one shard while the CPU merges
    the next (at most one shard waits for its flush)."""

    def __init__(self, out: Path, journal: Journal, base: Source, pusher: Any) -> None:
        self.out, self.journal, self.base, self.pusher = out, journal, base, pusher
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="stream-merge-commit")
        self.flushing: Future[None] | None = None

    def _commit(self, written: AtomicFile, res: ShardResult, release: Sequence[str]) -> None:
        publish(written)
        self.journal.record_shard(self.out, res)
        for file in release:
            self.base.release(file)
        if self.pusher is not None:
            self.pusher.submit(res.file, res.sha256, xxh3_128=res.xxh3_128)

    def submit(self, written: AtomicFile, res: ShardResult, release: Sequence[str]) -> None:
        """Publish `written` once the previous shard is, then release the base shards in `release` (no later
        output shard reads them); from here on its temp file is the committer's."""
        try:
            self.wait()
        except BaseException:
            written.abort()
            raise
        self.flushing = self.pool.submit(self._commit, written, res, release)
        if self.base.kind != "local":
            # a downloaded input shard is deleted only once the last output reading it is committed: no
            # overlap, so the disk holds the current output's inputs plus those prefetched
            self.wait()

    def wait(self) -> None:
        if self.flushing is not None:
            flushing, self.flushing = self.flushing, None
            flushing.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)  # a complete shard that is being flushed is still published


def _merge_one(plan: MergePlan, shard: ShardPlan, base: Source, out: Path, adapters: Sequence[AdapterReader],
               compute: Compute, report: Progress, checksum: bool, others: OtherShards
               ) -> tuple[AtomicFile, ShardResult]:
    headers = {h.file: h for h in plan.base.shards}
    try:
        with Readers.merging(base, headers).open(shard.inputs) as readers, frozen_gc():
            written, res = write_shard(shard, readers, adapters, out / shard.file, compute,
                                       lambda n, f=shard.file: report(n, f), checksum, others)
            try:
                readers.confirm()  # the bytes read while a base shard downloaded are the checked file's
            except BaseException:
                written.abort()
                raise
            return written, res
    except RedoFromFile as redo:
        log.warning("%s: the download of %s could not vouch for the bytes read while it ran; merging the shard "
                    "again from the checked file", shard.file, redo)
    with Readers.of(base.shard_path, headers).open(shard.inputs) as readers, frozen_gc():
        return write_shard(shard, readers, adapters, out / shard.file, compute, lambda n: None, checksum, others)




def merge_shards(plan: MergePlan, base: Source, out: Path, journal: Journal, done: dict[str, ShardResult],
                 compute: Compute, progress: bool | Progress, prefetch: int = 1, pusher: Any = None,
                 todo_files: Sequence[str] | None = None, checksum: bool = False) -> list[ShardResult]:
    """Merge `todo_files` (default: every shard not in `done`) in plan order; returns the results of `done`
    and the merged shards in plan order. Each shard is published and journaled before the loop ends."""
    wanted = set(todo_files) if todo_files is not None else {s.file for s in plan.shards} - set(done)
    todo = [s for s in plan.shards if s.file in wanted and s.file not in done]
    adapters = [AdapterReader(spec) for spec in plan.adapters]
    others = OtherShards(base.read_range, {h.file: h for h in plan.base.shards})  # fp8 scales in other shards
    report, bar = progress_callback(plan, wanted, progress)
    committer = _Committer(out, journal, base, pusher)
    release = last_readers(todo)
    results: list[ShardResult] = []
    written: AtomicFile | None = None  # a merged shard not yet handed to the committer: ours to remove
    try:
        for shard in plan.shards:
            if shard.file in done:
                results.append(done[shard.file])
                continue
            if shard.file not in wanted:
                continue
            check_interrupt()  # one Python may have dropped (`interrupts`)
            pos = todo.index(shard)
            for ahead in todo[pos:pos + 1 + prefetch]:  # this shard's inputs first, then up to `prefetch` more
                for file in ahead.inputs:
                    base.prefetch(file)
            written, res = _merge_one(plan, shard, base, out, adapters, compute, report, checksum, others)
            handed, written = written, None
            committer.submit(handed, res, release.get(shard.file, ()))
            results.append(res)
        committer.wait()
        check_interrupt()
    except KeyboardInterrupt:
        raise MergeInterrupted("interrupted; finished shards are kept", file=str(out),
                               fix="re-run the same command to resume") from None
    finally:
        if written is not None:
            written.abort()
        committer.close()
        for a in adapters:
            a.close()
        if bar is not None:
            bar.close()
    return results
