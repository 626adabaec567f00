"""Upload a merge to a Hub model repo while it runs.

Each shard is uploaded as soon as its output is committed and journaled, in two stages on two threads
(`push_lanes`): the LFS upload of the next shards runs while the commit of the shards uploaded before them
runs, so the upload link does not wait for a commit; commits follow the order the shards were handed over
(shards that finish while an upload runs are uploaded, and shards uploaded while a commit runs are
committed, together). The small files and the index go last, in one final commit, so a repo with the index
is complete, as locally. The remote state is read once at the start: a shard whose remote LFS sha256 equals
the journal's is already pushed, so re-running the same command resumes an interrupted push, and with
`local_copy=False` (each shard deleted from OUT once committed, never before) such a shard is not merged
again. A remote index from an earlier push is deleted by the first shard commit, so the repo never looks
complete while its shards are being replaced. The bytes sent are checked against the journal's digest (XXH3-128,
else sha256) before their commit.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, get_token
from huggingface_hub import errors as hf_errors

from .checkpoint import INDEX_NAME
from .errors import HubError
from .hub_cache import git_blob_sha1
from .hub_errors import call_with_retries, is_transient, short_error
from .hub_http import install_timeouts
from .push_file import HashedAdd
from .push_lanes import Lanes

log = logging.getLogger("stream_merge")
T = TypeVar("T")
# with local_copy=False: shards handed to the uploader and not uploaded yet (the one uploading included) past
# which the merge waits. One: shard i-1 uploads while shard i merges, so the uploader never starves; a second
# waiting shard would only hold one more shard of disk. Beyond these, the pusher holds at most one shard that
# is uploaded and not committed yet (see push_lanes): OUT holds at most MAX_HELD shards of the pusher's.
MAX_PENDING = 1
MAX_HELD = MAX_PENDING + 2


class Pusher:
    """Uploads one output folder to `repo_id` (branch main)."""

    def __init__(self, repo_id: str, out: Path, *, token: str | None = None, private: bool = False,
                 local_copy: bool = True) -> None:
        self.repo_id = repo_id
        self.out = out
        self.token = token
        self.private = private
        self.local_copy = local_copy
        self.api = HfApi(token=token)
        self.url = ""
        self.remote: dict[str, tuple[str | None, str | None]] = {}  # path -> (LFS sha256, git oid)
        self.uploaded: list[str] = []
        self._delete_index = False
        self._lanes: Lanes[tuple[str, str, str | None], HashedAdd] = Lanes(
            self._upload_shards, self._commit_shards, max_pending=None if local_copy else MAX_PENDING,
            name="stream-merge-push")
        self.on_upload: Callable[[str], None] | None = None  # progress: a shard is on the Hub

    @classmethod
    def open(cls, repo_id: str, out: Path, shard_files: Sequence[str], *, token: str | None = None,
             private: bool = False, local_copy: bool = True) -> Pusher:
        """Create the repo if needed and read which of our files it already holds."""
        install_timeouts()
        p = cls(repo_id, out, token=token, private=private, local_copy=local_copy)
        p.url = str(p._call(lambda: p.api.create_repo(repo_id, private=private, exist_ok=True), "creating the repo"))
        p.remote = p._remote_state([*shard_files, INDEX_NAME])
        p._delete_index = INDEX_NAME in p.remote
        return p

    def pushed(self, file: str, sha256: str | None) -> bool:
        return sha256 is not None and self.remote.get(file, (None, None))[0] == sha256

    # ------------------------------------------------------------------ shards
    def submit(self, file: str, sha256: str, *, xxh3_128: str | None = None) -> None:
        """Queue a committed shard for upload (no-op when the repo already has these bytes). `sha256` is its
        LFS oid; the bytes sent are checked against `xxh3_128` when given (cheaper), else against `sha256`.
        With `local_copy=False` this waits while too many shards are not uploaded yet (`push_lanes`)."""
        self.check()
        if self.pushed(file, sha256):
            if self.on_upload is not None:
                self.on_upload(file)
            if not self.local_copy:
                (self.out / file).unlink(missing_ok=True)
            return
        self._lanes.put((file, sha256, xxh3_128))

    def check(self) -> None:
        """Raise the upload's or the commit's error, if any (the merge stops early instead of filling the disk)."""
        self._lanes.check()

    def _upload_shards(self, batch: list[tuple[str, str, str | None]]) -> list[HashedAdd]:
        """Stage one: upload the shards' bytes (their sha256 is the journal's: no pass over the file before the
        upload; the bytes sent are hashed on the way and checked before the commit)."""
        adds = [HashedAdd.known(file, self.out / file, sha, xxh3_128=xxh) for file, sha, xxh in batch]
        what = _names([a.path_in_repo for a in adds])
        self._call(lambda: self.api.preupload_lfs_files(self.repo_id, additions=adds, free_memory=False),
                   f"uploading {what}", retry=False)
        for add in adds:
            if not add.sent_matches():
                raise HubError(f"{add.path_in_repo} changed on disk after it was written ({add.expected[0]} differs "
                               "from the journal)", file=str(self.out / add.path_in_repo),
                               fix="re-run the merge; the shard will be rewritten")
        return adds

    def _commit_shards(self, adds: list[HashedAdd]) -> None:
        """Stage two: commit uploaded shards in one commit (deleting a remote index of an earlier push with the
        first), then count them pushed and, with `local_copy=False`, delete them from OUT."""
        what = _names([a.path_in_repo for a in adds])
        ops: list[Any] = list(adds)
        if self._delete_index:
            ops.append(CommitOperationDelete(path_in_repo=INDEX_NAME))
        self._call(lambda: self.api.create_commit(self.repo_id, ops, commit_message=f"stream-merge: upload {what}"),
                   f"committing {what}", retry=False)
        self._delete_index = False
        for add in adds:
            file = add.path_in_repo
            self.remote[file] = (add.upload_info.sha256.hex(), None)
            self.uploaded.append(file)
            if self.on_upload is not None:
                self.on_upload(file)
            if not self.local_copy:
                (self.out / file).unlink(missing_ok=True)
        log.info("pushed %s to %s", what, self.repo_id)

    # ------------------------------------------------------------------ end
    def finish(self, small_files: Sequence[str]) -> None:
        """Wait for the shard uploads, then commit the small files with the index last (unchanged ones are
        skipped)."""
        self._lanes.join()
        names = [n for n in small_files if n != INDEX_NAME] + [INDEX_NAME]
        remote = self._remote_state(names)
        ops: list[Any] = []
        for name in names:
            data = (self.out / name).read_bytes()
            lfs, oid = remote.get(name, (None, None))
            if lfs == hashlib.sha256(data).hexdigest() or (lfs is None and oid == git_blob_sha1(data)):
                continue
            ops.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=data))
        if ops:
            self._call(lambda: self.api.create_commit(self.repo_id, ops, commit_message="stream-merge: upload the "
                                                      "index, model card, config and tokenizer files"),
                       "uploading the index and small files", retry=False)
            self.uploaded += [op.path_in_repo for op in ops]
        log.info("push to %s complete", self.repo_id)

    def close(self) -> None:
        """Let the threads end once through what was handed over, without waiting (the run is stopping)."""
        self._lanes.close()

    # ------------------------------------------------------------------ helpers
    def _remote_state(self, paths: Sequence[str]) -> dict[str, tuple[str | None, str | None]]:
        out: dict[str, tuple[str | None, str | None]] = {}
        for i in range(0, len(paths), 500):
            chunk = list(paths[i:i + 500])
            infos = self._call(lambda: self.api.get_paths_info(self.repo_id, chunk, revision="main"),
                               "reading the repo's files")
            for info in infos:
                lfs = getattr(info, "lfs", None)
                if hasattr(info, "blob_id"):  # files, not folders
                    out[info.path] = (getattr(lfs, "sha256", None) if lfs else None, info.blob_id)
        return out

    def _call(self, fn: Callable[[], T], doing: str, retry: bool = True) -> T:
        """Hub errors as one line naming the repo and the step; transient errors of idempotent calls are tried
        once more (commits are not: the client already retries their uploads)."""
        return call_with_retries(fn, lambda exc: self._error_for(exc, doing), f"push to {self.repo_id}",
                                 attempts=2 if retry else 1)

    def _error_for(self, exc: BaseException, doing: str) -> BaseException:
        resume = "re-run the same command to resume the push"
        if isinstance(exc, RuntimeError) and isinstance(exc.__cause__, hf_errors.HfHubHTTPError):
            exc = exc.__cause__  # an LFS upload refused, e.g. bytes that no longer match the recorded sha256
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(exc, hf_errors.RepositoryNotFoundError) or status in (401, 403):
            tok = "this token" if self.token or get_token() else "no token"
            return HubError(f"push to {self.repo_id} refused while {doing}: {tok} cannot write to it",
                            file=self.repo_id, fix="pass a token with write access to the repo or its organisation "
                                                   "(HF_TOKEN or --token)")
        if isinstance(exc, (hf_errors.HfHubHTTPError, hf_errors.OfflineModeIsEnabled)) or is_transient(exc):
            offline = " (HF_HUB_OFFLINE=1 is set)" if constants.HF_HUB_OFFLINE else ""
            return HubError(f"push to {self.repo_id} failed while {doing}{offline}: {short_error(exc)}",
                            file=self.repo_id, fix=resume)
        return exc


def _names(files: list[str]) -> str:
    """Up to three file names, for messages."""
    return ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
