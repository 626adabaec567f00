"""HTTP to the Hub: a bound on every wait, and header reads that never pull a whole shard.

huggingface_hub's shared client has no timeout, and several of its calls (`model_info`, `create_commit`,
`get_paths_info`) pass none, so a server that accepts the connection and never answers hangs a run for ever.
`install_timeouts` replaces the client factory with one whose every request gets a connect and a read timeout
(a value the caller gave is kept when it is smaller). `read_range` streams a byte range and stops after the
bytes asked for, so a server or proxy that answers a range request with a whole-file 200 costs only those
bytes. Both leave retries to one layer, `hub_errors.call_with_retries`.

Environment: `STREAM_MERGE_HUB_TIMEOUT` (seconds, default 60) bounds each read (the longest the server may
stay silent) and `STREAM_MERGE_HUB_CONNECT_TIMEOUT` (default 10) each connect.
"""

from __future__ import annotations

import os
from typing import Any

import httpx2
from huggingface_hub.utils import _http as hf_http
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

from .errors import ConfigError

READ_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 10.0
_STREAM_CHUNK = 64 * 1024


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < 86_400:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds between 0 and 86400", key=name,
                          fix=f"unset it (default {default:g}) or give e.g. {name}=30")
    return value


def timeouts() -> dict[str, float]:
    """The caps applied to every Hub request, per phase (httpx's connect/read/write/pool)."""
    read = _env_seconds("STREAM_MERGE_HUB_TIMEOUT", READ_TIMEOUT_S)
    connect = min(read, _env_seconds("STREAM_MERGE_HUB_CONNECT_TIMEOUT", CONNECT_TIMEOUT_S))
    return {"connect": connect, "read": read, "write": read, "pool": read}


def bounded(timeout: dict[str, Any] | None, caps: dict[str, float]) -> dict[str, float]:
    """`timeout` (httpx's per-phase dict, None meaning 'wait for ever') with every phase at most its cap."""
    given = timeout or {}
    return {phase: cap if given.get(phase) is None else min(float(given[phase]), cap)
            for phase, cap in caps.items()}


class BoundedClient(httpx2.Client):
    """huggingface_hub's client, with every request's timeouts capped (see `bounded`)."""

    def __init__(self, caps: dict[str, float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.caps = caps

    def send(self, request: httpx2.Request, **kwargs: Any) -> httpx2.Response:  # type: ignore[override]
        request.extensions = {**request.extensions, "timeout": bounded(request.extensions.get("timeout"), self.caps)}
        return super().send(request, **kwargs)


def install_timeouts() -> None:
    """Make huggingface_hub's shared client a `BoundedClient` (once; a client factory the user installed is
    left alone)."""
    if getattr(hf_http, "_GLOBAL_CLIENT_FACTORY", None) is not hf_http.default_client_factory:
        return
    caps = timeouts()

    def factory() -> httpx2.Client:
        return BoundedClient(caps, event_hooks={"request": [hf_http.hf_request_event_hook]},
                             follow_redirects=True, timeout=httpx2.Timeout(**caps))

    hf_http.set_client_factory(factory)


def read_range(url: str, start: int, end: int, token: str | None) -> bytes:
    """Bytes [start, end) of a remote file, in one request. A 206 gives them directly; a 200 (a server or
    proxy that ignores Range) is streamed and cut off after `end`, never read whole. No retry here: the
    caller's `call_with_retries` is the one retry layer."""
    if end <= start:
        return b""
    headers = {**build_hf_headers(token=token), "Range": f"bytes={start}-{end - 1}"}
    with hf_http.get_session().stream("GET", url, headers=headers) as resp:
        hf_raise_for_status(resp)
        skip = start if resp.status_code == 200 else 0
        want = end - start
        buf = bytearray()
        for chunk in resp.iter_bytes(_STREAM_CHUNK):
            if skip:
                cut = min(skip, len(chunk))
                chunk, skip = chunk[cut:], skip - cut
            buf += chunk
            if len(buf) >= want:
                break
    return bytes(buf[:want])
