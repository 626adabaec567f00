"""Every error stream-merge raises on purpose.

Each class carries the culprit (file, tensor or key) and a fix, so the CLI can print one actionable line and
exit with the class's code: 2 for bad input or configuration, 1 for a failed verification, 130 for an
interrupt. Anything else that escapes is a bug and is shown with a traceback hint.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .records import MergePlan


class StreamMergeError(Exception):
    """Base class: a problem the user can act on."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        fix: str | None = None,
        file: str | None = None,
        tensor: str | None = None,
        key: str | None = None,
    ) -> None:
        self.message = message
        self.fix = fix
        self.file = file
        self.tensor = tensor
        self.key = key
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = [f"{label} {value!r}" for label, value in
                 (("file", self.file), ("tensor", self.tensor), ("key", self.key)) if value]
        text = self.message
        if where:
            text += f" [{', '.join(where)}]"
        if self.fix:
            text += f"; fix: {self.fix}"
        return text


class ConfigError(StreamMergeError):
    """Bad merge options or YAML config (unknown key, wrong type, impossible combination)."""


class InputError(StreamMergeError):
    """A base or adapter file is missing, unreadable or malformed."""


class CheckpointFormatError(InputError):
    """A safetensors file or index that violates the format (truncated, overlapping offsets, ...)."""


class UnsupportedAdapterError(InputError):
    """An adapter whose method or config field stream-merge does not merge (yet)."""


class HubError(InputError):
    """A Hub repo, revision or file that cannot be used: not found, gated, private, offline, or corrupt."""


class PlanError(StreamMergeError):
    """The planner found problems; all of them are listed, nothing was written. `plan` is the plan with its
    problems when one was built, so `stream-merge plan` can show it without planning again."""

    def __init__(self, problems: Sequence[str], plan: MergePlan | None = None) -> None:
        self.problems = list(problems)
        self.plan = plan
        n = len(self.problems)
        super().__init__(
            f"the merge plan has {n} problem{'s' if n != 1 else ''}: " + " | ".join(self.problems),
            fix="see each problem; nothing was written",
        )


class CompatibilityError(StreamMergeError):
    """Adapter and base look like different models (raised only with --strict). `plan` is the plan that was
    built, so `stream-merge plan` / `--dry-run` can show it with its verdict."""

    plan: MergePlan | None = None


class OutputError(StreamMergeError):
    """The output folder cannot be used (inside an input, locked, out of space, ...)."""


class DiskSpaceError(OutputError):
    """Not enough free disk space for what the merge writes (and downloads). A dry run's carries its `report`
    (the plan and the disks measured), so the CLI can show the plan and its verdict before the error."""

    report: object = None


class NonFiniteError(StreamMergeError):
    """A merged tensor or adapter factor holds NaN or Inf."""


class VerificationError(StreamMergeError):
    """An output folder does not match its record."""

    exit_code = 1


class NotEnoughMemoryError(StreamMergeError):
    """An allocation failed (Python, torch, mmap, a thread stack, a shared library): the machine, its
    `ulimit -v` or its cgroup gave less memory than a step needed. Exit 2, like any other input the user
    can change; never 1, which means "verification failed"."""


# How allocation failures read when they do not arrive as MemoryError or OSError(ENOMEM): torch's CPU
# allocator, CUDA, a shared library that cannot be mapped at import, a thread whose stack cannot be mapped.
_MEMORY_TEXTS = ("can't allocate memory", "cannot allocate memory", "out of memory", "failed to map segment",
                 "std::bad_alloc", "can't start new thread")


def _is_allocation_failure(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM):
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, OSError, ImportError)) and any(t in text for t in _MEMORY_TEXTS)


def memory_error(exc: BaseException, block_size_mb: int | None = None) -> NotEnoughMemoryError | None:
    """A NotEnoughMemoryError when `exc`, or an exception it was raised from or while handling, is an
    allocation failure (errors raised `from None` still keep the original in `__context__`); else None."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if _is_allocation_failure(cause):
            detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:160]
            if cause is not exc:  # what was being done, e.g. "cannot create a file in the output folder"
                doing = exc.message if isinstance(exc, StreamMergeError) else str(exc).strip()
                detail += f", while: {(doing.splitlines() or [type(exc).__name__])[0][:160]}"
            now = f" (now {block_size_mb})" if block_size_mb else ""
            return NotEnoughMemoryError(f"not enough memory: {detail}", file=getattr(exc, "file", None),
                                        fix=f"lower --block-size-mb{now}, run fewer merges at once, or raise the "
                                            "memory limit (ulimit -v, the container's memory)")
        cause = cause.__cause__ or cause.__context__
    return None


class MergeInterrupted(StreamMergeError):
    """Ctrl-C or SIGTERM; the output is left resumable."""

    exit_code = 130


class RedoFromFile(Exception):
    """Internal, never shown: an output shard was merged from a base shard while it downloaded, and those bytes
    cannot be vouched for (the download failed, was retried into another file, or its digest was not the one
    computed from the bytes read). The shard loop writes the shard again from the downloaded, checked file."""
