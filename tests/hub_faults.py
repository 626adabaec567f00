"""Fault injection for the test Hub server (``hub_server.py`` speaks the protocol; this module breaks it).

``FaultInjection`` is mixed into ``HubServer``: ``add_fault`` and the shortcuts ``drop``, ``corrupt``, ``fail``,
``wrong_etag``, ``delay``, ``ignore_range`` and ``hold`` apply to requests whose path matches a pattern, optionally for
the first N matching requests only. The request handler asks ``take_faults`` which faults a request gets and
passes its response body through ``faulty_body``. ``TokenBucket`` limits the bandwidth of one direction (the
server keeps one for downloads and one for uploads, each shared by all connections, as a full-duplex link). ``silent_server`` is a socket that accepts connections and
never answers (a hung Hub or proxy).
"""

from __future__ import annotations

import contextlib
import fnmatch
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

KINDS = ("drop", "corrupt", "status", "wrong_etag", "delay", "ignore_range", "hold")


@dataclass
class Fault:
    """A fault applied to requests whose path matches ``pattern``.

    kind: ``"drop"`` (close the connection after ``after_bytes`` body bytes; ``None`` = before the status
    line), ``"corrupt"`` (flip one byte every ``every`` bytes of the body, size unchanged), ``"status"``
    (answer ``status``, default 503), ``"wrong_etag"`` (ETag/X-Linked-Etag that do not match the content),
    ``"delay"`` (sleep ``seconds`` before answering), ``"ignore_range"`` (answer a range request with the whole
    file and a 200, as some proxies do), ``"hold"`` (send ``after_bytes`` body bytes, then wait until the test sets
``released``, at most a minute, and send the rest). ``times``: only the first N matching requests (``None`` = all).
    ``methods``: defaults to GET for drop/corrupt/ignore_range, to every method otherwise. ``pattern``: a glob
    (``fnmatch``) if it contains ``*?[``, else a substring, tested against the decoded path; or a callable
    ``(method, path) -> bool``.
    """

    pattern: str | Callable[[str, str], bool]
    kind: str
    times: int | None = None
    methods: frozenset[str] | None = None
    after_bytes: int | None = 0
    status: int = 503
    seconds: float = 0.0
    every: int = 1024
    hits: int = 0
    released: threading.Event = field(default_factory=threading.Event)
    held: threading.Event = field(default_factory=threading.Event)  # a body reached the hold

    def matches(self, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.times is not None and self.hits >= self.times:
            return False
        if callable(self.pattern):
            return bool(self.pattern(method, path))
        if any(c in self.pattern for c in "*?["):
            return fnmatch.fnmatchcase(path, self.pattern)
        return self.pattern in path


class FaultInjection:
    """The fault registry of a server (thread-safe)."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._fault_lock = threading.Lock()

    def add_fault(self, pattern: str | Callable[[str, str], bool], kind: str, *, times: int | None = None,
                  methods: Iterable[str] | None = None, after_bytes: int | None = 0, status: int = 503,
                  seconds: float = 0.0, every: int = 1024) -> Fault:
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        if methods is None and kind in ("drop", "corrupt", "ignore_range", "hold"):
            methods = ("GET",)
        fault = Fault(pattern=pattern, kind=kind, times=times,
                      methods=frozenset(m.upper() for m in methods) if methods is not None else None,
                      after_bytes=after_bytes, status=status, seconds=seconds, every=max(1, every))
        with self._fault_lock:
            self._faults.append(fault)
        return fault

    def drop(self, pattern, after_bytes: int | None, *, times: int | None = 1, methods=None) -> Fault:
        """Close the connection after ``after_bytes`` body bytes (``None``: before any response)."""
        return self.add_fault(pattern, "drop", after_bytes=after_bytes, times=times, methods=methods)

    def corrupt(self, pattern, *, times: int | None = None, every: int = 1024, methods=None) -> Fault:
        """Serve the right number of bytes, with one byte flipped every ``every`` bytes."""
        return self.add_fault(pattern, "corrupt", times=times, every=every, methods=methods)

    def fail(self, pattern, status: int = 503, *, times: int | None = 1, methods=None) -> Fault:
        return self.add_fault(pattern, "status", status=status, times=times, methods=methods)

    def wrong_etag(self, pattern, *, times: int | None = None, methods=None) -> Fault:
        return self.add_fault(pattern, "wrong_etag", times=times, methods=methods)

    def delay(self, pattern, seconds: float, *, times: int | None = None, methods=None) -> Fault:
        return self.add_fault(pattern, "delay", seconds=seconds, times=times, methods=methods)

    def ignore_range(self, pattern, *, times: int | None = None, methods=None) -> Fault:
        """Answer range requests with the whole file (200), like a proxy that does not support ranges."""
        return self.add_fault(pattern, "ignore_range", times=times, methods=methods)

    def hold(self, pattern, after_bytes: int, *, times: int | None = 1, methods=None) -> Fault:
        """Send ``after_bytes`` body bytes, then wait for ``fault.released.set()`` before the rest."""
        return self.add_fault(pattern, "hold", after_bytes=after_bytes, times=times, methods=methods)

    def clear_faults(self) -> None:
        with self._fault_lock:
            self._faults.clear()

    def take_faults(self, method: str, path: str) -> list[Fault]:
        """The faults a request gets (each counts the hit)."""
        taken = []
        with self._fault_lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    fault.hits += 1
                    taken.append(fault)
        return taken


def faulty_body(chunks: Iterable[bytes], faults: Iterable[Fault], on_drop: Callable[[bytes], None]
                ) -> Iterator[bytes]:
    """The body ``chunks`` with the faults applied: corrupted bytes, and at a ``drop`` fault's byte count
    ``on_drop(last part)`` (which writes that part and closes the connection)."""
    drop_at = None
    corrupt_every = None
    holds = [f for f in faults if f.kind == "hold"]
    for fault in faults:
        if fault.kind == "drop" and fault.after_bytes is not None:
            drop_at = fault.after_bytes if drop_at is None else min(drop_at, fault.after_bytes)
        elif fault.kind == "corrupt":
            corrupt_every = fault.every
    pos = 0
    for chunk in chunks:
        if not chunk:
            continue
        if corrupt_every is not None:
            buf = bytearray(chunk)
            for i in range((-pos) % corrupt_every, len(buf), corrupt_every):
                buf[i] ^= 0xFF
            chunk = bytes(buf)
        if drop_at is not None and pos + len(chunk) >= drop_at:
            on_drop(chunk[: drop_at - pos])
        for hold in holds:
            if pos <= (hold.after_bytes or 0) < pos + len(chunk):
                cut = (hold.after_bytes or 0) - pos
                yield chunk[:cut]
                hold.held.set()
                hold.released.wait(60)
                chunk, pos = chunk[cut:], pos + cut
        yield chunk
        pos += len(chunk)


class TokenBucket:
    """A bandwidth limit of ``rate`` bytes/s shared by every caller of ``take``.

    Debt-based: ``take(n)`` takes its n tokens at once (the balance may go negative) and then sleeps until the
    balance it left is paid back, so concurrent callers are served in turn and the long-run total is at most
    ``rate`` plus one ``burst``. ``clock`` and ``sleep`` are injectable so tests can use a fake clock.
    """

    def __init__(self, rate: float, burst: float | None = None, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(256 * 1024.0, self.rate / 20)
        self._clock, self._sleep = clock, sleep
        self._tokens = self.burst
        self._last = clock()
        self._lock = threading.Lock()

    def take(self, n: int) -> float:
        """Account for ``n`` bytes; returns the seconds slept."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate) - n
            self._last = now
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """An endpoint (``http://127.0.0.1:PORT``) whose socket accepts connections (the kernel completes the
    handshake) and never reads or answers: every request waits until the client gives up."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()
