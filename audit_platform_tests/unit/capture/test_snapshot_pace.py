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
    slow = [Backlog(50_000 - n, 500) for n in range(0, 50_000, 100)]
    pace = Scripted(tmp_path, slow, rows=40_000, stall_seconds=60)
    pace.report = lambda found, staged: seen.append(found) if staged else None
    pace.wait(None, written_lsn=100)  # type: ignore[arg-type]
    assert pace.waited == pytest.approx(5 * REPORT_SECONDS)  # 100 looks, 100 rows each
    assert len(seen) == 4  # at 10, 20, 30 and 40 s; at 50 it is over
    assert [b.rows for b in seen] == sorted((b.rows for b in seen), reverse=True)
    # The wait measured 200 changes/s: two seconds of it is under the bound's least.
    assert pace.describe(seen[0], True) == (
        f"{seen[0].rows:,} staged changes not indexed yet (the next chunk goes at 1,000)"
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


def test_the_bound_is_seconds_of_the_indexing_a_wait_measured(tmp_path):
    # 1,000 rows a look of half a second: the pipeline gains 2,000 rows/s on the backlog.
    pace = Scripted(tmp_path, draining(12_000, 1_000, 0), rows=8_000, backlog_seconds=2.0)
    assert (pace.bound(), pace.chunk_limit()) == (8_000, 4_000)  # nothing measured yet
    pace.wait(None, written_lsn=100)  # type: ignore[arg-type]
    assert pace.looks == 5 and pace.rate == pytest.approx(2_000)  # 12,000 to 8,000 in 2 s
    assert (pace.bound(), pace.chunk_limit()) == (4_000, 2_000)
    # A faster pipeline next time: the rate moves part of the way towards it.
    pace.script, pace.looks = draining(9_000, 4_000, 0), 0
    pace.wait(None, written_lsn=100)  # type: ignore[arg-type]
    assert pace.rate == pytest.approx(2_000 + 0.3 * (8_000 - 2_000))  # 9,000 to 1,000 in 1 s
    assert pace.bound() == int(pace.rate * 2.0)


def test_a_slow_pipeline_keeps_chunks_of_the_least_size_and_the_cap_wins(tmp_path):
    pace = Scripted(tmp_path, draining(10_000, 50, 0), rows=8_000, min_rows=1_000)
    pace.wait(None, written_lsn=100)  # type: ignore[arg-type]
    assert pace.rate == pytest.approx(100) and (pace.bound(), pace.chunk_limit()) == (1_000, 500)
    capped = Scripted(tmp_path, [], rows=150, chunk_rows=60, min_rows=1_000)
    capped.rate = 100.0
    assert (capped.bound(), capped.chunk_limit()) == (150, 60)


def test_a_wait_too_short_or_not_shrinking_measures_nothing(tmp_path):
    # Under the bound at once, or after half a second: one batch leaving says nothing.
    for script in ([Backlog(2_000, 500)], [Backlog(9_000, 500), Backlog(1_000, 500)]):
        pace = Scripted(tmp_path, script, rows=8_000)
        pace.wait(None, written_lsn=100)  # type: ignore[arg-type]
        assert pace.rate is None
    # Before the chunk is staged the backlog is not the chunk's: only staged looks count.
    unstaged = [Backlog(50_000, 90)] * 10 + [Backlog(9_000, 150), Backlog(8_000, 150)]
    pace = Scripted(tmp_path, [*unstaged, Backlog(7_000, 150)], rows=7_000)
    pace.wait(None, written_lsn=100)  # type: ignore[arg-type]
    assert pace.rate == pytest.approx(2_000 / 1.0)
