"""Disk space: what a merge needs on each file system against what is free. One computation for the check a
merge makes before its first shard (`check_disk`, raising) and for the verdict of `plan` / `--dry-run`
(`planned_disks`, measuring without raising).

Needed: with a local copy, the output bytes not already finished plus one shard of headroom; with
`--push-to-hub --no-local-copy`, at most the shards waiting for upload plus the current one; for a Hub base,
the base shards downloaded at once (`Source.disk_need`: prefetch + 1 of them, or all with --keep-downloads).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from .errors import DiskSpaceError, StreamMergeError
from .plan_report import DiskNeed, gib, output_sizes, planned_need
from .records import MergePlan
from .resume import load_journal_or_record, shard_done
from .sources import Source


def existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (where a folder not created yet will live)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_needs(out: Path, plan: MergePlan, todo: Sequence[str], downloads: Sequence[tuple[Path, int]] = (),
               keep_outputs: bool = True) -> list[DiskNeed]:
    """Per file system (OUT's first): the bytes needed at most at once and the free bytes measured now."""
    sizes = output_sizes(plan)
    biggest = max(sizes.values()) if sizes else 0
    need = sum(sizes[f] for f in todo) + biggest
    if not keep_outputs:  # pushed shards leave OUT: at most the pusher's (push.MAX_HELD), plus the current one
        from .push import MAX_HELD

        need = min(need, (MAX_HELD + 1) * biggest)
    where = existing(out)
    disks: dict[int, list] = {where.stat().st_dev: [where, need, 0]}
    for folder, n in downloads:
        at = existing(folder)
        disk = disks.setdefault(at.stat().st_dev, [at, 0, 0])
        disk[1] += n
        disk[2] += n
    return [DiskNeed(str(path), need, fetched, shutil.disk_usage(path).free) for path, need, fetched in disks.values()]


def check_disk(out: Path, plan: MergePlan, todo: Sequence[str], downloads: Sequence[tuple[Path, int]] = (),
               keep_outputs: bool = True) -> None:
    """Raise DiskSpaceError naming the first file system without room for what `disk_needs` counts."""
    for d in disk_needs(out, plan, todo, downloads, keep_outputs):
        if d.short:
            raise short_disk_error(d)


def short_disk_error(d: DiskNeed) -> DiskSpaceError:
    """The one-line error for a file system without enough room."""
    what = "what is left to write plus one shard of headroom" if d.need > d.downloads else "base shards to download"
    if d.downloads and d.need > d.downloads:
        what += f", and {d.downloads / 2**30:.1f} GiB of base shards downloaded at once"
    return DiskSpaceError(f"not enough free disk space: {gib(d.free or 0)} free, {gib(d.need)} needed ({what})",
                          file=d.path, fix="free some space or choose another output folder; finished shards are kept")


def _finished(out: Path, mine: set[str], local_copy: bool) -> set[str]:
    """Shards OUT already holds finished, by its journal or record (none when it has neither)."""
    try:
        journal = load_journal_or_record(out)[0] if out.is_dir() else None
    except StreamMergeError:
        return set()  # reported, with its fix, when the merge reads the journal for real
    return {f for f in mine if journal is not None and shard_done(out, journal, f, local_copy)}


def planned_disks(plan: MergePlan, base_src: Source, out: Path | None, mine: set[str], prefetch: int,
                  local_copy: bool = True, fresh: bool = False) -> list[DiskNeed]:
    """What `merge --dry-run` reports: the disks a merge into OUT would need, measured now (shards OUT already
    holds finished are not counted, unless `fresh`). Without OUT (`plan`), the need alone, free space unknown."""
    if out is None:
        return [planned_need(plan, [s.file for s in plan.shards if s.file in mine], base_src.kind == "hub", prefetch)]
    done = set() if fresh else _finished(out, mine, local_copy)
    todo = [s.file for s in plan.shards if s.file in mine and s.file not in done]
    return disk_needs(out, plan, todo, base_src.disk_need(plan.inputs_of(todo), prefetch), local_copy)
