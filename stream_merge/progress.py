"""Progress of a merge and of verify, for a terminal and for logs.

Phases: `download` (Hub base shards, bytes as they arrive), `merge` (bytes written), `upload` (each shard
pushed to the Hub) and `verify` (bytes hashed or recomputed). Several run at once (a download ahead of the
merge, an upload behind it), each with its own bar on a terminal (huggingface_hub's bars are switched off
meanwhile, so no two bars fight), and elsewhere (Slurm, Kubernetes, nohup, CI), where carriage returns and
escape codes would fill a log, its own plain lines: one per finished shard and at most one every `interval`
seconds in between, each with the phase, GiB done of the total, the rate and an ETA. Sizes are GiB (and
MiB/s) everywhere. The runner reports through `progress_callback(plan, wanted, progress)` and the
`watch_*` hooks; a `Reporter` passed as `progress` also counts what this run merged, for the summary.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from .records import MergePlan, ShardPlan

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


BAR_FORMAT = ("{desc}: {percentage:3.0f}%|{bar:20}| {done_gib:.2f} / {total_gib:.2f} GiB "
              "[{elapsed}<{remaining}, {rate_mib:.1f} MiB/s{postfix}]")  # the units of the plain lines


def _bar(phase: str, total: int, stream: TextIO, position: int) -> Any:
    """A tqdm bar for one phase that counts bytes and shows them in GiB and MiB/s, like the plain lines."""
    from tqdm import tqdm

    class _GiBBar(tqdm):  # type: ignore[misc, type-arg]
        @property
        def format_dict(self) -> dict[str, Any]:
            d = super().format_dict
            rate = d["rate"] or (d["n"] / d["elapsed"] if d["elapsed"] else 0.0)
            return {**d, "done_gib": d["n"] / GIB, "total_gib": (d["total"] or 0) / GIB, "rate_mib": rate / MIB}

    return _GiBBar(total=total, desc=phase, leave=False, file=stream, position=position, bar_format=BAR_FORMAT)


class Reporter:
    """What the CLI passes as `progress`: shows each phase (a bar on a terminal, plain lines elsewhere, nothing
    when quiet) and remembers what this run merged, for the summary. Calling it reports the merge phase."""

    def __init__(self, quiet: bool = False, stream: TextIO | None = None, interval: float = 30.0) -> None:
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.bytes_done = 0
        self.labels: set[str] = set()
        self._phases: dict[str, Any] = {}  # phase -> its tqdm bar or PlainLines
        self._lock = threading.Lock()  # phases report from several threads (writer, download, upload)
        self._hf_bars_off = False  # whether we switched huggingface_hub's bars off (and so turn them back on)

    def start(self, phase: str, shard_bytes: dict[str, int]) -> Progress:
        """A phase begins (again) over these labels (shard file -> bytes); returns its callback(bytes, label).
        Other phases keep running."""
        self.stop(phase)
        if not self.quiet:
            with self._lock:
                if self.stream.isatty():
                    self._hf_bars(False)
                    self._phases[phase] = _bar(phase, sum(shard_bytes.values()), self.stream, len(self._phases))
                else:
                    self._phases[phase] = PlainLines(phase, shard_bytes, self.stream, self.interval)
        return lambda n, label: self._show(phase, n, label)

    def _show(self, phase: str, n: int, label: str) -> None:
        with self._lock:
            shown = self._phases.get(phase)
            if shown is None:
                return
            if isinstance(shown, PlainLines):
                shown(n, label)
            else:
                shown.set_postfix_str(label, refresh=False)
                shown.update(n)

    def __call__(self, n: int, label: str) -> None:
        self.bytes_done += n
        self.labels.add(label)
        self._show("merge", n, label)

    def stop(self, phase: str) -> None:
        """End one phase (its last plain line is printed; its bar is cleared)."""
        with self._lock:
            shown = self._phases.pop(phase, None)
            if shown is not None:
                shown.close()
            if not self._phases:
                self._hf_bars(True)

    def close(self) -> None:
        """End every phase."""
        for phase in list(self._phases):
            self.stop(phase)

    def _hf_bars(self, on: bool) -> None:
        """Switch huggingface_hub's own bars off while ours draw on a terminal, and back on after."""
        try:
            from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
        except ImportError:
            return
        if not on and not self._hf_bars_off and not are_progress_bars_disabled():
            disable_progress_bars()
            self._hf_bars_off = True
        elif on and self._hf_bars_off:
            enable_progress_bars()
            self._hf_bars_off = False

    def written(self, shards: Iterable[Any]) -> int:
        """Bytes of the `shards` (ShardResults) this run wrote, as opposed to kept from an earlier run."""
        files = [s for s in shards if s.file in self.labels]
        return sum(s.size for s in files) if files else self.bytes_done


class _Phase:
    """One phase of a Reporter, as something to close."""

    def __init__(self, reporter: Reporter, phase: str) -> None:
        self.reporter, self.phase = reporter, phase

    def close(self) -> None:
        self.reporter.stop(self.phase)


def phase_callback(progress: bool | Progress | None, phase: str, totals: dict[str, int]
                   ) -> tuple[Progress, Any]:
    """(callback(bytes, label), closable or None) for `phase` over `totals` (label -> bytes): the phase of a
    Reporter, of a new one for `progress=True`, a user's own callback, or nothing."""
    if progress is False or progress is None:
        return (lambda n, f: None), None
    if progress is True:
        reporter = Reporter()
        return reporter.start(phase, totals), reporter
    if isinstance(progress, Reporter):
        return progress.start(phase, totals), _Phase(progress, phase)
    return progress, None


def output_bytes(shard: ShardPlan) -> int:
    """The size of a shard's output file: the base shard's header and padding (unchanged) plus the merged
    tensors' bytes."""
    return shard.in_bytes - sum(t.source.nbytes for t in shard.tensors) + shard.out_data_bytes


def progress_callback(plan: MergePlan, wanted: set[str], progress: bool | Progress) -> tuple[Progress, Any]:
    """(callback(bytes, shard), closable or None) for the merge phase over the `wanted` shards: a Reporter's
    merge phase, a new Reporter for `progress=True`, a user's own callback, or nothing."""
    if progress is False or progress is None:
        return (lambda n, f: None), None
    if progress is True:
        progress = Reporter()
        progress.start("merge", {s.file: output_bytes(s) for s in plan.shards if s.file in wanted})
        return progress, progress
    if isinstance(progress, Reporter):
        progress.start("merge", {s.file: output_bytes(s) for s in plan.shards if s.file in wanted})
        return progress, _Phase(progress, "merge")
    return progress, None


class Arrivals:
    """Bytes of downloaded files as they arrive, each file's count capped at its size, for a progress callback
    (`add`, fed by a `counting_bar`); `finish(file)` reports the rest of a file that was complete (where the
    client reported fewer bytes, or none)."""

    def __init__(self, report: Progress, sizes: dict[str, int]) -> None:
        self.report, self.sizes = report, sizes
        self.arrived: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, file: str, n: int) -> None:
        with self._lock:
            done = self.arrived.get(file, 0)
            n = max(0, min(n, self.sizes.get(file, 0) - done))
            self.arrived[file] = done + n
        if n:
            self.report(n, file)

    def finish(self, file: str) -> None:
        self.add(file, self.sizes.get(file, 0))


def counting_bar(base: type, add: Callable[[int], None]) -> type:
    """A subclass of `base` (huggingface_hub's silent bar, for its `tqdm_class`) whose updates are bytes given
    to `add`, including the `initial` bytes of a download resumed from an earlier partial file."""

    class _Counted(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, initial: int = 0, **kwargs: Any) -> None:
            super().__init__()
            add(int(initial or 0))

        def update(self, n: int | float | None = 1) -> None:
            add(int(n or 0))

    return _Counted


def watch_downloads(progress: bool | Progress, source: Any, files: Iterable[str]) -> None:
    """A `download` phase for the base shards among `files` that `source` will download (a Hub source, which
    reports bytes as they arrive; a local folder downloads nothing)."""
    sizes = getattr(source, "download_sizes", None)
    if isinstance(progress, Reporter) and sizes is not None:
        todo = sizes(list(files))
        if todo:
            source.arrivals = Arrivals(progress.start("download", todo), todo)


def watch_uploads(progress: bool | Progress, pusher: Any, plan: MergePlan, files: Iterable[str]) -> None:
    """An `upload` phase for the shards among `files` that `pusher` uploads (one line per shard pushed)."""
    if isinstance(progress, Reporter) and pusher is not None:
        sizes = {s.file: output_bytes(s) for s in plan.shards if s.file in set(files)}
        report = progress.start("upload", sizes)
        pusher.on_upload = lambda file: report(sizes.get(file, 0), file)
