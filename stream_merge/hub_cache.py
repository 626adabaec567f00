"""The HF cache's layout and the Hub's digests, as stream-merge uses them.

The HF cache: `HF_HUB_CACHE/models--org--name/` holds `refs/<branch or tag>` (a commit sha), `snapshots/<sha>/<path>`
(links into `blobs/`) and `blobs/<etag>`, where the ETag is the sha256 for LFS files and the git blob sha1
for others. huggingface_hub checks only sizes on download, so every file we use is compared with the digest
the Hub lists for it (`RemoteFile.expected`, `digest_matches`).

A download area (`hf_hub_download(local_dir=AREA)`): the files, plus `AREA/.cache/huggingface/download/` with
`<file>.metadata`, `<file>.lock` and partial files `<hash>.<etag>.<uuid>.incomplete`, never resumed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from huggingface_hub import constants
from huggingface_hub.file_download import repo_folder_name

from .errors import HubError
from .fileio import file_sha256

log = logging.getLogger("stream_merge")

HEX40 = re.compile(r"[0-9a-f]{40}")
HEX64 = re.compile(r"[0-9a-f]{64}")
_HASH_CHUNK = 16 * 1024 * 1024
HF_LOCAL_DIR_META = Path(".cache") / "huggingface"  # what hf_hub_download(local_dir=...) keeps beside the files


@dataclass(frozen=True)
class RemoteFile:
    """One file of the pinned commit: its size and what its content must hash to."""

    path: str
    size: int
    sha256: str | None = None   # LFS files
    git_oid: str | None = None  # git blob sha1; of the content only for non-LFS files

    def expected(self) -> tuple[str, str] | None:
        """(digest kind, hex digest) the content must have, or None when the Hub gave none."""
        if self.sha256:
            return "sha256", self.sha256
        if self.git_oid and HEX40.fullmatch(self.git_oid):
            return "git-sha1", self.git_oid
        return None

    @property
    def etag(self) -> str | None:
        """The name huggingface_hub gives this file's blob and temp files."""
        return self.sha256 or self.git_oid


def git_blob_sha1(content: bytes | Path) -> str:
    """Git's object id of a file's content (`sha1("blob <size>\\0" + content)`), as the Hub lists it for
    files that are not in LFS. Takes the bytes or a path (read in chunks)."""
    if isinstance(content, (bytes, bytearray, memoryview)):
        return hashlib.sha1(b"blob %d\0" % len(content) + bytes(content)).hexdigest()
    h = hashlib.sha1(b"blob %d\0" % content.stat().st_size)
    with open(content, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def digest_matches(path: Path, entry: RemoteFile) -> tuple[bool, str]:
    """(does `path` hold exactly `entry`'s content?, the digest found)."""
    size = path.stat().st_size
    if size != entry.size:
        return False, f"{size} bytes"
    want = entry.expected()
    if want is None:
        return True, "size only"
    got = file_sha256(path) if want[0] == "sha256" else git_blob_sha1(path)
    return got == want[1], got


def remote_file(sibling: Any) -> RemoteFile:
    """A RemoteFile from one `model_info(files_metadata=True)` sibling."""
    lfs = getattr(sibling, "lfs", None)
    sha = (getattr(lfs, "sha256", None) or (lfs.get("sha256") if isinstance(lfs, dict) else None)) if lfs else None
    return RemoteFile(path=sibling.rfilename, size=int(sibling.size or 0), sha256=sha,
                      git_oid=None if lfs else getattr(sibling, "blob_id", None))


def plain_ref(rev: str) -> bool:
    """A revision name that is safe as a path under the cache's refs/ (no '..', not absolute)."""
    parts = PurePosixPath(rev).parts
    return bool(parts) and not rev.startswith("/") and "\\" not in rev and all(p not in ("", ".", "..") for p in parts)


def repo_cache_dir(repo_id: str) -> Path:
    """`HF_HUB_CACHE/models--org--name`."""
    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def snapshot_dir(repo_id: str, sha: str) -> Path:
    return repo_cache_dir(repo_id) / "snapshots" / sha


def cached_revision(what: str, repo_id: str, rev: str) -> str:
    """Offline: the commit sha that `rev` (a sha, branch or tag) names in the HF cache."""
    repo_dir = repo_cache_dir(repo_id)
    if HEX40.fullmatch(rev) and (repo_dir / "snapshots" / rev).is_dir():
        return rev
    ref = repo_dir / "refs" / rev
    if plain_ref(rev) and ref.is_file():
        sha = ref.read_text().strip()
        if (repo_dir / "snapshots" / sha).is_dir():
            return sha
    raise HubError(f"{what} {repo_id}@{rev} is not in the HF cache and HF_HUB_OFFLINE=1 is set",
                   file=str(repo_dir), fix=f"run once online (or `hf download {repo_id}`), or point "
                                           "HF_HOME / HF_HUB_CACHE at the cache that holds it")


def remember_ref(repo_id: str, rev: str, sha: str) -> None:
    """Record branch/tag -> commit in the cache's refs/, as huggingface_hub does when it resolves one, so that
    HF_HUB_OFFLINE=1 runs can use the same spec (we download by sha, which writes no ref)."""
    if rev == sha or not plain_ref(rev):
        return
    ref = repo_cache_dir(repo_id) / "refs" / rev
    try:
        if not ref.is_file() or ref.read_text() != sha:
            ref.parent.mkdir(parents=True, exist_ok=True)
            tmp = ref.with_name(f".{ref.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(sha)
            tmp.replace(ref)
    except OSError as exc:  # a read-only cache still works online
        log.warning("cannot record %s -> %s in the HF cache (%s)", rev, sha, exc.strerror)


def cached_files(snapshot: Path) -> dict[str, RemoteFile]:
    """Offline: the snapshot's files; the cache names each blob after its ETag (sha256 for LFS files, the git
    blob sha1 for others), which is the digest to check."""
    files = {}
    for p in sorted(snapshot.rglob("*")):
        if not p.is_file():
            continue
        real = p.resolve()
        blob = real.name
        name = p.relative_to(snapshot).as_posix()
        files[name] = RemoteFile(path=name, size=real.stat().st_size,
                                 sha256=blob if HEX64.fullmatch(blob) else None,
                                 git_oid=blob if HEX40.fullmatch(blob) else None)
    return files



def drop_stale_partials(area: Path, entry: RemoteFile) -> None:
    """Partial downloads of this very file that a killed earlier run left in `area` (the caller owns the area
    while it holds the run's lock). Files of other shards, and anything outside this file's folder, stay."""
    if not entry.etag:
        return
    where = area / HF_LOCAL_DIR_META / "download" / PurePosixPath(entry.path).parent
    for p in where.glob(f"*.{entry.etag}.*.incomplete"):
        p.unlink(missing_ok=True)
        log.info("removed a partial download of %s left by an earlier run", entry.path)


def remove_empty_area(area: Path) -> None:
    """Remove `area` and the bookkeeping folders huggingface_hub made in it, bottom up, where they are empty
    (a file someone else put there keeps its folder)."""
    meta = area / HF_LOCAL_DIR_META
    for marker in (".gitignore", "CACHEDIR.TAG"):
        (meta / marker).unlink(missing_ok=True)
    for d in (meta / "download", meta, meta.parent, area):
        try:
            d.rmdir()
        except OSError:
            pass
