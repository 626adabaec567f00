"""hub_http and hub_errors in-process: capped timeouts on every request, range reads that stop after the bytes
asked for (even when the server answers 200 with the whole file), and one bounded retry layer."""

from __future__ import annotations

import time

import httpx2
import pytest

from stream_merge import hub_errors, hub_http
from stream_merge.errors import ConfigError, HubError

try:
    from hub_faults import silent_server
except ImportError:  # tests/ imported as a package
    from tests.hub_faults import silent_server

pytestmark = pytest.mark.hub

BIG = bytes(range(256)) * (5 * 4096)  # 5 MiB


@pytest.fixture
def bounded_client(monkeypatch):
    """install_timeouts with 0.5 s caps; huggingface_hub's default client comes back afterwards."""
    from huggingface_hub.utils import _http as hf_http

    monkeypatch.setenv("STREAM_MERGE_HUB_TIMEOUT", "0.5")
    hf_http.set_client_factory(hf_http.default_client_factory)
    hub_http.install_timeouts()
    yield hf_http.get_session()
    hf_http.set_client_factory(hf_http.default_client_factory)


def test_bounded_fills_and_caps_every_phase() -> None:
    caps = {"connect": 10.0, "read": 60.0, "write": 60.0, "pool": 60.0}
    assert hub_http.bounded(None, caps) == caps
    got = hub_http.bounded({"connect": None, "read": 600.0, "write": 5.0}, caps)
    assert got == {"connect": 10.0, "read": 60.0, "write": 5.0, "pool": 60.0}


def test_timeouts_come_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("STREAM_MERGE_HUB_TIMEOUT", "5")
    monkeypatch.setenv("STREAM_MERGE_HUB_CONNECT_TIMEOUT", "30")
    assert hub_http.timeouts() == {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}
    monkeypatch.delenv("STREAM_MERGE_HUB_CONNECT_TIMEOUT")
    monkeypatch.delenv("STREAM_MERGE_HUB_TIMEOUT")
    assert hub_http.timeouts()["read"] == hub_http.READ_TIMEOUT_S
    for bad in ("0", "-1", "soon", "1e9"):
        monkeypatch.setenv("STREAM_MERGE_HUB_TIMEOUT", bad)
        with pytest.raises(ConfigError, match="STREAM_MERGE_HUB_TIMEOUT"):
            hub_http.timeouts()


def test_a_silent_server_times_out_even_when_the_caller_asks_for_no_timeout(bounded_client) -> None:
    assert isinstance(bounded_client, hub_http.BoundedClient)
    with silent_server() as endpoint:
        t0 = time.monotonic()
        with pytest.raises(httpx2.ReadTimeout):
            bounded_client.get(f"{endpoint}/api/models/org/base", timeout=None)  # what model_info passes
        assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("ignore_range", [False, True])
def test_read_range_returns_exactly_the_bytes_and_stops_reading(hub, bounded_client, monkeypatch, ignore_range) -> None:
    hub.add_commit("org/big", {"model.safetensors": BIG})
    if ignore_range:
        hub.ignore_range("model.safetensors")
    url = f"{hub.endpoint}/org/big/resolve/main/model.safetensors"
    consumed = {"bytes": 0}
    real = httpx2.Response.iter_bytes

    def counting(self, chunk_size=None):
        for chunk in real(self, chunk_size):
            consumed["bytes"] += len(chunk)
            yield chunk

    monkeypatch.setattr(httpx2.Response, "iter_bytes", counting)
    for start, end in ((0, 100_000), (70_000, 70_008), (len(BIG) - 10, len(BIG))):
        consumed["bytes"] = 0
        assert hub_http.read_range(url, start, end, token=None) == BIG[start:end]
        limit = (end if ignore_range else end - start) + 2 * 65536
        assert consumed["bytes"] <= limit, (start, end, consumed)
    statuses = {q.status for q in hub.requests("GET", "/org/big/")}
    assert statuses == ({200} if ignore_range else {206})
    assert hub_http.read_range(url, 5, 5, token=None) == b""


def test_the_retry_layer_is_bounded_and_ends_in_one_line(monkeypatch) -> None:
    monkeypatch.setattr(hub_errors, "RETRY_WAIT_S", 0.0)
    calls = {"n": 0}

    def hang() -> None:
        calls["n"] += 1
        raise httpx2.ReadTimeout("timed out")

    describe = lambda exc: hub_errors.hub_error(exc, "BASE", "org/base", None)  # noqa: E731
    with pytest.raises(HubError) as err:
        hub_errors.call_with_retries(hang, describe, "org/base")
    assert calls["n"] == hub_errors.ATTEMPTS
    assert "cannot reach the Hub" in str(err.value) and "ReadTimeout" in str(err.value) and "\n" not in str(err.value)


def test_the_retry_layer_stops_when_its_time_budget_is_spent(monkeypatch) -> None:
    """One try of hf_hub_download against a silent server can take minutes (it retries the HEAD itself): no
    second try once the budget is spent."""
    monkeypatch.setattr(hub_errors, "RETRY_WAIT_S", 0.0)
    monkeypatch.setattr(hub_errors, "RETRY_BUDGET_S", 0.2)
    calls = {"n": 0}

    def slow() -> None:
        calls["n"] += 1
        time.sleep(0.3)
        raise httpx2.ReadTimeout("timed out")

    with pytest.raises(HubError):
        hub_errors.call_with_retries(slow, lambda exc: hub_errors.hub_error(exc, "BASE", "org/base", None), "x")
    assert calls["n"] == 1


def test_errors_wrapped_by_hf_hub_download_are_mapped_by_their_cause() -> None:
    from huggingface_hub import errors as hf_errors

    def chained(outer: BaseException, cause: BaseException) -> BaseException:
        try:
            try:
                raise cause
            except BaseException as c:
                raise outer from c
        except BaseException as e:
            return e

    timeout = chained(ValueError("Force download failed due to the above error."), httpx2.ConnectTimeout("t"))
    assert hub_errors.is_transient(timeout)
    err = hub_errors.hub_error(timeout, "BASE", "org/base", None, file="model.safetensors")
    assert isinstance(err, HubError) and "cannot reach the Hub" in err.message and "model.safetensors" in err.message
    located = chained(hf_errors.LocalEntryNotFoundError("check your connection"), httpx2.ReadTimeout("t"))
    assert "cannot reach the Hub" in hub_errors.hub_error(located, "BASE", "org/base", None).message
    # an HTTP 404 raised by httpx under the hood is not transient
    resp = httpx2.Response(404, request=httpx2.Request("GET", "http://x"))
    nf = chained(hf_errors.RepositoryNotFoundError("nope", response=resp), httpx2.HTTPStatusError("404", request=resp.request,
                                                                                                 response=resp))
    assert not hub_errors.is_transient(nf)
    assert "was not found" in hub_errors.hub_error(nf, "BASE", "org/base", None).message
    assert hub_errors.hub_error(RuntimeError("bug"), "BASE", "org/base", None).__class__ is RuntimeError
