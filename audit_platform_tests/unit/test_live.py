"""The pacer that shares a live run's batch budget among its busy sources (pure logic)."""

from __future__ import annotations

from audit_platform.live import FlushPacer


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
