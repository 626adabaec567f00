"""push_lanes.Lanes on its own (no Hub): two stages in hand-over order, the first running while the second is
busy, errors of either stage stopping both, and the merge's wait bounds (`max_pending`)."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import wait_until

from stream_merge.push_lanes import Lanes

WAIT_S = 30.0  # a bound on every wait of these tests, so a broken pipeline fails instead of hanging



class Gated:
    """Stage functions that wait, per item, for the test to open its gate; they record what they saw."""

    def __init__(self) -> None:
        self.first_gates: dict[int, threading.Event] = {}
        self.second_gates: dict[int, threading.Event] = {}
        self.firsts: list[list[int]] = []
        self.seconds: list[list[int]] = []

    def gate(self, gates: dict[int, threading.Event], item: int) -> threading.Event:
        return gates.setdefault(item, threading.Event())

    def first(self, batch: list[int]) -> list[int]:
        self.firsts.append(list(batch))
        for x in batch:
            assert self.gate(self.first_gates, x).wait(WAIT_S)
        return [x * 10 for x in batch]

    def second(self, items: list[int]) -> None:
        self.seconds.append(list(items))
        for x in items:
            assert self.gate(self.second_gates, x // 10).wait(WAIT_S)

    def open_first(self, *items: int) -> None:
        for x in items:
            self.gate(self.first_gates, x).set()

    def open_second(self, *items: int) -> None:
        for x in items:
            self.gate(self.second_gates, x).set()


def _put_on_thread(lanes: Lanes, item: int) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            lanes.put(item)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors


def test_items_go_through_both_stages_in_hand_over_order() -> None:
    firsts: list[int] = []
    seconds: list[int] = []

    def first(batch: list[int]) -> list[int]:
        firsts.extend(batch)
        return [x * 10 for x in batch]

    lanes: Lanes[int, int] = Lanes(first, seconds.extend, max_pending=None, name="t")
    for i in range(50):
        lanes.put(i)
    lanes.join()
    assert firsts == list(range(50)) and seconds == [10 * i for i in range(50)]
    assert lanes.before_first == 0 and lanes.before_second == 0


def test_the_first_stage_of_the_next_item_runs_while_the_second_stage_is_busy() -> None:
    g = Gated()
    lanes: Lanes[int, int] = Lanes(g.first, g.second, max_pending=None, name="t")
    g.open_first(1, 2)
    lanes.put(1)
    wait_until(lambda: g.seconds == [[10]], "item 1 in the second stage")
    lanes.put(2)
    wait_until(lambda: g.firsts == [[1], [2]] and lanes.before_first == 0, "item 2 through the first stage")
    assert g.seconds == [[10]]  # item 1's second stage is still running (its gate is closed)
    g.open_second(1, 2)
    lanes.join()
    assert g.seconds == [[10], [20]]


def test_results_waiting_for_the_second_stage_go_together_in_order() -> None:
    g = Gated()
    lanes: Lanes[int, int] = Lanes(g.first, g.second, max_pending=None, name="t")
    g.open_first(1, 2, 3, 4)
    lanes.put(1)
    wait_until(lambda: g.seconds == [[10]], "item 1 in the second stage")
    for i in (2, 3, 4):
        lanes.put(i)
        wait_until(lambda: lanes.before_first == 0, f"item {i} through the first stage")
    g.open_second(1, 2, 3, 4)
    lanes.join()
    assert g.seconds == [[10], [20, 30, 40]]


def test_a_first_stage_error_stops_both_stages_and_is_raised() -> None:
    seconds: list[int] = []

    def first(batch: list[int]) -> list[int]:
        if 2 in batch:
            raise ValueError("upload of 2 failed")
        return batch

    lanes: Lanes[int, int] = Lanes(first, seconds.extend, max_pending=None, name="t")
    lanes.put(1)
    wait_until(lambda: seconds == [1], "item 1 through both stages")
    lanes.put(2)
    wait_until(lambda: lanes.error is not None, "the error")
    with pytest.raises(ValueError, match="upload of 2"):
        lanes.put(3)  # refused: nothing more is handed over
    with pytest.raises(ValueError, match="upload of 2"):
        lanes.join()
    assert seconds == [1] and lanes.before_first == 0 and lanes.before_second == 0


def test_a_second_stage_error_stops_both_stages_and_is_raised() -> None:
    firsts: list[int] = []

    def first(batch: list[int]) -> list[int]:
        firsts.extend(batch)
        return batch

    def second(items: list[int]) -> None:
        raise OSError(f"commit of {items} failed")

    lanes: Lanes[int, int] = Lanes(first, second, max_pending=None, name="t")
    lanes.put(1)
    wait_until(lambda: lanes.error is not None, "the error")
    with pytest.raises(OSError, match=r"commit of \[1\] failed"):
        lanes.put(2)
    with pytest.raises(OSError, match=r"commit of \[1\] failed"):
        lanes.join()
    assert firsts == [1]


def test_a_waiting_put_is_woken_by_an_error() -> None:
    def first(batch: list[int]) -> list[int]:
        time.sleep(0.05)
        raise ValueError("upload failed")

    lanes: Lanes[int, int] = Lanes(first, lambda items: None, max_pending=1, name="t")
    lanes.put(1)  # one not uploaded: no wait
    t, errors = _put_on_thread(lanes, 2)  # two not uploaded: waits, until the error
    t.join(WAIT_S)
    assert not t.is_alive() and len(errors) == 1 and isinstance(errors[0], ValueError)


def test_put_waits_for_the_upload_bound_then_for_the_commit_bound() -> None:
    """max_pending=1: a put waits while two items are not through the first stage (the old bound), and while
    three are not through the second (one more on disk than before: the one being committed)."""
    g = Gated()
    lanes: Lanes[int, int] = Lanes(g.first, g.second, max_pending=1, name="t")
    lanes.put(1)  # returns at once: one item before the first stage
    wait_until(lambda: g.firsts == [[1]], "item 1 in the first stage, alone")
    t2, err2 = _put_on_thread(lanes, 2)
    t2.join(0.2)
    assert t2.is_alive()  # two items not uploaded
    g.open_first(1)
    t2.join(WAIT_S)
    assert not t2.is_alive() and not err2
    wait_until(lambda: g.seconds == [[10]], "item 1 in the second stage")  # ... and stays there (gate closed)
    t3, err3 = _put_on_thread(lanes, 3)
    g.open_first(2, 3)
    wait_until(lambda: lanes.before_first == 0, "items 2 and 3 through the first stage")
    t3.join(0.2)
    assert t3.is_alive() and lanes.before_second == 3  # the commit bound holds it: 1 committing, 2 and 3 waiting
    g.open_second(1)
    t3.join(WAIT_S)
    assert not t3.is_alive() and not err3
    g.open_second(2, 3)
    lanes.join()
    assert [x for b in g.seconds for x in b] == [10, 20, 30]
