"""One shard as an upload whose digests are already known (the journal's, computed while the shard was written).

huggingface_hub hashes every file it is given before uploading it (a whole pass over a 5 GB shard on the
upload thread, before a byte is sent). `HashedAdd.known` hands it the sha256 (the LFS oid) instead, and reads
the file through `HashingReader` during the upload, so the bytes actually sent are hashed on the way:
`sent_digest` lets the pusher refuse to commit a shard whose file changed after it was written. The check on
the way uses the shard's XXH3-128 where the journal has one (a tenth of sha256's CPU, on a box that also
downloads and merges), its sha256 only where no XXH3-128 is known (records of older versions).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import xxhash
from huggingface_hub import CommitOperationAdd

from .fileio import file_digest

def new_hasher(kind: str) -> Any:
    """A fresh hasher of `kind` ("xxh3_128" or "sha256"): `update(bytes)`, `hexdigest()`."""
    if kind == "xxh3_128":
        return xxhash.xxh3_128()
    if kind == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown digest kind {kind!r}")


class HashingReader(io.BufferedIOBase):
    """A read-only view of `f` that hashes the bytes read in order from the start (bytes read again after a
    seek back, e.g. a retried upload, are not hashed twice; `covered` says how far the in-order hash got).
    `kind` names the digest: sha256 (default) or xxh3_128."""

    def __init__(self, f: BinaryIO, kind: str = "sha256") -> None:
        super().__init__()
        self._f = f
        self._hash = new_hasher(kind)
        self.covered = 0

    def read(self, n: int | None = -1) -> bytes:
        pos = self._f.tell()
        data = self._f.read(-1 if n is None else n)
        if pos <= self.covered < pos + len(data):  # the part not hashed yet, in order
            self._hash.update(memoryview(data)[self.covered - pos:])
            self.covered = pos + len(data)
        return data

    def read1(self, n: int = -1) -> bytes:
        return self.read(n)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def fileno(self) -> int:
        return self._f.fileno()  # lets the HTTP client send a Content-Length

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class HashedAdd(CommitOperationAdd):
    """A CommitOperationAdd of a local file with its sha256 given, read through a HashingReader that checks
    the sent bytes against `expected` (kind, hex): the XXH3-128 when known, else the sha256."""

    _reader: HashingReader | None = None
    expected: tuple[str, str] = ("sha256", "")

    @classmethod
    def known(cls, path_in_repo: str, path: Path, sha256: str, *, xxh3_128: str | None = None) -> HashedAdd:
        op = cls(path_in_repo=path_in_repo, path_or_fileobj=str(path))  # reads 512 bytes, hashes nothing
        op.upload_info.sha256 = bytes.fromhex(sha256)
        op.source = path
        op.expected = ("xxh3_128", xxh3_128) if xxh3_128 else ("sha256", sha256)
        return op

    @contextmanager
    def as_file(self, with_tqdm: bool = False) -> Iterator[BinaryIO]:
        with open(self.source, "rb") as f:
            reader = HashingReader(f, self.expected[0])
            self._reader = reader
            yield reader  # type: ignore[misc]

    def sent_digest(self) -> str | None:
        """The digest (of the kind in `expected`) of the file as it was uploaded; None when nothing was uploaded
        (the Hub had the bytes)."""
        if self._reader is None:
            return None
        if self._reader.covered == self.upload_info.size:
            return self._reader.hexdigest()
        return file_digest(self.source, self.expected[0])  # an unusual read order: check the file itself

    def sent_sha256(self) -> str | None:
        """`sent_digest` of an upload checked by sha256 (no XXH3-128 given)."""
        if self.expected[0] != "sha256":
            raise ValueError(f"{self.path_in_repo} is checked by its {self.expected[0]}, not its sha256")
        return self.sent_digest()

    def sent_matches(self) -> bool:
        """The bytes sent are the ones the journal recorded (True as well when nothing was sent)."""
        return self.sent_digest() in (None, self.expected[1])
