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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

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
#: The indexing rate is known once this much of it is measured: a batch leaves the backlog
#: whole, so half a second can see one leave, or none.
MEASURE_SECONDS = 1.0
#: What a stretch measured before the last weighs in the rate: about the last ten batches.
DECAY = 0.9


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
    #: The ledger's entries, each with its staged changes. An entry leaves the ledger when
    #: it is indexed and only then, so one gone since the last look is the pipeline's
    #: progress; a count that dips (a file read while another process replaces it) is not.
    pending: Mapping[str, int] = field(default_factory=dict)


@dataclass
class PipelinePace:
    """Waits before a snapshot's chunk until the pipeline of ``store``'s environment and source
    has staged the chunk before (its slot confirmed past it; when no capture streams the slot,
    for ``stage_seconds`` at most: capture is taken to be absent until one does or the slot
    moves, not deployed yet or not reading a source just joined before its next handover, or
    parked) and holds at most :meth:`bound` staged changes not indexed yet: enough that it is
    not idle while the next chunk is read and staged, few enough that a live change is not
    long behind. A wait in which no ledger entry is indexed for ``stall_seconds`` raises
    :class:`PipelineStalled` (capture stopped, Elasticsearch down): the snapshot stops where
    it is, resumable, rather than fill the source's WAL for a pipeline that is not indexing
    it."""

    store: StagingStore
    slot: str
    #: The backlog's bound is this many seconds of the pipeline's indexing, at the rate it
    #: indexed while chunks waited (:attr:`rate`), so a live change committed after a chunk
    #: waits about this long and the chunk's for the snapshot's rows. A bound in rows would be
    #: seconds on one machine and a minute on another.
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
    #: Staged changes indexed, and the seconds the pipeline had work meanwhile, over the
    #: stretches that end at a look finding ledger entries gone (older stretches weighing
    #: less, :data:`DECAY`).
    indexed: float = 0.0
    busy: float = 0.0
    #: The ledger's entries at the last look; when it was, and whether the pipeline had work
    #: then (a capture reading the slot, and a chunk not staged yet or changes not indexed);
    #: the seconds with work since entries were last found gone, and whether any ever were.
    #: Kept from one wait to the next, so a stretch that spans a chunk's reading is timed.
    seen: Mapping[str, int] | None = None
    looked: float | None = None
    had_work: bool = False
    working: float = 0.0
    timing: bool = False

    @property
    def rate(self) -> float | None:
        """Staged changes the pipeline indexes a second, as the waits saw (None until
        :data:`MEASURE_SECONDS` of it are measured). Every change it indexed counts, live ones
        too: a live change waits for all of the backlog ahead of it, whatever it holds. Only
        the seconds in which the pipeline had work count, staging included: an idle pipeline
        is not a slow one, nor is one no capture reads (a handover)."""
        return self.indexed / self.busy if self.busy >= MEASURE_SECONDS else None

    def bound(self) -> int:
        """The most staged changes a chunk may find waiting to be indexed."""
        rate = self.rate
        if rate is None:
            return self.rows
        return min(self.rows, max(self.min_rows, round(rate * self.backlog_seconds)))

    def chunk_limit(self) -> int:
        """The most rows the next chunk holds: half the bound."""
        return min(self.chunk_rows, max(1, self.bound() // 2))

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
        pending, inflight = self.store.backlog()
        rows = sum(pending.values()) + inflight
        return Backlog(rows, confirmed_lsn, bool(reading), pending)

    def wait(self, conn: psycopg.Connection, written_lsn: int) -> None:
        """Return once capture has staged past ``written_lsn`` (a position inside the last
        chunk's transaction, just before its commit) and the backlog is within bounds.

        A look that finds ledger entries gone since the look before (indexed) is progress,
        and times a stretch of indexing for :attr:`rate`. Before the chunk is staged, staging
        toward it (the slot confirmed further) is progress too; after, a slot that moves while
        nothing is indexed (Elasticsearch down, a batch failing downstream, heartbeats) is a
        stalled pipeline all the same."""
        started = progressed = reported = self.clock()
        confirmed = -1
        while True:
            found, now = self.backlog(conn), self.clock()
            if found.reading or found.confirmed_lsn != self.absent_at:
                self.absent_at = None  # a capture reads the slot (busy, maybe, but there)
            staged = found.confirmed_lsn >= written_lsn or self.absent_at is not None
            if not staged and not found.reading and now - started >= self.stage_seconds:
                self.absent_at, staged = found.confirmed_lsn, True
            if self._indexed_since_last_look(found, now, staged, started):
                progressed = now
            if staged and found.rows <= self.bound():
                break
            if not staged and found.confirmed_lsn > confirmed:
                progressed = now
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

    def _indexed_since_last_look(
        self, found: Backlog, now: float, staged: bool, written_at: float
    ) -> bool:
        """Whether entries left the ledger since the last look; times the stretch if so.

        The seconds from one look to the next count as work when the first look found some
        (a chunk to stage, changes to index) with a capture reading the slot; when it found
        none, only the seconds since the chunk was written (``written_at``) do. Timed from
        the entries' listing instead, staging was left out and the rate came out twice what
        the pipeline cleared; a rule that left out stretches ending on an empty ledger
        measured nothing, as a capture run stages each chunk and indexes it in one turn
        (benchmarks/results/sustained_load-issue27-snapshot-paced-seconds.md)."""
        if self.looked is not None and self.had_work:
            self.working += now - self.looked
        elif self.looked is not None and written_at > self.looked:
            self.working += now - written_at
        self.looked = now
        self.had_work = found.reading and (found.rows > 0 or not staged)
        gone = {name: rows for name, rows in (self.seen or {}).items() if name not in found.pending}
        self.seen = found.pending
        if not gone:
            if not self.had_work and not found.pending:  # idle: work done unseen (staged
                self.working = 0.0  # and indexed between two looks) has no changes to count
            return False
        # The first entries gone start the clock: work on them began before the first look.
        if self.timing and self.working > 0:
            self.indexed = self.indexed * DECAY + sum(gone.values())
            self.busy = self.busy * DECAY + self.working
        self.working, self.timing = 0.0, True
        return True


def pipeline_pace(staging_root: str, env: str, source: str) -> PipelinePace:
    """The pace of ``env``'s pipeline for ``source``."""
    return PipelinePace(StagingStore(staging_root, env, source), slot_name(env, source))
