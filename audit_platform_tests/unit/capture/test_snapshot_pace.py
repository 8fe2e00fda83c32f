"""When a paced snapshot writes its next chunk (pure logic: the backlog is given, the clock is
the test's)."""

from __future__ import annotations

import pytest

from audit_platform.capture.snapshot import SnapshotError
from audit_platform.capture.snapshot_pace import POLL_SECONDS, REPORT_SECONDS, Backlog, PipelinePace
from audit_platform.staging import StagingStore


class Scripted(PipelinePace):
    """A pace whose backlog follows a script, one entry per look; the last repeats."""

    def __init__(self, tmp_path, script: list[Backlog], **kw) -> None:
        super().__init__(StagingStore(str(tmp_path), "test", "shop"), "slot", **kw)
        self.script, self.now, self.looks = script, 0.0, 0
        self.clock = lambda: self.now
        self.sleep = self._sleep

    def _sleep(self, seconds: float) -> None:
        self.now += seconds

    def backlog(self, conn) -> Backlog:
        self.looks += 1
        return self.script[min(self.looks, len(self.script)) - 1]


def test_a_chunk_waits_until_the_last_is_staged_and_the_backlog_is_small(tmp_path):
    pace = Scripted(
        tmp_path,
        [Backlog(0, 90), Backlog(30_000, 100), Backlog(12_000, 130), Backlog(4_000, 160)],
        rows=5_000,
    )
    pace.wait(None, written_lsn=100)  # type: ignore[arg-type]
    assert pace.looks == 4
    assert pace.waited == pytest.approx(3 * POLL_SECONDS)


def test_without_capture_reading_it_goes_on_after_a_short_wait_then_at_once(tmp_path):
    # No capture streams the slot: not deployed yet, or not reading a source just joined.
    pace = Scripted(tmp_path, [Backlog(0, 50, reading=False)], rows=5_000, stage_seconds=2.0)
    pace.wait(None, written_lsn=100)  # type: ignore[arg-type]
    assert 2.0 <= pace.waited < 2.0 + 2 * POLL_SECONDS
    waited = pace.waited
    pace.wait(None, written_lsn=200)  # type: ignore[arg-type]
    assert pace.waited == waited  # the slot has not moved: still nobody reading, no wait
    # Capture starts reading: chunks wait for it again.
    pace.script, pace.looks = [Backlog(0, 150), Backlog(0, 300)], 0
    pace.wait(None, written_lsn=300)  # type: ignore[arg-type]
    assert pace.looks == 2 and pace.waited == pytest.approx(waited + POLL_SECONDS)


def test_a_backlog_that_never_moves_stops_the_snapshot_resumably(tmp_path):
    pace = Scripted(tmp_path, [Backlog(50_000, 500)], rows=5_000, stall_seconds=30)
    with pytest.raises(
        SnapshotError, match=r"has staged and indexed nothing for 30 s.*50,000 staged changes"
    ):
        pace.wait(None, written_lsn=100)  # type: ignore[arg-type]
    assert 30 <= pace.waited < 30 + 2 * POLL_SECONDS


def test_a_slow_backlog_that_moves_is_waited_for_however_long(tmp_path):
    slow = [Backlog(50_000 - n, 500) for n in range(0, 50_000, 100)]  # 100 rows a look
    pace = Scripted(tmp_path, slow, rows=40_000, stall_seconds=5)
    pace.wait(None, written_lsn=100)  # type: ignore[arg-type]
    assert pace.waited > 3 * 5  # far longer than the stall limit: it moved all along


def test_a_slot_that_moves_while_nothing_is_indexed_is_a_stall(tmp_path):
    # Elasticsearch down: capture stages and confirms, the backlog only grows.
    growing = [Backlog(50_000 + 100 * n, 500 + 10 * n) for n in range(1000)]
    pace = Scripted(tmp_path, growing, rows=5_000, stall_seconds=30)
    with pytest.raises(SnapshotError, match="has staged and indexed nothing for 30 s"):
        pace.wait(None, written_lsn=100)  # type: ignore[arg-type]


def test_a_long_wait_is_reported_while_it_lasts(tmp_path):
    seen: list[Backlog] = []
    said: list[str] = []
    slow = [Backlog(50_000 - n, 500) for n in range(0, 50_000, 100)]
    # The bound held at 40,000 (its least and most), whatever rate the wait measures.
    pace = Scripted(tmp_path, slow, rows=40_000, min_rows=40_000, stall_seconds=60)

    def report(found: Backlog, staged: bool) -> None:
        seen.extend([found] if staged else [])
        said.append(pace.describe(found, staged))

    pace.report = report
    pace.wait(None, written_lsn=100)  # type: ignore[arg-type]
    assert pace.waited == pytest.approx(5 * REPORT_SECONDS)  # 100 looks, 100 rows each
    assert len(seen) == 4  # at 10, 20, 30 and 40 s; at 50 it is over
    assert [b.rows for b in seen] == sorted((b.rows for b in seen), reverse=True)
    assert (
        said[0]
        == f"{seen[0].rows:,} staged changes not indexed yet (the next chunk goes at 40,000)"
    )
    assert pace.describe(seen[0], False) == "to read the last chunk"


def test_a_capture_busy_indexing_is_waited_for_not_taken_for_absent(tmp_path):
    # The worker streams the slot but is in a long turn: it stages the chunk after 10 s.
    busy = [Backlog(0, 50)] * 20 + [Backlog(3_000, 150)]
    pace = Scripted(tmp_path, busy, rows=5_000, stage_seconds=2.0, stall_seconds=60)
    pace.wait(None, written_lsn=100)  # type: ignore[arg-type]
    assert pace.waited == pytest.approx(20 * POLL_SECONDS) and pace.absent_at is None


def test_a_capture_that_neither_stages_nor_indexes_is_a_stall(tmp_path):
    stuck = [Backlog(3_000, 50)]  # streaming, never confirming past the chunk
    pace = Scripted(tmp_path, stuck, rows=5_000, stall_seconds=30)
    with pytest.raises(SnapshotError, match="has staged and indexed nothing for 30 s"):
        pace.wait(None, written_lsn=100)  # type: ignore[arg-type]


def draining(start: int, per_look: int, floor: int, confirmed: int = 500) -> list[Backlog]:
    """A busy pipeline: the backlog shrinks by ``per_look`` rows a look down to ``floor``."""
    return [Backlog(max(floor, start - n * per_look), confirmed) for n in range(1000)]


def test_the_bound_is_seconds_of_the_indexing_the_waits_measured(tmp_path):
    # 1,000 rows a look of half a second: the pipeline indexes 2,000 rows/s.
    pace = Scripted(tmp_path, draining(12_000, 1_000, 0), rows=8_000, backlog_seconds=2.0)
    assert (pace.rate, pace.bound(), pace.chunk_limit()) == (None, 8_000, 4_000)
    pace.wait(None, written_lsn=100)  # type: ignore[arg-type]
    # Known after a second of it, the bound is 4,000 from then on: the wait goes on to it.
    assert pace.rate == pytest.approx(2_000) and pace.looks == 9
    assert (pace.bound(), pace.chunk_limit()) == (4_000, 2_000)
    # A faster pipeline: 4,000 rows a look. The rate moves towards it, the older looks
    # weighing less.
    pace.script, pace.looks = draining(20_000, 4_000, 0), 0
    pace.wait(None, written_lsn=100)  # type: ignore[arg-type]
    assert 2_000 < pace.rate < 8_000 and pace.bound() == min(8_000, round(pace.rate * 2.0))


def test_batches_leave_whole_and_a_pause_is_not_slow_indexing(tmp_path):
    batch = [Backlog(9_000, 500)] * 4 + [Backlog(5_000, 500)]  # 4,000 indexed in 2 s
    paused = [Backlog(5_000, 500)] * 20 + [Backlog(1_000, 500)]  # a 10 s handover, then more
    pace = Scripted(tmp_path, batch + paused, rows=8_000)
    pace.wait(None, written_lsn=100)  # type: ignore[arg-type]
    assert pace.rate == pytest.approx(2_000)  # the pause left out
    assert pace.waited == pytest.approx(25 * POLL_SECONDS)  # for 4,000, then for 1,000


def test_live_changes_between_batches_do_not_restart_a_stretch(tmp_path):
    live = [Backlog(6_000, 500), Backlog(6_200, 500), Backlog(6_400, 500), Backlog(2_400, 500)]
    pace = Scripted(tmp_path, live, rows=5_000)
    pace.wait(None, written_lsn=100)  # type: ignore[arg-type]
    assert pace.rate == pytest.approx(4_000 / 1.5)  # one batch, timed from the chunk staged


def test_a_slow_pipeline_keeps_the_least_bound_and_the_most_wins(tmp_path):
    pace = Scripted(tmp_path, draining(10_000, 50, 0), rows=8_000, min_rows=1_000)
    pace.wait(None, written_lsn=100)  # type: ignore[arg-type]
    assert pace.rate == pytest.approx(100) and (pace.bound(), pace.chunk_limit()) == (1_000, 500)
    capped = Scripted(tmp_path, [], rows=150, chunk_rows=60, min_rows=1_000)
    capped.indexed, capped.busy = 100.0, 1.0
    assert (capped.bound(), capped.chunk_limit()) == (150, 60)
    capped.chunk_rows = 4_000
    assert capped.chunk_limit() == 75  # two chunks fit in the bound


def test_only_a_staged_chunk_times_the_indexing(tmp_path):
    # Under the bound at once: nothing measured. A single look of a batch leaving: half a
    # second measured, not enough to know a rate.
    for script in ([Backlog(2_000, 500)], [Backlog(9_000, 500), Backlog(1_000, 500)]):
        pace = Scripted(tmp_path, script, rows=8_000)
        pace.wait(None, written_lsn=100)  # type: ignore[arg-type]
        assert pace.rate is None
    # Before the chunk is staged, its rows are on their way in: indexing then is progress, not
    # a measure.
    unstaged = [Backlog(150_000 - n * 10_000, 90) for n in range(10)]  # 20,000 a second
    staged = [Backlog(12_000 - n * 1_000, 150) for n in range(9)]  # to 4,000, 2,000 a second
    pace = Scripted(tmp_path, unstaged + staged, rows=8_000)
    pace.wait(None, written_lsn=100)  # type: ignore[arg-type]
    assert pace.rate == pytest.approx(2_000 / 1.0)


def test_indexing_under_live_load_is_progress_without_new_lows(tmp_path):
    # Live changes keep the backlog above the bound; batches are indexed all the while.
    busy = [Backlog(6_000 if n % 2 else 5_500, 500) for n in range(200)] + [Backlog(500, 500)]
    pace = Scripted(tmp_path, busy, rows=1_000, min_rows=1_000, stall_seconds=30)
    pace.wait(None, written_lsn=100)  # type: ignore[arg-type]
    assert pace.waited == pytest.approx(200 * POLL_SECONDS)
