"""`stream-merge verify OUT [--full]`: is an output folder exactly what its record says?

Quick mode checks every shard's size and sha256 (recorded with `merge --checksums` or `--push-to-hub`) against
`stream_merge.json` and every header against the index. When a shard differs, has no recorded sha256, or
with --full, the plan is rebuilt from the recorded inputs and the expected bytes are regenerated and compared,
which names the first differing tensor. A shard without a checksum whose inputs are gone is reported as
unchecked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import AdapterReader
from .checkpoint import INDEX_NAME
from .errors import StreamMergeError, VerificationError
from .extras import RECORD_NAME
from .journal import file_sha256
from .records import MergePlan, ShardHeader
from .safetensors_io import ShardReader, read_header_file
from .worker import Compute, compute_threads, frozen_gc, shard_chunks, torch_settings


@dataclass
class VerifyReport:
    output: str
    shards_checked: int = 0
    recomputed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)  # no checksum recorded and the inputs are gone

    @property
    def ok(self) -> bool:
        return not self.problems


def _load(out: Path, name: str) -> dict:
    path = out / name
    if not path.exists():
        raise VerificationError(f"{name} is missing: the output is incomplete or not made by stream-merge",
                                file=str(path), fix="re-run the merge command to finish it")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise VerificationError(f"{name} is unreadable ({exc})", file=str(path)) from None


def _tensor_at(header: ShardHeader, offset: int) -> str:
    """The tensor whose bytes cover absolute file offset `offset` (or 'header')."""
    if offset < header.data_offset:
        return "<header>"
    rel = offset - header.data_offset
    for t in header.tensors:
        if t.start <= rel < t.end:
            return t.name
    return "<after the last tensor>"


def _rebuild_plan(record: dict) -> MergePlan:
    from .config import config_from_record
    from .runner import plan_merge

    return plan_merge(config_from_record(record["inputs"], record.get("options", {})))[0]


def _compare(out: Path, plan: MergePlan, file: str, header: ShardHeader | None, report: VerifyReport) -> None:
    shard = next(s for s in plan.shards if s.file == file)
    base_header = next(h for h in plan.base.shards if h.file == file)
    adapters = [AdapterReader(spec) for spec in plan.adapters]
    try:
        with ShardReader(Path(plan.base.root) / file, base_header) as reader, open(out / file, "rb") as f, \
                torch_settings(), frozen_gc():
            pos = 0
            compute = Compute(threads=compute_threads(torch.device("cpu")))
            pool = compute.pool(spare=0)
            chunks = shard_chunks(shard, reader, adapters, compute, pool)
            try:
                for name, chunk, n in chunks:
                    data = memoryview(chunk)[:n]
                    got = f.read(n)
                    if got != data:
                        i = next((k for k in range(min(len(got), len(data))) if got[k] != data[k]),
                                 min(len(got), len(data)))
                        where = name or (_tensor_at(header, pos + i) if header else f"byte {pos + i}")
                        report.problems.append(f"{file}: tensor {where!r} differs from a fresh merge of the "
                                               f"recorded inputs (first at byte {pos + i})")
                        return
                    pos += len(data)
                    data.release()  # so that a view of the base is unmapped right away
                    pool.put(chunk)
            finally:
                chunks.close()
            if f.read(1):
                report.problems.append(f"{file}: has trailing bytes after the last tensor")
    finally:
        for a in adapters:
            a.close()
    report.recomputed.append(file)


def verify(output: str | Path, full: bool = False) -> VerifyReport:
    """Check an output folder; problems are listed in the report (raises only when it is not checkable)."""
    out = Path(output)
    report = VerifyReport(output=str(out))
    record = _load(out, RECORD_NAME)
    index = _load(out, INDEX_NAME)
    wmap = index.get("weight_map", {})
    headers: dict[str, ShardHeader | None] = {}
    suspect = []
    no_checksum = []
    for entry in record.get("shards", []):
        file = entry["file"]
        path = out / file
        report.shards_checked += 1
        if not path.exists():
            report.problems.append(f"{file}: missing")
            continue
        try:
            headers[file] = read_header_file(path, file)
        except StreamMergeError as exc:
            headers[file] = None
            report.problems.append(f"{file}: {exc.message}")
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
    todo = [e["file"] for e in record.get("shards", [])] if full else suspect + no_checksum
    todo = [f for f in todo if (out / f).exists()]
    if todo:
        try:
            plan = _rebuild_plan(record)
        except StreamMergeError as exc:
            if full:
                raise VerificationError(f"cannot recompute: the recorded inputs are not usable ({exc.message})",
                                        fix="make the base and adapters available at their recorded paths") from None
            report.unchecked.extend(no_checksum)
            return report
        if plan.fingerprint() != record.get("plan_fingerprint"):
            report.problems.append("the recorded inputs changed since the merge; cannot recompute tensors")
            return report
        for file in todo:
            _compare(out, plan, file, headers.get(file), report)
    return report
