"""Hub base shards as local files, just in time: one download thread, each shard hashed while it downloads
(`hub_follow`) and readable while it downloads (`hub_stream`), deleted once its output is committed.

`ShardDownloads` is the download half of `hub.HubSource` (see its module docstring for the policies: where
shards go, what is deleted, how digests are checked); it uses the source's repo, revision, file list and
`_call` retry layer.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

from .errors import HubError
from .hub_cache import (HF_LOCAL_DIR_META, RemoteFile, digest_matches, drop_stale_partials, remove_empty_area,
                        repo_cache_dir)
from .hub_follow import PartialFollower
from .hub_stream import ShardStream, StreamedShardReader
from .progress import Arrivals, counting_bar
from .records import ShardHeader
from .safetensors_io import ShardReader

try:
    from huggingface_hub.utils.tqdm import silent_tqdm as _quiet_bar
except ImportError:  # older huggingface_hub: its own bars
    _quiet_bar = None

log = logging.getLogger("stream_merge")
T = TypeVar("T")

FOLLOW_MIN = 1 << 20            # LFS files at least this big are hashed while they download
DOWNLOAD_CHUNK = 64 * 1024      # huggingface_hub's download chunk for our downloads (`_small_chunks`)


class DownloadStopped(Exception):
    """The source was closed while a shard downloaded (raised from the progress hook, so huggingface_hub stops
    writing at once; the download's future, which nobody waits for any more, gets it)."""


class ShardDownloads:
    """The download half of `HubSource` (a base class: the attributes below are the source's)."""

    repo_id: str
    revision: str
    files: dict[str, RemoteFile]
    snapshot: Path
    token: str | None
    offline: bool
    download_dir: Path | None
    keep_downloads: bool

    def _init_downloads(self) -> None:
        self._lock = threading.Lock()
        self._futures: dict[str, Future[Path]] = {}
        self._streams: dict[str, ShardStream] = {}
        self._ours: dict[str, Path] = {}  # shards we downloaded into download_dir: deleted on release
        self._queue: queue.Queue[tuple[str, Future[Path]] | None] | None = None
        self._arrival_lock = threading.Lock()
        self._arrivals: Arrivals | None = None
        self._arrived: dict[str, int] = {}  # bytes of each download so far, reported or not
        self._complete: list[str] = []      # downloads finished and checked
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def arrivals(self) -> Arrivals | None:
        """Where download bytes are reported (`progress.watch_downloads`), or None."""
        return self._arrivals

    @arrivals.setter
    def arrivals(self, watcher: Arrivals | None) -> None:
        """Report to `watcher` from now on, and first what arrived before it existed (the first shard may start
        downloading while planning ends, before there is a progress display: `planning.merge_planned`)."""
        with self._arrival_lock:
            self._arrivals = watcher
            if watcher is not None:
                for name, n in self._arrived.items():
                    watcher.add(name, n)
                for name in self._complete:
                    watcher.finish(name)

    def _arrive(self, name: str, n: int = 0, complete: bool = False) -> None:
        if self._stopping and not complete:
            raise DownloadStopped(name)  # out of huggingface_hub's chunk loop: the download ends here
        with self._arrival_lock:
            if complete:
                self._complete.append(name)
            else:
                self._arrived[name] = self._arrived.get(name, 0) + n
            if self._arrivals is not None:
                if complete:
                    self._arrivals.finish(name)
                else:
                    self._arrivals.add(name, n)

    def _call(self, fn: Callable[[], T], file: str | None = None) -> T:
        raise NotImplementedError

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
                self._thread = threading.Thread(target=self._worker, args=(self._queue,),
                                                name="stream-merge-download", daemon=True)
                self._thread.start()
            fut: Future[Path] = Future()
            self._futures[file] = fut
            self._streams[file] = ShardStream(file, fut)
            self._queue.put((file, fut))

    def shard_path(self, file: str) -> Path:
        self.prefetch(file)
        return self._futures[file].result()

    def open_shard(self, file: str, header: ShardHeader) -> ShardReader:
        """A reader of the shard that can be used while it downloads (`hub_stream`); a shard already in the HF
        cache is read in place."""
        cached = self._cached(file) if file not in self._futures else None
        if cached is not None:
            return ShardReader(self.shard_path(file), header)  # checks its digest first
        self.prefetch(file)
        return StreamedShardReader(self._streams[file], header)

    def release(self, file: str) -> None:
        with self._lock:
            self._futures.pop(file, None)
            self._streams.pop(file, None)
            path = self._ours.pop(file, None)
        if path is not None:
            path.unlink(missing_ok=True)
            assert self.download_dir is not None
            meta = self.download_dir / HF_LOCAL_DIR_META / "download" / (file + ".metadata")
            meta.unlink(missing_ok=True)
            meta.with_suffix(".lock").unlink(missing_ok=True)
            log.info("deleted downloaded shard %s", file)

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
            self._stopping = True  # a download in progress stops at its next chunk (`_arrive`)
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

    def stop_downloads(self, timeout: float = 30.0) -> None:
        """`close`, then wait (at most `timeout` s) until the download thread has stopped writing, so that its
        area can be removed without a download recreating it."""
        self.close()
        if self._thread is not None:
            self._thread.join(timeout)

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

    def _fetch_verified(self, name: str, local_dir: Path | None, force: bool = False) -> Path:
        """Download `name` (into `local_dir`, or the HF cache when None) and check its digest; once more on a
        mismatch."""
        entry = self.files[name]
        stream = self._streams.get(name)
        got = ""
        for attempt in range(2):
            follower = None
            if entry.sha256 and entry.size >= FOLLOW_MIN:  # shards: hashed while they download
                with PartialFollower(self._partials_dir(name, local_dir), entry) as follower:
                    if stream is not None:
                        stream.attempt(follower)
                    path = self._call(lambda: self._download(name, local_dir, force or attempt > 0), file=name)
                    ok, got = follower.verdict(path)
            else:
                path = self._call(lambda: self._download(name, local_dir, force or attempt > 0), file=name)
                ok, got = digest_matches(path, entry)
            if ok:
                if stream is not None:
                    stream.verified(follower)
                self._arrive(name, complete=True)
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
            kwargs["tqdm_class"] = counting_bar(_quiet_bar, lambda n: self._arrive(name, n))
        if local_dir is not None:
            kwargs["local_dir"] = local_dir
        log.info("downloading %s from %s", name, self.repo_id)
        with _small_chunks():
            return Path(hf_hub_download(self.repo_id, name, **kwargs))


@contextlib.contextmanager
def _small_chunks() -> Iterator[None]:
    """huggingface_hub's download chunk (`DOWNLOAD_CHUNK_SIZE`, read once per request) at most DOWNLOAD_CHUNK
    for our downloads, restored afterwards: its 10 MiB default is gathered from the socket's small reads at a
    cost of about 5 CPU-seconds per GB (one core's worth at 200 MB/s); 64 KiB costs about 1. It also lets the
    partial file, which the merge reads while it downloads, grow in small steps."""
    before = constants.DOWNLOAD_CHUNK_SIZE
    constants.DOWNLOAD_CHUNK_SIZE = min(before, DOWNLOAD_CHUNK)
    try:
        yield
    finally:
        if constants.DOWNLOAD_CHUNK_SIZE == min(before, DOWNLOAD_CHUNK):
            constants.DOWNLOAD_CHUNK_SIZE = before

