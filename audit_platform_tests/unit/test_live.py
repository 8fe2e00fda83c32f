"""A live run's shared budgets (pure logic): the pacer that shares batches among its busy
sources, and the lanes that bound how many workers compute at once."""

from __future__ import annotations

import threading
import time

import pytest

from audit_platform.live import FlushPacer, Lane


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_busy_source_flushes_at_the_floor():
    clock = Clock()
    pacer = FlushPacer(0.5, 20, clock=clock)
    assert pacer.interval() == 0.5
    pacer.batched("busy")
    assert pacer.interval() == 0.5


def test_many_busy_sources_share_the_budget_and_quiet_ones_cost_nothing():
    clock = Clock()
    pacer = FlushPacer(0.5, 20, window=10, clock=clock)
    for n in range(50):
        pacer.batched(f"s{n:02d}")
    assert pacer.interval() == 2.5  # 50 sources, 20 batches a second together
    clock.now += 9
    for n in range(10):
        pacer.batched(f"s{n:02d}")
    assert pacer.interval() == 2.5  # the others batched 9 s ago: still busy
    clock.now += 2
    assert pacer.interval() == 0.5  # only ten left busy: 10 / 20 is under the floor


def _waiter(lane: Lane, name: str, served: list[str], release: threading.Event, **held):
    def run() -> None:
        with lane.held(**held):
            served.append(name)
            release.wait(5)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _until(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_lane_serves_waiters_in_the_order_they_came_even_while_they_keep_alive():
    """The oldest waiter is served first, although each woke many times to keep its stream
    alive meanwhile (a polled semaphore sent it behind later ones at each wake-up)."""
    lane, served, go = Lane(1), [], threading.Event()
    keepalives: dict[str, int] = {}

    def keepalive(name: str):
        return lambda: keepalives.__setitem__(name, keepalives.get(name, 0) + 1)

    with lane.held():
        threads = []
        for name in ("first", "second", "third"):
            threads.append(_waiter(lane, name, served, go, keepalive=keepalive(name), every=0.01))
            _until(lambda: lane.waiting == len(threads))
        time.sleep(0.1)  # each has woken several times
    go.set()
    for thread in threads:
        thread.join()
    assert served == ["first", "second", "third"]
    assert all(keepalives[name] >= 3 for name in ("first", "second", "third")), keepalives
    assert lane.waiting == 0


def test_a_lane_with_two_slots_serves_two_at_once():
    lane, served, go = Lane(2), [], threading.Event()
    threads = [_waiter(lane, name, served, go) for name in ("a", "b")]
    _until(lambda: len(served) == 2)
    third = _waiter(lane, "c", served, go)
    _until(lambda: lane.waiting == 1)
    go.set()
    for thread in [*threads, third]:
        thread.join()
    assert sorted(served) == ["a", "b", "c"]


def test_a_waiter_whose_keepalive_fails_leaves_the_queue_and_loses_no_slot():
    lane, served, go = Lane(1), [], threading.Event()

    def broken() -> None:
        raise ConnectionError("stream lost")

    failed: list[BaseException] = []

    def run() -> None:
        try:
            with lane.held(keepalive=broken, every=0.01):
                served.append("broken")
        except ConnectionError as exc:
            failed.append(exc)

    with lane.held():
        thread = threading.Thread(target=run)
        thread.start()
        thread.join(5)
    assert failed and served == [] and lane.waiting == 0
    # The slot is free again: two more are served one after the other.
    threads = [_waiter(lane, name, served, go) for name in ("x", "y")]
    go.set()
    for t in threads:
        t.join()
    assert sorted(served) == ["x", "y"]


def test_a_lane_needs_a_slot():
    with pytest.raises(ValueError, match="at least one slot"):
        Lane(0)
