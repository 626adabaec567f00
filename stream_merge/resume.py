"""Resume rules: what identifies a merge (fingerprint), what identifies its inputs, whose files OUT holds, and
which shards are already finished.

OUT is *ours* when it holds our journal (a merge in progress) or our record `stream_merge.json` (a finished
merge: the journal is removed on completion and the record says the same). Files in an OUT that is not ours
are never replaced (issue 14 item 1), and `--fresh` removes only the files our journal or record name. A
re-run with the same fingerprint resumes (or, when complete, does nothing); another fingerprint is refused
naming what differs (a moved Hub revision, another compute device) with `--fresh` as the fix. Local input
files are identified cheaply by size, mtime and inode (and a sha256 with `--checksums`), so a base changed
after a merge is noticed instead of silently kept (issue 14 item 2).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .checkpoint import INDEX_NAME
from .errors import OutputError
from .extras import RECORD_NAME
from .fileio import TMP_PREFIX, file_note, file_sha256
from .journal import JOURNAL_NAME, SHARDS_DIR, Journal, load_journal, remove_journal, shard_finished
from .records import MergePlan, ShardResult
from .sources import DOWNLOADS_DIR, Source

log = logging.getLogger("stream_merge")
SHARD_TIMES_NOTE = "stream-merge.shard-mtimes"  # extended attribute of the record: each shard's mtime
MACHINERY = (JOURNAL_NAME, SHARDS_DIR, DOWNLOADS_DIR)  # our own bookkeeping in OUT, never shipped


# ---------------------------------------------------------------------------------------------- identity


def local_file_identity(path: Path, checksum: bool) -> dict[str, Any]:
    """What identifies a local input file: size, mtime and inode (cheap), plus its sha256 when asked."""
    st = path.stat()
    ident: dict[str, Any] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    if checksum:
        ident["sha256"] = file_sha256(path)
    return ident


def inputs_record(base: Source, adapters: Sequence[Source], plan: MergePlan, checksums: bool = False
                  ) -> dict[str, Any]:
    """What identifies the inputs: shard sizes and header digests (these enter the fingerprint), adapter file
    digests, revisions, and for a local base each shard file's identity (checked on resume, see
    `check_inputs_unchanged`)."""
    shards = {s.file: {"size": s.size, "header_sha256": hashlib.sha256(
        repr([(t.name, t.dtype, t.shape, t.start, t.end) for t in s.tensors]).encode()).hexdigest()}
        for s in plan.base.shards}
    base_entry: dict[str, Any] = {"spec": base.spec, "path": str(base.folder()), "revision": base.revision,
                                  "shards": shards}
    if base.kind == "local":
        base_entry["files"] = {s.file: local_file_identity(base.shard_path(s.file), checksums)
                               for s in plan.base.shards}
    return {
        "base": base_entry,
        "adapters": [{"spec": src.spec, "path": spec.path, "revision": src.revision, "weight": spec.weight,
                      "config_sha256": file_sha256(Path(spec.config_file)),
                      "weights_sha256": file_sha256(Path(spec.weights_file)),
                      "base_model_name_or_path": spec.raw_config.get("base_model_name_or_path"),
                      "adapter_revision": spec.raw_config.get("revision")}
                     for src, spec in zip(adapters, plan.adapters)],
    }


def fingerprint(plan: MergePlan, inputs: dict[str, Any], options: dict[str, Any]) -> str:
    """One digest of everything that decides the output bytes: the plan, the base shards' headers, the adapter
    files, the recorded options (the compute device kind among them), the tool's major version and, for Hub
    inputs, the commits. Options enter as JSON, so options read back from a journal give the same digest."""
    revisions = [inputs["base"].get("revision")] + [a.get("revision") for a in inputs["adapters"]]
    return hashlib.sha256(repr((plan.fingerprint(), inputs["base"]["shards"],
                                [(a["config_sha256"], a["weights_sha256"]) for a in inputs["adapters"]],
                                json.dumps(options, sort_keys=True), __version__.split(".")[0])
                               + ((revisions,) if any(revisions) else ())).encode()).hexdigest()


def changed_inputs(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Local base files whose identity differs from the record. A recorded sha256 that the file still has
    forgives a new mtime or inode (the folder was copied); it is computed only then."""
    old = recorded.get("base", {}).get("files") or {}
    new = current["base"].get("files") or {}
    changed = []
    for file, ident in new.items():
        was = old.get(file)
        if was is None or all(was.get(k) == ident.get(k) for k in ("size", "mtime_ns", "inode")):
            continue
        if was.get("size") == ident["size"] and was.get("sha256"):
            got = ident.get("sha256") or file_sha256(Path(current["base"]["path"]) / file)
            if got == was["sha256"]:
                continue
        changed.append(file)
    return changed


def check_inputs_unchanged(recorded: dict[str, Any], current: dict[str, Any], out: Path) -> None:
    """Refuse to resume or keep an output whose local base files changed since they were merged."""
    changed = changed_inputs(recorded, current)
    if changed:
        folder = current["base"].get("path", "")
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise OutputError(f"BASE file {os.path.join(folder, changed[0])}{more} changed since this output was merged "
                          "(size, mtime or inode differ)", file=str(out),
                          fix="add --fresh to merge the new base again (or restore the old file)")


def moved_revisions(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Hub inputs whose revision (a branch or tag) now resolves to another commit than the journal's."""
    pairs = [("BASE", old.get("base", {}), new["base"])]
    pairs += [("ADAPTER", o, n) for o, n in zip(old.get("adapters", []), new["adapters"])]
    return [(what, n["spec"], o["revision"], n["revision"]) for what, o, n in pairs
            if o.get("spec") == n["spec"] and o.get("revision") and n["revision"] and o["revision"] != n["revision"]]


def check_same_merge(journal: Journal, fp: str, inputs: dict[str, Any], options: dict[str, Any], out: Path) -> None:
    """Refuse an OUT that holds a merge of other inputs or options, naming the difference where it can."""
    if journal.fingerprint != fp:
        for what, spec, old, new in moved_revisions(journal.inputs, inputs):
            raise OutputError(f"{what} {spec} now resolves to commit {new}, but this output was started from {old}",
                              file=str(out), fix=f"pin the old commit ({spec.split('@')[0]}@{old}) to resume it, or "
                                                 "add --fresh to start over")
        was, now = journal.options.get("device"), options.get("device")
        if was and now and was != now:
            raise OutputError(f"this output was merged on {was}, and {now} rounds differently: resuming on {now} "
                              "would mix results", file=str(out),
                              fix=f"re-run with --device {was} to resume it, or add --fresh to merge again on {now}")
        raise OutputError("output folder holds a merge of other inputs or options", file=str(out),
                          fix="re-run with the original command to resume it, or add --fresh to start over")
    check_inputs_unchanged(journal.inputs, inputs, out)


# ---------------------------------------------------------------------------------------------- whose files


def read_record(out: Path) -> dict[str, Any] | None:
    """OUT's `stream_merge.json` when it is a record of ours (None when absent or not ours)."""
    try:
        obj = json.loads((out / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict) or obj.get("tool") != "stream-merge" or not isinstance(obj.get("shards"), list):
        return None
    return obj


def journal_from_record(record: dict[str, Any], recorded_ns: int, mtimes: dict[str, Any] | None = None) -> Journal:
    """The journal a finished merge had, rebuilt from its record (not saved). Each shard's mtime comes from
    the record's extended attribute (`mtimes`); where there is none (a file system without them, a copy
    that dropped them), a shard not modified after the record was written (`recorded_ns`) counts as the one
    recorded, since the record is written after every shard."""
    shards = {}
    for e in record["shards"]:
        if isinstance(e, dict) and isinstance(e.get("file"), str):
            known = (mtimes or {}).get(e["file"])
            shards[e["file"]] = {**e, "mtime_ns": known} if isinstance(known, int) else {**e, "not_after_ns": recorded_ns}
    return Journal(fingerprint=str(record.get("fingerprint", "")), inputs=record.get("inputs") or {},
                   options=record.get("options") or {}, tool_version=str(record.get("version", "")), shards=shards)


def _shard_times(out: Path) -> dict[str, Any] | None:
    note = file_note(out / RECORD_NAME, SHARD_TIMES_NOTE)
    try:
        times = json.loads(note) if note else None
    except ValueError:
        return None
    return times if isinstance(times, dict) else None


def load_journal_or_record(out: Path) -> tuple[Journal | None, bool]:
    """OUT's journal (a merge in progress), else the journal rebuilt from OUT's record (second value True: a
    finished merge), else None."""
    journal = load_journal(out)
    if journal is not None:
        return journal, False
    record = read_record(out)
    if record is None:
        return None, False
    try:
        recorded_ns = (out / RECORD_NAME).stat().st_mtime_ns
    except OSError:
        return None, False
    return journal_from_record(record, recorded_ns, _shard_times(out)), True


def foreign_files(out: Path) -> list[str]:
    """Entries of OUT that are not our bookkeeping or temp files."""
    return sorted(n for n in os.listdir(out) if n not in MACHINERY and not n.startswith(TMP_PREFIX)
                  and not (n.startswith(".stream-merge") and n.endswith(".lock")))  # locks of older versions


def _refuse_foreign(out: Path, names: list[str], fix: str) -> OutputError:
    listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return OutputError(f"output folder holds files stream-merge did not write ({listed})", file=str(out), fix=fix)


def clear_ours(out: Path, outputs: Sequence[str], claim: Journal) -> None:
    """--fresh: remove what our journal or record says is ours, in an order that keeps OUT ours after a kill
    at any point (the index, the old journal, the new journal `claim`, then the files); refuse when OUT holds
    files and is not ours."""
    try:
        journal = load_journal(out)
    except OutputError:
        journal = Journal(fingerprint="", inputs={}, options={}, tool_version="")  # unreadable, but ours
    record = read_record(out)
    if journal is None and record is None:
        names = foreign_files(out)
        if names:
            raise _refuse_foreign(out, names, "--fresh only removes files of an earlier merge; empty the folder "
                                              "yourself or choose another -o")
        return
    ours = {INDEX_NAME, RECORD_NAME, "README.md"}
    if record is not None:
        ours |= {e.get("file") for e in record["shards"] if isinstance(e, dict)}
        ours |= set(record.get("side_files") or [])
    if journal is not None:
        ours |= set(journal.shards) | set(outputs)
    ours = {n for n in ours if isinstance(n, str) and n and "/" not in n and n not in (".", "..")}
    (out / INDEX_NAME).unlink(missing_ok=True)
    remove_journal(out)
    claim.save(out)
    for name in sorted(ours - {INDEX_NAME}):
        try:
            (out / name).unlink(missing_ok=True)
        except OSError as exc:
            raise OutputError(f"--fresh cannot remove {name} ({exc.strerror})", file=str(out / name),
                              fix="remove it by hand (or fix its permissions), then re-run") from None


def prepare_journal(out: Path, plan: MergePlan, fp: str, inputs: dict[str, Any], options: dict[str, Any],
                    fresh: bool) -> tuple[Journal, bool]:
    """The journal to continue: OUT's own, one rebuilt from OUT's record (second value True: nothing is saved
    yet, OUT may be complete), or a new one. Refuses a mismatching merge, changed inputs or foreign files."""
    new = Journal(fingerprint=fp, inputs=inputs, options=options, tool_version=__version__)
    if fresh:
        clear_ours(out, [s.file for s in plan.shards], new)
        return new, False
    journal, from_record = load_journal_or_record(out)
    if journal is None:
        names = foreign_files(out)
        if not names:
            return new, False
        journal = load_journal(out)  # another --worker may have claimed OUT since we looked
        if journal is None:
            raise _refuse_foreign(out, names, NOT_OURS_FIX)
    check_same_merge(journal, fp, inputs, options, out)
    journal.inputs = inputs  # the current identity (a copied base that still matches by sha256)
    return journal, from_record


NOT_OURS_FIX = "use an empty or new folder (or --fresh to replace an earlier merge of stream-merge)"


def check_resumable(out: Path, fp: str, inputs: dict[str, Any], options: dict[str, Any]) -> None:
    """What `prepare_journal` (without --fresh) would refuse, checked without writing anything: a dry run's
    answer for an OUT that holds another merge, changed inputs or files that are not ours."""
    journal, _ = load_journal_or_record(out)
    if journal is None:
        names = foreign_files(out)
        if names:
            raise _refuse_foreign(out, names, NOT_OURS_FIX)
        return
    check_same_merge(journal, fp, inputs, options, out)


# ---------------------------------------------------------------------------------------------- finished shards


def journal_result(journal: Journal, file: str) -> ShardResult:
    entry = journal.shards[file]
    return ShardResult(file=file, size=entry["size"], sha256=entry.get("sha256"), patched=entry["patched"],
                       copied=entry["copied"], seconds=0.0, xxh3_128=entry.get("xxh3_128"))


def shard_done(out: Path, journal: Journal, file: str, local_copy: bool = True) -> bool:
    """A shard an earlier run (or another worker) finished: `journal.shard_finished` on its file, or, with
    --no-local-copy, recorded and already uploaded and deleted as asked."""
    entry = journal.shards.get(file)
    if shard_finished(out / file, entry):
        return True
    return not local_copy and entry is not None and not os.path.lexists(out / file)


def pending_shards(out: Path, plan: MergePlan, journal: Journal, local_copy: bool = True) -> list[str]:
    """Shards not finished yet by any worker (records re-read: other workers share OUT)."""
    journal.reload(out)
    return [s.file for s in plan.shards if not shard_done(out, journal, s.file, local_copy)]
