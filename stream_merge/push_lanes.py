"""Two stages on two threads, strictly in hand-over order: the pusher's LFS upload of the next shards runs
while the commit of the shards uploaded before them runs, so the upload link does not idle during a commit.

Items handed over (`put`) go to the first stage in batches (everything waiting when it gets to them, one
call); each batch's result goes to the second stage, which takes every result waiting and makes one call of
them, in order. A failure in either stage is kept (`error`), stops both stages (items not yet through are
dropped, never half processed) and is raised to the caller by `check`, `put` or `join`.

Backpressure (`max_pending`, for a merge that deletes each shard from disk once it is committed): `put` waits
while more than `max_pending` items are handed over and not through the first stage, or more than
`max_pending + 1` are handed over and not through the second. The first bound is the one the pusher always
had (the merge waits while too many shards wait for their upload; the next shard is always queued, so the
upload never starves); the second lets at most one item more than before wait on disk: the one being
committed, or uploaded and waiting for that commit. Without it, fast uploads and slow commits would let
uploaded shards pile up.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
U = TypeVar("U")
Q = TypeVar("Q")


def _take(q: queue.Queue[Q | None]) -> tuple[list[Q], bool]:
    """Wait for one entry of `q`, then take every entry waiting: (entries, whether the end mark came)."""
    first = q.get()
    if first is None:
        return [], True
    items = [first]
    while True:
        try:
            nxt = q.get_nowait()
        except queue.Empty:
            return items, False
        if nxt is None:
            return items, True
        items.append(nxt)


class Lanes(Generic[T, U]):
    """`first(batch of T) -> list of U` then `second(list of U)`, each on a thread of its own, in order."""

    def __init__(self, first: Callable[[list[T]], list[U]], second: Callable[[list[U]], None], *,
                 max_pending: int | None, name: str) -> None:
        self._first, self._second = first, second
        self.max_pending = max_pending  # None: `put` never waits
        self._name = name
        self._q1: queue.Queue[T | None] = queue.Queue()
        self._q2: queue.Queue[tuple[int, list[U]] | None] = queue.Queue()
        self._cond = threading.Condition()
        self.before_first = 0  # handed over, not through the first stage yet
        self.before_second = 0  # handed over, not through the second stage yet (the first's included)
        self.error: BaseException | None = None
        self._threads: list[threading.Thread] = []

    def put(self, item: T) -> None:
        """Hand `item` over; with `max_pending`, wait while too many items are not through (see the module)."""
        self.check()
        if not self._threads:
            self._threads = [threading.Thread(target=run, name=f"{self._name}-{stage}", daemon=True)
                             for run, stage in ((self._run_first, "upload"), (self._run_second, "commit"))]
            for t in self._threads:
                t.start()
        with self._cond:
            self.before_first += 1
            self.before_second += 1
        self._q1.put(item)
        if self.max_pending is not None:
            with self._cond:
                self._cond.wait_for(self._may_go_on)
        self.check()

    def _may_go_on(self) -> bool:
        m = self.max_pending
        assert m is not None
        return self.error is not None or (self.before_first <= m and self.before_second <= m + 1)

    def check(self) -> None:
        """Raise a stage's error, if any (the merge stops early instead of filling the disk)."""
        if self.error is not None:
            raise self.error

    def join(self) -> None:
        """Let both stages finish what was handed over, end their threads, then raise a stage's error."""
        if self._threads:
            self._q1.put(None)
            for t in self._threads:
                t.join()
            self._threads = []
        self.check()

    def close(self) -> None:
        """End the threads once they are through what was handed over, without waiting for them."""
        if self._threads:
            self._q1.put(None)
            self._threads = []

    # ------------------------------------------------------------------ the two threads
    def _run_first(self) -> None:
        ending = False
        while not ending:
            batch, ending = _take(self._q1)
            if not batch:
                continue
            out: list[U] | None = None
            try:
                if self.error is None:
                    out = self._first(batch)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller by check()
                self._fail(exc)
            if out is not None and self.error is None:
                self._q2.put((len(batch), out))
                self._passed(len(batch), 0)
            else:
                self._passed(len(batch), len(batch))
        self._q2.put(None)

    def _run_second(self) -> None:
        ending = False
        while not ending:
            batches, ending = _take(self._q2)
            if not batches:
                continue
            try:
                if self.error is None:
                    self._second([u for _, out in batches for u in out])
            except BaseException as exc:  # noqa: BLE001 - handed to the caller by check()
                self._fail(exc)
            finally:
                self._passed(0, sum(n for n, _ in batches))

    def _passed(self, first: int, second: int) -> None:
        with self._cond:
            self.before_first -= first
            self.before_second -= second
            self._cond.notify_all()

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self.error is None:
                self.error = exc
            self._cond.notify_all()
