"""Progress of a merge, for a terminal and for logs.

On a terminal: one tqdm bar per phase. Elsewhere (Slurm, Kubernetes, nohup, CI), where a bar's carriage
returns and escape codes would fill a log: one plain line per finished shard and at most one line every
`interval` seconds in between, each with the phase, GiB done of the total, the rate and an ETA. The runner
reports through `progress_callback(plan, wanted, progress)`; a `Reporter` passed as `progress` also counts
what this run wrote, for the summary.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from .records import MergePlan

Progress = Callable[[int, str], None]
GIB = 2**30
MIB = 2**20


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class PlainLines:
    """Progress as plain lines: one per finished shard, and at most one every `interval` seconds otherwise.
    A shard counts as finished when the next one starts, when its bytes are all reported, or at `close`."""

    def __init__(self, phase: str, shard_bytes: dict[str, int], stream: TextIO, interval: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.phase = phase
        self.shard_bytes = shard_bytes
        self.total = sum(shard_bytes.values())
        self.stream = stream
        self.interval = interval
        self.clock = clock
        self.start = self.last = clock()
        self.done = 0
        self.finished: list[str] = []
        self._current: str | None = None
        self._current_bytes = 0

    def __call__(self, n: int, label: str) -> None:
        if label != self._current:
            self._finish_current()
            self._current, self._current_bytes = label, 0
        self.done += n
        self._current_bytes += n
        if self._current in self.shard_bytes and self._current_bytes >= self.shard_bytes[self._current]:
            self._finish_current()
        elif self.clock() - self.last >= self.interval:
            self._line(f"{self._current}")

    def _finish_current(self) -> None:
        label, self._current = self._current, None
        if label is not None and label in self.shard_bytes and label not in self.finished:
            self.finished.append(label)
            self._line(f"{label} done ({len(self.finished)}/{len(self.shard_bytes)} shards)")

    def _line(self, what: str) -> None:
        now = self.clock()
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = f", ETA {_duration((self.total - self.done) / rate)}" if rate > 0 and self.done < self.total else ""
        pct = min(100.0, 100.0 * self.done / self.total) if self.total else 100.0
        self.stream.write(f"{self.phase}: {what}; {self.done / GIB:.2f} / {self.total / GIB:.2f} GiB ({pct:.0f}%), "
                          f"{rate / MIB:.1f} MiB/s{eta}\n")
        self.stream.flush()

    def close(self) -> None:
        self._finish_current()


class Reporter:
    """What the CLI passes as `progress`: shows progress (a bar on a terminal, plain lines elsewhere, nothing
    when quiet) and remembers what this run merged, for the summary."""

    def __init__(self, quiet: bool = False, stream: TextIO | None = None, interval: float = 30.0) -> None:
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.bytes_done = 0
        self.labels: set[str] = set()
        self._show: Progress | None = None
        self._bar: Any = None

    def start(self, phase: str, shard_bytes: dict[str, int]) -> None:
        """A phase begins over these shards (file -> bytes to write)."""
        self.close()
        if self.quiet:
            return
        if self.stream.isatty():
            from tqdm import tqdm

            bar = tqdm(total=sum(shard_bytes.values()), unit="B", unit_scale=True, unit_divisor=1024, desc=phase,
                       leave=False, file=self.stream)
            self._bar = bar
            self._show = lambda n, f: (bar.set_postfix_str(f, refresh=False), bar.update(n))
        else:
            self._bar = PlainLines(phase, shard_bytes, self.stream, self.interval)
            self._show = self._bar

    def __call__(self, n: int, label: str) -> None:
        self.bytes_done += n
        self.labels.add(label)
        if self._show is not None:
            self._show(n, label)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar = self._show = None

    def written(self, shards: Iterable[Any]) -> int:
        """Bytes of the `shards` (ShardResults) this run wrote, as opposed to kept from an earlier run."""
        files = [s for s in shards if s.file in self.labels]
        return sum(s.size for s in files) if files else self.bytes_done


def progress_callback(plan: MergePlan, wanted: set[str], progress: bool | Progress) -> tuple[Progress, Any]:
    """(callback(bytes, shard), closable or None) for the merge phase over the `wanted` shards: a Reporter
    started on them, a new one for `progress=True`, a user's own callback, or nothing."""
    if progress is False or progress is None:
        return (lambda n, f: None), None
    if progress is True:
        progress = Reporter()
    if isinstance(progress, Reporter):
        # each output file: the base shard's header and padding (unchanged) plus the merged tensors' bytes
        progress.start("merge", {s.file: s.in_bytes - sum(t.source.nbytes for t in s.tensors) + s.out_data_bytes
                                 for s in plan.shards if s.file in wanted})
        return progress, progress
    return progress, None
