"""``Writers.side_by_side``: jobs that write different files run at once, and a failure is
raised only once every job has ended."""

from __future__ import annotations

import threading
import time

import pytest

from audit_platform.faults import SimulatedCrash
from audit_platform.staging.writers import Writers

writers = Writers(4, "test-writer")


def test_jobs_run_at_once_and_results_keep_their_order() -> None:
    # Each job waits until all of them have started (run one after another, the first would
    # wait for the barrier until its timeout), then they end in the reverse order.
    barrier = threading.Barrier(writers.threads, timeout=10)

    def job(value: int) -> int:
        barrier.wait()
        time.sleep(0.05 * (writers.threads - value))
        return value * 10

    found = writers.side_by_side(lambda v=v: job(v) for v in range(writers.threads))
    assert found == [0, 10, 20, 30]


def test_a_failure_is_raised_only_after_every_job_has_ended() -> None:
    ended: list[str] = []

    def fails() -> None:
        raise OSError("disk full")

    def slow() -> None:
        time.sleep(0.3)
        ended.append("slow")

    with pytest.raises(OSError, match="disk full"):
        writers.side_by_side([fails, slow, slow])
    # A write that went on behind the caller's back would land after a restart had begun.
    assert ended == ["slow", "slow"]


def test_the_first_failure_in_job_order_is_raised() -> None:
    def error(message: str) -> None:
        time.sleep(0.2 if message == "first" else 0)
        raise ValueError(message)

    with pytest.raises(ValueError, match="first"):
        writers.side_by_side([lambda: error("first"), lambda: error("second")])


def test_a_crash_is_raised_before_an_error_beside_it() -> None:
    # Raised as an error, a simulated crash (or an interrupt) would be retried as one.
    def error() -> None:
        raise OSError("disk full")

    def crash() -> None:
        raise SimulatedCrash("simulated crash in a write")

    with pytest.raises(SimulatedCrash):
        writers.side_by_side([error, crash])


def test_a_job_that_writes_side_by_side_itself_writes_in_its_own_thread() -> None:
    # Queued for the shared threads instead, jobs that wait for their own writes could hold
    # every thread while those writes wait for one: a hang.
    def outer() -> bool:
        me = threading.current_thread()
        return writers.side_by_side([threading.current_thread] * 2) == [me, me]

    assert writers.side_by_side([outer, outer]) == [True, True]


def test_one_job_runs_in_the_callers_thread() -> None:
    assert writers.side_by_side([threading.current_thread]) == [threading.current_thread()]
    assert writers.side_by_side([]) == []
