"""Completing an output folder once every shard is on disk: side files, model card, record, and last the
index, whose presence means "complete". The resume journal is removed just before the index is written
(issue 15 item 6): the record then holds everything a re-run needs (fingerprint, inputs, options, each
shard's size and digests), and a kill between the two leaves an OUT that a re-run completes. The record's bytes
hold no times, so two merges of the same inputs write the same record; each shard's mtime goes into an
extended attribute of the record (metadata, where the file system has them; see `resume.journal_from_record`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .checkpoint import INDEX_NAME
from .card import model_card
from .extras import RECORD_NAME, copy_side_files, shard_entries, write_index, write_record
from .fileio import fsync_dir, set_file_note, write_file_atomic
from .journal import Journal, remove_journal
from .records import MergePlan
from .resume import SHARD_TIMES_NOTE, journal_result
from .sources import Source

CARD_NAME = "README.md"


def printable(label: str) -> str:
    """A path or spec as UTF-8 text: bytes that are not UTF-8 (a non-UTF-8 folder name) are shown escaped."""
    return label.encode("utf-8", "backslashreplace").decode("utf-8")


def record_of(plan: MergePlan, journal: Journal, findings: Sequence[str], side: Sequence[str]) -> dict[str, Any]:
    """The record `stream_merge.json`: what was merged, how, and each shard's identity."""
    entries = shard_entries([journal_result(journal, s.file) for s in plan.shards])
    return {"tool": "stream-merge", "version": __version__, "fingerprint": journal.fingerprint,
            "inputs": journal.inputs, "options": journal.options, "plan_fingerprint": plan.fingerprint(),
            "config_updates": dict(plan.config_updates), "compatibility": list(findings),
            "warnings": list(plan.warnings), "side_files": list(side), "shards": entries}


def finalize_output(out: Path, plan: MergePlan, base_src: Source, adapter_labels: Sequence[str], base_label: str,
                    journal: Journal, findings: Sequence[str]) -> list[str]:
    """Every shard is on disk and in `journal`: write the side files, the model card, the record, remove the
    journal and write the index. An existing index goes first, so that a run killed while rewriting these
    files never looks complete. Returns the side files written."""
    (out / INDEX_NAME).unlink(missing_ok=True)
    side = copy_side_files(base_src.folder(), [Path(a.path) for a in plan.adapters], out, plan.config_updates)
    write_file_atomic(out / CARD_NAME, model_card(plan, printable(base_label), [printable(a) for a in adapter_labels],
                                                  base_dir=base_src.folder(), inputs=journal.inputs))
    write_record(out, record_of(plan, journal, findings, side))
    set_file_note(out / RECORD_NAME, SHARD_TIMES_NOTE,
                  json.dumps({f: e.get("mtime_ns") for f, e in journal.shards.items()}, sort_keys=True).encode())
    remove_journal(out)
    write_index(out, plan)
    fsync_dir(out)
    return side


def shipped_files(plan: MergePlan, record: dict[str, Any]) -> list[str]:
    """The small files a complete output holds besides its shards (side files, card, record, index)."""
    return [*record.get("side_files", []), CARD_NAME, RECORD_NAME, INDEX_NAME]
