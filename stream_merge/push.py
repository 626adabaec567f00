"""Upload a merge to a Hub model repo while it runs.

Each shard is uploaded as soon as its output is committed and journaled, on one background thread (shards
that finish while an upload is running go together in the next commit); the small files and the index go last,
in one final commit, so a repo with the index is complete, as locally. The remote state is read once at the
start: a shard whose remote LFS sha256 equals the journal's is already pushed, so re-running the same command
resumes an interrupted push, and with `local_copy=False` (each shard deleted from OUT once pushed) such a shard
is not merged again. A remote index from an earlier push is deleted by the first shard commit, so the repo
never looks complete while its shards are being replaced.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
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

log = logging.getLogger("stream_merge")
T = TypeVar("T")
# with local_copy=False: shards handed to the uploader and not pushed yet (the one uploading included) past which
# the merge waits. One: shard i-1 uploads while shard i merges, so the uploader never starves; a second waiting
# shard would only hold one more shard of disk.
MAX_PENDING = 1


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
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._pending = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
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
    def submit(self, file: str, sha256: str) -> None:
        """Queue a committed shard for upload (no-op when the repo already has these bytes)."""
        self.check()
        if self.pushed(file, sha256):
            if self.on_upload is not None:
                self.on_upload(file)
            if not self.local_copy:
                (self.out / file).unlink(missing_ok=True)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name="stream-merge-push", daemon=True)
            self._thread.start()
        with self._cond:
            self._pending += 1
        self._queue.put((file, sha256))
        if not self.local_copy:  # bound the disk: wait while too many shards are waiting for upload
            with self._cond:
                self._cond.wait_for(lambda: self._pending <= MAX_PENDING or self._error is not None)
        self.check()

    def check(self) -> None:
        """Raise the uploader's error, if any (the merge stops early instead of filling the disk)."""
        if self._error is not None:
            raise self._error

    def _worker(self) -> None:
        while (item := self._queue.get()) is not None:
            batch = [item]
            while True:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            try:
                if self._error is None:
                    self._commit_shards(batch)
            except BaseException as exc:  # noqa: BLE001 - handed to the merging thread by check()
                self._error = exc
            finally:
                with self._cond:
                    self._pending -= len(batch)
                    self._cond.notify_all()

    def _commit_shards(self, batch: list[tuple[str, str]]) -> None:
        """Upload the shards (their sha256 is the journal's: no pass over the file before the upload; the bytes
        sent are hashed on the way and checked before the commit), then commit them in one commit."""
        files = [f for f, _ in batch]
        adds = [HashedAdd.known(file, self.out / file, sha) for file, sha in batch]
        what = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        self._call(lambda: self.api.preupload_lfs_files(self.repo_id, additions=adds, free_memory=False),
                   f"uploading {what}", retry=False)
        for add, (file, sha) in zip(adds, batch):
            if add.sent_sha256() not in (None, sha):
                raise HubError(f"{file} changed on disk after it was written (sha256 differs from the journal)",
                               file=str(self.out / file), fix="re-run the merge; the shard will be rewritten")
        ops: list[Any] = list(adds)
        if self._delete_index:
            ops.append(CommitOperationDelete(path_in_repo=INDEX_NAME))
        self._call(lambda: self.api.create_commit(self.repo_id, ops, commit_message=f"stream-merge: upload {what}"),
                   f"committing {what}", retry=False)
        self._delete_index = False
        for file, sha in batch:
            self.remote[file] = (sha, None)
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
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self.check()
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
        if self._thread is not None:
            self._queue.put(None)
            self._thread = None

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
