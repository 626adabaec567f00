"""The base shards one output shard reads: one `ShardReader` per input file, opened on first use, closed together.

Without --max-shard-size an output shard reads exactly the base shard of the same name; with it, an output
shard may read several base shards (smaller shards merged into one) or part of one (a big shard split).
Everything that produces an output shard (the shard loop, Ray tasks, `verify --full`) reads through a
`Readers`, so that each tensor is read from the file its `TensorPlan.source_file` names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CheckpointFormatError
from .records import ShardHeader, ShardPlan
from .safetensors_io import ShardReader

if TYPE_CHECKING:
    from .sources import Source

OpenReader = Callable[[str], ShardReader]


class Readers:
    """file -> open `ShardReader`, opened by `open_reader` on first use (or by `open`) and closed by `close`
    (or the `with` block).
    A reader handed in from outside (`Readers.wrap`) is answered for every file and never closed here."""

    def __init__(self, open_reader: OpenReader) -> None:
        self._open = open_reader
        self._readers: dict[str, ShardReader] = {}
        self._borrowed: ShardReader | None = None

    @classmethod
    def of(cls, shard_path: Callable[[str], Path], headers: Mapping[str, ShardHeader]) -> "Readers":
        """Readers of base shards at `shard_path(file)` (a Source's, which downloads a Hub shard first),
        each checked against its planned header."""
        def open_reader(file: str) -> ShardReader:
            header = headers.get(file)
            if header is None:
                raise CheckpointFormatError("base shard not in the plan", file=file)
            return ShardReader(shard_path(file), header)
        return cls(open_reader)

    @classmethod
    def merging(cls, source: "Source", headers: Mapping[str, ShardHeader]) -> "Readers":
        """Readers for merging from `source` (`Source.open_shard`: a Hub shard is read while it downloads;
        `confirm` before the output is published)."""
        def open_reader(file: str) -> ShardReader:
            header = headers.get(file)
            if header is None:
                raise CheckpointFormatError("base shard not in the plan", file=file)
            return source.open_shard(file, header)
        return cls(open_reader)

    @classmethod
    def wrap(cls, reader: ShardReader) -> "Readers":
        """The one reader of an output shard that reads a single base shard (the caller keeps closing it)."""
        readers = cls(lambda file: reader)
        readers._borrowed = reader
        return readers

    def get(self, file: str) -> ShardReader:
        """The reader of base shard `file`, opened now if it is not yet."""
        if self._borrowed is not None:
            return self._borrowed
        reader = self._readers.get(file)
        if reader is None:
            reader = self._readers[file] = self._open(file)
        return reader

    def open(self, files: Sequence[str]) -> "Readers":
        """Open `files` now: before the output file exists, so that each input's size is checked against the
        plan and its read lease is held from the start (a truncation then waits for us and is named as a
        change during the merge)."""
        try:
            for file in files:
                self.get(file)
        except BaseException:
            self.close()
            raise
        return self

    def confirm(self) -> None:
        """The output is written: raise `RedoFromFile` if bytes read from a download in progress are not vouched
        for by its digest (see `hub_stream`)."""
        for reader in self._all():
            reader.confirm()

    def abandon(self) -> None:
        """Stop reads that wait for bytes still downloading (the output shard failed or was interrupted)."""
        for reader in self._all():
            reader.abandon()

    def _all(self) -> list[ShardReader]:
        return [self._borrowed] if self._borrowed is not None else list(self._readers.values())

    def close(self) -> None:
        readers, self._readers = self._readers, {}
        for reader in readers.values():
            reader.close()

    def __enter__(self) -> "Readers":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def as_readers(source: "ShardReader | Readers") -> Readers:
    """A `Readers` for either form callers hand in (one reader for a one-input shard, or readers)."""
    return source if isinstance(source, Readers) else Readers.wrap(source)


def last_readers(todo: Sequence["ShardPlan"]) -> dict[str, list[str]]:
    """output shard -> the base shards that no later output shard of `todo` reads: released (a downloaded
    Hub shard deleted) once that output is committed."""
    last: dict[str, str] = {}
    for shard in todo:
        for file in shard.inputs:
            last[file] = shard.file
    release: dict[str, list[str]] = {}
    for file, output in last.items():
        release.setdefault(output, []).append(file)
    return release
