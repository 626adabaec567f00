"""`stream-merge verify OUT [--full]`: is an output folder exactly what its record says?

Quick mode checks every shard's size and sha256 (recorded with `merge --checksums` or `--push-to-hub`) against
`stream_merge.json` and every header against the index. When a shard differs, has no recorded sha256, or
with --full, the plan is rebuilt from the recorded inputs and the expected bytes are regenerated and compared,
which names the first differing tensor. Base shards are read through their source: a local folder, or for a
Hub base the HF cache (quick mode) or a fresh download into OUT's download area (--full, deleted afterwards).

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from .adapter import AdapterReader
from .checkpoint import INDEX_NAME, regular_file
from .compute import Compute, compute_threads, frozen_gc, torch_settings
from .errors import InputError, StreamMergeError, VerificationError
from .extras import RECORD_NAME
from .fileio import file_sha256
from .pipeline import shard_chunks
from .records import MergePlan, ShardHeader
from .safetensors_io import read_header_file
from .shard_inputs import Readers
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
        if not skipped:
            return [f"ok: {n} shards match the record{extra}"]
        lines = [f"ok: {n - skipped} of {n} shards match the record{extra}" if skipped < n
                 else f"not checked: none of the {n} shards could be checked"]
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
             report: VerifyReport) -> None:
    """Regenerate `file` from the inputs and compare it byte for byte, naming the first differing tensor."""
    shard = next(s for s in plan.shards if s.file == file)
    headers = {h.file: h for h in plan.base.shards}
    adapters = [AdapterReader(spec) for spec in plan.adapters]
    try:
        inputs = Readers.of(lambda b: regular_file(base_src.shard_path(b), f"base shard {b}"), headers)
        with inputs.open(shard.inputs) as reader, open(out / file, "rb") as f, torch_settings(), frozen_gc():
            compute = Compute(threads=compute_threads(torch.device(VERIFY_DEVICE)))
            pool = compute.pool(spare=0)
            differs = _first_difference(shard_chunks(shard, reader, adapters, compute, pool), pool, f, header)
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
        for b in shard.inputs:
            base_src.release(b)
    report.recomputed.append(file)


def _first_difference(chunks: Any, pool: Any, f: Any, header: ShardHeader | None) -> str | None:
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
            data.release()  # so that a view of the base is unmapped right away
            pool.put(chunk)
    finally:
        chunks.close()
    return None


def _check_files(out: Path, entries: Sequence[dict[str, Any]], wmap: dict[str, str],
                 report: VerifyReport) -> tuple[dict[str, ShardHeader | None], list[str], list[str]]:
    """Sizes, checksums and headers against the record and the index: (headers, suspect, no_checksum)."""
    headers: dict[str, ShardHeader | None] = {}
    suspect, no_checksum = [], []
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
        if path.stat().st_size != entry["size"] or (entry.get("sha256") and file_sha256(path) != entry["sha256"]):
            report.problems.append(f"{file}: size or sha256 differs from the record")
            suspect.append(file)
        elif not entry.get("sha256"):
            no_checksum.append(file)  # merged without --checksums: only recomputing can check its bytes
    in_headers = {t.name: f for f, h in headers.items() if h for t in h.tensors}
    for name, file in wmap.items():
        if in_headers.get(name) != file and headers.get(file) is not None:
            report.problems.append(f"index puts {name!r} in {file} but its header does not hold it")
    for name, file in in_headers.items():
        if name not in wmap:
            report.problems.append(f"{file}: tensor {name!r} is not in the index")
    return headers, suspect, no_checksum


def _recompute(out: Path, record: dict[str, Any], todo: Sequence[str], no_checksum: Sequence[str],
               headers: dict[str, ShardHeader | None], full: bool, report: VerifyReport) -> None:
    """Regenerate the shards in `todo` from the recorded inputs; what cannot be regenerated is not checked."""
    try:
        with _recorded_inputs(record, out, full) as (plan, base_src):
            if plan.fingerprint() != record.get("plan_fingerprint"):
                report.problems.append("the recorded inputs changed since the merge; cannot recompute tensors")
                return
            for file in todo:
                if not full and not base_src.available(file):
                    report.skip([file] if file in no_checksum else [],
                                "the base shard is not in the HF cache (`verify --full` downloads it)")
                    continue
                _compare(out, plan, base_src, file, headers.get(file), report)
    except StreamMergeError as exc:
        if isinstance(exc, VerificationError):
            raise
        report.skip(no_checksum, f"the recorded inputs are not available to recompute them ({exc.message}); "
                                 "merge with --checksums to make verify independent of the inputs")


def verify(output: str | Path, full: bool = False) -> VerifyReport:
    """Check an output folder against its record.

    Args:
        output: the folder a merge wrote.
        full: regenerate every shard from the recorded inputs (downloading Hub base shards) instead of only
            those without a checksum or that differ.

    Returns:
        A VerifyReport: `problems` (a differing shard names its first differing tensor where it could be
        recomputed) and the shards not checked, with why.

    Raises:
        VerificationError: the folder has no readable record or index, or the record is malformed.
    """
    out = Path(output)
    report = VerifyReport(output=str(out))
    record = _load(out, RECORD_NAME)
    wmap = _load(out, INDEX_NAME).get("weight_map", {})
    entries = _shard_entries(record, out)
    headers, suspect, no_checksum = _check_files(out, entries, wmap if isinstance(wmap, dict) else {}, report)
    todo = [e["file"] for e in entries if e["file"] in headers] if full else suspect + no_checksum
    kind = recorded_device_kind(record)
    if todo and kind != VERIFY_DEVICE:
        report.skip(no_checksum, f"merged on {kind} and recomputing on the {VERIFY_DEVICE} is not comparable bit "
                                 "for bit; merge with --checksums to verify it")
        return report
    if todo:
        _recompute(out, record, todo, no_checksum, headers, full, report)
    return report
