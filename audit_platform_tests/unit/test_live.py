"""A live run's shared budgets (pure logic): the pacer that shares batches among its busy
sources, and the lanes that bound how many workers compute at once."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest

from audit_platform import live
from audit_platform.live import FlushPacer, Lane, TurnRequest, Turns


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


def _request(name: str, turn_failed: bool = False) -> TurnRequest:
    settings = SimpleNamespace(grace=timedelta(minutes=10), trail=True)
    worker = SimpleNamespace(name=name, turn_failed=turn_failed, settings=settings)
    return TurnRequest(worker=worker, policy=None, database="db", resolve=False, client=None)  # type: ignore[arg-type]


def test_a_turn_serves_every_worker_that_waited_for_it_at_once():
    """Requests queued while the lane is busy are served together by the first of their
    workers that finds it free; each returns once its own was served."""
    turns = Turns(1)
    turns_served: list[list[str]] = []
    busy, go = threading.Event(), threading.Event()

    def serve(batch, keepalive) -> None:
        turns_served.append([r.worker.name for r in batch])
        if batch[0].worker.name == "first":
            busy.set()
            go.wait(5)

    threads = [threading.Thread(target=turns.take, args=(_request("first"), serve))]
    threads[0].start()
    busy.wait(5)
    for name in ("second", "third", "fourth"):
        threads.append(threading.Thread(target=turns.take, args=(_request(name), serve)))
        threads[-1].start()
        _until(lambda: turns.waiting == len(threads) - 1)
    go.set()
    for thread in threads:
        thread.join(5)
    # One turn for the three: served by whichever of them woke first, its own request first.
    assert turns_served[0] == ["first"] and len(turns_served) == 2
    assert sorted(turns_served[1]) == ["fourth", "second", "third"]
    assert turns.waiting == 0


def test_a_request_whose_turn_failed_raises_in_its_own_worker():
    turns = Turns(1)
    failing = _request("broken")

    def serve(batch, keepalive) -> None:
        for request in batch:
            request.error = ValueError(f"{request.worker.name} cannot be enriched")

    with pytest.raises(ValueError, match="broken cannot be enriched"):
        turns.take(failing, serve)
    assert failing.done and turns.waiting == 0


def test_a_failed_turn_of_many_is_served_again_one_source_at_a_time(monkeypatch):
    """One source whose batch cannot be enriched fails alone: the turn it spoiled is served
    again per source, and the others' requests succeed."""
    turns: list[list[str]] = []

    def turn(batch, keepalive) -> None:
        turns.append([r.worker.name for r in batch])
        if any(r.worker.name == "broken" for r in batch):
            raise ValueError("unreadable staged file")
        for request in batch:  # as ``live._turn`` ends for each source it served
            request.held, request.worker.turn_failed = True, False

    monkeypatch.setattr(live, "_turn", turn)
    batch = [_request(name) for name in ("north", "broken", "south")]
    live.serve_turn(batch, None)
    assert turns == [["north", "broken", "south"], ["north"], ["broken"], ["south"]]
    assert [(r.held, r.error is None) for r in batch] == [
        (True, True),
        (False, False),
        (True, True),
    ]


def test_turns_on_two_lanes_lose_no_lane_when_a_request_was_served_by_another():
    """Workers whose requests another turn took find a lane free and must not keep it: six
    workers taking turns on two lanes, a hundred and twenty times in all, all finish and
    both lanes are free again (a lane taken for an empty turn was never given back)."""
    turns = Turns(2)
    sizes: list[int] = []

    def serve(batch, keepalive) -> None:
        sizes.append(len(batch))
        time.sleep(0.002)

    def worker(name: str) -> None:
        for _ in range(20):
            turns.take(_request(name), serve, every=0.01)

    threads = [threading.Thread(target=worker, args=(f"w{n}",), daemon=True) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert (turns.free, turns.waiting, sum(sizes)) == (2, 0, 120)
    assert max(sizes) > 1  # some turns served several workers


def test_a_worker_whose_stream_fails_while_waiting_leaves_the_queue():
    """Its keepalive fails while both lanes are busy: it leaves the queue with its stream's
    error, and the turn that comes later does not serve it."""
    turns, go, served = Turns(1), threading.Event(), []

    def serve(batch, keepalive) -> None:
        served.extend(r.worker.name for r in batch)
        go.wait(5)

    first = threading.Thread(target=turns.take, args=(_request("first"), serve))
    first.start()
    _until(lambda: served == ["first"])

    def broken() -> None:
        raise ConnectionError("stream lost")

    with pytest.raises(ConnectionError, match="stream lost"):
        turns.take(_request("second"), serve, broken, every=0.01)
    go.set()
    first.join(5)
    assert served == ["first"] and turns.waiting == 0 and turns.free == 1


def test_a_worker_serves_only_turns_that_hold_its_own_request():
    """A worker whose request another turn holds waits for it, and does not take the lane
    that frees meanwhile for others' requests (it would serve them while its stream waits,
    and a crash in that turn would end it with its own request still being served). Which
    waiting thread wakes first is the scheduler's choice: the scene is played eight times."""
    for _ in range(8):
        served = _two_lanes_freed_while_a_pair_is_served()
        assert served[3] == ("c", ["c"])
        assert all(server in names for server, names in served)


def _two_lanes_freed_while_a_pair_is_served() -> list[tuple[str, list[str]]]:
    turns = Turns(2)
    gates = {name: threading.Event() for name in ("x", "y", "pair")}
    served: list[tuple[str, list[str]]] = []

    def serve(batch, keepalive) -> None:
        names = [r.worker.name for r in batch]
        served.append((threading.current_thread().name, names))
        gate = "pair" if len(names) == 2 else names[0]
        if gate in gates:
            gates[gate].wait(5)

    def start(name: str) -> threading.Thread:
        thread = threading.Thread(target=turns.take, args=(_request(name), serve), name=name)
        thread.start()
        return thread

    threads = [start("x"), start("y")]
    _until(lambda: len(served) == 2)  # both lanes busy
    threads += [start("a"), start("b")]
    _until(lambda: turns.waiting == 2)
    gates["x"].set()  # a lane frees: a or b serves both
    _until(lambda: len(served) == 3 and len(served[2][1]) == 2)
    threads.append(start("c"))
    _until(lambda: turns.waiting == 1)
    gates["y"].set()  # the other lane frees while the pair's turn goes on
    _until(lambda: len(served) == 4)
    gates["pair"].set()
    for thread in threads:
        thread.join(5)
    return served


def test_a_schema_problem_makes_the_source_unhealthy_and_says_the_fix():
    status = live.SourceStatus("shop", state="live")
    assert status.healthy and status.problem is None
    status.schema_problems = status.after_schema(
        {"public.b": "b lost its key", "public.a": "a: REPLICA IDENTITY", "public.c": None}
    )
    assert status.schema_problems == {
        "public.b": "b lost its key",
        "public.a": "a: REPLICA IDENTITY",
    }
    assert not status.healthy
    assert status.problem == "a: REPLICA IDENTITY; b lost its key"
    status.error = "OperationalError: down"
    assert status.problem == "OperationalError: down; a: REPLICA IDENTITY; b lost its key"
    # A later change of a table replaces its problem; one that fixes it removes it.
    assert status.after_schema({"public.a": None, "public.b": "b: no key"}) == {
        "public.b": "b: no key"
    }
