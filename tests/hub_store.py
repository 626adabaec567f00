"""The test Hub's store: repos with branches, tags and immutable commits of blobs (``hub_server.py`` serves
it over HTTP, ``hub_faults.py`` breaks the serving).

A commit is an immutable snapshot ``{path: Blob}``; commit shas are sha1 over (parent, message, sorted tree)
and thus deterministic. LFS blobs have the sha256 as ETag and an LFS pointer as git object; the others are
regular git blobs (ETag = git blob sha1).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

_URL_PREFIX = {"model": ""}
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_STREAM_CHUNK = 64 * 1024
_EPOCH = _dt.datetime(2024, 1, 1, tzinfo=_dt.timezone.utc)


def _git_blob_sha1(data: bytes) -> str:
    h = hashlib.sha1(b"blob %d\0" % len(data))
    h.update(data)
    return h.hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _iso(ts: _dt.datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.000Z")


# --------------------------------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------------------------------


class ByteSource(Protocol):
    """Content made on demand (``hub_procedural.ProceduralFile``): any byte range, nothing stored."""

    size: int

    def read(self, start: int, end: int) -> bytes: ...


@dataclass(frozen=True)
class Blob:
    """File content, held in memory (``data``), on disk (``path``), made on demand (``gen``), or not held at
    all (an upload the server hashed and discarded: only its size and sha256 are known)."""

    size: int
    sha256: str
    content_sha1: str  # git blob sha1 of the content itself
    lfs: bool
    data: bytes | None = None
    path: Path | None = None
    gen: Any = None  # a ByteSource

    @classmethod
    def generated(cls, gen: ByteSource, sha256: str) -> "Blob":
        """An LFS blob whose bytes ``gen`` makes on demand (its sha256 computed once by the caller)."""
        return cls(size=gen.size, sha256=sha256, content_sha1="", lfs=True, gen=gen)

    @classmethod
    def discarded(cls, size: int, sha256: str) -> "Blob":
        """An uploaded LFS object the server did not keep: listed and committed, never served."""
        return cls(size=size, sha256=sha256, content_sha1="", lfs=True)

    @classmethod
    def from_source(cls, src: bytes | str | os.PathLike, *, lfs: bool | None, policy: Callable[[int], bool]) -> "Blob":
        if isinstance(src, str):
            src = src.encode()
        if isinstance(src, (bytes, bytearray, memoryview)):
            data = bytes(src)
            size = len(data)
            return cls(
                size=size,
                sha256=hashlib.sha256(data).hexdigest(),
                content_sha1=_git_blob_sha1(data),
                lfs=policy(size) if lfs is None else lfs,
                data=data,
            )
        path = Path(src)
        size = path.stat().st_size
        h256 = hashlib.sha256()
        h1 = hashlib.sha1(b"blob %d\0" % size)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h256.update(chunk)
                h1.update(chunk)
        return cls(
            size=size,
            sha256=h256.hexdigest(),
            content_sha1=h1.hexdigest(),
            lfs=policy(size) if lfs is None else lfs,
            path=path,
        )

    @property
    def pointer(self) -> bytes:
        return _lfs_pointer(self.sha256, self.size)

    @property
    def git_oid(self) -> str:
        """The git object id: of the LFS pointer for LFS files, of the content otherwise."""
        return _git_blob_sha1(self.pointer) if self.lfs else self.content_sha1

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.content_sha1

    @property
    def upload_oid(self) -> str:
        """What the preupload endpoint reports as ``oid`` (the client's ``_local_oid``)."""
        return self.sha256 if self.lfs else self.content_sha1

    def read(self, start: int = 0, end: int | None = None) -> bytes:
        return b"".join(self.iter_range(start, self.size if end is None else end))

    def iter_range(self, start: int, end: int, chunk: int = _STREAM_CHUNK) -> Iterator[bytes]:
        """Yield bytes [start, end)."""
        if self.data is not None:
            for pos in range(start, end, chunk):
                yield self.data[pos : min(end, pos + chunk)]
            return
        if self.gen is not None:
            step = max(chunk, 1 << 20)  # made on demand: larger pieces, fewer calls
            for pos in range(start, end, step):
                yield self.gen.read(pos, min(end, pos + step))
            return
        if self.path is None:
            raise OSError("this upload was hashed and discarded by the server: it cannot be served")
        with open(self.path, "rb") as f:
            f.seek(start)
            remaining = end - start
            while remaining > 0:
                buf = f.read(min(chunk, remaining))
                if not buf:
                    raise OSError(f"{self.path} shrank while being served")
                remaining -= len(buf)
                yield buf


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str | None
    message: str
    files: Mapping[str, Blob]
    date: str

    def directories(self) -> set[str]:
        dirs: set[str] = set()
        for p in self.files:
            parts = p.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        return dirs

    def tree_oid(self, directory: str) -> str:
        prefix = directory + "/"
        h = hashlib.sha1(b"tree\0")
        for p in sorted(self.files):
            if p.startswith(prefix):
                h.update(f"{p[len(prefix):]}\0{self.files[p].git_oid}\n".encode())
        return h.hexdigest()


@dataclass
class HubRepo:
    repo_id: str
    repo_type: str = "model"
    private: bool = False
    gated: bool = False
    token: str | None = None
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    pr_count: int = 0
    created_at: str = field(default_factory=lambda: _iso(_EPOCH))

    @property
    def url_path(self) -> str:
        return f"{_URL_PREFIX[self.repo_type]}{self.repo_id}"

    def resolve(self, revision: str) -> Commit | None:
        rev = revision
        if rev.startswith("refs/heads/"):
            rev = rev[len("refs/heads/") :]
        elif rev.startswith("refs/tags/"):
            sha = self.tags.get(rev[len("refs/tags/") :])
            return self.commits.get(sha) if sha else None
        if rev in self.branches:
            return self.commits[self.branches[rev]]
        if rev in self.tags:
            return self.commits[self.tags[rev]]
        if _HEX40.match(rev) and rev in self.commits:
            return self.commits[rev]
        return None

    def last_commit_for(self, commit: Commit, path: str) -> Commit:
        """The oldest first-parent ancestor in which ``path`` already had its current content."""
        blob = commit.files.get(path)
        current = commit
        while current.parent is not None:
            parent = self.commits.get(current.parent)
            if parent is None or parent.files.get(path) != blob:
                break
            current = parent
        return current
