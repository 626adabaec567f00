"""Hub inputs: `org/name[@revision]` as a Source.

The revision (branch, tag or sha; `main` when left out) is resolved once, by one `model_info` call that also
lists every file with its size and digest (LFS sha256, or the git blob sha1 of small files), and that commit
sha is used for every file afterwards, so a branch that moves during a run cannot mix two commits.

- Planning reads no tensor data: the small files (index, config, tokenizer; for adapters, the whole adapter)
  go to the HF cache, and shard headers are read with HTTP range requests (or from the HF cache when the
  shard is already there), so every planning problem is found before a shard is downloaded.
- Shards come just in time on one background thread, in the order the runner asks (`prefetch`), into
  `OUT/.stream-merge-downloads/` (same disk as the output, one folder to clean); each is deleted by `release`
  once its output is committed. `keep_downloads` downloads into the HF cache instead and keeps them. Shards
  already in the HF cache are used in place and never deleted.
- Integrity: every file we use is hashed and compared with the Hub's digest (huggingface_hub checks only
  sizes); a mismatch is downloaded once more, then fails naming the file. Transient errors (dropped
  connections, 5xx, timeouts) are retried.
- HF_HUB_OFFLINE=1: the revision comes from the cache's refs, files from its snapshot, digests from the blob
  names; anything missing is named in one error before any work.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import queue
import re
import shutil
import struct
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from huggingface_hub import HfApi, constants, get_token, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub import errors as hf_errors
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_backoff

from .checkpoint import INDEX_NAME, SINGLE_NAME, check_shard_name, load_json, read_index
from .errors import HubError, StreamMergeError
from .extras import MAX_SIDE_FILE, NOT_SIDE_FILES, SIDE_FILES, TOKENIZER_FILES
from .journal import file_sha256
from .records import BaseIndex, ShardHeader
from .safetensors_io import MAX_HEADER_BYTES, parse_header, read_header_file

try:
    from huggingface_hub.utils.tqdm import silent_tqdm as _quiet_bar
except ImportError:  # older huggingface_hub: its own bars
    _quiet_bar = None

log = logging.getLogger("stream_merge")
T = TypeVar("T")

HEX40 = re.compile(r"[0-9a-f]{40}")
HEX64 = re.compile(r"[0-9a-f]{64}")
HEADER_PROBE = 100_000          # first range read of a shard; larger headers take a second one
ATTEMPTS = 4                    # tries per request against transient errors
RETRY_WAIT_S = 1.0              # then 2, 4 s
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "config.json")
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
_CACHE = "cache"


@dataclass(frozen=True)
class RemoteFile:
    """One file of the pinned commit: its size and what its content must hash to."""

    path: str
    size: int
    sha256: str | None = None   # LFS files
    git_oid: str | None = None  # git blob sha1; of the content only for non-LFS files

    def expected(self) -> tuple[str, str] | None:
        if self.sha256:
            return "sha256", self.sha256
        if self.git_oid and HEX40.fullmatch(self.git_oid):
            return "git-sha1", self.git_oid
        return None


def split_spec(spec: str) -> tuple[str, str | None]:
    repo_id, _, rev = spec.partition("@")
    return repo_id, rev or None


def git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(16 * 1024 * 1024):
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


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        return False
    if isinstance(exc, hf_errors.HfHubHTTPError):
        resp = getattr(exc, "response", None)
        return getattr(resp, "status_code", None) in _TRANSIENT_STATUS
    if type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3"):
        return True  # transport errors: refused, reset, dropped mid-body, timeouts
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, OSError) and "Consistency check failed" in str(exc)  # size mismatch after a drop


def _plain_ref(rev: str) -> bool:
    """A revision name that is safe as a path under the cache's refs/ (no '..', not absolute)."""
    parts = PurePosixPath(rev).parts
    return bool(parts) and not rev.startswith("/") and "\\" not in rev and all(p not in ("", ".", "..") for p in parts)


def _repo_cache_dir(repo_id: str) -> Path:
    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def _is_side_file(name: str, size: int) -> bool:
    return ("/" not in name and size <= MAX_SIDE_FILE and any(fnmatch.fnmatch(name, g) for g in SIDE_FILES)
            and not any(fnmatch.fnmatch(name, g) for g in NOT_SIDE_FILES))


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
        self._dir_ready = False

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, spec: str, what: str, *, token: str | None = None, download_dir: Path | None = None,
             keep_downloads: bool = False) -> HubSource:
        """Resolve the revision once and fetch the small files (the whole adapter for ADAPTER)."""
        repo_id, rev = split_spec(spec)
        offline = bool(constants.HF_HUB_OFFLINE)
        probe = cls(spec, what, repo_id, rev or "main", {}, Path(), token=token, offline=offline)
        if offline:
            sha = probe._cached_revision(rev or "main")
            snapshot = _repo_cache_dir(repo_id) / "snapshots" / sha
            files = _cached_files(snapshot)
        else:
            info = probe._call(lambda: HfApi(token=token).model_info(repo_id, revision=rev, files_metadata=True))
            sha = info.sha
            if not sha:
                raise HubError(f"{what} {repo_id} has no commits", file=spec, fix="check the repo id")
            files = {s.rfilename: _remote_file(s) for s in info.siblings or []}
            snapshot = _repo_cache_dir(repo_id) / "snapshots" / sha
        src = cls(spec, what, repo_id, sha, files, snapshot, token=token, offline=offline,
                  download_dir=download_dir, keep_downloads=keep_downloads)
        log.info("%s %s resolved to commit %s", what, spec, sha)
        src._fetch_small_files()
        if not offline and (rev or "main") != sha and _plain_ref(rev or "main"):
            src._remember_ref(rev or "main")
        return src

    def _remember_ref(self, rev: str) -> None:
        """Record branch/tag -> commit in the cache's refs/, as huggingface_hub does when it resolves one, so
        that HF_HUB_OFFLINE=1 runs can use the same spec (we download by sha, which writes no ref)."""
        ref = _repo_cache_dir(self.repo_id) / "refs" / rev
        try:
            if not ref.is_file() or ref.read_text() != self.revision:
                ref.parent.mkdir(parents=True, exist_ok=True)
                tmp = ref.with_name(f".{ref.name}.{threading.get_ident()}.tmp")
                tmp.write_text(self.revision)
                tmp.replace(ref)
        except OSError as exc:  # a read-only cache still works online
            log.warning("cannot record %s -> %s in the HF cache (%s)", rev, self.revision, exc.strerror)

    def _cached_revision(self, rev: str) -> str:
        repo_dir = _repo_cache_dir(self.repo_id)
        if HEX40.fullmatch(rev) and (repo_dir / "snapshots" / rev).is_dir():
            return rev
        ref = repo_dir / "refs" / rev
        if _plain_ref(rev) and ref.is_file():
            sha = ref.read_text().strip()
            if (repo_dir / "snapshots" / sha).is_dir():
                return sha
        raise HubError(f"{self.what} {self.repo_id}@{rev} is not in the HF cache and HF_HUB_OFFLINE=1 is set",
                       file=str(repo_dir), fix=f"run once online (or `hf download {self.repo_id}`), or point "
                                               "HF_HOME / HF_HUB_CACHE at the cache that holds it")

    def _fetch_small_files(self) -> None:
        if self.what == "BASE":
            if INDEX_NAME not in self.files and SINGLE_NAME not in self.files:
                raise self._no_weights()
            names = [n for n, f in self.files.items() if n == INDEX_NAME or _is_side_file(n, f.size)]
        else:
            names = [n for n in self.files if n.count("/") <= 1 and PurePosixPath(n).name in
                     ADAPTER_FILES + TOKENIZER_FILES]
            names = [n for n in names if not (n.endswith("adapter_model.bin") and
                                               n[:-3] + "safetensors" in self.files)]
            if not any(PurePosixPath(n).name == "adapter_config.json" for n in names):
                where = "in the HF cache" if self.offline else f"at {self.revision[:12]}"
                raise HubError(f"{self.what} {self.repo_id} has no adapter_config.json {where} (top level or one "
                               "sub-folder)", file=self.spec,
                               fix="point ADAPTER at a PEFT LoRA adapter repo" + (
                                   "; offline, only what an earlier online run cached is there"
                                   if self.offline else ""))
        if self.offline:
            return  # they are in the snapshot, or were never downloaded: the readers name what is missing
        for name in sorted(names):
            self._fetch_verified(name, _CACHE)
        self.snapshot.mkdir(parents=True, exist_ok=True)

    def _no_weights(self) -> HubError:
        names = sorted(self.files)
        where = "in the HF cache" if self.offline else f"at {self.revision[:12]}"
        if "adapter_config.json" in names:
            return HubError(f"BASE {self.repo_id} is a PEFT adapter repo, not a model", file=self.spec,
                            fix="pass the base model first, then the adapter")
        others = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".gguf"))]
        if others:
            return HubError(f"BASE {self.repo_id} has no safetensors weights {where}, only {', '.join(others[:3])}",
                            file=self.spec, fix="use a safetensors revision of the model (many repos have one "
                                                "under refs/pr/N), or convert it first")
        return HubError(f"BASE {self.repo_id} has no {INDEX_NAME} or {SINGLE_NAME} {where}", file=self.spec,
                        fix="check the repo id and revision" + (
                            "; offline, only files an earlier online run cached are there" if self.offline else ""))

    # ------------------------------------------------------------------ Source interface
    @property
    def protected(self) -> Path | None:
        return _repo_cache_dir(self.repo_id)

    def folder(self) -> Path:
        return self.snapshot

    def base_index(self, label: str) -> BaseIndex:
        """Index and shard headers: from the HF cache where a shard is there, else by range requests."""
        if self.what != "BASE":
            raise HubError(f"{self.spec} was opened as {self.what}, not as BASE")
        if INDEX_NAME in self.files:
            index_path = self.snapshot / INDEX_NAME
            if not index_path.is_file():
                raise HubError(f"{INDEX_NAME} of {self.repo_id} is not in the HF cache and HF_HUB_OFFLINE=1 is set",
                               file=str(index_path), fix="run once online")
            index = load_json(index_path, "checkpoint index")
            wmap = index.get("weight_map") if isinstance(index, dict) else None
            names = (sorted({check_shard_name(v, str(index_path)) for v in wmap.values()})
                     if isinstance(wmap, dict) else [])
        else:
            names = [SINGLE_NAME]
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

        return read_index(self.snapshot, header_reader=reader, label=label)

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
            meta = self.download_dir / ".cache" / "huggingface" / "download" / (file + ".metadata")
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
        return self._range(hf_hub_url(self.repo_id, file, revision=self.revision), start, end, file)

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
        """Stop the download thread; after a complete merge remove the download folder."""
        with self._lock:
            for fut in self._futures.values():
                fut.cancel()
            if self._queue is not None:
                self._queue.put(None)
                self._queue = None
        if complete and self.download_dir is not None and self.download_dir.exists():
            shutil.rmtree(self.download_dir, ignore_errors=True)

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
            return self._fetch_verified(file, _CACHE, force=cached is not None)
        if self.download_dir is None:
            raise HubError(f"no download folder for {file}", fix="give an output folder (-o OUT)")
        self._prepare_download_dir()
        path = self._fetch_verified(file, self.download_dir)
        with self._lock:
            self._ours[file] = path
        return path

    def _prepare_download_dir(self) -> None:
        """Created on the first download, under the output lock: drop partial files a killed run left."""
        if self._dir_ready or self.download_dir is None:
            return
        self.download_dir.mkdir(parents=True, exist_ok=True)
        for p in self.download_dir.rglob("*.incomplete"):
            p.unlink(missing_ok=True)
        self._dir_ready = True

    # ------------------------------------------------------------------ downloads
    def _fetch_verified(self, name: str, into: str | Path, force: bool = False) -> Path:
        """Download `name` (into the HF cache or a plain folder) and check its digest; once more on mismatch."""
        entry = self.files[name]
        got = ""
        for attempt in range(2):
            path = self._call(lambda: self._download(name, into, force or attempt > 0), file=name)
            ok, got = digest_matches(path, entry)
            if ok:
                return path
            log.warning("%s from %s does not match the Hub's checksum (%s); downloading it again", name,
                        self.repo_id, got[:16])
            if into != _CACHE:
                path.unlink(missing_ok=True)
        if into == _CACHE:  # do not leave a corrupt blob behind in the user's cache
            blob = path.resolve()
            path.unlink(missing_ok=True)
            blob.unlink(missing_ok=True)
        kind, want = entry.expected() or ("size", str(entry.size))
        raise HubError(f"{name} of {self.repo_id}@{self.revision[:12]} was downloaded twice and both copies differ "
                       f"from the Hub's {kind} ({got[:16]}... instead of {want[:16]}...)", file=name,
                       fix="retry later; if it persists, the file or a proxy on the way is corrupt")

    def _download(self, name: str, into: str | Path, force: bool) -> Path:
        kwargs: dict[str, Any] = dict(revision=self.revision, token=self.token, force_download=force)
        if _quiet_bar is not None:
            kwargs["tqdm_class"] = _quiet_bar
        if into != _CACHE:
            kwargs["local_dir"] = into
        log.info("downloading %s from %s", name, self.repo_id)
        return Path(hf_hub_download(self.repo_id, name, **kwargs))

    def _read_headers(self, names: Sequence[str]) -> dict[str, ShardHeader | BaseException]:
        def one(name: str) -> ShardHeader:
            local = self._cached(name)
            if local is not None:
                try:
                    return read_header_file(local, name)
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
        size = self.files[name].size
        url = hf_hub_url(self.repo_id, name, revision=self.revision)
        head = self._range(url, 0, min(size, HEADER_PROBE), name)
        if len(head) >= 8:
            (n,) = struct.unpack("<Q", head[:8])
            if n <= MAX_HEADER_BYTES and len(head) < 8 + n <= size:
                head += self._range(url, len(head), 8 + n, name)
        return parse_header(head, size, name)

    def _range(self, url: str, start: int, end: int, name: str) -> bytes:
        """Bytes [start, end) of a remote file."""
        if end <= start:
            return b""

        def get() -> bytes:
            headers = {**build_hf_headers(token=self.token), "Range": f"bytes={start}-{end - 1}"}
            resp = http_backoff("GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)
            hf_raise_for_status(resp)
            data = resp.content
            return data[start:end] if resp.status_code == 200 else data

        return self._call(get, file=name)

    # ------------------------------------------------------------------ errors
    def _call(self, fn: Callable[[], T], file: str | None = None) -> T:
        """Run a Hub call, retrying transient failures, and turn its errors into one-line HubErrors."""
        for attempt in range(ATTEMPTS):
            try:
                return fn()
            except StreamMergeError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                if attempt + 1 < ATTEMPTS and is_transient(exc):
                    wait = RETRY_WAIT_S * 2**attempt
                    log.warning("%s%s: %s; retrying in %.0f s", self.repo_id, f"/{file}" if file else "",
                                short_error(exc), wait)
                    time.sleep(wait)
                    continue
                raise hub_error(exc, self.what, self.spec, self.token, file=file) from exc
        raise AssertionError("unreachable")


def hub_error(exc: BaseException, what: str, spec: str, token: str | None, file: str | None = None
              ) -> StreamMergeError | BaseException:
    """One actionable line for a huggingface_hub exception (unknown ones are returned unchanged)."""
    repo_id, rev = split_spec(spec)
    endpoint = constants.ENDPOINT
    where = f" ({file})" if file else ""
    if isinstance(exc, hf_errors.GatedRepoError):
        return HubError(f"{what} {repo_id} is a gated repo and "
                        f"{'this token has' if token or get_token() else 'without a token you have'} no access{where}",
                        file=spec, fix=f"accept its conditions at {endpoint}/{repo_id} with your account, then pass "
                                       "that account's token (HF_TOKEN or --token)")
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return HubError(f"{what} {repo_id} was not found on {endpoint}, or it is private and "
                        f"{'this token has no access' if token or get_token() else 'no token was given'}",
                        file=spec, fix="check the repo id; for a private repo pass a token with read access "
                                       "(HF_TOKEN or --token)")
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return HubError(f"{what} {repo_id} has no revision {rev!r}", file=spec,
                        fix="after @ use an existing branch, tag or full commit sha")
    if isinstance(exc, hf_errors.DisabledRepoError):
        return HubError(f"{what} {repo_id} has been disabled on the Hub", file=spec)
    offline_miss = isinstance(exc, (hf_errors.OfflineModeIsEnabled, hf_errors.LocalEntryNotFoundError))
    if offline_miss and constants.HF_HUB_OFFLINE:
        return HubError(f"{what} {repo_id}{where} is not in the HF cache and HF_HUB_OFFLINE=1 is set", file=spec,
                        fix="run once online, or unset HF_HUB_OFFLINE")
    if isinstance(exc, hf_errors.EntryNotFoundError):
        return HubError(f"{what} {repo_id} has no file {file or ''} at this revision", file=spec)
    if isinstance(exc, hf_errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            return HubError(f"the Hub rejected the token for {what} {repo_id}{where}", file=spec,
                            fix="check HF_TOKEN / --token (or unset it for a public repo)")
        return HubError(f"the Hub answered HTTP {status} for {what} {repo_id}{where}: {short_error(exc)}",
                        file=spec, fix="retry later; re-running resumes")
    if is_transient(exc):
        return HubError(f"cannot reach the Hub at {endpoint} for {what} {repo_id}{where} ({short_error(exc)})",
                        file=spec, fix="check the network and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the HF "
                                       "cache; re-running resumes")
    return exc


def short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def _remote_file(sibling: Any) -> RemoteFile:
    lfs = getattr(sibling, "lfs", None)
    sha = (getattr(lfs, "sha256", None) or (lfs.get("sha256") if isinstance(lfs, dict) else None)) if lfs else None
    return RemoteFile(path=sibling.rfilename, size=int(sibling.size or 0), sha256=sha,
                      git_oid=None if lfs else getattr(sibling, "blob_id", None))


def _cached_files(snapshot: Path) -> dict[str, RemoteFile]:
    """Offline: the snapshot's files; the cache names each blob after its ETag (sha256 for LFS files, the git
    blob sha1 for others), which is the digest to check."""
    files = {}
    for p in sorted(snapshot.rglob("*")):
        if not p.is_file():
            continue
        real = p.resolve()
        blob = real.name
        files[p.relative_to(snapshot).as_posix()] = RemoteFile(
            path=p.relative_to(snapshot).as_posix(), size=real.stat().st_size,
            sha256=blob if HEX64.fullmatch(blob) else None, git_oid=blob if HEX40.fullmatch(blob) else None)
    return files
