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
import queue
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from huggingface_hub import HfApi, constants, hf_hub_download, hf_hub_url, try_to_load_from_cache

from .checkpoint import (INDEX_NAME, SINGLE_NAME, check_pickle_allowed, index_shard_names, load_json, read_index,
                         read_shard_header, weight_files)
from .errors import HubError, StreamMergeError
from .extras import MAX_SIDE_FILE, TOKENIZER_FILES, is_side_file, side_files
from .hub_cache import (HF_LOCAL_DIR_META, RemoteFile, cached_files, cached_revision, digest_matches,
                        drop_stale_partials, remember_ref, remote_file, remove_empty_area, repo_cache_dir, snapshot_dir)
from .hub_errors import call_with_retries, hub_error, split_spec
from .hub_follow import PartialFollower
from .hub_http import install_timeouts, read_range
from .progress import Arrivals
from .records import BaseIndex, ShardHeader
from .pickle_io import read_pickle_header
from .safetensors_io import MAX_HEADER_BYTES, parse_header

try:
    from huggingface_hub.utils.tqdm import silent_tqdm as _quiet_bar
except ImportError:  # older huggingface_hub: its own bars
    _quiet_bar = None

__all__ = ["HubSource", "RemoteFile", "HEADER_PROBE", "ADAPTER_FILES"]

log = logging.getLogger("stream_merge")
T = TypeVar("T")

HEADER_PROBE = 100_000          # first range read of a shard; larger headers take a second one
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "config.json")
FOLLOW_MIN = 1 << 20            # LFS files at least this big are hashed while they download
BASE_CARD = "README.md"         # fetched with the small files: the output's card keeps its text and licence


class HubSource:
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
        self._lock = threading.Lock()
        self._futures: dict[str, Future[Path]] = {}
        self._ours: dict[str, Path] = {}  # shards we downloaded into download_dir: deleted on release
        self._queue: queue.Queue[tuple[str, Future[Path]] | None] | None = None
        self.arrivals: Arrivals | None = None  # download progress (`progress.watch_downloads`)

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

    def available(self, file: str) -> bool:
        """Whether the shard can be read without downloading it (it is in the HF cache)."""
        return self._cached(file) is not None

    def download_sizes(self, files: Sequence[str]) -> dict[str, int]:
        """The shards among `files` that are not in the HF cache (to be downloaded), with their sizes."""
        return {f: self.files[f].size for f in files if f in self.files and self._cached(f) is None}

    def prefetch(self, file: str) -> None:
        with self._lock:
            if file in self._futures:
                return
            if self._queue is None:
                self._queue = queue.Queue()
                threading.Thread(target=self._worker, args=(self._queue,), name="stream-merge-download",
                                 daemon=True).start()
            fut: Future[Path] = Future()
            self._futures[file] = fut
            self._queue.put((file, fut))

    def shard_path(self, file: str) -> Path:
        self.prefetch(file)
        return self._futures[file].result()

    def release(self, file: str) -> None:
        with self._lock:
            self._futures.pop(file, None)
            path = self._ours.pop(file, None)
        if path is not None:
            path.unlink(missing_ok=True)
            assert self.download_dir is not None
            meta = self.download_dir / HF_LOCAL_DIR_META / "download" / (file + ".metadata")
            meta.unlink(missing_ok=True)
            meta.with_suffix(".lock").unlink(missing_ok=True)
            log.info("deleted downloaded shard %s", file)

    def read_range(self, file: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a repo file: from the HF cache when it is there, else one range request."""
        cached = self._cached(file)
        if cached is not None:
            with open(cached, "rb") as f:
                f.seek(start)
                return f.read(end - start)
        url = hf_hub_url(self.repo_id, file, revision=self.revision)
        return self._call(lambda: read_range(url, start, end, self.token), file=file)

    def disk_need(self, files: Sequence[str], prefetch: int) -> list[tuple[Path, int]]:
        """Where downloading `files` puts bytes, and at most how many at once."""
        sizes = [self.files[f].size for f in files if f in self.files and self._cached(f) is None]
        if not sizes:
            return []
        if self.keep_downloads:
            return [(Path(constants.HF_HUB_CACHE), sum(sizes))]
        assert self.download_dir is not None
        return [(self.download_dir, sum(sorted(sizes, reverse=True)[:prefetch + 1]))]

    def close(self, complete: bool = False) -> None:
        """Stop the download thread; after a complete merge remove what this source left in its download area
        (shards it downloaded and did not release, their bookkeeping) and the area's folders once empty."""
        with self._lock:
            for fut in self._futures.values():
                fut.cancel()
            if self._queue is not None:
                self._queue.put(None)
                self._queue = None
            leftovers = list(self._ours) if complete else []
        for file in leftovers:
            self.release(file)
        if complete and self.download_dir is not None:
            remove_empty_area(self.download_dir)

    # ------------------------------------------------------------------ shards
    def _worker(self, q: queue.Queue[tuple[str, Future[Path]] | None]) -> None:
        while (item := q.get()) is not None:
            file, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(self._obtain(file))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                fut.set_exception(exc)

    def _cached(self, file: str) -> Path | None:
        """The file in the HF cache at our commit, if it is there with the right size."""
        if self.offline:
            p = self.snapshot / file
        else:
            found = try_to_load_from_cache(self.repo_id, file, revision=self.revision)
            if not isinstance(found, str):
                return None
            p = Path(found)
        entry = self.files.get(file)
        return p if p.is_file() and entry is not None and p.stat().st_size == entry.size else None

    def _obtain(self, file: str) -> Path:
        entry = self.files[file]
        cached = self._cached(file)
        if cached is not None:
            ok, got = digest_matches(cached, entry)
            if ok:
                log.info("using %s from the HF cache", file)
                return cached
            if self.offline:
                raise HubError(f"the cached copy of {file} is corrupt ({got[:16]}..., the Hub says "
                               f"{(entry.expected() or ('', ''))[1][:16]}...)", file=str(cached.resolve()),
                               fix="delete it and run once online")
            log.warning("the cached copy of %s is corrupt; downloading it again", file)
        if self.offline:
            raise HubError(f"{file} is not in the HF cache and HF_HUB_OFFLINE=1 is set", file=str(self.snapshot),
                           fix="run once online")
        if self.keep_downloads:
            return self._fetch_verified(file, None, force=cached is not None)
        if self.download_dir is None:
            raise HubError(f"no download folder for {file}", fix="give an output folder (-o OUT)")
        self.download_dir.mkdir(parents=True, exist_ok=True)
        drop_stale_partials(self.download_dir, entry)
        path = self._fetch_verified(file, self.download_dir)
        with self._lock:
            self._ours[file] = path
        return path

    # ------------------------------------------------------------------ downloads
    def _fetch_verified(self, name: str, local_dir: Path | None, force: bool = False) -> Path:
        """Download `name` (into `local_dir`, or the HF cache when None) and check its digest; once more on a
        mismatch."""
        entry = self.files[name]
        got = ""
        for attempt in range(2):
            if entry.sha256 and entry.size >= FOLLOW_MIN:  # shards: hashed while they download
                with PartialFollower(self._partials_dir(name, local_dir), entry) as follower:
                    path = self._call(lambda: self._download(name, local_dir, force or attempt > 0), file=name)
                    ok, got = follower.verdict(path)
            else:
                path = self._call(lambda: self._download(name, local_dir, force or attempt > 0), file=name)
                ok, got = digest_matches(path, entry)
            if ok:
                if self.arrivals is not None:
                    self.arrivals.finish(name)
                return path
            log.warning("%s from %s does not match the Hub's checksum (%s); downloading it again", name,
                        self.repo_id, got[:16])
            if local_dir is not None:
                path.unlink(missing_ok=True)
        if local_dir is None:  # do not leave a corrupt blob behind in the user's cache
            blob = path.resolve()
            path.unlink(missing_ok=True)
            blob.unlink(missing_ok=True)
        kind, want = entry.expected() or ("size", str(entry.size))
        raise HubError(f"{name} of {self.repo_id}@{self.revision[:12]} was downloaded twice and both copies differ "
                       f"from the Hub's {kind} ({got[:16]}... instead of {want[:16]}...)", file=name,
                       fix="retry later; if it persists, the file or a proxy on the way is corrupt")

    def _partials_dir(self, name: str, local_dir: Path | None) -> Path:
        """Where huggingface_hub writes `name`'s partial file (see hub_cache's module docstring)."""
        if local_dir is None:
            return repo_cache_dir(self.repo_id) / "blobs"
        return local_dir / HF_LOCAL_DIR_META / "download" / PurePosixPath(name).parent

    def _download(self, name: str, local_dir: Path | None, force: bool) -> Path:
        kwargs: dict[str, Any] = dict(revision=self.revision, token=self.token, force_download=force)
        if _quiet_bar is not None:
            kwargs["tqdm_class"] = _quiet_bar if self.arrivals is None else self.arrivals.bar(name, _quiet_bar)
        if local_dir is not None:
            kwargs["local_dir"] = local_dir
        log.info("downloading %s from %s", name, self.repo_id)
        return Path(hf_hub_download(self.repo_id, name, **kwargs))

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

