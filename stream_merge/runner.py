"""Orchestrates a merge: resolve -> plan -> checks -> journal -> shard loop -> side files -> record -> index.

The index is written last, so its presence means the output is complete; the journal (one atomic write per
finished shard) makes any interruption resumable by re-running the same command. The rules for resuming live
in `resume`, the local shard loop in `shard_loop`, Ray in `ray_runner`, completion in `completion`, the lock
in `locking`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import INDEX_NAME
from .config import MergeConfig, config_from_record, fingerprint_options, recorded_options
from .errors import ConfigError, InputError, OutputError, StreamMergeError
from .extras import RECORD_NAME
from .fileio import file_sha256, owner_is_dead, remove_dead_temps
from .completion import finalize_output, printable, shipped_files
from .disk_space import check_disk as _check_disk, planned_disks, short_disk_error
from .journal import SHARDS_DIR, Journal
from .locking import out_lock
from .partition import parse_worker, split
from .planning import Planned, check_output_location, plan_merge, remove_download_area
from .platform_support import check_platform, peak_rss_bytes
from .progress import Progress, watch_downloads, watch_uploads
from .records import MergePlan, MergeReport, ShardResult
from .resume import (check_resumable, check_same_merge, fingerprint, inputs_record, journal_result, load_journal_or_record,
                     pending_shards, prepare_journal, read_record, shard_done)
from .shard_loop import merge_shards
from .sources import DOWNLOADS_DIR, Source
from .worker import Compute, compute_threads, torch_settings

log = logging.getLogger("stream_merge")
__all__ = ["run", "plan_merge", "finalize", "resolve_device", "peak_rss_bytes"]  # plan_merge: planning's


def resolve_device(name: str) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` as a torch device; a CUDA device this machine lacks is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine", key="device",
                              fix="use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)", key="device")
    return dev






def _remove_dead_leftovers(out: Path) -> None:
    """Temp files and download areas that killed processes of this host left in OUT (see fileio.owner_is_dead);
    those of live processes and of other hosts stay."""
    removed = remove_dead_temps([out, out / SHARDS_DIR])
    downloads = out / DOWNLOADS_DIR
    if downloads.is_dir():
        for area in os.listdir(downloads):
            if owner_is_dead(area):
                shutil.rmtree(downloads / area, ignore_errors=True)
                removed.append(f"{DOWNLOADS_DIR}/{area}")
    if removed:
        log.info("removed what killed runs left: %s", ", ".join(removed))






@dataclass
class _MergeRun:
    """One merge into OUT, step by step (see `run`): the state the steps share."""

    cfg: MergeConfig
    plan: MergePlan
    base_src: Source
    adapter_srcs: list[Source]
    findings: list[str]
    out: Path
    device: torch.device
    options: dict[str, Any]
    inputs: dict[str, Any]
    fp: str
    mine: set[str]
    journal: Journal | None = None
    pusher: Any = None
    done: dict[str, ShardResult] = field(default_factory=dict)
    progress: bool | Progress = False

    def _finished(self) -> dict[str, ShardResult]:
        """This run's shards that an earlier run finished (checksummed now when a push needs the sha256)."""
        journal, done = self.journal, {}
        assert journal is not None
        for s in self.plan.shards:
            if s.file not in self.mine:
                continue
            if shard_done(self.out, journal, s.file):
                r = journal_result(journal, s.file)
                if r.sha256 is None and self.pusher is not None:
                    (self.out / INDEX_NAME).unlink(missing_ok=True)  # nothing is written beside a complete index
                    r = dataclasses.replace(r, sha256=file_sha256(self.out / s.file))
                    journal.record_shard(self.out, r)
                done[s.file] = r
            elif self.pusher is not None and not self.cfg.local_copy and s.file in journal.shards \
                    and self.pusher.pushed(s.file, journal.shards[s.file].get("sha256")):
                done[s.file] = journal_result(journal, s.file)  # pushed, and its local copy deleted as asked
        return done

    def _complete_already(self, from_record: bool) -> bool:
        """OUT holds this very merge, finished, and nothing is to be pushed: a re-run writes nothing."""
        if not from_record or self.pusher is not None or len(self.done) != len(self.mine):
            return False
        record = read_record(self.out) or {}
        return all(os.path.lexists(self.out / n) for n in shipped_files(self.plan, record))

    def prepare(self) -> list[str] | None:
        """Take over or start the journal; returns the shards this run merges, or None when OUT already holds
        this merge, complete (then nothing was written)."""
        cfg, out = self.cfg, self.out
        self.journal, from_record = prepare_journal(out, self.plan, self.fp, self.inputs, self.options, cfg.fresh)
        if cfg.push_to_hub:
            from .push import Pusher

            self.pusher = Pusher.open(cfg.push_to_hub, out, [s.file for s in self.plan.shards], token=cfg.token,
                                      private=cfg.private, local_copy=cfg.local_copy)
            watch_uploads(self.progress, self.pusher, self.plan, self.mine)
        self.done = self._finished()
        todo = [s.file for s in self.plan.shards if s.file in self.mine and s.file not in self.done]
        if self._complete_already(from_record):
            return None
        if todo or from_record or not self.journal.saved(out):
            # "complete" only once everything is done again; and nothing is written into OUT while it holds
            # the index (a kill in the middle of an atomic write leaves its temp file beside it)
            (out / INDEX_NAME).unlink(missing_ok=True)
        self.journal.save(out)
        if from_record:  # the shard records of the finished merge, for a resume after a kill from here on
            for f in self.done:
                entry = {k: v for k, v in self.journal.shards[f].items() if k != "not_after_ns"}
                if (out / f).exists():
                    entry["mtime_ns"] = (out / f).stat().st_mtime_ns  # checked just now by shard_done
                self.journal.record(out, f, entry)
        for f in todo:
            self.journal.forget(out, f)
        _check_disk(out, self.plan, todo, self.base_src.disk_need(self.plan.inputs_of(todo), cfg.prefetch),
                    keep_outputs=cfg.local_copy)
        if self.pusher is not None:
            for r in self.done.values():  # finished by an earlier run, maybe not pushed yet
                self.pusher.submit(r.file, r.sha256, xxh3_128=r.xxh3_128)
        return todo

    def merge(self, todo: list[str], progress: bool | Progress) -> list[ShardResult]:
        """Merge `todo` locally or on Ray; returns the results of this run's shards in plan order."""
        cfg = self.cfg
        compute = Compute(device=self.device, block_bytes=cfg.block_size_mb * 1024 * 1024,
                          check_finite=cfg.check_finite, threads=compute_threads(self.device))
        # every shard's XXH3-128 is computed by the writer (the record, verify and resume use it); its sha256 too
        # only where something needs it: a push (the LFS oid) or --checksums (asked for sha256 everywhere)
        checksum = self.pusher is not None or cfg.checksums
        assert self.journal is not None
        if not todo:
            return [self.done[s.file] for s in self.plan.shards if s.file in self.done]
        if cfg.ray is not None:
            from .ray_runner import merge_on_ray

            pusher = self.pusher
            on_done = (None if pusher is None else
                       lambda res: pusher.submit(res.file, res.sha256, xxh3_128=res.xxh3_128))
            return merge_on_ray(self.plan, self.base_src.folder(), self.out, self.done, todo, compute, progress,
                                None if cfg.ray == "local" else cfg.ray, checksum, on_done)
        watch_downloads(progress, self.base_src, todo)
        with torch_settings():
            return merge_shards(self.plan, self.base_src, self.out, self.journal, self.done, compute, progress,
                                cfg.prefetch, self.pusher, todo, checksum)

    def complete(self) -> list[str]:
        """Finalize OUT when no worker has shards left; returns the shards still pending elsewhere."""
        assert self.journal is not None
        pending = pending_shards(self.out, self.plan, self.journal, self.cfg.local_copy)
        if not pending:
            side = finalize_output(self.out, self.plan, self.base_src, [s.spec for s in self.adapter_srcs],
                                   self.cfg.base, self.journal, self.findings)
            if self.pusher is not None:
                self.pusher.finish([*side, "README.md", RECORD_NAME, INDEX_NAME])
        return pending


def _require_text(out: Path, base_src: Source, adapter_srcs: Sequence[Source]) -> None:
    """The record, the model card and the Hub hold paths as UTF-8 text: refuse, before anything is written,
    a path that is not (issue 14 item 8: it used to fail at the last step, after every shard)."""
    named = [("output folder", str(out), OutputError), ("BASE", str(base_src.folder()), InputError)]
    named += [("ADAPTER", str(s.folder()), InputError) for s in adapter_srcs]
    for what, text, error in named:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise error(f"the {what} path is not valid UTF-8", file=printable(text),
                        fix="rename the folder (or give a symlink with a UTF-8 name)") from None


def _resume_device(out: Path) -> torch.device | None:
    """With `--device auto`, the kind an earlier run of this OUT merged on, where this machine has it: the kind
    decides the last bits, so a CPU-started merge re-run on a GPU machine resumes on the CPU."""
    if not out.is_dir():
        return None
    try:
        journal, _ = load_journal_or_record(out)
    except StreamMergeError:
        return None  # reported, with its fix, when the journal is read for real
    kind = journal.options.get("device") if journal is not None else None
    if kind == "cpu" or (kind == "cuda" and torch.cuda.is_available()):
        return torch.device(kind)
    return None


def _start(cfg: MergeConfig, plan: MergePlan, base_src: Source, adapter_srcs: list[Source],
           findings: list[str]) -> _MergeRun:
    """Everything a merge decides before it touches OUT (beyond creating it)."""
    out = Path(cfg.output).expanduser()
    _require_text(out, base_src, adapter_srcs)
    check_output_location(out, base_src, adapter_srcs)
    device = _resume_device(out) if cfg.device == "auto" else None
    device = device or resolve_device(cfg.device)
    mine = _partition(cfg, plan)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder ({exc.strerror})", file=printable(str(out))) from None
    options = recorded_options(cfg, device.type)  # the device kind among them: it decides the last bits
    inputs = inputs_record(base_src, adapter_srcs, plan, cfg.checksums)
    return _MergeRun(cfg, plan, base_src, adapter_srcs, findings, out, device, options, inputs,
                     fingerprint(plan, inputs, fingerprint_options(cfg, device.type)), mine)


def run(cfg: MergeConfig, progress: bool | Progress = False, planned: Planned | None = None) -> MergeReport:
    """Run a merge (or only plan it with `cfg.dry_run`).

    Args: cfg, the merge configuration; progress, True for a progress bar, a callback(bytes, shard), or False;
    planned, `planning.plan_merge(cfg)` when the caller planned already (`planning.merge_planned`).
    Returns the MergeReport (`pending` lists shards left to other `--worker` runs).
    Raises StreamMergeError subclasses: PlanError (every plan problem at once), ConfigError, OutputError (OUT
    holds another merge, foreign files, changed inputs, no disk space), MergeInterrupted.
    """
    t0 = time.perf_counter()
    if not cfg.dry_run and cfg.output is not None:
        check_platform()
    plan, base_src, adapter_srcs, findings = planned if planned is not None else plan_merge(cfg)
    if cfg.dry_run or cfg.output is None:
        return _dry_run(cfg, plan, base_src, adapter_srcs, t0)
    job, complete, pending = None, False, []
    try:
        job = _start(cfg, plan, base_src, adapter_srcs, findings)
        job.progress = progress
        with out_lock(job.out, cfg.worker):
            _remove_dead_leftovers(job.out)
            todo = job.prepare()
            if todo is None:  # OUT already holds this merge, complete: nothing is written
                results = [job.done[s.file] for s in plan.shards if s.file in job.done]
            else:
                results = job.merge(todo, progress)
                pending = job.complete()
            complete = not pending
    finally:
        base_src.close(complete)
        if job is not None:
            if job.pusher is not None:
                job.pusher.close()
            remove_download_area(job.out)
    return MergeReport(output=str(job.out), plan=plan, shards=tuple(results), seconds=time.perf_counter() - t0,
                       peak_rss_bytes=peak_rss_bytes(), resumed_shards=len(job.done), pending=tuple(pending))


def _dry_run(cfg: MergeConfig, plan: MergePlan, base_src: Source, adapter_srcs: list[Source],
             t0: float) -> MergeReport:
    """The report of a merge that only plans: with OUT, what the merge would refuse there (another merge,
    changed inputs, files not ours) and the disk check (DiskSpaceError, carrying this report, when a disk is
    short); nothing is written."""
    out = Path(cfg.output).expanduser() if cfg.output else None
    if out is not None and out.is_dir() and not cfg.fresh:
        kind = (_resume_device(out) if cfg.device == "auto" else None) or resolve_device(cfg.device)
        inputs = inputs_record(base_src, adapter_srcs, plan, checksums=False)  # a changed mtime hashes then
        check_resumable(out, fingerprint(plan, inputs, fingerprint_options(cfg, kind.type)), inputs,
                        recorded_options(cfg, kind.type))
    disks = planned_disks(plan, base_src, out, _partition(cfg, plan), cfg.prefetch, cfg.local_copy, cfg.fresh)
    report = MergeReport(output=cfg.output or "", plan=plan, shards=(), seconds=time.perf_counter() - t0,
                         peak_rss_bytes=peak_rss_bytes(), dry_run=True, disk=tuple(disks))
    short = next((d for d in disks if d.short), None)
    if short is not None:
        error = short_disk_error(short)
        error.report = report
        raise error
    return report


def _partition(cfg: MergeConfig, plan: MergePlan) -> set[str]:
    """The shards this run merges: all of them, or worker I's share of a deterministic split by bytes."""
    if cfg.worker is None:
        return {s.file for s in plan.shards}
    i, n = parse_worker(cfg.worker)  # --fresh with --worker is refused by build_config
    return set(split([(s.file, s.in_bytes) for s in plan.shards], n)[i])


def finalize(output: str | Path) -> MergeReport:
    """`stream-merge finalize OUT`: after partitioned workers, check that the journal still matches the inputs
    and that every shard is finished (the one definition in `journal.shard_finished`), then write the side
    files, the record and the index.

    Args: output, the output folder. Returns a MergeReport of the (already merged) shards.
    Raises OutputError when OUT holds no journal, inputs changed since, or shards are missing.
    """
    t0 = time.perf_counter()
    check_platform()
    out = Path(output)
    journal = load_journal_or_record(out)[0]
    if journal is None:
        raise OutputError("no stream-merge journal in this folder", file=str(out),
                          fix="run `stream-merge merge ... -o OUT` (or its --worker runs) first")
    cfg = config_from_record(journal.inputs, journal.options, str(out))
    plan, base_src, adapter_srcs, findings = plan_merge(cfg)
    checksums = any("sha256" in f for f in (journal.inputs.get("base", {}).get("files") or {}).values())
    inputs = inputs_record(base_src, adapter_srcs, plan, checksums)
    try:
        with out_lock(out):
            journal = load_journal_or_record(out)[0]
            if journal is None:
                raise OutputError("the journal was removed meanwhile", file=str(out), fix="re-run finalize")
            keys = fingerprint_options(cfg, str(journal.options.get("device", "cpu")))  # values: as recorded
            fp = fingerprint(plan, inputs, {k: journal.options.get(k) for k in keys})
            check_same_merge(journal, fp, inputs, journal.options, out)
            missing = [s.file for s in plan.shards if not shard_done(out, journal, s.file)]
            if missing:
                raise OutputError(f"{len(missing)} of {len(plan.shards)} shards are not finished or do not match "
                                  f"the journal: {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}",
                                  file=str(out), fix="run the missing workers (or the same merge command) again")
            finalize_output(out, plan, base_src, [s.spec for s in adapter_srcs], journal.inputs["base"]["spec"],
                            journal, findings)
    finally:
        base_src.close(True)
        remove_download_area(out)
    return MergeReport(output=str(out), plan=plan, shards=tuple(journal_result(journal, s.file) for s in plan.shards),
                       seconds=time.perf_counter() - t0, peak_rss_bytes=peak_rss_bytes(),
                       resumed_shards=len(plan.shards))
