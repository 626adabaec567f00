"""Resolve the inputs and plan a merge without torch, so that planning (Hub lookups, shard headers over HTTP,
the adapter's header) runs while torch loads.

`plan` never imports torch; a merge (`merge_planned`) imports the runner, and with it torch, on a thread
while the main thread plans and, for a fresh merge of a Hub base, starts downloading the first shard
(`_start_first_download`): importing torch holds the GIL for only part of its time, and planning and
downloading are mostly waiting for the network, so the first shard's download no longer waits for torch.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .adapter import load_adapter
from .compat import compatibility_findings
from .config import MergeConfig
from .errors import CompatibilityError, OutputError, PlanError, StreamMergeError
from .fileio import owner_tag
from .planner import PlanOptions, build_plan
from .platform_support import check_platform
from .records import MergePlan, MergeReport
from .sources import DOWNLOADS_DIR, Source, resolve_source
from .trained_on import find_trained_on

log = logging.getLogger("stream_merge")
__all__ = ["plan_merge", "merge_planned", "download_area", "remove_download_area"]

Planned = tuple[MergePlan, Source, list[Source], list[str]]

def download_area(out: Path) -> Path:
    """This process's own folder for base shards downloaded from the Hub (workers sharing OUT never share one)."""
    return out / DOWNLOADS_DIR / owner_tag()

def remove_download_area(out: Path) -> None:
    """Remove this process's download area in OUT, and the downloads folder once no other area is in it."""
    area = download_area(out)
    if area.exists():
        shutil.rmtree(area, ignore_errors=True)
    try:
        (out / DOWNLOADS_DIR).rmdir()  # only when no other worker's area is in it
    except OSError:
        pass

def plan_merge(cfg: MergeConfig) -> Planned:
    """Resolve the inputs and build the plan; no writes. Raises PlanError listing every problem."""
    out = Path(cfg.output).expanduser() if cfg.output else None  # a dry run measures the download area's disk
    base_src = resolve_source(cfg.base, "BASE", token=cfg.token, keep_downloads=cfg.keep_downloads,
                              download_dir=None if out is None else download_area(out))
    adapter_srcs = [resolve_source(a, "ADAPTER", token=cfg.token) for a in cfg.adapters]
    base = base_src.base_index(cfg.base, allow_pickle=cfg.allow_pickle)
    specs = [load_adapter(src.folder(), weight=w, allow_pickle=cfg.allow_pickle, label=src.spec)
             for src, w in zip(adapter_srcs, cfg.adapter_weights)]
    plan = build_plan(base, specs, PlanOptions(key_map=cfg.key_map, strict=cfg.strict, untie=cfg.untie,
                                                 dequantize=cfg.dequantize, dtype=cfg.dtype,
                                                 max_shard_size=cfg.max_shard_size))
    findings: list[str] = []
    for spec in specs:  # configs compared, not names: a renamed local copy of the same model is the same model
        trained_on = find_trained_on(Path(spec.path), spec.raw_config)
        findings += compatibility_findings(base, spec, trained_on, plan.config_updates.get("vocab_size"))
    if plan.problems:
        raise PlanError(plan.problems, plan=plan)
    if findings and cfg.strict:
        error = CompatibilityError("; ".join(findings), fix="check you picked the right base, or drop --strict")
        error.plan = plan
        raise error
    for w in list(plan.warnings) + findings:
        log.warning("%s", w)
    return plan, base_src, adapter_srcs, findings


def check_output_location(out: Path, base_src: Source, adapter_srcs: Sequence[Source]) -> None:
    """Refuse an output folder that overlaps an input (the base, an adapter, or the HF cache of a Hub input)."""
    o = out.resolve()
    for src in [base_src, *adapter_srcs]:
        p = src.protected
        if p is None:
            continue
        p = p.resolve()
        if o == p or p in o.parents or o in p.parents:
            raise OutputError(f"output folder {str(out)!r} overlaps input {str(p)!r}", file=str(out),
                              fix="choose an output folder outside the base and adapter folders")


def merge_planned(cfg: MergeConfig, progress: Any = False) -> MergeReport:
    """`runner.run(cfg)`, with the runner (torch) imported on a thread while the inputs are resolved and planned."""
    if not cfg.dry_run and cfg.output is not None:
        check_platform()
    loader = threading.Thread(target=_import_runner, name="stream-merge-import", daemon=True)
    loader.start()
    out = Path(cfg.output).expanduser() if cfg.output else None
    fresh = out is not None and not out.exists()
    early = False
    try:
        planned = plan_merge(cfg)
        early = _start_first_download(cfg, planned)
    finally:
        loader.join()  # also on a plan error: a process never exits while a thread imports torch
    from .runner import run

    try:
        return run(cfg, progress, planned=planned)
    except BaseException:
        if early and out is not None:  # refused before it merged: leave no trace of the early download
            stop = getattr(planned[1], "stop_downloads", None)
            if stop is not None:
                stop()
            remove_download_area(out)
            if fresh:
                with contextlib.suppress(OSError):
                    out.rmdir()  # only if nothing else is in it
        raise


def _start_first_download(cfg: MergeConfig, planned: Planned) -> bool:
    """Start downloading the first shard's base inputs while torch loads, when nothing can make that wrong: a
    fresh OUT (no journal, no lock holder, nothing pushed by it yet: the first shard is the first to merge),
    the whole merge on this process, an OUT outside the inputs, and room on disk for everything. The runner
    checks all of it again; a refusal removes the download (`merge_planned`)."""
    plan, base_src, adapter_srcs, _ = planned
    if (base_src.kind != "hub" or cfg.output is None or cfg.dry_run or cfg.worker is not None
            or cfg.ray is not None or not plan.shards):
        return False
    out = Path(cfg.output).expanduser()
    if out.exists():
        return False
    from .disk_space import check_disk

    try:
        check_output_location(out, base_src, adapter_srcs)
        todo = [s.file for s in plan.shards]
        check_disk(out, plan, todo, base_src.disk_need(plan.inputs_of(todo), cfg.prefetch),
                   keep_outputs=cfg.local_copy)
    except StreamMergeError:
        return False  # the runner says why, before anything is downloaded
    for file in plan.shards[0].inputs:
        base_src.prefetch(file)
    return True


def _import_runner() -> None:
    try:
        importlib.import_module(".runner", __package__)
    except BaseException:  # noqa: BLE001 - the main thread's own import raises it again, with its traceback
        pass
