"""Hub inputs: `org/name[@revision]` as a Source.

The revision (branch, tag or sha; `main` when left out) is resolved once, by one `model_info` call that also
lists every file with its size and digest (LFS sha256, or the git blob sha1 of small files), and that commit
sha is used for every file afterwards, so a branch that moves during a run cannot mix two commits.

- Planning reads no tensor data: the small files (index, config, tokenizer; for adapters, the whole adapter)
  go to the HF cache, and shard headers are read with HTTP range requests (or from the HF cache when the
  shard is already there), so every planning problem is found before a shard is downloaded.
- Shards come just in time on one background thread, in the order the runner asks (`prefetch`), into the
  download area the caller gives (`OUT/.stream-merge-downloads/` or one per worker: same disk as the output);
  each is deleted by `release` once its output is committed. `keep_downloads` downloads into the HF cache
  instead and keeps them. Shards already in the HF cache are used in place and never deleted.
- Cleanup by ownership: only files this source downloaded, and the partial files of the shards it downloads,
  are removed; the area's folders go once they are empty (another worker's files are never touched).
- Integrity: every file we use is hashed and compared with the Hub's digest (huggingface_hub checks only
  sizes; shards are hashed while they download, `hub_follow`, so the check adds no time); a mismatch is downloaded once more, then fails naming the file. Transient errors (dropped
  connections, 5xx, timeouts) are retried by `hub_errors.call_with_retries`; every request has a timeout
  (`hub_http`).
- HF_HUB_OFFLINE=1: the revision comes from the cache's refs, files from its snapshot, digests from the blob
  names; anything missing is named in one error before any work.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import TypeVar

from huggingface_hub import HfApi, constants, hf_hub_url

from .checkpoint import (INDEX_NAME, SINGLE_NAME, check_pickle_allowed, index_shard_names, load_json, read_index,
                         read_shard_header, weight_files)
from .errors import HubError, StreamMergeError
from .extras import MAX_SIDE_FILE, TOKENIZER_FILES, is_side_file, side_files
from .hub_cache import RemoteFile, cached_files, cached_revision, remember_ref, remote_file, repo_cache_dir, snapshot_dir
from .hub_download import ShardDownloads
from .hub_errors import call_with_retries, hub_error, split_spec
from .hub_http import install_timeouts, read_range
from .records import BaseIndex, ShardHeader
from .pickle_io import read_pickle_header
from .safetensors_io import MAX_HEADER_BYTES, parse_header

__all__ = ["HubSource", "RemoteFile", "HEADER_PROBE", "ADAPTER_FILES"]

log = logging.getLogger("stream_merge")
T = TypeVar("T")

HEADER_PROBE = 100_000          # first range read of a shard; larger headers take a second one
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "config.json")
BASE_CARD = "README.md"         # fetched with the small files: the output's card keeps its text and licence


class HubSource(ShardDownloads):
    """A Hub model repo pinned to one commit. See the module docstring for the policies."""

    kind = "hub"

    def __init__(self, spec: str, what: str, repo_id: str, revision: str, files: dict[str, RemoteFile],
                 snapshot: Path, *, token: str | None = None, offline: bool = False,
                 download_dir: Path | None = None, keep_downloads: bool = False) -> None:
        self.spec = spec
        self.what = what
        self.repo_id = repo_id
        self.revision = revision
        self.files = files
        self.snapshot = snapshot
        self.token = token
        self.offline = offline
        self.download_dir = download_dir
        self.keep_downloads = keep_downloads
        self._init_downloads()

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, spec: str, what: str, *, token: str | None = None, download_dir: Path | None = None,
             keep_downloads: bool = False) -> HubSource:
        """Resolve the revision once and fetch the small files (the whole adapter for ADAPTER)."""
        install_timeouts()
        repo_id, rev = split_spec(spec)
        offline = bool(constants.HF_HUB_OFFLINE)
        if offline:
            sha = cached_revision(what, repo_id, rev or "main")
            files = cached_files(snapshot_dir(repo_id, sha))
        else:
            probe = cls(spec, what, repo_id, rev or "main", {}, Path(), token=token)
            info = probe._call(lambda: HfApi(token=token).model_info(repo_id, revision=rev, files_metadata=True))
            sha = info.sha
            if not sha:
                raise HubError(f"{what} {repo_id} has no commits", file=spec, fix="check the repo id")
            files = {s.rfilename: remote_file(s) for s in info.siblings or []}
        src = cls(spec, what, repo_id, sha, files, snapshot_dir(repo_id, sha), token=token, offline=offline,
                  download_dir=download_dir, keep_downloads=keep_downloads)
        log.info("%s %s resolved to commit %s", what, spec, sha)
        src._fetch_small_files()
        if not offline:
            remember_ref(repo_id, rev or "main", sha)
        return src

    def _small_files(self) -> list[str]:
        """The files planning needs: index and side files of a base; the adapter's files (top level or one
        sub-folder) and its tokenizer."""
        if self.what == "BASE":
            layout = weight_files(self.files)
            if layout is None:
                raise self._no_weights()
            return [n for n, f in self.files.items() if n == layout.index or is_side_file(n, f.size)
                    or (n == BASE_CARD and f.size <= MAX_SIDE_FILE)]
        names = [n for n in self.files if n.count("/") <= 1 and PurePosixPath(n).name in
                 ADAPTER_FILES + TOKENIZER_FILES]
        names = [n for n in names if not (n.endswith("adapter_model.bin") and n[:-3] + "safetensors" in self.files)]
        if not any(PurePosixPath(n).name == "adapter_config.json" for n in names):
            raise HubError(f"{self.what} {self.repo_id} has no adapter_config.json {self._where()} (top level or "
                           "one sub-folder)", file=self.spec,
                           fix="point ADAPTER at a PEFT LoRA adapter repo" + (
                               "; offline, only what an earlier online run cached is there" if self.offline else ""))
        return names

    def _fetch_small_files(self) -> None:
        names = self._small_files()
        if self.offline:
            return  # they are in the snapshot, or were never downloaded: the readers name what is missing
        for name in sorted(names):
            self._fetch_verified(name, None)
        self.snapshot.mkdir(parents=True, exist_ok=True)

    def _where(self) -> str:
        return "in the HF cache" if self.offline else f"at {self.revision[:12]}"

    def _no_weights(self) -> HubError:
        names = sorted(self.files)
        if "adapter_config.json" in names:
            return HubError(f"BASE {self.repo_id} is a PEFT adapter repo, not a model", file=self.spec,
                            fix="pass the base model first, then the adapter")
        others = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".gguf"))]
        if others:
            return HubError(f"BASE {self.repo_id} has no safetensors weights {self._where()}, only "
                            f"{', '.join(others[:3])}", file=self.spec,
                            fix="use a safetensors revision of the model (many repos have one under refs/pr/N), "
                                "or convert it first")
        return HubError(f"BASE {self.repo_id} has no {INDEX_NAME} or {SINGLE_NAME} {self._where()}", file=self.spec,
                        fix="check the repo id and revision" + (
                            "; offline, only files an earlier online run cached are there" if self.offline else ""))

    # ------------------------------------------------------------------ Source interface
    @property
    def protected(self) -> Path | None:
        return repo_cache_dir(self.repo_id)

    def folder(self) -> Path:
        return self.snapshot

    def base_index(self, label: str, allow_pickle: bool = False) -> BaseIndex:
        """Index and shard headers: from the HF cache where a shard is there, else by range requests."""
        if self.what != "BASE":
            raise HubError(f"{self.spec} was opened as {self.what}, not as BASE")
        layout = weight_files(self.files)
        if layout is None:
            raise self._no_weights()
        check_pickle_allowed(layout, allow_pickle, self.spec)
        names = self._shard_names()
        missing = [n for n in names if n not in self.files]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            if self.offline:
                raise HubError(f"HF_HUB_OFFLINE=1 and {len(missing)} shard(s) of {self.repo_id}@{self.revision[:12]} "
                               f"are not in the HF cache: {', '.join(missing[:5])}{more}", file=str(self.snapshot),
                               fix=f"download them first (`hf download {self.repo_id} --revision {self.revision}`), "
                                   "or run without HF_HUB_OFFLINE")
            raise HubError(f"the index names {len(missing)} shard(s) that {self.repo_id}@{self.revision[:12]} does not "
                           f"have: {', '.join(missing[:5])}{more}", file=INDEX_NAME,
                           fix="the repo is broken at this revision; pick another revision")
        headers = self._read_headers(names)

        def reader(name: str) -> ShardHeader:
            got = headers[name]
            if isinstance(got, BaseException):
                raise got
            return got

        index = read_index(self.snapshot, header_reader=reader, label=label, allow_pickle=allow_pickle, files=layout)
        side_files(self.snapshot)  # refuses a side file linked out of the snapshot and its blob store
        return index

    def _shard_names(self) -> list[str]:
        layout = weight_files(self.files)
        if layout is None:
            raise self._no_weights()
        if layout.index is None:
            return [layout.single]
        index_path = self.snapshot / layout.index
        if not index_path.is_file():
            raise HubError(f"{layout.index} of {self.repo_id} is not in the HF cache and HF_HUB_OFFLINE=1 is set",
                           file=str(index_path), fix="run once online")
        return sorted(set(index_shard_names(load_json(index_path, "checkpoint index"), str(index_path), layout).values()))

    def read_range(self, file: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a repo file: from the HF cache when it is there, else one range request."""
        cached = self._cached(file)
        if cached is not None:
            with open(cached, "rb") as f:
                f.seek(start)
                return f.read(end - start)
        url = hf_hub_url(self.repo_id, file, revision=self.revision)
        return self._call(lambda: read_range(url, start, end, self.token), file=file)

    # ------------------------------------------------------------------ headers
    def _read_headers(self, names: Sequence[str]) -> dict[str, ShardHeader | BaseException]:
        def one(name: str) -> ShardHeader:
            local = self._cached(name)
            if local is not None:
                try:
                    return read_shard_header(local, name)
                except StreamMergeError:
                    if self.offline:
                        raise
                    log.warning("the cached copy of %s is unreadable; reading its header from the Hub", name)
            if self.offline:
                raise HubError(f"{name} is not in the HF cache and HF_HUB_OFFLINE=1 is set", file=str(self.snapshot))
            return self._remote_header(name)

        out: dict[str, ShardHeader | BaseException] = {}
        with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
            futures = {n: pool.submit(one, n) for n in names}
        for n, f in futures.items():
            exc = f.exception()
            out[n] = exc if exc is not None else f.result()
        return out

    def _remote_header(self, name: str) -> ShardHeader:
        """A shard's header by range requests: HEADER_PROBE bytes first, the rest of a larger header second."""
        size = self.files[name].size
        url = hf_hub_url(self.repo_id, name, revision=self.revision)

        def get(start: int, end: int) -> bytes:
            return self._call(lambda: read_range(url, start, end, self.token), file=name)

        if name.endswith(".bin"):  # a torch.save zip: its directory, data.pkl and storage headers by ranges
            return read_pickle_header(get, size, name)
        head = get(0, min(size, HEADER_PROBE))
        if len(head) >= 8:
            (n,) = struct.unpack("<Q", head[:8])
            if n <= MAX_HEADER_BYTES and len(head) < 8 + n <= size:
                head += get(len(head), 8 + n)
        return parse_header(head, size, name)

    # ------------------------------------------------------------------ errors
    def _call(self, fn: Callable[[], T], file: str | None = None) -> T:
        """A Hub call with the one retry layer, its errors as one-line HubErrors."""
        label = f"{self.repo_id}/{file}" if file else self.repo_id
        return call_with_retries(fn, lambda exc: hub_error(exc, self.what, self.spec, self.token, file=file), label)

