"""`stream-merge verify OUT [--full]`: is an output folder exactly what its record says?

The default mode reads each output shard once and compares its size and digest with `stream_merge.json` (every
merge records the XXH3-128 of each shard, computed by the writer while it wrote the bytes, and its sha256 with
--push-to-hub or --checksums; the sha256 is compared where recorded), and every header with the index. It never
reads the inputs: a shard that differs is named, and `--full` names its first differing tensor. A shard without
a recorded digest (merged by a version that did not always record one) is
recomputed instead, and the summary says so. With --full, every shard is also regenerated from the recorded
inputs and compared byte for byte, which names the first differing tensor. Base shards are read through their
source: a local folder, or for a Hub base the HF cache (default mode) or a fresh download into OUT's download
area (--full, deleted afterwards).

A shard is never reported `ok` without a check: one whose bytes could not be checked (no checksum, and the
inputs are gone, or a quick verify of a Hub base whose shards are not cached) is listed as not checked, with
the reason. The last bits of a merge depend on the compute device, so a merge recorded on another device kind
(CUDA) is not recomputed on the CPU: checksums decide, and without them the shard is "not comparable".

The record is untrusted input: shard entries must be plain file names inside OUT, and only regular files are
opened.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from .adapter import AdapterReader
from .checkpoint import INDEX_NAME, regular_file
from .compute import Compute, compute_threads, frozen_gc, torch_settings
from .errors import InputError, StreamMergeError, VerificationError
from .extras import RECORD_NAME
from .fileio import file_sha256, file_xxh3_128, recorded_digest
from .progress import Progress, phase_callback, watch_downloads
from .pipeline import shard_chunks
from .records import MergePlan, ShardHeader
from .safetensors_io import read_header_file
from .shard_inputs import Readers, last_readers
from .sources import Source

VERIFY_DEVICE = "cpu"  # where verify recomputes


@dataclass
class VerifyReport:
    """What `verify` found: `problems` (any makes it fail), shards recomputed, and shards not checked with
    the reason for each (`unchecked` lists their files, `reasons` maps file -> why)."""

    output: str
    shards_checked: int = 0
    recomputed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    no_digest: list[str] = field(default_factory=list)  # no recorded sha256: only recomputing could check them

    @property
    def ok(self) -> bool:
        return not self.problems

    def skip(self, files: Sequence[str], reason: str) -> None:
        """Record `files` as not checked, for `reason`."""
        for f in files:
            if f not in self.reasons:
                self.unchecked.append(f)
                self.reasons[f] = reason

    def summary(self) -> list[str]:
        """The lines the CLI prints for a report without problems: a shard not checked is never called ok."""
        extra = f", {len(self.recomputed)} recomputed" if self.recomputed else ""
        n, skipped = self.shards_checked, len(self.unchecked)
        lines = [f"ok: {n} shards match the record{extra}" if not skipped
                 else f"ok: {n - skipped} of {n} shards match the record{extra}" if skipped < n
                 else f"not checked: none of the {n} shards could be checked"]
        redone = [f for f in self.no_digest if f in self.recomputed]
        if redone:
            names = ", ".join(redone[:3]) + (f" and {len(redone) - 3} more" if len(redone) > 3 else "")
            lines.append(f"recomputed: {len(redone)} shard(s) have no recorded sha256 ({names}; merged by an "
                         "older stream-merge), so they were checked by recomputing them from the inputs")
        by_reason: dict[str, list[str]] = {}
        for f in self.unchecked:
            by_reason.setdefault(self.reasons[f], []).append(f)
        for reason, files in by_reason.items():
            names = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
            lines.append(f"note: {len(files)} shard(s) not checked ({names}): {reason}")
        return lines


def _load(out: Path, name: str) -> dict[str, Any]:
    path = out / name
    if not path.exists():
        raise VerificationError(f"{name} is missing: the output is incomplete or not made by stream-merge",
                                file=str(path), fix="re-run the merge command to finish it")
    try:
        data = json.loads(regular_file(path, name).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise VerificationError(f"{name} is unreadable ({exc})", file=str(path)) from None
    if not isinstance(data, dict):
        raise VerificationError(f"{name} is not a JSON object", file=str(path))
    return data


def _shard_entries(record: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """The record's shard list, each entry checked: a plain *.safetensors name inside OUT (no folder, no
    '..', not absolute) and an integer size; anything else is refused naming it (InputError: the record is
    untrusted input, and following such a path could read, or block on, a file outside OUT)."""
    entries = record.get("shards", [])
    if not isinstance(entries, list):
        raise InputError(f"{RECORD_NAME}: 'shards' is not a list", file=str(out / RECORD_NAME),
                         fix="a record lists plain shard file names inside OUT; re-run the merge")
    for e in entries:
        file = e.get("file") if isinstance(e, dict) else None
        ok = (isinstance(file, str) and file.endswith(".safetensors") and file.isprintable()
              and PurePosixPath(file).name == file and "\\" not in file and file not in (".", ".."))
        if not ok or not isinstance(e.get("size"), int):
            raise InputError(f"{RECORD_NAME} names a shard outside the output folder or is malformed: "
                                    f"{file if isinstance(file, str) else e!r}", file=str(out / RECORD_NAME),
                                    fix="a record lists plain shard file names inside OUT; re-run the merge")
    return entries


def _tensor_at(header: ShardHeader, offset: int) -> str:
    """The tensor whose bytes cover absolute file offset `offset` (or 'header')."""
    if offset < header.data_offset:
        return "<header>"
    rel = offset - header.data_offset
    for t in header.tensors:
        if t.start <= rel < t.end:
            return t.name
    return "<after the last tensor>"


def recorded_device_kind(record: dict[str, Any]) -> str:
    """The kind of device the merge computed on (`cpu` for records made before the device was recorded)."""
    options = record.get("options")
    device = options.get("device") if isinstance(options, dict) else None
    return str(device or "cpu").split(":")[0]


@contextlib.contextmanager
def _recorded_inputs(record: dict[str, Any], out: Path, full: bool) -> Iterator[tuple[MergePlan, Source]]:
    """The plan rebuilt from the recorded inputs, and the base's source (a Hub base downloads into OUT's
    download area with `full`; the downloads are removed on exit)."""
    from .config import config_from_record
    from .runner import plan_merge, remove_download_area

    cfg = config_from_record(record["inputs"], record.get("options", {}), str(out) if full else None)
    plan, base_src, adapter_srcs, _ = plan_merge(cfg)
    try:
        yield plan, base_src
    finally:
        for src in (base_src, *adapter_srcs):
            src.close(complete=True)
        if full:
            remove_download_area(out)


def _compare(out: Path, plan: MergePlan, base_src: Source, file: str, header: ShardHeader | None,
             report: VerifyReport, on_bytes: Progress, release: Sequence[str]) -> None:
    """Regenerate `file` from the inputs and compare it byte for byte, naming the first differing tensor;
    then release the base shards in `release` (no later recomputed shard reads them)."""
    shard = next(s for s in plan.shards if s.file == file)
    headers = {h.file: h for h in plan.base.shards}
    adapters = [AdapterReader(spec) for spec in plan.adapters]
    try:
        inputs = Readers.of(lambda b: regular_file(base_src.shard_path(b), f"base shard {b}"), headers)
        with inputs.open(shard.inputs) as reader, open(out / file, "rb") as f, torch_settings(), frozen_gc():
            compute = Compute(threads=compute_threads(torch.device(VERIFY_DEVICE)))
            pool = compute.pool(spare=0)
            differs = _first_difference(shard_chunks(shard, reader, adapters, compute, pool), pool, f, header,
                                        lambda n: on_bytes(n, recompute_label(file)))
            if differs is None and f.read(1):
                differs = f"{file}: has trailing bytes after the last tensor"
            elif differs is not None:
                differs = f"{file}: {differs}"
        if differs is not None:
            report.problems.append(differs)
            return
    finally:
        for a in adapters:
            a.close()
        for b in release:
            base_src.release(b)
    report.recomputed.append(file)


def recompute_label(file: str) -> str:
    """The progress label of recomputing `file` (hashing it is labelled with its name)."""
    return f"{file} (recomputed)"


def _first_difference(chunks: Any, pool: Any, f: Any, header: ShardHeader | None,
                      on_bytes: Callable[[int], None]) -> str | None:
    """Walk the regenerated chunks against the file; a description of the first difference, or None."""
    pos = 0
    try:
        for name, chunk, n in chunks:
            data = memoryview(chunk)[:n]
            got = f.read(n)
            if got != data:
                i = next((k for k in range(min(len(got), len(data))) if got[k] != data[k]), min(len(got), len(data)))
                where = name or (_tensor_at(header, pos + i) if header else f"byte {pos + i}")
                return f"tensor {where!r} differs from a fresh merge of the recorded inputs (first at byte {pos + i})"
            pos += len(data)
            on_bytes(len(data))
            data.release()  # so that a view of the base is unmapped right away
            pool.put(chunk)
    finally:
        chunks.close()
    return None


def _check_digest(path: Path, entry: dict[str, Any], report: VerifyReport, on_bytes: Progress) -> bool:
    """Whether the file at `path` has the recorded size and (when recorded) digest, the sha256 where the record
    has one (a push or --checksums), else the xxh3_128 (every merge since it was the default); a difference is
    reported naming the file. The size is compared first, so a truncated or grown shard is never hashed."""
    file = entry["file"]
    size = path.stat().st_size
    if size != entry["size"]:
        report.problems.append(f"{file}: size {size:,} bytes differs from the record's {entry['size']:,} "
                               "(truncated or replaced)")
        return False
    digest = recorded_digest(entry)
    hasher = file_sha256 if digest is not None and digest[0] == "sha256" else file_xxh3_128
    if digest is not None and hasher(path, on_bytes=lambda n: on_bytes(n, file)) != digest[1]:
        report.problems.append(f"{file}: {digest[0]} differs from the record (the bytes changed since the merge; "
                               "`verify --full` names the first differing tensor)")
        return False
    return True


def _check_files(out: Path, entries: Sequence[dict[str, Any]], wmap: dict[str, str], report: VerifyReport,
                 on_bytes: Progress) -> tuple[dict[str, ShardHeader | None], list[str]]:
    """Sizes, checksums and headers against the record and the index: (headers, no_checksum)."""
    headers: dict[str, ShardHeader | None] = {}
    no_checksum: list[str] = []
    for entry in entries:
        file = entry["file"]
        path = out / file
        report.shards_checked += 1
        if not path.exists():
            report.problems.append(f"{file}: missing")
            continue
        try:
            headers[file] = read_header_file(regular_file(path, file), file)
        except StreamMergeError as exc:
            headers[file] = None
            report.problems.append(f"{file}: {exc.message}")
            continue
        if _check_digest(path, entry, report, on_bytes) and recorded_digest(entry) is None:
            no_checksum.append(file)  # merged before every shard had a digest: only recomputing can check it
    in_headers = {t.name: f for f, h in headers.items() if h for t in h.tensors}
    for name, file in wmap.items():
        if in_headers.get(name) != file and headers.get(file) is not None:
            report.problems.append(f"index puts {name!r} in {file} but its header does not hold it")
    for name, file in in_headers.items():
        if name not in wmap:
            report.problems.append(f"{file}: tensor {name!r} is not in the index")
    return headers, no_checksum


def _recompute(out: Path, record: dict[str, Any], todo: Sequence[str], no_checksum: Sequence[str],
               headers: dict[str, ShardHeader | None], full: bool, report: VerifyReport, on_bytes: Progress,
               progress: bool | Progress | None = None) -> None:
    """Regenerate the shards in `todo` from the recorded inputs; what cannot be regenerated is not checked.
    With `full`, base shards a Hub source downloads are a `download` phase of `progress`."""
    try:
        with _recorded_inputs(record, out, full) as (plan, base_src):
            if plan.fingerprint() != record.get("plan_fingerprint"):
                report.problems.append("the recorded inputs changed since the merge; cannot recompute tensors")
                return
            if full:
                watch_downloads(progress, base_src, dict.fromkeys(b for s in plan.shards if s.file in todo
                                                                  for b in s.inputs))
            shards = {s.file: s for s in plan.shards}
            if not full:  # only what can be read without downloading
                missing = {f for f in todo if not all(base_src.available(b) for b in shards[f].inputs)}
                report.skip([f for f in todo if f in missing and f in no_checksum],
                            "the base shard is not in the HF cache (`verify --full` downloads it)")
                todo = [f for f in todo if f not in missing]
            release = last_readers([shards[f] for f in todo])  # a base shard two outputs read: downloaded once
            for file in todo:
                _compare(out, plan, base_src, file, headers.get(file), report, on_bytes, release.get(file, ()))
    except StreamMergeError as exc:
        if isinstance(exc, VerificationError):
            raise
        report.skip(no_checksum, f"no recorded sha256, and the recorded inputs are not available to recompute "
                                 f"them ({exc.message}); merge again to record one")


def _progress_totals(entries: Sequence[dict[str, Any]], full: bool) -> dict[str, int]:
    """Progress label -> bytes: each shard with a recorded digest is hashed; each without one (every shard with
    `full`) is recomputed."""
    totals = {e["file"]: e["size"] for e in entries if recorded_digest(e)}
    totals.update({recompute_label(e["file"]): e["size"] for e in entries if full or not recorded_digest(e)})
    return totals


def verify(output: str | Path, full: bool = False, progress: bool | Progress | None = None) -> VerifyReport:
    """Check an output folder against its record.

    Args:
        output: the folder a merge wrote.
        full: also regenerate every shard from the recorded inputs (downloading Hub base shards), instead of
            only those without a recorded digest (sha256 or xxh3_128).
        progress: a `progress.Reporter` (a "verify" phase: bytes hashed and recomputed), a callback
            `(bytes, label)`, True for a bar, or None / False.

    Returns:
        A VerifyReport: `problems` (each names its shard; with `full`, a differing shard also names its first
        differing tensor), the shards recomputed, and the shards not checked, with why.

    Raises:
        VerificationError: the folder has no readable record or index, or the record is malformed.
    """
    out = Path(output)
    report = VerifyReport(output=str(out))
    record = _load(out, RECORD_NAME)
    wmap = _load(out, INDEX_NAME).get("weight_map", {})
    entries = _shard_entries(record, out)
    on_bytes, phase = phase_callback(progress, "verify", _progress_totals(entries, full))
    try:
        headers, no_checksum = _check_files(out, entries, wmap if isinstance(wmap, dict) else {}, report, on_bytes)
        report.no_digest = list(no_checksum)
        todo = [e["file"] for e in entries if e["file"] in headers] if full else no_checksum
        kind = recorded_device_kind(record)
        if todo and kind != VERIFY_DEVICE:
            report.skip(no_checksum, f"no recorded sha256, merged on {kind}, and recomputing on the {VERIFY_DEVICE} "
                                     "is not comparable bit for bit; merge again to record one")
        elif todo:
            _recompute(out, record, todo, no_checksum, headers, full, report, on_bytes, progress)
    finally:
        if phase is not None:
            phase.close()
    return report
