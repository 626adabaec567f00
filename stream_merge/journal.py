"""The resume journal: a versioned JSON file in OUT listing every finished shard (size, sha256) under a
fingerprint of the inputs and options. Written atomically after each shard, so after any crash it describes
exactly the shards that are safely on disk.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import OutputError
from .safetensors_io import write_file_atomic

JOURNAL_NAME = "stream_merge.journal.json"
JOURNAL_VERSION = 1


@dataclass
class Journal:
    fingerprint: str
    inputs: dict[str, Any]
    options: dict[str, Any]
    tool_version: str
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps({"version": JOURNAL_VERSION, "fingerprint": self.fingerprint, "inputs": self.inputs,
                           "options": self.options, "tool_version": self.tool_version, "shards": self.shards},
                          indent=1, sort_keys=True).encode()

    def save(self, out_dir: Path) -> None:
        write_file_atomic(out_dir / JOURNAL_NAME, self.to_json())


def load_journal(out_dir: Path) -> Journal | None:
    path = out_dir / JOURNAL_NAME
    if not path.exists():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        if obj.get("version") != JOURNAL_VERSION:
            raise ValueError(f"version {obj.get('version')!r}")
        return Journal(fingerprint=obj["fingerprint"], inputs=obj["inputs"], options=obj["options"],
                       tool_version=obj["tool_version"], shards=dict(obj["shards"]))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise OutputError(f"the resume journal is unreadable ({exc})", file=str(path),
                          fix="re-run with --fresh to start this output over") from None


def file_sha256(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    buf = bytearray(chunk)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(mv):
            h.update(mv[:n])
    return h.hexdigest()
