"""Orchestrates a merge: resolve -> plan -> checks -> journal -> shard loop -> side files -> record -> index.

The index is written last, so its presence means the output is complete; the journal (one atomic rewrite per
finished shard) makes any interruption resumable by re-running the same command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import resource
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from urllib.parse import unquote
from typing import Any

import torch

from . import __version__
from .adapter import AdapterReader, load_adapter
from .checkpoint import INDEX_NAME, load_model_config
from .compat import compatibility_findings
from .config import MergeConfig, config_from_record, fingerprint_options, recorded_options
from .errors import CompatibilityError, ConfigError, MergeInterrupted, OutputError, PlanError
from .card import model_card
from .extras import RECORD_NAME, copy_side_files, shard_entries, write_index, write_record
from .journal import JOURNAL_NAME, SHARDS_DIR, Journal, file_sha256, load_journal, remove_journal
from .partition import parse_worker, split
from .planner import PlanOptions, build_plan
from .progress import progress_callback
from .records import MergePlan, MergeReport, ShardResult
from .safetensors_io import TMP_PREFIX, AtomicFile, ShardReader, fsync_dir, write_file_atomic
from .sources import DOWNLOADS_DIR, Source, resolve_source
from .shard_rows import OtherShards
from .worker import Compute, compute_threads, frozen_gc, publish, torch_settings, write_shard

log = logging.getLogger("stream_merge")
LOCK_NAME = ".stream-merge.lock"
LOCK_GLOB = ".stream-merge*.lock"
Progress = Callable[[int, str], None]


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resolve_device(name: str) -> torch.device:
    from .errors import ConfigError

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


def _inputs_record(base: Source, adapters: Sequence[Source], plan: MergePlan) -> dict[str, Any]:
    """What identifies the inputs: shard sizes and header digests, adapter file digests, revisions."""
    return {
        "base": {"spec": base.spec, "path": str(base.folder()), "revision": base.revision,
                 "shards": {s.file: {"size": s.size, "header_sha256": hashlib.sha256(
                     repr([(t.name, t.dtype, t.shape, t.start, t.end) for t in s.tensors]).encode()).hexdigest()}
                     for s in plan.base.shards}},
        "adapters": [{"spec": src.spec, "path": spec.path, "revision": src.revision, "weight": spec.weight,
                      "config_sha256": file_sha256(Path(spec.config_file)),
                      "weights_sha256": file_sha256(Path(spec.weights_file)),
                      "base_model_name_or_path": spec.raw_config.get("base_model_name_or_path"),
                      "adapter_revision": spec.raw_config.get("revision")}
                     for src, spec in zip(adapters, plan.adapters)],
    }


def _check_output_location(out: Path, inputs: Sequence[Path]) -> None:
    o = out.resolve()
    for p in inputs:
        p = p.resolve()
        if o == p or p in o.parents or o in p.parents:
            raise OutputError(f"output folder {str(out)!r} overlaps input {str(p)!r}", file=str(out),
                              fix="choose an output folder outside the base and adapter folders")


@contextlib.contextmanager
def _locked(out: Path, name: str = LOCK_NAME) -> Iterator[None]:
    """Fail fast when another run writes the same shards of OUT (each `--worker I/N` has its own lock). On
    the way out (success, refusal, error or Ctrl-C) the lock file and every temp file of this process are
    removed, so a refused run leaves OUT as it found it."""
    lock = out / name
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    held = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            raise OutputError("another stream-merge is writing to this output folder", file=str(out),
                              fix="wait for it to finish, or use another -o") from None
        yield
    finally:
        if held:
            for folder in (out, out / SHARDS_DIR):  # e.g. an interrupt inside AtomicFile's open
                for p in folder.glob(f"{TMP_PREFIX}*.{os.getpid()}.*"):
                    p.unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
        os.close(fd)


def _clean_stale_temps(out: Path, mine: set[str] | None = None) -> int:
    """Remove temp files left by killed runs: all of them, or (for `--worker`) only those of this worker's
    shards, since other workers may be writing theirs right now. Temp names are `<prefix><file>.<pid>.<id>`."""
    n = 0
    for folder in (out, out / SHARDS_DIR):
        for p in folder.glob(TMP_PREFIX + "*"):
            target = p.name[len(TMP_PREFIX):].rsplit(".", 2)[0]
            if folder != out:  # a shard record: <quoted shard file>.json
                target = unquote(target.removesuffix(".json"))
            if mine is None or target in mine:
                p.unlink(missing_ok=True)
                n += 1
    return n


def _prepare_journal(out: Path, plan: MergePlan, fingerprint: str, inputs: dict[str, Any], options: dict[str, Any],
                     fresh: bool) -> Journal:
    """Reuse a matching journal, refuse a mismatching one (unless --fresh), or start a new one."""
    journal = load_journal(out) if not fresh else None
    ours = {s.file for s in plan.shards} | {INDEX_NAME, RECORD_NAME}
    if fresh:
        for name in ours:
            (out / name).unlink(missing_ok=True)
        remove_journal(out)
    elif journal is None:
        # (another --worker starting at the same moment may already have written the journal and a shard)
        foreign = sorted(p.name for p in out.iterdir()
                         if p.name not in (DOWNLOADS_DIR, SHARDS_DIR, JOURNAL_NAME) and not p.match(LOCK_GLOB)
                         and not p.name.startswith(TMP_PREFIX) and p.name not in ours)
        if foreign:
            raise OutputError(f"output folder is not empty and holds no stream-merge journal ({', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''})", file=str(out),
                              fix="use an empty or new folder, or --fresh to overwrite")
    elif journal.fingerprint != fingerprint:
        for what, spec, old, new in _moved_revisions(journal.inputs, inputs):
            raise OutputError(f"{what} {spec} now resolves to commit {new}, but this output was started from {old}",
                              file=str(out), fix=f"pin the old commit ({spec.split('@')[0]}@{old}) to resume it, or "
                                                 "add --fresh to start over")
        raise OutputError("output folder holds a merge of other inputs or options", file=str(out),
                          fix="re-run with the original command to resume it, or add --fresh to start over")
    if journal is None:
        journal = Journal(fingerprint=fingerprint, inputs=inputs, options=options, tool_version=__version__)
    return journal


def _moved_revisions(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Hub inputs whose revision (a branch or tag) now resolves to another commit than the journal's."""
    pairs = [("BASE", old.get("base", {}), new["base"])]
    pairs += [("ADAPTER", o, n) for o, n in zip(old.get("adapters", []), new["adapters"])]
    return [(what, n["spec"], o["revision"], n["revision"]) for what, o, n in pairs
            if o.get("spec") == n["spec"] and o.get("revision") and n["revision"] and o["revision"] != n["revision"]]


def _journal_result(journal: Journal, file: str) -> ShardResult:
    entry = journal.shards[file]
    return ShardResult(file=file, size=entry["size"], sha256=entry.get("sha256"), patched=entry["patched"],
                       copied=entry["copied"], seconds=0.0)


def _shard_done(out: Path, journal: Journal, file: str) -> ShardResult | None:
    """A shard an earlier run finished: still the file it published (same size and mtime), or, when the
    folder was copied since, the same size and sha256 as recorded."""
    entry = journal.shards.get(file)
    path = out / file
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if not entry or st.st_size != entry["size"]:
        return None
    if entry.get("mtime_ns") != st.st_mtime_ns and (not entry.get("sha256") or file_sha256(path) != entry["sha256"]):
        return None
    return _journal_result(journal, file)


def _add_checksum(out: Path, journal: Journal, res: ShardResult) -> ShardResult:
    res = dataclasses.replace(res, sha256=file_sha256(out / res.file))
    journal.record_shard(out, res)
    return res


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_disk(out: Path, plan: MergePlan, todo: Sequence[str], downloads: Sequence[tuple[Path, int]] = (),
                keep_outputs: bool = True) -> None:
    """Free space for what is left to write, one shard of headroom and, for Hub bases, the downloaded shards
    that can be on disk at once (on whichever disk they go to)."""
    sizes = {s.file: s.in_bytes - sum(t.source.nbytes for t in s.tensors) + s.out_data_bytes for s in plan.shards}
    biggest = max(sizes.values()) if sizes else 0
    need = sum(sizes[f] for f in todo) + biggest
    if not keep_outputs:  # pushed shards leave OUT: at most the ones waiting for upload, plus the current one
        from .push import MAX_PENDING

        need = min(need, (MAX_PENDING + 2) * biggest)
    disks: dict[int, list[Any]] = {out.stat().st_dev: [out, need, 0]}
    for where, n in downloads:
        disk = disks.setdefault(_existing(where).stat().st_dev, [_existing(where), 0, 0])
        disk[1] += n
        disk[2] += n
    for path, need, fetched in disks.values():
        free = shutil.disk_usage(path).free
        if free < need:
            what = "what is left to write plus one shard of headroom" if need > fetched else "base shards to download"
            if fetched and need > fetched:
                what += f", and {fetched / 2**30:.1f} GiB of base shards downloaded at once"
            raise OutputError(f"not enough free disk space: {free / 2**30:.1f} GiB free, {need / 2**30:.1f} GiB "
                              f"needed ({what})", file=str(path),
                              fix="free some space or choose another output folder; finished shards are kept")


def plan_merge(cfg: MergeConfig) -> tuple[MergePlan, Source, list[Source], list[str]]:
    """Resolve the inputs and build the plan; no writes. Raises PlanError listing every problem."""
    out = Path(cfg.output).expanduser() if cfg.output and not cfg.dry_run else None
    base_src = resolve_source(cfg.base, "BASE", token=cfg.token, keep_downloads=cfg.keep_downloads,
                              download_dir=None if out is None else out / DOWNLOADS_DIR)
    adapter_srcs = [resolve_source(a, "ADAPTER", token=cfg.token) for a in cfg.adapters]
    base = base_src.base_index(cfg.base)
    specs = [load_adapter(src.folder(), weight=w, allow_pickle=cfg.allow_pickle, label=src.spec)
             for src, w in zip(adapter_srcs, cfg.adapter_weights)]
    plan = build_plan(base, specs, PlanOptions(key_map=cfg.key_map, strict=cfg.strict, untie=cfg.untie,
                                                 dequantize=cfg.dequantize, dtype=cfg.dtype))
    findings: list[str] = []
    for src, spec in zip(adapter_srcs, specs):
        model_cfg_path = Path(spec.path) / "config.json"
        model_cfg = load_model_config(model_cfg_path, "adapter's config.json") if model_cfg_path.exists() else None
        base_name = cfg.base.split("@", 1)[0] if base_src.kind == "hub" else cfg.base  # the id, not the revision
        findings += compatibility_findings(base_name, base.config, src.spec, spec.raw_config, model_cfg)
    if plan.problems:
        raise PlanError(plan.problems, plan=plan)
    if findings and cfg.strict:
        raise CompatibilityError("; ".join(findings), fix="check you picked the right base, or drop --strict")
    for w in list(plan.warnings) + findings:
        log.warning("%s", w)
    return plan, base_src, adapter_srcs, findings


def run(cfg: MergeConfig, progress: bool | Progress = False) -> MergeReport:
    """Run a merge (or only plan it with dry_run) and return the report."""
    t0 = time.perf_counter()
    plan, base_src, adapter_srcs, findings = plan_merge(cfg)
    if cfg.dry_run or cfg.output is None:
        return MergeReport(output=cfg.output or "", plan=plan, shards=(), seconds=time.perf_counter() - t0,
                           peak_rss_bytes=peak_rss_bytes(), dry_run=True)
    out = Path(cfg.output).expanduser()
    _check_output_location(out, [p for s in [base_src, *adapter_srcs] if (p := s.protected) is not None])
    device = resolve_device(cfg.device)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder ({exc.strerror})", file=str(out)) from None
    options = recorded_options(cfg, device.type)
    inputs = _inputs_record(base_src, adapter_srcs, plan)
    revisions = [s.revision for s in (base_src, *adapter_srcs)]  # Hub commits: a moved branch is another input
    fingerprint = hashlib.sha256(repr((plan.fingerprint(), inputs["base"]["shards"],
                                       [(a["config_sha256"], a["weights_sha256"]) for a in inputs["adapters"]],
                                       sorted(fingerprint_options(cfg, device.type).items()), __version__.split(".")[0])
                                      + ((revisions,) if any(revisions) else ())).encode()).hexdigest()
    mine = _partition(cfg, plan)
    lock = LOCK_NAME if cfg.worker is None else f".stream-merge-{cfg.worker.replace('/', '-of-')}.lock"
    complete, pusher = False, None
    try:
        with _locked(out, lock):
            _clean_stale_temps(out, None if cfg.worker is None else mine)
            journal = _prepare_journal(out, plan, fingerprint, inputs, options, cfg.fresh)
            if cfg.push_to_hub:
                from .push import Pusher

                pusher = Pusher.open(cfg.push_to_hub, out, [s.file for s in plan.shards], token=cfg.token,
                                     private=cfg.private, local_copy=cfg.local_copy)
            done = {}
            for s in plan.shards:
                if s.file not in mine:
                    continue
                r = _shard_done(out, journal, s.file)
                if r is not None and r.sha256 is None and pusher is not None:
                    (out / INDEX_NAME).unlink(missing_ok=True)  # nothing is written beside a complete index
                    r = _add_checksum(out, journal, r)  # merged by an earlier run without --push-to-hub
                if r is None and pusher is not None and not cfg.local_copy and s.file in journal.shards \
                        and pusher.pushed(s.file, journal.shards[s.file].get("sha256")):
                    r = _journal_result(journal, s.file)  # pushed, and its local copy deleted as asked
                if r is not None:
                    done[s.file] = r
            todo = [s.file for s in plan.shards if s.file in mine and s.file not in done]
            if todo or not journal.saved(out):
                # "complete" only once everything is done again; and nothing is written into OUT while it holds
                # the index (a kill in the middle of an atomic write leaves its temp file beside it)
                (out / INDEX_NAME).unlink(missing_ok=True)
            for f in todo:
                journal.forget(out, f)
            journal.save(out)
            _check_disk(out, plan, todo, base_src.disk_need(todo, cfg.prefetch), keep_outputs=cfg.local_copy)
            if pusher is not None:
                for r in done.values():  # finished by an earlier run, maybe not pushed yet
                    pusher.submit(r.file, r.sha256)
            compute = Compute(device=device, block_bytes=cfg.block_size_mb * 1024 * 1024,
                              check_finite=cfg.check_finite, threads=compute_threads(device))
            checksum = cfg.checksums or pusher is not None
            if cfg.ray is not None:
                from .ray_runner import merge_on_ray

                if base_src.kind != "local":
                    raise ConfigError("--ray needs BASE on a file system every Ray node can read",
                                      key="ray", fix="download the base first, or run without --ray")
                results = merge_on_ray(plan, base_src.folder(), out, journal, done, todo, compute, progress,
                                       None if cfg.ray == "local" else cfg.ray, checksum)
            else:
                with torch_settings():
                    results = _merge_shards(plan, base_src, out, journal, done, compute, progress, cfg.prefetch,
                                            pusher, todo, checksum)
            pending = _pending(out, plan, journal, cfg.local_copy)
            if not pending:
                side = _finalize(out, plan, base_src, [s.spec for s in adapter_srcs], cfg.base, inputs, options,
                                 findings, journal)
                if pusher is not None:
                    pusher.finish([*side, "README.md", RECORD_NAME, INDEX_NAME])
                complete = True
    finally:
        base_src.close(complete)
        if pusher is not None:
            pusher.close()
    return MergeReport(output=str(out), plan=plan, shards=tuple(results), seconds=time.perf_counter() - t0,
                       peak_rss_bytes=peak_rss_bytes(), resumed_shards=len(done), pending=tuple(pending))


def _partition(cfg: MergeConfig, plan: MergePlan) -> set[str]:
    """The shards this run merges: all of them, or worker I's share of a deterministic split by bytes."""
    if cfg.worker is None:
        return {s.file for s in plan.shards}
    i, n = parse_worker(cfg.worker)
    if cfg.fresh:
        raise ConfigError("--fresh cannot be combined with --worker: one worker would delete the others' shards",
                          key="fresh", fix="run --fresh once without --worker (or empty OUT), then start the workers")
    return set(split([(s.file, s.in_bytes) for s in plan.shards], n)[i])


def _pending(out: Path, plan: MergePlan, journal: Journal, local_copy: bool = True) -> list[str]:
    """Shards not finished yet by any worker (records re-read: other workers share OUT). With
    --no-local-copy a finished shard may already be uploaded and deleted."""
    journal.reload(out)
    return [s.file for s in plan.shards
            if s.file not in journal.shards or (local_copy and (
                not (out / s.file).exists() or (out / s.file).stat().st_size != journal.shards[s.file]["size"]))]


def _finalize(out: Path, plan: MergePlan, base_src: Source, adapter_labels: Sequence[str], base_label: str,
              inputs: dict[str, Any], options: dict[str, Any], findings: Sequence[str], journal: Journal) -> list[str]:
    """Every shard is on disk: write the side files, the model card, the record and, last, the index. An
    existing index goes first, so that a run killed while rewriting these files never looks complete."""
    (out / INDEX_NAME).unlink(missing_ok=True)
    results = [_journal_result(journal, s.file) for s in plan.shards]
    side = copy_side_files(base_src.folder(), [Path(a.path) for a in plan.adapters], out, plan.config_updates)
    write_file_atomic(out / "README.md", model_card(plan, base_label, adapter_labels, base_dir=base_src.folder(),
                                                    inputs=inputs))
    write_record(out, {
        "tool": "stream-merge", "version": __version__, "inputs": inputs, "options": options,
        "plan_fingerprint": plan.fingerprint(), "config_updates": dict(plan.config_updates),
        "compatibility": list(findings), "warnings": list(plan.warnings), "side_files": side,
        "shards": shard_entries(results),
    })
    write_index(out, plan)
    fsync_dir(out)
    return side


def finalize(output: str | Path) -> MergeReport:
    """`stream-merge finalize OUT`: after partitioned workers, check every shard against the journal (size and
    sha256) and write the index and record; refuses while shards are missing."""
    t0 = time.perf_counter()
    out = Path(output)
    journal = load_journal(out)
    if journal is None:
        raise OutputError("no stream-merge journal in this folder", file=str(out),
                          fix="run `stream-merge merge ... -o OUT` (or its --worker runs) first")
    cfg = config_from_record(journal.inputs, journal.options, str(out))
    plan, base_src, adapter_srcs, findings = plan_merge(cfg)
    with _locked(out, ".stream-merge-finalize.lock"):
        journal.reload(out)
        missing = [s.file for s in plan.shards if _shard_done(out, journal, s.file) is None]
        if missing:
            raise OutputError(f"{len(missing)} of {len(plan.shards)} shards are not finished or do not match the "
                              f"journal: {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}",
                              file=str(out), fix="run the missing workers (or the same merge command) again")
        _finalize(out, plan, base_src, [s.spec for s in adapter_srcs], journal.inputs["base"]["spec"],
                  journal.inputs, journal.options, findings, journal)
    base_src.close(True)
    return MergeReport(output=str(out), plan=plan, shards=tuple(_journal_result(journal, s.file) for s in plan.shards),
                       seconds=time.perf_counter() - t0, peak_rss_bytes=peak_rss_bytes(),
                       resumed_shards=len(plan.shards))


def _merge_shards(plan: MergePlan, base: Source, out: Path, journal: Journal, done: dict[str, ShardResult],
                  compute: Compute, progress: bool | Progress, prefetch: int = 1, pusher: Any = None,
                  todo_files: Sequence[str] | None = None, checksum: bool = False) -> list[ShardResult]:
    adapters = [AdapterReader(spec) for spec in plan.adapters]
    others = OtherShards(base.read_range, {h.file: h for h in plan.base.shards})  # fp8 scales in other shards
    results: list[ShardResult] = []
    wanted = set(todo_files) if todo_files is not None else {s.file for s in plan.shards} - set(done)
    progress, bar = progress_callback(plan, wanted, progress)
    committer = ThreadPoolExecutor(1, thread_name_prefix="stream-merge-commit")
    flushing: Future[None] | None = None

    def commit(written: AtomicFile, res: ShardResult) -> None:
        publish(written)
        journal.record_shard(out, res)
        base.release(res.file)
        if pusher is not None:
            pusher.submit(res.file, res.sha256)

    try:
        wanted = set(todo_files) if todo_files is not None else {s.file for s in plan.shards} - set(done)
        todo = [s for s in plan.shards if s.file in wanted]
        for shard in plan.shards:
            if shard.file in done:
                results.append(done[shard.file])
                continue
            if shard.file not in wanted:
                continue
            header = next(h for h in plan.base.shards if h.file == shard.file)
            pos = todo.index(shard)
            for ahead in todo[pos:pos + 1 + prefetch]:  # this shard first, then up to `prefetch` more
                base.prefetch(ahead.file)
            with ShardReader(base.shard_path(shard.file), header) as reader, frozen_gc():
                written, res = write_shard(shard, reader, adapters, out / shard.file, compute,
                                           lambda n, f=shard.file: progress(n, f), checksum, others)
            if flushing is not None:
                flushing.result()
            # fsync + rename + journal on the committer thread, overlapping the next shard's merge: the
            # disk flushes one shard while the CPU merges the next (at most one shard waits for its flush)
            flushing = committer.submit(commit, written, res)
            if base.kind != "local":
                # a downloaded input shard is deleted only once its output is committed: no overlap, so the
                # disk holds at most prefetch + 1 base shards
                flushing.result()
                flushing = None
            results.append(res)
        if flushing is not None:
            flushing.result()
    except KeyboardInterrupt:
        raise MergeInterrupted("interrupted; finished shards are kept", file=str(out),
                               fix="re-run the same command to resume") from None
    finally:
        committer.shutdown(wait=True)  # a complete shard that is being flushed is still published
        for a in adapters:
            a.close()
        if bar is not None:
            bar.close()
    return results
