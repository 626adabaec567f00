"""The resume journal: `stream_merge.journal.json` in OUT holds a fingerprint of the inputs and options, and
`.stream-merge-journal/` one small record (size, mtime, sha256 when checksums are on) per finished shard. Each file is written
atomically by the process that finished that shard, so after any crash the journal lists exactly the shards
that are safely on disk, and workers of a partitioned merge (`--worker I/N`, Ray tasks) can share one OUT on
a shared file system without a global lock.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from .errors import OutputError
from .records import ShardResult
from .safetensors_io import write_file_atomic

JOURNAL_NAME = "stream_merge.journal.json"
SHARDS_DIR = ".stream-merge-journal"
JOURNAL_VERSION = 2


@dataclass
class Journal:
    fingerprint: str
    inputs: dict[str, Any]
    options: dict[str, Any]
    tool_version: str
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)

    def _run_file(self) -> bytes:
        return json.dumps({"version": JOURNAL_VERSION, "fingerprint": self.fingerprint, "inputs": self.inputs,
                           "options": self.options, "tool_version": self.tool_version},
                          indent=1, sort_keys=True).encode()

    def saved(self, out_dir: Path) -> bool:
        """Whether OUT's run file already holds exactly what `save` would write."""
        try:
            return (out_dir / JOURNAL_NAME).read_bytes() == self._run_file()
        except OSError:
            return False

    def save(self, out_dir: Path) -> None:
        """Write the run file (fingerprint, inputs, options) unless it already holds these bytes (a re-run
        of a complete OUT writes nothing before its finalize removes the index); shard records are written
        by `record`."""
        if not self.saved(out_dir):
            write_file_atomic(out_dir / JOURNAL_NAME, self._run_file())

    def record(self, out_dir: Path, file: str, entry: dict[str, Any]) -> None:
        folder = out_dir / SHARDS_DIR
        folder.mkdir(exist_ok=True)
        write_file_atomic(folder / (quote(file, safe="") + ".json"), json.dumps(entry, sort_keys=True).encode())
        self.shards[file] = entry

    def record_shard(self, out_dir: Path, res: ShardResult) -> None:
        """Record a published shard: its size and mtime say on resume that it is still the file we wrote."""
        self.record(out_dir, res.file, shard_entry(out_dir, res))

    def forget(self, out_dir: Path, file: str) -> None:
        (out_dir / SHARDS_DIR / (quote(file, safe="") + ".json")).unlink(missing_ok=True)
        self.shards.pop(file, None)

    def reload(self, out_dir: Path) -> None:
        """Re-read the shard records (other workers may have finished shards meanwhile)."""
        self.shards = _read_records(out_dir)


def shard_entry(out_dir: Path, res: ShardResult) -> dict[str, Any]:
    st = (out_dir / res.file).stat()
    return {"size": res.size, "mtime_ns": st.st_mtime_ns, "sha256": res.sha256, "patched": res.patched,
            "copied": res.copied}


def _read_records(out_dir: Path) -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    folder = out_dir / SHARDS_DIR
    if folder.is_dir():
        for p in folder.glob("*.json"):
            try:
                entry = json.loads(p.read_text(encoding="utf-8"))
                if all(k in entry for k in ("size", "patched", "copied")):
                    records[unquote(p.name[: -len(".json")])] = entry
            except (ValueError, UnicodeDecodeError):
                continue  # a torn record cannot exist (atomic writes); an unreadable one means "redo the shard"
    return records


def load_journal(out_dir: Path) -> Journal | None:
    path = out_dir / JOURNAL_NAME
    if not path.exists():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        if obj.get("version") != JOURNAL_VERSION:
            raise ValueError(f"version {obj.get('version')!r}, expected {JOURNAL_VERSION}")
        return Journal(fingerprint=obj["fingerprint"], inputs=obj["inputs"], options=obj["options"],
                       tool_version=obj["tool_version"], shards=_read_records(out_dir))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise OutputError(f"the resume journal is unreadable ({exc})", file=str(path),
                          fix="re-run with --fresh to start this output over") from None


def remove_journal(out_dir: Path) -> None:
    (out_dir / JOURNAL_NAME).unlink(missing_ok=True)
    shutil.rmtree(out_dir / SHARDS_DIR, ignore_errors=True)


def file_sha256(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    buf = bytearray(chunk)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(mv):
            h.update(mv[:n])
    return h.hexdigest()
