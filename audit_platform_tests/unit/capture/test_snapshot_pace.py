"""When a paced snapshot writes its next chunk (pure logic: the backlog is given, the clock is
the test's)."""

from __future__ import annotations

from dataclasses import replace

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


def draining(
    batches: int,
    rows: int,
    confirmed: int = 500,
    *,
    every: int = 1,
    arriving: int = 0,
    name: str = "b",
) -> list[Backlog]:
    """A busy pipeline: a ledger of ``batches`` entries of ``rows`` changes, the oldest
    indexed every ``every`` looks after the first, and ``arriving`` live changes staged at
    each look (in an entry of their own, indexed after the rest)."""
    script, left, live = [], [f"{name}{n:04}" for n in range(batches)], {}
    for look in range(batches * every + 1):
        if arriving:
            live[f"{name}-live{look:04}"] = arriving
        if look and look % every == 0:
            left.pop(0)
        pending = dict.fromkeys(left, rows) | live
        script.append(Backlog(sum(pending.values()), confirmed, pending=pending))
    return script


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
    slow = draining(500, 100)  # a batch of 100 indexed a look
    pace = Scripted(tmp_path, slow, rows=10_000, min_rows=10_000, stall_seconds=5)
    pace.wait(None, written_lsn=100)  # type: ignore[arg-type]
    assert pace.waited == pytest.approx(400 * POLL_SECONDS)  # far longer than the stall limit


def test_a_slot_that_moves_while_nothing_is_indexed_is_a_stall(tmp_path):
    # Elasticsearch down: capture stages and confirms, the backlog only grows.
    growing = [Backlog(50_000 + 100 * n, 500 + 10 * n) for n in range(1000)]
    pace = Scripted(tmp_path, growing, rows=5_000, stall_seconds=30)
    with pytest.raises(SnapshotError, match="has staged and indexed nothing for 30 s"):
        pace.wait(None, written_lsn=100)  # type: ignore[arg-type]


def test_a_long_wait_is_reported_while_it_lasts(tmp_path):
    seen: list[Backlog] = []
    said: list[str] = []
    # The bound held at 40,000 (its least and most), whatever rate the wait measures.
    pace = Scripted(tmp_path, draining(500, 100), rows=40_000, min_rows=40_000)

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


def test_the_bound_is_seconds_of_the_indexing_the_waits_measured(tmp_path):
    # A batch of 1,000 indexed every half second: 2,000 changes/s.
    pace = Scripted(tmp_path, draining(12, 1_000), rows=8_000, backlog_seconds=2.0)
    assert (pace.rate, pace.bound(), pace.chunk_limit()) == (None, 8_000, 4_000)
    pace.wait(None, written_lsn=100)  # type: ignore[arg-type]
    # Known after a second of it (the first batch gone starts the clock), the bound is 4,000
    # from then on: the wait goes on to it.
    assert pace.rate == pytest.approx(2_000) and pace.looks == 9
    assert (pace.bound(), pace.chunk_limit()) == (4_000, 2_000)
    # Faster now, 4,000 a look: the rate moves towards it, the older stretches weighing less.
    pace.script, pace.looks = draining(6, 2_000, name="c"), 0
    pace.wait(None, written_lsn=100)  # type: ignore[arg-type]
    assert 2_000 < pace.rate < 4_000 and pace.bound() == min(8_000, round(pace.rate * 2.0))
    decayed = pace.rate
    pace.script, pace.looks = draining(6, 2_000, name="d"), 0
    pace.wait(None, written_lsn=100)  # type: ignore[arg-type]
    assert decayed < pace.rate < 4_000


def test_a_batch_indexed_between_waits_is_timed_from_the_last_one_seen(tmp_path):
    pace = Scripted(tmp_path, draining(12, 1_000), rows=8_000)
    pace.wait(None, written_lsn=100)  # type: ignore[arg-type]
    rate, busy = pace.rate, pace.busy
    pace.now += 1.5  # the chunk is read and staged, while two batches of 1,000 are indexed
    ledger = dict(list(pace.seen.items())[2:]) | {"chunk": 1_000}
    pace.script, pace.looks = [Backlog(sum(ledger.values()), 600, pending=ledger)], 0
    pace.wait(None, written_lsn=600)  # type: ignore[arg-type]
    assert pace.busy == pytest.approx(busy * 0.9 + 1.5)
    assert pace.rate == pytest.approx((rate * busy * 0.9 + 2_000) / (busy * 0.9 + 1.5))


def test_a_handover_is_not_slow_indexing_and_a_slow_stretch_is(tmp_path):
    batch = draining(9, 1_000)[:5]  # a batch of 1,000 each half second: 2,000 a second
    # A handover of 10.5 s: no capture reads the slot, nothing is indexed.
    paused = [replace(batch[-1], reading=False)] * 21
    after = dict(list(batch[-1].pending.items())[1:])  # then one more batch indexed
    last = dict(list(after.items())[1:])  # and one more, half a second later
    script = [
        *batch,
        *paused,
        Backlog(4_000, 500, pending=after),
        Backlog(3_000, 500, pending=last),
    ]
    pace = Scripted(tmp_path, script, rows=3_000)
    pace.wait(None, written_lsn=100)  # type: ignore[arg-type]
    assert pace.looks == len(script)
    assert pace.rate == pytest.approx(2_000)  # the 10.5 s without a capture left out
    # A capture that reads and indexes a batch every 12 s is slow, not paused.
    slow = Scripted(tmp_path, draining(4, 3_000, every=24), rows=8_000, min_rows=100)
    slow.wait(None, written_lsn=100)  # type: ignore[arg-type]
    assert slow.rate == pytest.approx(3_000 / 12) and slow.bound() == 500


def test_chunks_staged_and_indexed_in_one_turn_are_timed_with_their_staging(tmp_path):
    # As the deployment runs: capture stages a chunk, then indexes it in the same turn, so
    # the ledger is empty when the snapshot finds the chunk gone, and the chunk after it is
    # read only then. The pipeline has work all the while (a chunk to stage, then to index):
    # the whole cycle is its time. A pipeline that is idle while a chunk is read is not.
    pace = Scripted(tmp_path, [], rows=8_000)
    confirmed = 0

    def cycle(rows_at_staging: int = 4_000, reading_for: float = 0.25) -> None:
        nonlocal confirmed
        chunk, written = f"c{confirmed:04}", confirmed + 100
        staged = {chunk: rows_at_staging} if rows_at_staging else {}
        pace.script = [
            Backlog(0, confirmed),  # the chunk before gone, this one not staged yet
            Backlog(rows_at_staging, written, pending=staged),
        ]
        pace.looks = 0
        pace.wait(None, written_lsn=written)  # type: ignore[arg-type]
        pace.now += reading_for  # the next chunk is read
        confirmed = written

    for _ in range(4):
        cycle()
    assert pace.rate == pytest.approx(4_000 / 0.75)  # half a second to stage, a quarter
    # A chunk staged and indexed between two looks (its changes never seen, so its seconds
    # are left out too), then the pipeline idle for 2 s while the next is read.
    cycle(rows_at_staging=0, reading_for=2.0)
    cycle()
    cycle()
    assert pace.rate == pytest.approx(4_000 / 0.75)  # the idle 2 s left out


def test_a_count_that_dips_is_not_progress(tmp_path):
    # Elasticsearch down: nothing is indexed, capture stages on; a read that misses an entry
    # now and then makes the count dip, but no entry leaves the ledger.
    looks = []
    for n in range(200):
        pending = {f"b{i:04}": 100 for i in range(n + 50)}
        if n % 20 == 5:
            pending.pop("b0003")  # missed by a listing
            pending["b0003"] = 0  # or listed and not read
        looks.append(Backlog(sum(pending.values()) - 100 * (n % 20 == 6), 500, pending=pending))
    pace = Scripted(tmp_path, looks, rows=1_000, stall_seconds=30)
    with pytest.raises(SnapshotError, match="has staged and indexed nothing for 30 s"):
        pace.wait(None, written_lsn=100)  # type: ignore[arg-type]


def test_a_slow_pipeline_keeps_the_least_bound_and_the_most_wins(tmp_path):
    pace = Scripted(tmp_path, draining(200, 50), rows=8_000, min_rows=1_000)
    pace.wait(None, written_lsn=100)  # type: ignore[arg-type]
    assert pace.rate == pytest.approx(100) and (pace.bound(), pace.chunk_limit()) == (1_000, 500)
    capped = Scripted(tmp_path, [], rows=150, chunk_rows=60, min_rows=1_000)
    capped.indexed, capped.busy = 100.0, 1.0
    assert (capped.bound(), capped.chunk_limit()) == (150, 60)
    capped.chunk_rows = 4_000
    assert capped.chunk_limit() == 75  # two chunks fit in the bound


def test_indexing_under_live_load_is_progress_without_new_lows(tmp_path):
    # Live changes keep the backlog above the bound; batches are indexed all the while.
    busy = draining(200, 600, every=2, arriving=300)
    pace = Scripted(tmp_path, busy, rows=1_000, min_rows=1_000, stall_seconds=30)
    with pytest.raises(SnapshotError):  # never under the bound, and never stalled:
        pace.wait(None, written_lsn=100)  # type: ignore[arg-type]
    assert pace.waited > 100  # until the script ends and the last look repeats
    # Live changes count into the rate: every change indexed does (600 a second here).
    assert pace.rate == pytest.approx(600)
