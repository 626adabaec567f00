"""One shard as an upload whose sha256 is already known (the journal's, computed while the shard was written).

huggingface_hub hashes every file it is given before uploading it (a whole pass over a 5 GB shard on the
upload thread, before a byte is sent). `HashedAdd.known` hands it the digest instead, and reads the file
through `HashingReader` during the upload, so the bytes actually sent are hashed on the way: `sent_sha256`
lets the pusher refuse to commit a shard whose file changed after it was written, as the pass before did.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from huggingface_hub import CommitOperationAdd

from .fileio import file_sha256


class HashingReader(io.BufferedIOBase):
    """A read-only view of `f` that hashes the bytes read in order from the start (bytes read again after a
    seek back, e.g. a retried upload, are not hashed twice; `covered` says how far the in-order hash got)."""

    def __init__(self, f: BinaryIO) -> None:
        super().__init__()
        self._f = f
        self._hash = hashlib.sha256()
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
    """A CommitOperationAdd of a local file with its sha256 given, read through a HashingReader."""

    _reader: HashingReader | None = None

    @classmethod
    def known(cls, path_in_repo: str, path: Path, sha256: str) -> HashedAdd:
        op = cls(path_in_repo=path_in_repo, path_or_fileobj=str(path))  # reads 512 bytes, hashes nothing
        op.upload_info.sha256 = bytes.fromhex(sha256)
        op.source = path
        return op

    @contextmanager
    def as_file(self, with_tqdm: bool = False) -> Iterator[BinaryIO]:
        with open(self.source, "rb") as f:
            reader = HashingReader(f)
            self._reader = reader
            yield reader  # type: ignore[misc]

    def sent_sha256(self) -> str | None:
        """The sha256 of the file as it was uploaded; None when nothing was uploaded (the Hub had the bytes)."""
        if self._reader is None:
            return None
        if self._reader.covered == self.upload_info.size:
            return self._reader.hexdigest()
        return file_sha256(self.source)  # an unusual read order: check the file itself
