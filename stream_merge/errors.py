"""Every error stream-merge raises on purpose.

Each class carries the culprit (file, tensor or key) and a fix, so the CLI can print one actionable line and
exit with the class's code: 2 for bad input or configuration, 1 for a failed verification, 130 for an
interrupt. Anything else that escapes is a bug and is shown with a traceback hint.
"""

from __future__ import annotations

from collections.abc import Sequence


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


class PlanError(StreamMergeError):
    """The planner found problems; all of them are listed, nothing was written."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        n = len(self.problems)
        super().__init__(
            f"the merge plan has {n} problem{'s' if n != 1 else ''}: " + " | ".join(self.problems),
            fix="see each problem; nothing was written",
        )


class CompatibilityError(StreamMergeError):
    """Adapter and base look like different models (raised only with --strict)."""


class OutputError(StreamMergeError):
    """The output folder cannot be used (inside an input, locked, out of space, ...)."""


class NonFiniteError(StreamMergeError):
    """A merged tensor or adapter factor holds NaN or Inf."""


class VerificationError(StreamMergeError):
    """An output folder does not match its record."""

    exit_code = 1


class MergeInterrupted(StreamMergeError):
    """Ctrl-C or SIGTERM; the output is left resumable."""

    exit_code = 130


class HubError(InputError):
    """A Hub repo, revision or file that cannot be used: not found, gated, private, offline, or corrupt."""
