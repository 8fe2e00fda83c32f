"""``side_by_side``: jobs that write different files run at once, and a failure waits for all."""

from __future__ import annotations

import threading
import time

import pytest

from audit_platform.faults import SimulatedCrash
from audit_platform.staging.store import WRITERS, side_by_side


def test_jobs_run_at_once_and_results_keep_their_order() -> None:
    # Each job waits until all of them have started: run one after another, the first would
    # wait for the barrier forever (its timeout fails the test).
    jobs = 4
    assert jobs <= WRITERS
    barrier = threading.Barrier(jobs, timeout=10)

    def job(value: int) -> int:
        barrier.wait()
        return value * 10

    assert side_by_side(lambda v=v: job(v) for v in range(jobs)) == [0, 10, 20, 30]


def test_a_failure_is_raised_only_after_every_job_has_ended() -> None:
    ended: list[str] = []

    def fails() -> None:
        raise SimulatedCrash("simulated crash in a write")

    def slow() -> None:
        time.sleep(0.3)
        ended.append("slow")

    with pytest.raises(SimulatedCrash):
        side_by_side([fails, slow, slow])
    # A write that went on behind the caller's back would land after a restart had begun.
    assert ended == ["slow", "slow"]


def test_the_first_failure_in_job_order_is_raised() -> None:
    def error(message: str) -> None:
        time.sleep(0.2 if message == "first" else 0)
        raise ValueError(message)

    with pytest.raises(ValueError, match="first"):
        side_by_side([lambda: error("first"), lambda: error("second")])


def test_one_job_runs_in_the_callers_thread() -> None:
    assert side_by_side([threading.current_thread]) == [threading.current_thread()]
    assert side_by_side([]) == []
