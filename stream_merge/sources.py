"""Where inputs come from. A Source gives the runner headers for planning, small side files, and each base
shard as a local file just in time (and may delete it once merged). Local folders are the trivial case;
Hub repos (`org/name[@revision]`) implement the same interface in `hub.py`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .checkpoint import read_index, regular_file
from .errors import HubError, InputError
from .extras import side_files
from .records import BaseIndex, ShardHeader

if TYPE_CHECKING:
    from .safetensors_io import ShardReader

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[^\s]+)?$")
DOWNLOADS_DIR = ".stream-merge-downloads"  # inside OUT: base shards downloaded just in time, deleted once merged


class Source(Protocol):
    spec: str                 # what the user typed
    revision: str | None      # the pinned commit sha for Hub inputs
    kind: str                 # "local" or "hub"

    @property
    def protected(self) -> Path | None:
        """A local folder the output must stay out of (the input itself)."""

    def folder(self) -> Path:
        """A local folder with the small files (configs, tokenizer; for adapters, the adapter files too)."""

    def base_index(self, label: str, allow_pickle: bool = False) -> BaseIndex:
        """Index + shard headers, without reading tensor data (`allow_pickle`: PyTorch .bin bases too)."""

    def available(self, file: str) -> bool:
        """Whether the shard can be read without downloading it."""

    def prefetch(self, file: str) -> None:
        """Start fetching a shard that will be needed soon (no-op when local)."""

    def shard_path(self, file: str) -> Path:
        """The shard as a local file (waits for a download)."""

    def open_shard(self, file: str, header: ShardHeader) -> ShardReader:
        """A reader of the shard for merging; a Hub shard's may be read while it downloads (its `confirm`
        says, once the output is written, whether those bytes were the checked file's)."""

    def release(self, file: str) -> None:
        """The shard's output is committed: delete it if we downloaded it and may not keep it."""

    def read_range(self, file: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a base file without fetching it whole (fp8 scales stored in another shard)."""

    def disk_need(self, files: Sequence[str], prefetch: int) -> list[tuple[Path, int]]:
        """(folder, bytes) that fetching `files` will occupy at most at once, `prefetch` ahead."""

    def close(self, complete: bool = False) -> None:
        """Stop background work; `complete`: the merge finished, temporary downloads can go."""


@dataclass(frozen=True)
class LocalSource:
    spec: str
    path: Path
    revision: str | None = None
    kind: str = "local"

    @property
    def protected(self) -> Path | None:
        return self.path

    def folder(self) -> Path:
        return self.path

    def base_index(self, label: str, allow_pickle: bool = False) -> BaseIndex:
        index = read_index(self.path, label=label, allow_pickle=allow_pickle)
        side_files(self.path)  # refuses a side file linked out of BASE before any work
        return index

    def available(self, file: str) -> bool:
        return (self.path / file).is_file()

    def prefetch(self, file: str) -> None:
        pass

    def shard_path(self, file: str) -> Path:
        return self.path / file

    def open_shard(self, file: str, header: ShardHeader) -> ShardReader:
        from .safetensors_io import ShardReader  # torch: only once a merge runs
        return ShardReader(self.path / file, header)

    def release(self, file: str) -> None:
        pass

    def read_range(self, file: str, start: int, end: int) -> bytes:
        with open(regular_file(self.path / file, f"base file {file}"), "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def disk_need(self, files: Sequence[str], prefetch: int) -> list[tuple[Path, int]]:
        return []

    def close(self, complete: bool = False) -> None:
        pass


# HubError texts (hub_errors.py) that mean "no such repo here": the user may have meant a local folder
NOT_ON_HUB = ("was not found on", "is not in the HF cache", "cannot reach the Hub", "cannot locate")


def resolve_source(spec: str, what: str, **hub_options: Any) -> Source:
    """A local folder, or a Hub repo `org/name[@revision]` (hub_options: token, download_dir, keep_downloads).

    `org/name` that is not an existing folder is looked up on the Hub; when that fails for want of the repo
    (not found, offline), the error says so and that `./org/name` insists on a folder. A path that starts
    with `.`, `/` or `~` (or has more than one slash) is never looked up: it is a folder or "no such folder"."""
    path = Path(spec).expanduser()
    if path.exists():
        return LocalSource(spec=spec, path=path.resolve())
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        try:
            from .hub import HubSource
        except ImportError:
            raise InputError(f"{what} {spec!r} is not a local folder, and downloading from the Hub is not "
                             "supported in this version", fix="download it first and pass the folder") from None
        try:
            return HubSource.open(spec, what, **hub_options)
        except HubError as exc:
            if not any(text in exc.message for text in NOT_ON_HUB):
                raise
            raise HubError(f"{exc.message} ({what} {spec!r} was taken as a Hub repo id because no folder of that "
                           f"name exists; write ./{spec} to insist on a local folder)", file=exc.file,
                           fix=exc.fix) from None
    local = " (a path, so it was not looked up on the Hub)" if HUB_ID.match(spec.lstrip("./~")) else ""
    raise InputError(f"{what} folder not found: no such folder{local}", file=spec, fix="check the path")
