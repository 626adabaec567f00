"""A small Hub-compatible HTTP server for tests (stdlib only).

It speaks just enough of the Hugging Face Hub protocol for an *unmodified* ``huggingface_hub`` 2.4 client
(see ``HUB_TEST_CONTRACT.md``): file resolution with HEAD/GET and Range, repo info, tree listing with
pagination, paths-info, and the upload path (create repo, preupload, LFS batch/PUT/verify, ndjson commit).
It never emits any Xet header or ``xetHash``, so the client always uses plain HTTP.

Typical use::

    server = start_hub_server(tmp_path)
    sha = server.add_commit("org/model", {"config.json": b"{}", "model.safetensors": some_path})
    env = hub_env(server, tmp_path / "hf_home")          # clean env for a subprocess
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    assert not server.requests("GET", path_contains=".safetensors")
    server.stop()

Store model
    ``HubRepo`` keeps branches and tags (name -> commit sha) and commits (sha -> ``Commit``), in ``hub_store.py``.
    ``add_commit`` creates a snapshot commit and moves a branch to it, so tests can move ``main`` under a client.
    Files whose suffix is in ``lfs_suffixes`` or whose size is >= ``lfs_threshold`` are LFS: they carry
    ``X-Linked-Etag``/``X-Linked-Size`` and ``lfs`` entries.

Access control
    ``create_repo(repo_id, private=True, token="hf_x")``: every request to the repo needs ``Bearer hf_x``
    (401 + ``RepoNotFound`` without a token, 404 + ``RepoNotFound`` with a wrong one -> the client raises
    ``RepositoryNotFoundError``). ``gated=True``: metadata is public, file contents need the token
    (401/403 + ``GatedRepo`` -> ``GatedRepoError``). A ``token`` on a repo also guards writes to it; a
    server-wide ``write_token`` guards writes to repos without one and ``/api/repos/create``.

Request log and faults
    Every request is logged (``server.requests(...)``) before its status line is written, so by the time a
    client has seen a response its log entry exists. Faults (drops, corrupted bodies, error statuses, wrong
    ETags, delays, ignored ranges) live in ``hub_faults.py``; ``HubServer`` mixes them in.

Bandwidth and big repos
    ``rate_down`` / ``rate_up`` (bytes/s) limit response bodies and request bodies separately, each direction
    shared by all connections (``hub_faults.TokenBucket``). A blob may be made on demand (``Blob.generated``,
    see ``hub_procedural.py``); with ``discard_uploads`` an LFS upload is hashed while it is received and
    dropped (its size and sha256 are kept, so verify and commit work). ``on_event`` receives one dict per
    finished file GET, LFS upload and commit (``hub_procedural`` writes them to a JSON-lines log).

Scope
    Model repos only, and only the endpoints stream-merge and its tests use (no datasets/spaces, whoami,
    DELETE/PATCH, folder deletes or LFS downloads).
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import json
import os
import re
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

try:
    from hub_faults import Fault, FaultInjection, TokenBucket, faulty_body
    from hub_store import _EPOCH, _HEX40, _URL_PREFIX, Blob, Commit, HubRepo, _iso
except ImportError:  # tests/ imported as a package
    from tests.hub_faults import Fault, FaultInjection, TokenBucket, faulty_body
    from tests.hub_store import _EPOCH, _HEX40, _URL_PREFIX, Blob, Commit, HubRepo, _iso

__all__ = [
    "Blob",
    "Commit",
    "Fault",
    "HubRepo",
    "HubServer",
    "LoggedRequest",
    "hub_env",
    "start_hub_server",
]

REPO_TYPES = ("model",)  # stream-merge reads and pushes model repos only
_API_PLURAL = {"models": "model"}
_REPO_ACTIONS = {"revision", "tree", "paths-info", "preupload", "commit", "refs", "resolve", "commits"}

DEFAULT_LFS_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".npy", ".npz",
    ".pkl", ".zip", ".tar", ".gz", ".parquet", ".arrow",
)
DEFAULT_LFS_THRESHOLD = 10 * 1024 * 1024
_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
)


@dataclass
class LoggedRequest:
    method: str
    path: str  # URL-decoded path, no query
    raw_path: str  # request target exactly as received (quoted, with query)
    query: dict[str, list[str]]
    range: str | None
    headers: dict[str, str]
    status: int | None = None
    bytes_sent: int = 0  # body bytes handed to the socket
    faults: list[str] = field(default_factory=list)
    dropped: bool = False
    time: float = field(default_factory=time.monotonic)

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


class _Abort(Exception):
    """Raised inside a handler to stop processing after a deliberate connection drop."""


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, headers: dict | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.body = body


# --------------------------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------------------------


class _ThreadingServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, handler, hub: "HubServer"):
        self.hub = hub
        super().__init__(addr, handler)


class HubServer(FaultInjection):
    """An in-process Hub-compatible server (faults: see ``hub_faults``). Create it with :func:`start_hub_server`."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
        lfs_suffixes: Iterable[str] = DEFAULT_LFS_SUFFIXES,
        tree_page_size: int = 1000,
        write_token: str | None = None,
        rate_down: float | None = None,
        rate_up: float | None = None,
        discard_uploads: bool = False,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ):
        super().__init__()
        self.down = TokenBucket(rate_down) if rate_down else None
        self.up = TokenBucket(rate_up) if rate_up else None
        self.discard_uploads = discard_uploads
        self.trust_uploads = False  # True: store an LFS upload under its oid unchecked, as a presigned S3 PUT does
        self.on_event = on_event
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lfs_dir = self.root / "lfs-objects"
        self.lfs_dir.mkdir(exist_ok=True)
        self.lfs_threshold = lfs_threshold
        self.lfs_suffixes = tuple(lfs_suffixes)
        self.tree_page_size = tree_page_size
        self.write_token = write_token
        self.repos: dict[tuple[str, str], HubRepo] = {}
        self.lfs_objects: dict[str, Blob] = {}
        self.errors: list[str] = []  # unexpected server-side exceptions (tests may assert it stays empty)
        self._lock = threading.RLock()
        self._log: list[LoggedRequest] = []
        self._log_lock = threading.Lock()
        self._clock = 0
        self._connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        self._httpd: _ThreadingServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "HubServer":
        self._httpd = _ThreadingServer(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        with self._conn_lock:
            conns = list(self._connections)
        for conn in conns:  # idle keep-alive connections would otherwise keep their threads blocked
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "HubServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- store helpers
    def is_lfs(self, path: str, size: int) -> bool:
        return path.lower().endswith(self.lfs_suffixes) or size >= self.lfs_threshold

    def _now(self) -> str:
        with self._lock:
            self._clock += 1
            return _iso(_EPOCH + _dt.timedelta(minutes=self._clock))

    def create_repo(
        self,
        repo_id: str,
        *,
        repo_type: str = "model",
        private: bool = False,
        gated: bool = False,
        token: str | None = None,
        exist_ok: bool = True,
    ) -> HubRepo:
        """Create (or, with ``exist_ok``, reconfigure) a repo. It has no commit until ``add_commit``."""
        if repo_type not in REPO_TYPES:
            raise ValueError(f"repo_type must be one of {REPO_TYPES}")
        if (private or gated) and token is None:
            raise ValueError("a private or gated repo needs the token that grants access")
        with self._lock:
            repo = self.repos.get((repo_type, repo_id))
            if repo is None:
                repo = HubRepo(repo_id=repo_id, repo_type=repo_type, created_at=self._now())
                self.repos[(repo_type, repo_id)] = repo
            elif not exist_ok:
                raise ValueError(f"{repo_type} repo {repo_id} exists")
            repo.private, repo.gated, repo.token = private, gated, token
            return repo

    def get_repo(self, repo_id: str, repo_type: str = "model") -> HubRepo:
        return self.repos[(repo_type, repo_id)]

    def _blob(self, path: str, src: bytes | str | os.PathLike | Blob, lfs: bool | None = None) -> Blob:
        if isinstance(src, Blob):
            return src
        return Blob.from_source(src, lfs=lfs, policy=lambda size: self.is_lfs(path, size))

    def _make_commit(self, repo: HubRepo, files: dict[str, Blob], parent: str | None, message: str) -> Commit:
        h = hashlib.sha1()
        h.update(f"parent {parent or ''}\nmessage {message}\n".encode())
        for p in sorted(files):
            b = files[p]
            h.update(f"{p}\0{b.git_oid}\0{int(b.lfs)}\n".encode())
        sha = h.hexdigest()
        commit = repo.commits.get(sha)
        if commit is None:
            commit = Commit(sha=sha, parent=parent, message=message, files=dict(files), date=self._now())
            repo.commits[sha] = commit
        return commit

    def add_commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str | os.PathLike | Blob | None],
        branch: str = "main",
        tag: str | None = None,
        *,
        repo_type: str = "model",
        message: str | None = None,
        keep_existing: bool = False,
        lfs: Iterable[str] | None = None,
    ) -> str:
        """Commit a snapshot to ``branch`` (created with the repo if needed) and return the commit sha.

        ``files`` maps repo paths to bytes, str, or a file path (served from disk). By default the commit
        contains exactly ``files``; with ``keep_existing=True`` they are applied on top of the branch head,
        and a ``None`` value deletes a path. ``lfs`` forces the listed paths to be LFS. ``tag`` (re)points
        a tag at the new commit.
        """
        force_lfs = set(lfs or ())
        with self._lock:
            repo = self.repos.get((repo_type, repo_id)) or self.create_repo(repo_id, repo_type=repo_type)
            parent = repo.branches.get(branch)
            snapshot: dict[str, Blob] = dict(repo.commits[parent].files) if (keep_existing and parent) else {}
            for path, src in files.items():
                path = path.strip("/")
                if src is None:
                    snapshot.pop(path, None)
                else:
                    snapshot[path] = self._blob(path, src, True if path in force_lfs else None)
            commit = self._make_commit(repo, snapshot, parent, message or f"Update {len(files)} file(s)")
            repo.branches[branch] = commit.sha
            if tag is not None:
                repo.tags[tag] = commit.sha
            return commit.sha

    def set_ref(self, repo_id: str, name: str, revision: str, *, tag: bool = False, repo_type: str = "model") -> str:
        """Point a branch (or tag) at an existing revision; returns the commit sha."""
        with self._lock:
            repo = self.get_repo(repo_id, repo_type)
            commit = repo.resolve(revision)
            if commit is None:
                raise KeyError(revision)
            (repo.tags if tag else repo.branches)[name] = commit.sha
            return commit.sha

    def file_bytes(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        with self._lock:
            commit = self.get_repo(repo_id, repo_type).resolve(revision)
        if commit is None:
            raise KeyError(revision)
        return commit.files[path].read()

    # ---------------------------------------------------------------- log
    def _record(self, entry: LoggedRequest) -> None:
        with self._log_lock:
            self._log.append(entry)

    def requests(
        self, method: str | None = None, path_contains: str | None = None, *, status: int | None = None
    ) -> list[LoggedRequest]:
        """Logged requests, oldest first, filtered by method, by a substring of the (decoded or raw) path,
        and by status."""
        with self._log_lock:
            entries = list(self._log)
        out = []
        for e in entries:
            if method is not None and e.method != method.upper():
                continue
            if path_contains is not None and path_contains not in e.path and path_contains not in e.raw_path:
                continue
            if status is not None and e.status != status:
                continue
            out.append(e)
        return out

    def clear_log(self) -> None:
        with self._log_lock:
            self._log.clear()

# --------------------------------------------------------------------------------------------------------------
# Request handler
# --------------------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "stream-merge-test-hub/1.0"
    timeout = 120  # idle keep-alive connections end eventually
    server: _ThreadingServer

    # ------------------------------------------------------------ plumbing
    def setup(self) -> None:
        super().setup()
        with self.hub._conn_lock:
            self.hub._connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        with self.hub._conn_lock:
            self.hub._connections.discard(self.connection)

    def handle(self) -> None:
        try:
            super().handle()
        except (OSError, _Abort):
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # ------------------------------------------------------------ body
    def _iter_body(self) -> Iterator[bytes]:
        if self._body_consumed:
            return
        self._body_consumed = True
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise _Abort("eof in chunked body")
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    self.close_connection = True
                    raise _HTTPError(400, "Malformed chunked request body")
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                remaining = size
                while remaining:
                    buf = self.rfile.read(min(remaining, 1 << 20))
                    if not buf:
                        raise _Abort("eof in chunk")
                    remaining -= len(buf)
                    self._throttle(self.hub.up, len(buf))
                    yield buf
                self.rfile.readline(3)  # CRLF after the chunk
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                buf = self.rfile.read(min(remaining, 1 << 20))
                if not buf:
                    raise _Abort("eof in body")
                remaining -= len(buf)
                self._throttle(self.hub.up, len(buf))
                yield buf

    @staticmethod
    def _throttle(bucket: TokenBucket | None, n: int) -> None:
        if bucket is not None:
            bucket.take(n)

    def _event(self, **event: Any) -> None:
        if self.hub.on_event is not None:
            self.hub.on_event(event)

    def _read_body(self) -> bytes:
        return b"".join(self._iter_body())

    def _json_body(self) -> Any:
        raw = self._read_body()
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            raise _HTTPError(400, "Invalid JSON body")

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip() or None
        return None

    # ------------------------------------------------------------ responses
    def _start(self, status: int, headers: Mapping[str, str], length: int) -> None:
        """Write the status line and headers (always with Content-Length)."""
        if not self._body_consumed:
            for _ in self._iter_body():  # drain an unread request body so the connection stays usable
                pass
        entry = self._entry
        for fault in self._faults:
            if fault.kind == "drop" and fault.after_bytes is None:
                self._drop_now(entry)
        entry.status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def _drop_now(self, entry: LoggedRequest) -> None:
        entry.dropped = True
        entry.faults.append("drop")
        try:
            self.wfile.flush()
        except OSError:
            pass
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.close_connection = True
        raise _Abort("fault: connection dropped")

    def _write_body(self, chunks: Iterable[bytes]) -> None:
        entry = self._entry

        def drop(part: bytes) -> None:
            if part:
                entry.bytes_sent += len(part)
                self.wfile.write(part)
            self._drop_now(entry)

        for chunk in faulty_body(chunks, self._faults, drop):
            self._throttle(self.hub.down, len(chunk))
            # Counted before the write: once the client has read the bytes, the log already shows them.
            entry.bytes_sent += len(chunk)
            self.wfile.write(chunk)

    def _send_bytes(self, status: int, body: bytes, headers: Mapping[str, str] | None = None,
                    content_type: str = "application/json; charset=utf-8") -> None:
        hdrs = {"Content-Type": content_type, **(headers or {})}
        self._start(status, hdrs, len(body))
        if self.command != "HEAD" and body:
            self._write_body([body])

    def _send_json(self, status: int, obj: Any, headers: Mapping[str, str] | None = None,
                   content_type: str = "application/json; charset=utf-8") -> None:
        self._send_bytes(status, json.dumps(obj).encode(), headers, content_type)

    def _send_error(self, err: _HTTPError) -> None:
        headers = dict(err.headers)
        if err.code:
            headers["X-Error-Code"] = err.code
        headers["X-Error-Message"] = err.message
        body = err.body if err.body is not None else {"error": err.message}
        self._send_json(err.status, body, headers)

    # ------------------------------------------------------------ dispatch
    def _dispatch(self, method: str) -> None:
        self._body_consumed = "Content-Length" not in self.headers and "Transfer-Encoding" not in self.headers
        split = urlsplit(self.path)
        decoded = unquote(split.path)
        self._query = parse_qs(split.query, keep_blank_values=True)
        self._entry = LoggedRequest(
            method=method,
            path=decoded,
            raw_path=self.path,
            query=self._query,
            range=self.headers.get("Range"),
            headers={k.lower(): v for k, v in self.headers.items()},
        )
        self._faults = self.hub.take_faults(method, decoded)
        self.hub._record(self._entry)
        try:
            for fault in self._faults:
                if fault.kind == "delay":
                    self._entry.faults.append("delay")
                    time.sleep(fault.seconds)
            for fault in self._faults:
                if fault.kind == "status":
                    self._entry.faults.append(f"status:{fault.status}")
                    self._read_body()
                    raise _HTTPError(fault.status, f"Injected fault: HTTP {fault.status}",
                                     headers={"Retry-After": "0"} if fault.status in (429, 503) else None)
            for fault in self._faults:
                if fault.kind in ("corrupt", "wrong_etag", "ignore_range"):
                    self._entry.faults.append(fault.kind)
            self._route(method, split.path)
        except _HTTPError as err:
            if self._entry.status is not None:
                self.close_connection = True
                raise _Abort("error after headers") from err
            self._send_error(err)
        except (_Abort, OSError):
            self.close_connection = True
            raise
        except Exception as exc:  # a bug in this server: report it loudly
            import traceback

            self.hub.errors.append(f"{method} {self.path}: {traceback.format_exc()}")
            self.close_connection = True
            if self._entry.status is None:
                self._send_json(500, {"error": f"test hub server error: {exc!r}"})
            else:
                raise _Abort("error after headers")
        finally:
            if not self._body_consumed:
                self.close_connection = True

    def _route(self, method: str, raw_path: str) -> None:
        segs = [unquote(s) for s in raw_path.split("/")[1:]]
        if segs and segs[-1] == "" and len(segs) > 1:
            segs = segs[:-1]
        if not segs or segs == [""]:
            raise _HTTPError(404, "Not found")

        if segs[0] == "api":
            return self._route_api(method, segs[1:], raw_path)
        if segs[0] == "_lfs" and len(segs) == 3:
            if segs[1] == "upload" and method == "PUT":
                return self._lfs_put(segs[2])
            if segs[1] == "verify" and method == "POST":
                return self._lfs_verify(segs[2])
            raise _HTTPError(405, "Method not allowed")

        repo_type = "model"
        rest = segs
        # {repo}.git/info/lfs/objects/batch
        for i, s in enumerate(rest):
            if s.endswith(".git") and rest[i + 1 :] == ["info", "lfs", "objects", "batch"] and i in (0, 1):
                repo_id = "/".join(rest[:i] + [s[:-4]])
                if method != "POST":
                    raise _HTTPError(405, "Method not allowed")
                return self._lfs_batch(repo_type, repo_id)
        # {repo}/resolve/{rev}/{path}. Segments were decoded one by one, so a quoted revision
        # (refs%2Fpr%2F1) is still a single segment here.
        candidates = [i for i in (1, 2) if len(rest) > i + 1 and rest[i] == "resolve"]
        if candidates:
            known = [i for i in candidates if (repo_type, "/".join(rest[:i])) in self.hub.repos]
            i = known[0] if known else candidates[-1]
            if method not in ("GET", "HEAD"):
                raise _HTTPError(405, "Method not allowed")
            return self._resolve(repo_type, "/".join(rest[:i]), rest[i + 1 :])
        raise _HTTPError(404, f"Not found: {unquote(raw_path)}")

    def _split_repo(self, repo_type: str, rest: list[str]) -> tuple[str, list[str]]:
        if len(rest) >= 2 and (repo_type, f"{rest[0]}/{rest[1]}") in self.hub.repos:
            return f"{rest[0]}/{rest[1]}", rest[2:]
        if rest and (repo_type, rest[0]) in self.hub.repos:
            return rest[0], rest[1:]
        if len(rest) >= 2 and rest[1] not in _REPO_ACTIONS:
            return f"{rest[0]}/{rest[1]}", rest[2:]
        if rest:
            return rest[0], rest[1:]
        raise _HTTPError(404, "Not found")

    def _route_api(self, method: str, segs: list[str], raw_path: str) -> None:
        if segs == ["agent-harnesses"]:
            raise _HTTPError(404, "Not found")
        if segs == ["validate-yaml"] and method == "POST":
            self._json_body()
            return self._send_json(200, {"errors": [], "warnings": []})
        if segs == ["repos", "create"] and method == "POST":
            return self._create_repo_api()
        if not segs or segs[0] not in _API_PLURAL or len(segs) < 2:
            raise _HTTPError(404, f"Not found: {unquote(raw_path)}")
        repo_type = _API_PLURAL[segs[0]]
        repo_id, tail = self._split_repo(repo_type, segs[1:])
        if not tail:
            if method == "GET":
                return self._repo_info(repo_type, repo_id, None)
            raise _HTTPError(405, "Method not allowed")
        action = tail[0]
        if action == "revision" and len(tail) >= 2 and method == "GET":
            return self._repo_info(repo_type, repo_id, "/".join(tail[1:]))
        if action == "tree" and len(tail) >= 2 and method == "GET":
            rev, path = self._rev_and_path(tail[1:])
            return self._tree(repo_type, repo_id, rev, path, raw_path)
        if action == "paths-info" and len(tail) >= 2 and method == "POST":
            return self._paths_info(repo_type, repo_id, "/".join(tail[1:]))
        if action == "preupload" and len(tail) >= 2 and method == "POST":
            return self._preupload(repo_type, repo_id, "/".join(tail[1:]))
        if action == "commit" and len(tail) >= 2 and method == "POST":
            return self._commit(repo_type, repo_id, "/".join(tail[1:]))
        if action == "refs" and len(tail) == 1 and method == "GET":
            return self._refs(repo_type, repo_id)
        raise _HTTPError(404, f"Not found: {unquote(raw_path)}")

    def _rev_and_path(self, parts: list[str]) -> tuple[str, str]:
        """Split [rev, *path] where an unquoted ``refs/pr/N`` may have been split into three segments."""
        if len(parts) >= 3 and parts[0] == "refs" and parts[1] in ("pr", "convert", "heads", "tags"):
            return "/".join(parts[:3]), "/".join(parts[3:])
        return parts[0], "/".join(parts[1:])

    # ------------------------------------------------------------ repo lookup and access
    def _repo(self, repo_type: str, repo_id: str, *, content: bool = False, write: bool = False) -> HubRepo:
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None:
            raise _HTTPError(404, "Repository not found", code="RepoNotFound")
        token = self._token()
        if repo.private and token != repo.token:
            if token is None:
                raise _HTTPError(401, "Invalid username or password.", code="RepoNotFound")
            raise _HTTPError(404, "Repository not found", code="RepoNotFound")
        if repo.gated and content and token != repo.token:
            kind = repo.repo_type
            if token is None:
                raise _HTTPError(
                    401,
                    f"Access to {kind} {repo_id} is restricted. You must have access to it and be authenticated "
                    "to access it. Please log in.",
                    code="GatedRepo",
                )
            raise _HTTPError(
                403,
                f"Access to {kind} {repo_id} is restricted and you are not in the authorized list. "
                f"Visit {self.hub.endpoint}/{repo.url_path} to ask for access.",
                code="GatedRepo",
            )
        if write:
            required = repo.token if repo.token is not None else self.hub.write_token
            if required is not None and token != required:
                raise _HTTPError(403, f"You don't have the rights to create a commit in {repo_id}")
        return repo

    def _commit_at(self, repo: HubRepo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HTTPError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return commit

    # ------------------------------------------------------------ /resolve
    def _resolve(self, repo_type: str, repo_id: str, tail: list[str]) -> None:
        with self.hub._lock:
            repo = self._repo(repo_type, repo_id, content=True)
            rev, path = self._rev_and_path(tail)
            commit = self._commit_at(repo, rev)
        blob = commit.files.get(path)
        if blob is None:
            raise _HTTPError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": commit.sha})

        etag = blob.etag
        if any(f.kind == "wrong_etag" for f in self._faults):
            digest = hashlib.sha256 if blob.lfs else hashlib.sha1
            etag = digest(b"wrong-etag:" + etag.encode()).hexdigest()
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{etag}"',
            "X-Repo-Commit": commit.sha,
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}; "
                                   f"filename=\"{path.rsplit('/', 1)[-1]}\";",
            "Vary": "Origin, Accept-Encoding",
        }
        if blob.lfs:
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(blob.size)

        start, end, status = 0, blob.size, 200
        rng = self.headers.get("Range")
        if rng and any(f.kind == "ignore_range" for f in self._faults):
            rng = None
        if rng:
            parsed = _parse_range(rng, blob.size)
            if parsed == "unsatisfiable":
                raise _HTTPError(416, "Requested Range Not Satisfiable",
                                 headers={"Content-Range": f"bytes */{blob.size}", **{
                                     "X-Repo-Commit": commit.sha}})
            if parsed is not None:
                start, end = parsed
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
        self._start(status, headers, end - start)
        if self.command == "GET":
            t0 = time.time()
            self._write_body(blob.iter_range(start, end))
            if blob.lfs:
                self._event(ev="get", repo=repo_id, path=path, start=start, end=end, t0=t0, t1=time.time())

    # ------------------------------------------------------------ repo info, refs, tree, paths-info
    def _file_entry(self, repo: HubRepo, commit: Commit, path: str, expand: bool) -> dict:
        blob = commit.files[path]
        entry: dict[str, Any] = {"type": "file", "oid": blob.git_oid, "size": blob.size, "path": path}
        if blob.lfs:
            entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": len(blob.pointer)}
        if expand:
            last = repo.last_commit_for(commit, path)
            entry["lastCommit"] = {"id": last.sha, "title": last.message, "date": last.date}
        return entry

    def _dir_entry(self, repo: HubRepo, commit: Commit, path: str, expand: bool) -> dict:
        entry: dict[str, Any] = {"type": "directory", "oid": commit.tree_oid(path), "size": 0, "path": path}
        if expand:
            entry["lastCommit"] = {"id": commit.sha, "title": commit.message, "date": commit.date}
        return entry

    def _repo_info(self, repo_type: str, repo_id: str, revision: str | None) -> None:
        with self.hub._lock:
            repo = self._repo(repo_type, repo_id)
            commit = self._commit_at(repo, revision or "main") if (revision or repo.branches) else None
        blobs = _truthy(self._query.get("blobs"))
        siblings = []
        for p in sorted(commit.files) if commit else []:
            sib: dict[str, Any] = {"rfilename": p}
            if blobs:
                b = commit.files[p]
                sib.update(size=b.size, blobId=b.git_oid)
                if b.lfs:
                    sib["lfs"] = {"sha256": b.sha256, "size": b.size, "pointerSize": len(b.pointer)}
            siblings.append(sib)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0] if "/" in repo_id else None,
            "sha": commit.sha if commit else None,
            "lastModified": commit.date if commit else repo.created_at,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        self._send_json(200, info)

    def _refs(self, repo_type: str, repo_id: str) -> None:
        with self.hub._lock:
            repo = self._repo(repo_type, repo_id)
            branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s}
                        for n, s in sorted(repo.branches.items()) if not n.startswith("refs/")]
            prs = [{"name": n[len("refs/"):], "ref": n, "targetCommit": s}
                   for n, s in sorted(repo.branches.items()) if n.startswith("refs/pr/")]
            tags = [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in sorted(repo.tags.items())]
        body: dict[str, Any] = {"branches": branches, "converts": [], "tags": tags}
        if _truthy(self._query.get("include_prs")):
            body["pullRequests"] = prs
        self._send_json(200, body)

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str, raw_path: str) -> None:
        with self.hub._lock:
            repo = self._repo(repo_type, repo_id)
            commit = self._commit_at(repo, revision)
        path = path.strip("/")
        recursive = _truthy(self._query.get("recursive"))
        expand = _truthy(self._query.get("expand"))
        dirs = commit.directories()
        if path and path not in dirs:
            raise _HTTPError(404, f"Entry not found: {path}", code="EntryNotFound",
                             headers={"X-Repo-Commit": commit.sha})
        prefix = f"{path}/" if path else ""

        def under(p: str) -> bool:
            if not p.startswith(prefix):
                return False
            return recursive or "/" not in p[len(prefix):]

        names = [(d, True) for d in dirs if under(d)] + [(f, False) for f in commit.files if under(f)]
        # Grouped by parent directory (shallow levels first); directories before files; then by name.
        names.sort(key=lambda t: (t[0].split("/")[:-1], not t[1], t[0]))
        try:
            cursor = int((self._query.get("cursor") or ["0"])[0])
        except ValueError:
            raise _HTTPError(400, "Invalid cursor")
        page_size = max(1, self.hub.tree_page_size)
        page = names[cursor : cursor + page_size]
        entries = [
            self._dir_entry(repo, commit, p, expand) if is_dir else self._file_entry(repo, commit, p, expand)
            for p, is_dir in page
        ]
        headers = {}
        if cursor + page_size < len(names):
            params = {k: v[-1] for k, v in self._query.items() if k != "cursor"}
            params["cursor"] = str(cursor + page_size)
            headers["Link"] = f'<{self.hub.endpoint}{raw_path}?{urlencode(params)}>; rel="next"'
        self._send_json(200, entries, headers)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        form = parse_qs(self._read_body().decode(), keep_blank_values=True)  # the client posts a form
        paths = form.get("paths", [])
        expand = _truthy(form.get("expand"))
        with self.hub._lock:
            repo = self._repo(repo_type, repo_id)
            commit = self._commit_at(repo, revision)
        dirs = commit.directories()
        out = []
        for p in paths:
            p = str(p).strip("/")
            if p in commit.files:
                out.append(self._file_entry(repo, commit, p, expand))
            elif p in dirs:
                out.append(self._dir_entry(repo, commit, p, expand))
        self._send_json(200, out)

    # ------------------------------------------------------------ uploads
    def _create_repo_api(self) -> None:
        data = self._json_body()
        token = self._token()
        if self.hub.write_token is not None and token != self.hub.write_token:
            raise _HTTPError(401, "Invalid username or password.")
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise _HTTPError(400, "Missing name")
        org = data.get("organization")
        repo_id = f"{org}/{name}" if org else name
        repo_type = data.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise _HTTPError(400, f"Invalid repo type {repo_type}")
        private = data.get("private") is True or data.get("visibility") == "private"
        url = f"{self.hub.endpoint}/{_URL_PREFIX[repo_type]}{repo_id}"
        with self.hub._lock:
            if (repo_type, repo_id) in self.hub.repos:
                raise _HTTPError(409, f"You already created this {repo_type} repo",
                                 body={"error": f"You already created this {repo_type} repo", "url": url})
            if private and token is None:
                raise _HTTPError(400, "A private repo needs an authenticated creator in this test server")
            repo = self.hub.create_repo(repo_id, repo_type=repo_type, private=private,
                                        token=token if private else None)
            init = self.hub._make_commit(repo, {".gitattributes": self.hub._blob(".gitattributes", _GITATTRIBUTES,
                                                                                   lfs=False)},
                                         None, "initial commit")
            repo.branches["main"] = init.sha
        self._send_json(200, {"url": url, "name": repo_id, "id": repo.created_at})

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        data = self._json_body()
        files = data.get("files")
        if not isinstance(files, list):
            raise _HTTPError(400, "files must be a list")
        with self.hub._lock:
            repo = self._repo(repo_type, repo_id, write=True)
            commit = repo.resolve(revision)
            if commit is None and not (revision == "main" and not repo.branches):
                raise _HTTPError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        out = []
        for f in files:
            path = str(f.get("path", "")).strip("/")
            size = int(f.get("size") or 0)
            existing = commit.files.get(path) if commit else None
            out.append({
                "path": path,
                "uploadMode": "lfs" if (size > 0 and self.hub.is_lfs(path, size)) else "regular",
                "shouldIgnore": False,
                "oid": existing.upload_oid if existing else None,
            })
        self._send_json(200, {"files": out, "commitOid": commit.sha if commit else None})

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        data = self._json_body()
        with self.hub._lock:
            self._repo(repo_type, repo_id, write=True)
        if data.get("operation") != "upload":
            raise _HTTPError(400, "this server only takes LFS uploads")
        objects = []
        for obj in data.get("objects") or []:
            oid, size = obj.get("oid"), obj.get("size")
            if not (isinstance(oid, str) and re.fullmatch(r"[0-9a-f]{64}", oid) and isinstance(size, int)):
                objects.append({"oid": str(oid), "size": int(size or 0),
                                "error": {"code": 422, "message": "invalid oid or size"}})
                continue
            stored = self.hub.lfs_objects.get(oid)
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if stored is None or stored.size != size:
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.endpoint}/_lfs/upload/{oid}", "header": {}},
                    "verify": {"href": f"{self.hub.endpoint}/_lfs/verify/{oid}", "header": {}},
                }
            objects.append(entry)
        self._send_json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                        content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str) -> None:
        if not re.fullmatch(r"[0-9a-f]{64}", oid):
            raise _HTTPError(400, "invalid oid")
        if self.hub.discard_uploads:
            return self._lfs_put_discard(oid)
        fd, tmp = tempfile.mkstemp(dir=self.hub.lfs_dir, prefix=".upload-")
        h = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in self._iter_body():
                    h.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
            if h.hexdigest() != oid and not self.hub.trust_uploads:
                raise _HTTPError(400, f"sha256 mismatch: got {h.hexdigest()}, expected {oid}")
            final = self.hub.lfs_dir / oid
            os.replace(tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        blob = Blob.from_source(final, lfs=True, policy=lambda _: True)
        with self.hub._lock:
            self.hub.lfs_objects[oid] = blob
        self._send_bytes(200, b"", {"ETag": f'"{oid}"'}, content_type="text/plain")

    def _lfs_put_discard(self, oid: str) -> None:
        """Hash the upload while it arrives and keep only its size and sha256."""
        t0 = time.time()
        h = hashlib.sha256()
        size = 0
        for chunk in self._iter_body():
            h.update(chunk)
            size += len(chunk)
        if h.hexdigest() != oid:
            raise _HTTPError(400, f"sha256 mismatch: got {h.hexdigest()}, expected {oid}")
        with self.hub._lock:
            self.hub.lfs_objects[oid] = Blob.discarded(size, oid)
        self._event(ev="put", oid=oid, size=size, t0=t0, t1=time.time())
        self._send_bytes(200, b"", {"ETag": f'"{oid}"'}, content_type="text/plain")

    def _lfs_verify(self, oid: str) -> None:
        data = self._json_body()
        stored = self.hub.lfs_objects.get(oid)
        if stored is None or data.get("oid") != oid or data.get("size") != stored.size:
            raise _HTTPError(404, "Object not found or size mismatch")
        self._send_json(200, {"success": True})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        raw = self._read_body()
        lines = []
        for line in raw.splitlines():
            if line.strip():
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    raise _HTTPError(400, "Invalid ndjson line")
        if not lines or lines[0].get("key") != "header":
            raise _HTTPError(400, "First line must be the commit header")
        header = lines[0].get("value") or {}
        summary = header.get("summary") or ""
        if not summary:
            raise _HTTPError(400, "Commit summary is required")
        create_pr = _truthy(self._query.get("create_pr"))
        hub = self.hub
        with hub._lock:
            repo = self._repo(repo_type, repo_id, write=True)
            if revision in repo.tags or (_HEX40.match(revision) and revision not in repo.branches):
                raise _HTTPError(400, f"Invalid rev id: {revision} is not a branch")
            if revision not in repo.branches and not (revision == "main" and not repo.branches):
                raise _HTTPError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
            head_sha = repo.branches.get(revision)
            parent_commit = header.get("parentCommit")
            if parent_commit and parent_commit != head_sha:
                raise _HTTPError(412, "A commit has happened since. Please refresh and try again.")
            files: dict[str, Blob] = dict(repo.commits[head_sha].files) if head_sha else {}
            for item in lines[1:]:
                self._apply_commit_op(repo, files, item)
            message = summary + ("\n\n" + header["description"] if header.get("description") else "")
            commit = hub._make_commit(repo, files, head_sha, message)
            pr_url = None
            if create_pr:
                repo.pr_count += 1
                repo.branches[f"refs/pr/{repo.pr_count}"] = commit.sha
                pr_url = f"{hub.endpoint}/{repo.url_path}/discussions/{repo.pr_count}"
            else:
                repo.branches[revision] = commit.sha
        self._event(ev="commit", repo=repo_id, t=time.time(),
                    files={i["value"]["path"]: i["value"].get("oid") for i in lines[1:]
                           if i.get("key") == "lfsFile" and isinstance(i.get("value"), dict)})
        self._send_json(200, {
            "success": True,
            "commitOid": commit.sha,
            "commitUrl": f"{hub.endpoint}/{repo.url_path}/commit/{commit.sha}",
            "pullRequestUrl": pr_url,
            "hookOutput": "",
        })


    def _apply_commit_op(self, repo: HubRepo, files: dict[str, Blob], item: dict) -> None:
        """Apply one ndjson commit line (file, lfsFile or deletedFile) to the snapshot being built."""
        hub = self.hub
        key, value = item.get("key"), item.get("value") or {}
        path = str(value.get("path", "")).strip("/")
        if key == "file":
            if value.get("encoding", "base64") != "base64":
                raise _HTTPError(400, "Only base64 encoding is supported")
            try:
                content = base64.b64decode(value.get("content", ""), validate=True)
            except (binascii.Error, ValueError):
                raise _HTTPError(400, f"Invalid base64 for {path}")
            files[path] = hub._blob(path, content, lfs=False)
        elif key == "lfsFile":
            oid = value.get("oid")
            blob = hub.lfs_objects.get(oid) if isinstance(oid, str) else None
            if blob is None:
                # Also accept an LFS object already present in this repo (copies).
                blob = next((b for c in repo.commits.values() for b in c.files.values()
                             if b.lfs and b.sha256 == oid), None)
            if blob is None:
                raise _HTTPError(422, f"LFS object {oid} for {path} was not uploaded")
            if value.get("size") is not None and value["size"] != blob.size:
                raise _HTTPError(422, f"LFS object {oid} size mismatch")
            files[path] = blob
        elif key == "deletedFile":
            if path not in files:
                raise _HTTPError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
            del files[path]
        else:
            raise _HTTPError(400, f"Unsupported commit operation {key!r}")

def _truthy(values: list[str] | str | None) -> bool:
    if values is None:
        return False
    v = values[-1] if isinstance(values, list) else values
    if not isinstance(v, str):
        return bool(v)
    return v.strip().lower() in ("1", "true", "yes", "on")


def _parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """Parse a single ``bytes=`` range. Returns (start, end_exclusive), ``"unsatisfiable"``, or None (ignore)."""
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not m or (m.group(1) == "" and m.group(2) == ""):
        return None
    first, last = m.group(1), m.group(2)
    if first == "":  # suffix: last N bytes
        n = int(last)
        if n == 0:
            return "unsatisfiable"
        return max(0, size - n), size
    start = int(first)
    end = size if last == "" else min(size, int(last) + 1)
    if last != "" and int(last) < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, end


# --------------------------------------------------------------------------------------------------------------
# Pytest helpers
# --------------------------------------------------------------------------------------------------------------


def start_hub_server(root_tmp_path: str | os.PathLike, **kwargs: Any) -> HubServer:
    """Start a server on 127.0.0.1 (OS-chosen port) storing uploads under ``root_tmp_path``.

    The result is also a context manager that stops the server on exit.
    """
    return HubServer(Path(root_tmp_path) / "hub-server", **kwargs).start()


def hub_env(server: HubServer, hf_home: str | os.PathLike, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean environment for a subprocess using ``huggingface_hub`` against ``server``.

    Every ``HF_*``/``HUGGINGFACE_*`` variable of the current environment is dropped (so no real token or
    cache leaks in), then ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_DISABLE_TELEMETRY=1``,
    ``HF_HUB_DISABLE_XET=1`` and ``NO_PROXY``/``no_proxy`` are set; ``extra`` is applied last
    (e.g. ``{"HF_TOKEN": ..., "HF_HUB_OFFLINE": "1"}``).
    """
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("HF_", "HUGGINGFACE_"))}
    Path(hf_home).mkdir(parents=True, exist_ok=True)
    env.update(
        HF_ENDPOINT=server.endpoint,
        HF_HOME=str(hf_home),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    if extra:
        env.update(extra)
    return env
