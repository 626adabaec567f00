"""The resume journal: `stream_merge.journal.json` in OUT holds a fingerprint of the inputs and options, and
`.stream-merge-journal/` one small record (size, mtime, xxh3_128, sha256 with a push or --checksums) per
finished shard. Each file is written atomically by the process that finished that shard, so after any crash
the journal lists exactly the shards that are safely on disk, and workers of a partitioned merge (`--worker
I/N`, Ray tasks) can share one OUT on a shared file system without a global lock. Once the output is
complete the journal is removed; `stream_merge.json` (the record) then says the same. Imports only the
standard library, `fileio` and `errors` (and through fileio xxhash), so reading a journal never loads torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from .errors import OutputError
from .fileio import NAME_MAX, file_digest, recorded_digest, write_file_atomic

if TYPE_CHECKING:
    from .records import ShardResult

JOURNAL_NAME = "stream_merge.journal.json"
SHARDS_DIR = ".stream-merge-journal"
JOURNAL_VERSION = 2


def _record_name(file: str) -> str:
    """The shard record's file name: the quoted shard name, or a digest where that would pass NAME_MAX (a
    long or non-ASCII shard name); the record itself names its shard."""
    name = quote(file, safe="") + ".json"
    if len(name.encode()) > NAME_MAX:
        name = "sha256-" + hashlib.sha256(file.encode("utf-8", "surrogateescape")).hexdigest() + ".json"
    return name


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
        """Write the run file (fingerprint, inputs, options) unless it already holds these bytes; shard
        records are written by `record`."""
        if not self.saved(out_dir):
            write_file_atomic(out_dir / JOURNAL_NAME, self._run_file())

    def record(self, out_dir: Path, file: str, entry: dict[str, Any]) -> None:
        entry = {**entry, "file": file}
        folder = out_dir / SHARDS_DIR
        folder.mkdir(exist_ok=True)
        write_file_atomic(folder / _record_name(file), json.dumps(entry, sort_keys=True).encode())
        self.shards[file] = entry

    def record_shard(self, out_dir: Path, res: ShardResult) -> None:
        """Record a published shard: its size and mtime say on resume that it is still the file we wrote."""
        self.shards[res.file] = record_shard(out_dir, res)

    def forget(self, out_dir: Path, file: str) -> None:
        (out_dir / SHARDS_DIR / _record_name(file)).unlink(missing_ok=True)
        self.shards.pop(file, None)

    def reload(self, out_dir: Path) -> None:
        """Re-read the shard records (other workers may have finished shards meanwhile)."""
        self.shards = _read_records(out_dir)


def shard_entry(out_dir: Path, res: ShardResult) -> dict[str, Any]:
    """What the journal keeps about a published shard."""
    st = (out_dir / res.file).stat()
    return {"file": res.file, "size": res.size, "mtime_ns": st.st_mtime_ns, "sha256": res.sha256,
            "xxh3_128": res.xxh3_128, "patched": res.patched, "copied": res.copied}


def record_shard(out_dir: Path, res: ShardResult) -> dict[str, Any]:
    """Write the record of one published shard (for processes that hold no Journal, e.g. Ray tasks)."""
    entry = shard_entry(out_dir, res)
    folder = out_dir / SHARDS_DIR
    folder.mkdir(exist_ok=True)
    write_file_atomic(folder / _record_name(res.file), json.dumps(entry, sort_keys=True).encode())
    return entry


def shard_finished(path: Path, entry: dict[str, Any] | None) -> bool:
    """THE definition of a finished shard, used by resume, by the pending check and by finalize: the file at
    `path` has the recorded size and either the recorded mtime (still the file we published; for an entry
    rebuilt from a finished merge's record, an mtime not later than the record's, `not_after_ns`) or, when
    the folder was copied since, the recorded digest (sha256 when recorded, else xxh3_128)."""
    if not entry or "size" not in entry:
        return False
    try:
        st = path.stat()
    except OSError:
        return False
    if st.st_size != entry["size"]:
        return False
    if entry.get("mtime_ns") == st.st_mtime_ns or st.st_mtime_ns <= entry.get("not_after_ns", -1):
        return True
    digest = recorded_digest(entry)
    return digest is not None and file_digest(path, digest[0]) == digest[1]


def _read_records(out_dir: Path) -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    folder = out_dir / SHARDS_DIR
    try:
        names = os.listdir(folder)
    except OSError:
        return records
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        try:
            entry = json.loads((folder / name).read_text(encoding="utf-8"))
            if isinstance(entry, dict) and all(k in entry for k in ("size", "patched", "copied")):
                file = entry.get("file")
                records[file if isinstance(file, str) else unquote(name[: -len(".json")])] = entry
        except (OSError, ValueError, UnicodeDecodeError):
            continue  # a torn record cannot exist (atomic writes); an unreadable one means "redo the shard"
    return records


def load_journal(out_dir: Path) -> Journal | None:
    """OUT's journal, None when there is none; an unreadable one is an OutputError naming it."""
    path = out_dir / JOURNAL_NAME
    if not os.path.lexists(path):
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        if obj.get("version") != JOURNAL_VERSION:
            raise ValueError(f"version {obj.get('version')!r}, expected {JOURNAL_VERSION}")
        return Journal(fingerprint=obj["fingerprint"], inputs=obj["inputs"], options=obj["options"],
                       tool_version=obj["tool_version"], shards=_read_records(out_dir))
    except OSError as exc:
        raise OutputError(f"the resume journal is unreadable ({exc.strerror})", file=str(path),
                          fix="remove it, or re-run with --fresh to start this output over") from None
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise OutputError(f"the resume journal is unreadable ({exc})", file=str(path),
                          fix="re-run with --fresh to start this output over") from None


def _is_ours(name: str) -> bool:
    """A file of the journal folder that the journal itself consists of: a shard record or a worker's lock."""
    return (name.endswith(".json") or (name.startswith("worker-") and name.endswith(".lock"))) \
        and not name.startswith(".")


def remove_journal(out_dir: Path) -> None:
    """Remove the journal (run file, shard records, worker locks; the folder once empty). Files of other
    runs in its folder (a temp record being written) stay. One that cannot be removed is an OutputError."""
    path = out_dir / JOURNAL_NAME
    try:
        if os.path.lexists(path):
            path.unlink()
        folder = out_dir / SHARDS_DIR
        names = os.listdir(folder) if folder.is_dir() else []
        for name in names:
            if _is_ours(name):
                path = folder / name
                path.unlink(missing_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot remove the old resume journal ({exc.strerror})", file=str(path),
                          fix="remove it by hand (or fix its permissions), then re-run") from None
    try:
        (out_dir / SHARDS_DIR).rmdir()  # only once empty: another run's temp record keeps it
    except OSError:
        pass
