"""A snapshot that waits for the live trail: its next chunk is written only once the
environment's pipeline has nearly caught up with what came before (docs/design.md, "Snapshots").

A snapshot's records travel through the same ordered pipeline as the source's live changes
(the trail is appended in commit order), so every change committed after a chunk is searchable
only once the chunk's rows are. Left to itself, the source writes chunks more than twenty
times faster than one capture run on a small machine enriches and indexes them, and a change
made meanwhile waited for the whole backlog: half an hour behind a 5,000,000-row snapshot.
Paced, a live change waits for about :attr:`PipelinePace.backlog_seconds` of the pipeline's
indexing, measured as it goes, not for the snapshot; the snapshot takes as long as the pipeline
needs for its rows, which it needed anyway.

Pacing decides when a chunk is read and how many rows it may hold, never where its records sit:
each row is still recorded once, at its chunk's commit, so a wait measured wrong costs time,
never a record.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from audit_platform.capture.snapshot import SnapshotError
from audit_platform.lsn import parse_lsn
from audit_platform.naming import slot_name
from audit_platform.platform_db import one
from audit_platform.staging import StagingStore

#: How often the backlog is looked at while waiting (a listing of the ledger: on an object
#: store, a request or two).
POLL_SECONDS = 0.5
REPORT_SECONDS = 10.0
#: A wait shorter than this says little about the indexing rate: a batch leaves the backlog
#: whole, so half a second can see one leave, or none.
MEASURE_SECONDS = 1.0
#: The weight of a wait's rate against the rate measured before it.
RATE_WEIGHT = 0.3


class PipelineStalled(SnapshotError):
    """The environment's pipeline indexed nothing for too long while a snapshot waited."""


@dataclass(frozen=True)
class Backlog:
    #: Staged changes not indexed yet (the source's pending ledger and in-flight batches).
    rows: int
    #: Where the environment's slot is confirmed: capture has staged what committed before.
    confirmed_lsn: int
    #: A capture streams the slot now (it may be busy indexing, and read the chunk later).
    reading: bool = True


@dataclass
class PipelinePace:
    """Waits before a snapshot's chunk until the pipeline of ``store``'s environment and source
    has staged the chunk before (its slot confirmed past it; when no capture streams the slot,
    for ``stage_seconds`` at most: capture is taken to be absent until one does or the slot
    moves, not deployed yet or not reading a source just joined before its next handover, or
    parked) and holds at most :meth:`bound` staged changes not indexed yet: enough that it is
    not idle while the next chunk is read and staged, few enough that a live change is not
    long behind. A wait in which the backlog reaches no new low for
    ``stall_seconds`` raises :class:`PipelineStalled` (capture stopped, Elasticsearch down):
    the snapshot stops where it is, resumable, rather than fill the source's WAL for a
    pipeline that is not indexing it."""

    store: StagingStore
    slot: str
    #: How long a live change committed after a chunk may wait for the snapshot's rows ahead
    #: of it: the backlog's bound is this many seconds of the pipeline's indexing, at the rate
    #: it indexed while chunks waited (:attr:`rate`). A bound in rows would be seconds on one
    #: machine and a minute on another.
    backlog_seconds: float = 2.0
    #: The bound before a rate is known, and its most: two chunks, so the next is read and
    #: staged while the last is indexed (with one, the pipeline idled between chunks and
    #: indexed them at half the speed).
    rows: int = 8_000
    #: The bound's least, however slow the pipeline (``rows`` still caps it): a chunk of
    #: fewer rows costs the source and the pipeline more per row than it saves a live change.
    min_rows: int = 1_000
    #: The most rows a paced chunk holds; it holds half the bound when that is fewer, so two
    #: fit in it.
    chunk_rows: int = 4_000
    #: Longer than a capture run's handover, when no capture streams the slot for a while
    #: (with 2 s, a handover let chunks run 117 MB ahead, benchmarks/results/
    #: sustained_load-issue27-snapshot-paced.md, minutes 30-35).
    stage_seconds: float = 30.0
    stall_seconds: float = 600.0
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    #: Seconds spent waiting so far (what pacing cost the snapshot).
    waited: float = 0.0
    #: Where the slot stood when no capture was found streaming it (None: one is). Until one
    #: streams it or it moves, chunks do not wait for staging again: a source just joined is
    #: read from the capture run's next handover, and a large table would otherwise wait
    #: ``stage_seconds`` a chunk for it.
    absent_at: int | None = None
    #: Told the backlog, and whether the last chunk is staged, every :data:`REPORT_SECONDS` of
    #: a long wait (a CLI prints it, the Dagster job logs it): a snapshot is seen waiting.
    report: Callable[[Backlog, bool], None] | None = None
    #: Staged changes indexed a second while a chunk waited (None until a wait measured it):
    #: the pipeline was busy all through such a wait, so an idle pipeline does not shrink it.
    rate: float | None = None

    def bound(self) -> int:
        """The most staged changes a chunk may find waiting to be indexed."""
        if self.rate is None:
            return self.rows
        return min(self.rows, max(self.min_rows, int(self.rate * self.backlog_seconds)))

    def chunk_limit(self) -> int:
        """The most rows the next chunk holds: half the bound."""
        return min(self.chunk_rows, max(self.min_rows // 2, self.bound() // 2))

    def describe(self, found: Backlog, staged: bool) -> str:
        """What a long wait is waiting for, in a report's words."""
        if not staged:
            return "to read the last chunk"
        return (
            f"{found.rows:,} staged changes not indexed yet (the next chunk goes at "
            f"{self.bound():,})"
        )

    def backlog(self, conn: psycopg.Connection) -> Backlog:
        confirmed, reading = one(
            conn.execute(
                "SELECT s.confirmed_flush_lsn::text, coalesce(s.active, false) FROM (SELECT)"
                " AS one LEFT JOIN pg_replication_slots s ON s.slot_name = %s",
                (self.slot,),
            )
        )
        confirmed_lsn = parse_lsn(confirmed) if confirmed else 0
        return Backlog(self.store.backlog_rows(), confirmed_lsn, bool(reading))

    def wait(self, conn: psycopg.Connection, written_lsn: int) -> None:
        """Return once capture has staged past ``written_lsn`` (a position inside the last
        chunk's transaction, just before its commit) and the backlog is within bounds.

        Once the chunk is staged, only indexing counts as progress (the backlog at a new low):
        a slot that moves while nothing is indexed (Elasticsearch down, a batch failing
        downstream, heartbeats) is a stalled pipeline all the same."""
        started = progressed = reported = self.clock()
        lowest: int | None = None
        confirmed = -1
        draining: tuple[float, int] | None = None  # the first look with the chunk staged
        while True:
            found, now = self.backlog(conn), self.clock()
            if found.reading or found.confirmed_lsn != self.absent_at:
                self.absent_at = None  # a capture reads the slot (busy, maybe, but there)
            staged = found.confirmed_lsn >= written_lsn or self.absent_at is not None
            if not staged and not found.reading and now - started >= self.stage_seconds:
                self.absent_at, staged = found.confirmed_lsn, True
            if staged and found.rows <= self.bound():
                self._measure(draining, now, found.rows)
                break
            if staged and draining is None:
                draining = (now, found.rows)
            # Progress: indexing (the backlog at a new low), or, before the chunk is staged,
            # staging toward it (the slot confirmed further).
            moved = not staged and found.confirmed_lsn > confirmed
            if moved or lowest is None or found.rows < lowest:
                progressed = now
            lowest = found.rows if lowest is None else min(lowest, found.rows)
            confirmed = max(confirmed, found.confirmed_lsn)
            if now - progressed >= self.stall_seconds:
                self.waited += now - started
                raise PipelineStalled(
                    f"the pipeline of slot {self.slot} has staged and indexed nothing for "
                    f"{self.stall_seconds:.0f} s ({found.rows:,} staged changes not indexed): "
                    "is the environment's capture running, and Elasticsearch reachable? The "
                    "snapshot waits for it so as not to hold its live changes up; fix that, "
                    "or snapshot without pacing"
                )
            if self.report is not None and now - reported >= REPORT_SECONDS:
                self.report(found, staged)
                reported = now
            self.sleep(POLL_SECONDS)
        self.waited += self.clock() - started

    def _measure(self, draining: tuple[float, int] | None, now: float, rows: int) -> None:
        """The rate a wait saw the backlog shrink at, from the first look with the chunk staged
        to the last. Live changes staged meanwhile make it the rate at which the pipeline gains
        on them, which is what the bound is for."""
        if draining is None or now - draining[0] < MEASURE_SECONDS or draining[1] <= rows:
            return
        seen = (draining[1] - rows) / (now - draining[0])
        self.rate = seen if self.rate is None else self.rate + RATE_WEIGHT * (seen - self.rate)


def pipeline_pace(staging_root: str, env: str, source: str) -> PipelinePace:
    """The pace of ``env``'s pipeline for ``source``."""
    return PipelinePace(StagingStore(staging_root, env, source), slot_name(env, source))
