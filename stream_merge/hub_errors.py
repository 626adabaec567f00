"""Hub failures as one actionable line, and the one retry layer around every Hub call.

huggingface_hub raises many exception types (HTTP errors with a status, transport errors from httpx, errors
wrapped by `hf_hub_download` in a `LocalEntryNotFoundError` or a `ValueError` whose cause is the real one).
`hub_error` maps each to a `HubError` naming the repo, the file and the fix; `call_with_retries` retries the
transient ones a bounded number of times, so a Hub that keeps failing (or never answers, see `hub_http`) ends
in one line and exit 2 instead of a hang or a traceback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from huggingface_hub import constants, get_token
from huggingface_hub import errors as hf_errors

from .errors import HubError, StreamMergeError

log = logging.getLogger("stream_merge")
T = TypeVar("T")

ATTEMPTS = 4                    # tries per call against transient errors
RETRY_WAIT_S = 1.0              # then 2, 4 s
RETRY_BUDGET_S = 120.0          # no new try once a call has failed for this long (hf_hub_download retries a
                                # silent HEAD itself, with its own waits: one of its tries can take minutes)
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
_TRANSPORT_MODULES = ("httpx", "httpx2", "requests", "urllib3", "httpcore")


def split_spec(spec: str) -> tuple[str, str | None]:
    """`org/name@rev` -> (`org/name`, `rev`), `org/name` -> (`org/name`, None)."""
    repo_id, _, rev = spec.partition("@")
    return repo_id, rev or None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from (hf_hub_download wraps a failed HEAD in another error)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)


def _transient_one(exc: BaseException) -> bool:
    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        return False
    if isinstance(exc, hf_errors.HfHubHTTPError):
        return getattr(getattr(exc, "response", None), "status_code", None) in _TRANSIENT_STATUS
    if type(exc).__module__.split(".")[0] in _TRANSPORT_MODULES:
        return True  # transport errors: refused, reset, dropped mid-body, connect and read timeouts
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, OSError) and "Consistency check failed" in str(exc)  # size mismatch after a drop


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: a network error, a timeout, 408/429/5xx, or a download cut short. The first Hub answer
    or transport error of the chain decides (an HTTP 404 is not transient because httpx raised it)."""
    return _transient_one(_root(exc))


def short_error(exc: BaseException) -> str:
    """`Type: first line` of an exception, at most 160 characters of message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def _root(exc: BaseException) -> BaseException:
    """The most telling exception of a chain: the first that is a Hub answer or a transport error."""
    for e in _causes(exc):
        if isinstance(e, hf_errors.HfHubHTTPError) or _transient_one(e):
            return e
    return exc


def _access_error(exc: BaseException, what: str, repo_id: str, spec: str, token: str | None,
                  where: str) -> HubError | None:
    """Repo-level refusals: gated, not found or private, unknown revision, disabled, bad token."""
    endpoint = constants.ENDPOINT
    has_token = bool(token or get_token())
    if isinstance(exc, hf_errors.GatedRepoError):
        return HubError(f"{what} {repo_id} is a gated repo and "
                        f"{'this token has' if has_token else 'without a token you have'} no access{where}",
                        file=spec, fix=f"accept its conditions at {endpoint}/{repo_id} with your account, then pass "
                                       "that account's token (HF_TOKEN or --token)")
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return HubError(f"{what} {repo_id} was not found on {endpoint}, or it is private and "
                        f"{'this token has no access' if has_token else 'no token was given'}",
                        file=spec, fix="check the repo id; for a private repo pass a token with read access "
                                       "(HF_TOKEN or --token)")
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return HubError(f"{what} {repo_id} has no revision {split_spec(spec)[1]!r}", file=spec,
                        fix="after @ use an existing branch, tag or full commit sha")
    if isinstance(exc, hf_errors.DisabledRepoError):
        return HubError(f"{what} {repo_id} has been disabled on the Hub", file=spec)
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, hf_errors.HfHubHTTPError) and status == 401:
        return HubError(f"the Hub rejected the token for {what} {repo_id}{where}", file=spec,
                        fix="check HF_TOKEN / --token (or unset it for a public repo)")
    return None


def hub_error(exc: BaseException, what: str, spec: str, token: str | None, file: str | None = None
              ) -> StreamMergeError | BaseException:
    """One actionable line for a huggingface_hub exception (unknown ones are returned unchanged)."""
    repo_id, _ = split_spec(spec)
    where = f" ({file})" if file else ""
    root = _root(exc)
    found = _access_error(root, what, repo_id, spec, token, where)
    if found is not None:
        return found
    offline_miss = isinstance(root, (hf_errors.OfflineModeIsEnabled, hf_errors.LocalEntryNotFoundError))
    if offline_miss and constants.HF_HUB_OFFLINE:
        return HubError(f"{what} {repo_id}{where} is not in the HF cache and HF_HUB_OFFLINE=1 is set", file=spec,
                        fix="run once online, or unset HF_HUB_OFFLINE")
    if is_transient(exc):
        return HubError(f"cannot reach the Hub at {constants.ENDPOINT} for {what} {repo_id}{where} "
                        f"({short_error(root)})", file=spec,
                        fix="check the network and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the HF cache; "
                            "re-running resumes")
    if isinstance(root, hf_errors.EntryNotFoundError):
        return HubError(f"{what} {repo_id} has no file {file or ''} at this revision", file=spec)
    if isinstance(root, hf_errors.HfHubHTTPError):
        status = getattr(getattr(root, "response", None), "status_code", None)
        return HubError(f"the Hub answered HTTP {status} for {what} {repo_id}{where}: {short_error(root)}",
                        file=spec, fix="retry later; re-running resumes")
    if isinstance(exc, hf_errors.LocalEntryNotFoundError):  # a HEAD that failed for a reason we do not know
        return HubError(f"cannot locate {what} {repo_id}{where} on {constants.ENDPOINT} ({short_error(exc)})",
                        file=spec, fix="check the network and HF_ENDPOINT; re-running resumes")
    return exc


def call_with_retries(fn: Callable[[], T], describe: Callable[[BaseException], BaseException], label: str,
                      attempts: int = ATTEMPTS) -> T:
    """Run `fn`, retrying transient failures `attempts` times in all (waits 1, 2, 4 s) and while the call has
    been failing for less than RETRY_BUDGET_S; any other failure, or the last transient one, is raised as
    `describe(exc)`. Together with the client's timeouts (`hub_http`) this bounds every Hub call: a server
    that never answers costs at most `attempts` read timeouts plus the waits, or the budget."""
    start = time.monotonic()
    for attempt in range(attempts):
        try:
            return fn()
        except StreamMergeError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            in_budget = time.monotonic() - start + RETRY_WAIT_S * 2**attempt < RETRY_BUDGET_S
            if attempt + 1 < attempts and in_budget and is_transient(exc):
                wait = RETRY_WAIT_S * 2**attempt
                log.warning("%s: %s; retrying in %.0f s", label, short_error(_root(exc)), wait)
                time.sleep(wait)
                continue
            raise describe(exc) from exc
    raise AssertionError("unreachable")
