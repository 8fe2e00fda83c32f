"""Long-lived capture: per source a worker that keeps its slot open, a supervisor that runs many.

A :class:`SourceWorker` holds one source's replication connection and decoder for as long as it
runs and loops: read what the slot sends, close a batch by size (as :meth:`SlotStream.batches`)
or by time (``flush_seconds``), stage and confirm it with the same :class:`_Stager` a one-shot
:func:`capture` uses (so every crash point holds as it does there), then enrich and index the
source's pending batches in a turn shared with the other workers waiting for one
(:class:`Turns`), sign a checkpoint when due, and now and then resolve the quarantine.
While the slot is quiet it waits on the socket; when the server has read
``heartbeat_bytes`` of WAL past the slot's confirmed position without a tracked change (a quiet
database next to a busy one), it confirms that position so the server may recycle the WAL.

A source quiet for ``park_after_seconds`` parks: it confirms what it has read, closes its stream
and keeps one query connection, through which it looks every ``park_look_seconds`` at its
tables' change counters and its slot (:class:`ParkedLook`). A streaming slot's walsender wakes
at every commit of every database on its server and decodes it, even while its own database is
idle; a parked one has no walsender (benchmarks/idle_sources.py). The look's counters are a
hint, never the truth: the stream that reopens reads from the slot's confirmed position, so a
change the look misses waits (until ``heartbeat_bytes`` of WAL or ``park_most_seconds``), and
is never lost. A wake-up that finds nothing to read makes the next looks rarer (up to 8 times
``park_look_seconds``), so rolled-back writes cannot keep a source flapping.

A failure (the source unreachable, its slot dropped or lost, Elasticsearch down, a bug) ends
the worker's attempt: it closes its connections and tries again after a backoff, doubling up
to ``backoff_max_seconds``; its status says why. Nothing is lost: the slot was confirmed only
up to staged batches, the pending ledger keeps what was not indexed, and the next attempt
starts with the same recovery a one-shot capture does.

A :class:`Supervisor` runs one worker per source in threads, each on its own: one that fails
or waits never delays another. What they share (a batch budget, lanes that bound how many
compute at once, downstream turns, a pool and a client) is described in docs/design.md, "The
capture run".
It stops on its stop event or after its lifetime: each worker finishes the batch in hand,
confirms it and closes its connections, so the next run takes over with nothing lost or twice.

No Dagster here: ``audit_platform/defs/capture/`` runs a supervisor inside a Dagster run.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, closing, contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from elasticsearch import Elasticsearch
from psycopg.abc import Params
from psycopg.conninfo import make_conninfo

from audit_platform.capture.pgoutput import ChangeBatch
from audit_platform.capture.run import CaptureResult, _Stager, source_decoder
from audit_platform.capture.schema_changes import current_problems
from audit_platform.capture.slot import parked_name, usable_slot_state
from audit_platform.capture.stream import BATCH_BYTES, SlotBusy, SlotStream, StopEvent
from audit_platform.clients import connect_source
from audit_platform.enrich import quarantine
from audit_platform.enrich.batch import (
    HourResult,
    Share,
    enrich_pending_together,
    resolve_quarantine,
)
from audit_platform.index.batch import HourIndexed, IndexShare, index_pending_together
from audit_platform.naming import STANDARD_CLASS, publication_name, slot_name
from audit_platform.policy import SourcePolicy
from audit_platform.staging import StagedFile, StagingStore
from audit_platform.staging.lock import ledger_lock
from audit_platform.trust.log import TrustLog

log = logging.getLogger(__name__)


def shard_of(source: str, shards: int) -> int:
    """The shard a source belongs to: stable across runs, processes and machines."""
    return zlib.crc32(source.encode()) % max(1, shards)


@dataclass(frozen=True)
class LiveSettings:
    #: A batch closes at the first commit after its first message is this old (at least: see
    #: ``batches_per_second``).
    flush_seconds: float = 0.5
    #: The batches a run's busy sources may close per second together. Each batch costs about
    #: the same fixed work (files written, the ledger, a bulk request) whatever it holds, so
    #: when many sources are busy each waits longer and batches more (50 busy sources flush
    #: every 2.5 s instead of 0.5), one busy source still every ``flush_seconds``.
    batches_per_second: float = 20.0
    #: Workers of a run that may stage at once, and that may enrich and index at once
    #: (``Lanes``).
    lanes: int = 2
    batch_changes: int = 50_000
    batch_bytes: int = BATCH_BYTES
    #: WAL the server may read past the slot's position, without a tracked change, before the
    #: worker confirms it anyway.
    heartbeat_bytes: int = 16 * 1024**2
    grace: timedelta = timedelta(minutes=10)
    trail: bool = True
    checkpoint_every: timedelta = timedelta(seconds=60)
    resolve_every_seconds: float = 30.0
    #: How often a quiet worker wakes for its periodic look (heartbeat, work due); a change
    #: or a stop wakes it at once. Each look asks the server for a keepalive, which is most of
    #: what an idle source costs (benchmarks/idle_sources.py measures it).
    idle_seconds: float = 10.0
    #: While quiet, the socket is looked at this often at most after a wake-up that brought
    #: only keepalives (``SlotStream.live_batches``): what a quiet source's first change may
    #: wait more, against hundreds of wake-ups a second next to a busy neighbour database.
    quiet_poll_seconds: float = 0.25
    backoff_seconds: float = 1.0
    #: The longest wait between attempts: a failed attempt costs a connection, and the wait
    #: is what a source's freshness pays after its outage ends (benchmarks/fleet.py's faults).
    backoff_max_seconds: float = 10.0
    #: A source with no tracked change for this long, everything read staged and indexed,
    #: parks (see the module's description); 0 never parks.
    park_after_seconds: float = 120.0
    #: How often a parked source looks for work: one query, no decoding. What its next change
    #: may wait more.
    park_look_seconds: float = 2.0
    #: A parked source reopens its stream at least this often, whatever the look says: what a
    #: change the counters do not show waits at most (a TRUNCATE of an empty table, a logical
    #: message alone), and how late its due orphans are resolved.
    park_most_seconds: float = 300.0


class Lane:
    """A number of slots handed out first come, first served.

    A waiter keeps its place while it waits, and calls ``keepalive`` every ``every`` seconds
    meanwhile (a worker's stream must tell the server it is alive). A freed slot goes straight
    to the oldest waiter, so a worker that has waited longest is served next: a semaphore
    polled with a timeout would send it to the back of the queue at each timeout, behind
    workers that came later, and the sources it serves would fall furthest behind (their
    freshness tail, docs/design.md "The capture run").
    """

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"a lane needs at least one slot, not {slots}")
        self._lock = threading.Lock()
        self._free = slots
        self._waiting: deque[threading.Event] = deque()

    @contextmanager
    def held(
        self, keepalive: Callable[[], None] | None = None, every: float = 1.0
    ) -> Iterator[None]:
        with self._lock:
            turn: threading.Event | None = None
            if self._free and not self._waiting:
                self._free -= 1
            else:
                turn = threading.Event()
                self._waiting.append(turn)
        if turn is not None:
            try:
                while not turn.wait(every):
                    if keepalive is not None:
                        keepalive()
            except BaseException:
                with self._lock:
                    if turn.is_set():  # handed over meanwhile: pass it on
                        self._release()
                    else:
                        self._waiting.remove(turn)
                raise
        try:
            yield
        finally:
            with self._lock:
                self._release()

    def _release(self) -> None:
        """Hand the slot to the oldest waiter, or free it; the caller holds ``_lock``."""
        if self._waiting:
            self._waiting.popleft().set()
        else:
            self._free += 1

    @property
    def waiting(self) -> int:
        return len(self._waiting)


class Lanes:
    """How many of a run's workers may stage at once, and how many downstream turns run at once.

    The workers are threads of one interpreter. When fifty compute at once, each waits for the
    interpreter lock after every read and write it makes (a convoy: Dagster's events and the
    slots' reads fall behind on two cores that are busy switching). A worker waits for a lane
    instead, and what its source sends meanwhile waits in the socket and makes its next batch
    larger. Staging and the downstream step have lanes of their own, so Elasticsearch being
    slow does not stop slots from being read and confirmed; a downstream turn serves every
    worker waiting for one (``Turns``).
    """

    def __init__(self, staging: int = 2, downstream: int = 2) -> None:
        self.staging = Lane(staging)
        self.downstream = Turns(downstream)


@dataclass(eq=False)
class TurnRequest:
    """A worker's wish to enrich and index its source's pending batches, and how it went."""

    worker: SourceWorker
    policy: SourcePolicy
    database: str
    resolve: bool
    client: Elasticsearch
    #: The source's ledger lock was free (False: a backfill holds it; nothing was done).
    held: bool = False
    done: bool = False
    error: BaseException | None = None


class Turns:
    """Downstream turns that serve every waiting worker at once (flat combining).

    A downstream turn costs about the same whatever it holds (the frame work, a bulk request:
    about 30 ms, benchmarks/results/batch_cost.md), so fifty busy sources each taking turns of
    their own cost fifty times what one does. A worker that wants a turn queues its request;
    whichever waiting worker finds a lane free while its own request is still queued takes it
    and the other queued requests (up to ``most``, the oldest first) and serves them in one
    turn, each source's files, ledger and trail written as its own
    (``enrich_pending_together``). A worker whose request another turn holds only waits: it
    never serves a turn that is not its own, so it returns to its stream once its request is
    done. A turn that fails is served again one source at a time, so a source whose batch
    cannot be enriched fails alone (``serve_turn``). While it waits,
    a worker keeps its stream alive (``keepalive`` every ``every`` seconds)."""

    def __init__(self, lanes: int, most: int = 32) -> None:
        if lanes < 1:
            raise ValueError(f"turns need at least one lane, not {lanes}")
        self._cond = threading.Condition()
        self._free = lanes
        self._queue: deque[TurnRequest] = deque()
        self.most = most

    def take(
        self,
        request: TurnRequest,
        serve: Callable[[list[TurnRequest], Callable[[], None]], None],
        keepalive: Callable[[], None] | None = None,
        every: float = 1.0,
    ) -> None:
        """Return once ``request`` was served (by this thread or another); raise its error, or
        that of this worker's own stream (``keepalive``) while it waited or served.

        A stream that fails is its worker's alone: a turn this worker serves for others goes
        on without its keepalives, and its request leaves the queue if no turn has taken it
        yet (one that has is waited for: the turn uses the request's worker until done)."""
        broken: list[Exception] = []

        def alive() -> None:
            if keepalive is None or broken:
                return
            try:
                keepalive()
            except Exception as exc:
                broken.append(exc)

        kept = time.monotonic()
        with self._cond:
            self._queue.append(request)
        while True:
            batch: list[TurnRequest] = []
            with self._cond:
                if request.done:
                    break
                if broken and request in self._queue:
                    self._queue.remove(request)
                    break
                queued = request in self._queue
                if self._free and queued:  # serve its own request first, then the oldest
                    self._free -= 1
                    self._queue.remove(request)
                    batch.append(request)
                    while self._queue and len(batch) < self.most:
                        batch.append(self._queue.popleft())
                else:  # a lane is busy, or another turn serves its request: wait
                    self._cond.wait(every)
            if batch:
                try:
                    serve(batch, alive)
                except BaseException as exc:  # a crash: every request it held shares it
                    for served in batch:
                        if not served.done and served.error is None:
                            served.error = exc
                    raise
                finally:
                    with self._cond:
                        self._free += 1
                        for served in batch:
                            served.done = True
                        self._cond.notify_all()
            elif time.monotonic() - kept >= every:
                alive()
                kept = time.monotonic()
        if broken:
            raise broken[0]
        if request.error is not None:
            raise request.error

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def free(self) -> int:
        return self._free


class FlushPacer:
    """Shares a run's batch budget among the sources that are busy now.

    A source is busy if it closed a batch in the last ``window`` seconds; each batch that opens
    waits ``max(floor, busy / batches_per_second)``. Quiet sources cost nothing here, so one
    busy source beside 200 idle ones keeps the floor.
    """

    def __init__(
        self,
        floor: float,
        batches_per_second: float,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.floor, self.rate, self.window, self.clock = floor, batches_per_second, window, clock
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def batched(self, source: str) -> None:
        with self._lock:
            self._last[source] = self.clock()

    def interval(self) -> float:
        since = self.clock() - self.window
        with self._lock:
            busy = sum(1 for t in self._last.values() if t >= since)
        return max(self.floor, busy / self.rate)


@dataclass(frozen=True)
class LiveSource:
    """What a worker needs of one source; ``url`` and ``policy`` are read at each attempt."""

    name: str
    url: Callable[[], str]
    policy: Callable[[], SourcePolicy]
    store: StagingStore
    #: The source database's name, as records carry it (default: the URL's).
    database: str | None = None
    #: The retention class whose indices its records go to (the environment file says).
    retention_class: str = STANDARD_CLASS


@dataclass
class SourceStatus:
    source: str
    #: starting, live, parked (quiet: no stream, see the module's description), retrying
    #: (after a failure), stopped, failed (stopped while failing), or crashed (a BaseException
    #: ended the worker).
    state: str = "starting"
    error: str | None = None
    failures: int = 0
    attempts: int = 0
    changes: int = 0
    records_indexed: int = 0
    confirmed_lsn: int = 0
    last_batch_at: datetime | None = None
    #: Quiet, with everything committed before the attempt started staged, enriched, indexed.
    caught_up: bool = False
    #: Tracked tables a captured schema change left degraded (no REPLICA IDENTITY FULL, no key),
    #: each with its fix, until a later schema change fixes it (``capture.schema_changes``).
    schema_problems: dict[str, str] = field(default_factory=dict)
    updated_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def healthy(self) -> bool:
        return (
            self.state in {"starting", "live", "parked", "stopped"}
            and self.error is None
            and not self.schema_problems
        )

    def after_schema(self, changed: dict[str, str | None]) -> dict[str, str]:
        """The schema problems once ``changed`` tables' latest changes are known: a table's
        problem is replaced by its latest, and gone when that broke nothing."""
        problems = {**self.schema_problems, **changed}
        return {table: problem for table, problem in problems.items() if problem}

    @property
    def problem(self) -> str | None:
        """What is wrong, for whoever looks: the last failure, then the schema's problems."""
        found = [self.error, *(self.schema_problems[t] for t in sorted(self.schema_problems))]
        return "; ".join(p for p in found if p) or None


class LiveReport:
    """What the workers did since the last :meth:`drain`, summed per source, asset and hour,
    and each source's status: what a caller reports (Dagster coalesces it into events)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._staged: dict[tuple[str, str, datetime], dict[str, int]] = {}
        self._enriched: list[tuple[str, HourResult]] = []
        self._indexed: list[tuple[str, HourIndexed]] = []
        self._status: dict[str, SourceStatus] = {}

    def staged(self, source: str, files: list[StagedFile]) -> None:
        with self._lock:
            for file in files:
                found = self._staged.setdefault(
                    (source, file.dataset, file.hour), {"files": 0, "rows": 0}
                )
                found["files"] += 1
                found["rows"] += file.rows

    def enriched(self, source: str, hours: list[HourResult]) -> None:
        with self._lock:
            self._enriched.extend((source, h) for h in hours)

    def indexed(self, source: str, hours: list[HourIndexed]) -> None:
        with self._lock:
            self._indexed.extend((source, h) for h in hours)

    def status(self, status: SourceStatus) -> None:
        with self._lock:
            self._status[status.source] = replace(status, updated_at=datetime.now(UTC))

    def statuses(self) -> dict[str, SourceStatus]:
        with self._lock:
            return dict(self._status)

    def drain(self) -> tuple[dict, list[tuple[str, HourResult]], list[tuple[str, HourIndexed]]]:
        with self._lock:
            found = (self._staged, self._enriched, self._indexed)
            self._staged, self._enriched, self._indexed = {}, [], []
        return found


class SourceWorker:
    """One source's live capture: see the module's description."""

    def __init__(
        self,
        env: str,
        source: LiveSource,
        *,
        state: Callable[[], AbstractContextManager[psycopg.Connection]],
        elasticsearch: Callable[[], AbstractContextManager[Elasticsearch]],
        mask_key: bytes | None,
        signer: Ed25519PrivateKey | None,
        settings: LiveSettings,
        report: LiveReport,
        pacer: FlushPacer | None = None,
        lanes: Lanes | None = None,
    ) -> None:
        self.env, self.source, self.settings, self.report = env, source, settings, report
        self.pacer = pacer or FlushPacer(settings.flush_seconds, settings.batches_per_second)
        self.lanes = lanes or Lanes(settings.lanes, settings.lanes)
        #: The platform database, for the downstream steps only: a run's workers share a small
        #: pool, so an idle source holds no connection to it (``defs/capture/live.py``).
        self.state, self.elasticsearch = state, elasticsearch
        self.mask_key, self.signer = mask_key, signer
        self.slot = slot_name(env, source.name)
        self.publication = publication_name(env, source.name)
        self.status = SourceStatus(source.name)
        #: When the source's last tracked change was read (or the worker started): kept across
        #: attempts, so a source woken to confirm WAL parks again as soon as it has.
        self.changed_at = time.monotonic()
        #: Wake-ups in a row for counters that moved with nothing to read (a rolled-back write).
        self.false_wakes = 0
        #: Its last downstream turn failed: the next is served alone (``serve_turn``).
        self.turn_failed = False
        self._woke_for_counters = False

    def _set(self, **changes) -> None:
        for name, value in changes.items():
            setattr(self.status, name, value)
        self.report.status(self.status)

    def run(self, stop: threading.Event) -> None:
        """Attempt after attempt until ``stop``: a failure is reported and retried after a
        backoff; a :class:`BaseException` (a simulated crash, an interrupt) ends the worker."""
        self._set(state="starting")
        while not stop.is_set():
            self.status.attempts += 1
            try:
                parked = self.attempt(stop)
                if parked is not None:
                    self._parked(stop, parked)
                    continue
            except Exception as exc:  # reported and retried; the others go on
                failures = self.status.failures + 1
                delay = min(
                    self.settings.backoff_max_seconds,
                    self.settings.backoff_seconds * 2 ** (failures - 1),
                )
                log.warning("source %s: %s; retrying in %.0f s", self.source.name, exc, delay)
                self._set(state="retrying", error=f"{type(exc).__name__}: {exc}", failures=failures)
                stop.wait(delay)
            else:
                break
        # Stopped while failing: the last error stands, for whoever reads the run's report.
        self._set(state="stopped" if self.status.error is None else "failed")

    def attempt(self, stop: threading.Event) -> ParkedLook | None:
        """One connection's worth of live capture, until ``stop`` (returns None), the source
        parks (returns the look it parked with) or a failure (raises). Everything is closed on
        the way out."""
        source = self.source
        policy, url = source.policy(), source.url()
        if self.mask_key is None and any(t.mask for t in policy.tables.values()):
            raise ValueError(
                f"policy of source {source.name!r} masks columns but no masking key is set"
            )
        conn = SourceQueries(url, idle_seconds=2 * self.settings.idle_seconds)
        with closing(conn), self.elasticsearch() as client:
            slot = usable_slot_state(conn, self.slot)
            if slot.active_pid is not None:
                raise SlotBusy(f"slot {self.slot} is in use by process {slot.active_pid}")
            try:
                self._set(schema_problems=current_problems(conn, policy))
            except psycopg.Error as exc:  # only what the status shows: capture goes on
                log.warning("%s: tracked tables' schema problems not read: %s", source.name, exc)
            result = CaptureResult(
                self.slot, start_lsn=slot.confirmed_lsn, target_lsn=slot.current_lsn
            )
            database = source.database or _database_of(url)
            source.store.recover(slot.confirmed_lsn)
            decoder = source_decoder(conn, policy, self.mask_key, self.env)
            stream = SlotStream(url, self.slot, self.publication)
            stager = _Stager(source.store, stream, conn, self.slot, self.env, policy, result)
            try:
                # What an earlier run staged and did not finish is done by the first downstream
                # step, before this run's batches (the ledger is read in LSN order). Not before
                # streaming starts: after a crash every worker has such a backlog, and the
                # lanes would hold most streams back for minutes (the fleet benchmark's kill).
                stream.start()
                self._set(
                    state="live", error=None, confirmed_lsn=slot.confirmed_lsn, caught_up=False
                )
                parked = self._loop(stop, stream, decoder, stager, client, policy, database, result)
            finally:
                stream.close()
        self.status.failures = 0
        return parked

    def _loop(
        self, stop, stream, decoder, stager, client, policy, database, result
    ) -> ParkedLook | None:
        settings = self.settings
        resolved_at = checkpointed_at = time.monotonic()
        behind = True  # pending work not done yet: an earlier run's, or the ledger lock's
        look: ParkedLook | None = None  # taken when the source may park, see ``_may_park``
        for raw in stream.live_batches(
            stop,
            flush_seconds=self.pacer.interval,
            batch_changes=settings.batch_changes,
            batch_bytes=settings.batch_bytes,
            idle_seconds=settings.idle_seconds,
            quiet_poll_seconds=settings.quiet_poll_seconds,
        ):
            now = time.monotonic()
            if raw is not None:
                self.changed_at, look = now, None
                self.false_wakes, self._woke_for_counters = 0, False
                self.pacer.batched(self.source.name)
                before = len(result.files)
                with self._lane(self.lanes.staging, stream):
                    batch = decoder.decode(raw.messages, ChangeBatch(), complete=raw.complete)
                    written = stager.write(batch)
                if written is not None:
                    stager.confirm(*written)
                if batch.schema_problems:
                    self._set(schema_problems=self.status.after_schema(batch.schema_problems))
                self.report.staged(self.source.name, result.files[before:])
                del result.files[:]  # a run lasts long: keep no history of its files
                self._set(
                    changes=result.changes,
                    confirmed_lsn=result.confirmed_lsn,
                    last_batch_at=datetime.now(UTC),
                )
                if not raw.complete:
                    continue  # a transaction in parts: enrich it when it is whole
                resolve = now - resolved_at >= settings.resolve_every_seconds
                behind = not self._downstream(
                    client, policy, database, resolve=resolve, stream=stream
                )
                if resolve and not behind:
                    resolved_at = now
                continue
            # Quiet: confirm WAL read without a tracked change, past the heartbeat threshold.
            self._confirm_read(stream, stager, result, settings.heartbeat_bytes)
            resolve = now - resolved_at >= settings.resolve_every_seconds
            if behind or resolve:
                behind = not self._downstream(
                    client, policy, database, resolve=resolve, stream=stream
                )
                if resolve and not behind:
                    resolved_at = now
            stager.conn.close_if_idle()
            caught_up = not behind and stream.server_wal_end >= result.target_lsn
            if caught_up and not self.status.caught_up:
                self._set(caught_up=True)
            if now - checkpointed_at >= settings.checkpoint_every.total_seconds():
                self._checkpoint()
                checkpointed_at = now
            parks = settings.park_after_seconds and caught_up and not behind
            if parks and now - self.changed_at >= settings.park_after_seconds:
                look = self._may_park(stream, stager, result, look)
                if look.read_through(stream.server_wal_end):
                    self._checkpoint(every=timedelta(0))  # sign what it appended, now
                    if self._woke_for_counters:
                        self.false_wakes += 1
                    return look
        return None

    def _may_park(self, stream, stager, result, look: ParkedLook | None) -> ParkedLook:
        """The look a quiet source parks with, taken on one quiet wake-up; it parks on a later
        one once its stream has read past the WAL position the look was taken at, so every
        change the look's counters include has been read (and, quiet, staged and indexed)."""
        # Confirmed now, the slot's WAL is released while parked (what the heartbeat does).
        self._confirm_read(stream, stager, result, 1)
        return look or ParkedLook.take(stager.conn, self.publication)

    def _confirm_read(self, stream, stager, result, at_least: int) -> None:
        """Between transactions, nothing held: confirm the WAL the server has read past the
        slot's position without a tracked change, if that is ``at_least`` bytes."""
        confirmed = max(result.confirmed_lsn, result.start_lsn)
        if stream.server_wal_end - confirmed >= at_least:
            stager.confirm(stream.server_wal_end)
            self._set(confirmed_lsn=result.confirmed_lsn)

    def _parked(self, stop: threading.Event, look: ParkedLook) -> None:
        """Wait, holding one query connection and no stream, until a look finds work (a
        change counted, WAL to confirm, the slot gone), ``park_most_seconds`` have passed, or
        ``stop``; the next attempt then reads the slot.

        The WAL that wakes a parked source is a random 50 to 100% of ``heartbeat_bytes``:
        sources that parked together beside a busy neighbour do not all wake at once."""
        settings = self.settings
        self._set(state="parked")
        parked_at = time.monotonic()
        every = settings.park_look_seconds * 2 ** min(self.false_wakes, 3)
        wal = int(settings.heartbeat_bytes * random.uniform(0.5, 1.0))
        self._woke_for_counters = False
        name = parked_name(self.slot)
        with closing(SourceQueries(self.source.url(), math.inf, application_name=name)) as conn:
            while not stop.wait(every):
                if time.monotonic() - parked_at >= settings.park_most_seconds:
                    return
                found = look.work(conn, self.slot, wal)
                if found is not None:
                    self._woke_for_counters = found == "counters"
                    return

    def _lane(self, lane: Lane, stream: SlotStream | None) -> AbstractContextManager[None]:
        """Hold ``lane``; while waiting for it, keep the stream alive (``SlotStream.keepalive``)."""
        return lane.held(stream.keepalive if stream is not None else None)

    def _downstream(
        self, client, policy, database: str, *, resolve: bool, stream: SlotStream | None = None
    ) -> bool:
        """Enrich and index the source's pending batches (and, with ``resolve``, its due
        orphans), in a turn shared with every other worker waiting for one (``Turns``); False
        if another process holds the source's ledger (a backfill) and nothing was done: the
        next quiet moment tries again, capture goes on meanwhile."""
        request = TurnRequest(self, policy, database, resolve, client)
        keepalive = stream.keepalive if stream is not None else None
        self.lanes.downstream.take(request, serve_turn, keepalive)
        return request.held

    def _checkpoint(self, every: timedelta | None = None) -> None:
        if self.signer is not None and self.settings.trail:
            TrustLog(self.source.store).checkpoint(
                self.signer,
                datetime.now(UTC),
                self.settings.checkpoint_every if every is None else every,
            )


def serve_turn(batch: list[TurnRequest], keepalive: Callable[[], None]) -> None:
    """One downstream turn for these workers' sources; if it fails, one turn per source, so
    that only the sources that fail on their own report an error. A source whose last attempt
    failed is served alone from the start: one that fails again and again (a batch that cannot
    be enriched) does not make every turn it joins cost one turn per source."""
    failing = [request for request in batch if request.worker.turn_failed]
    together: dict[tuple, list[TurnRequest]] = {}  # workers made with other settings apart
    for request in batch:
        if not request.worker.turn_failed:
            settings = request.worker.settings
            together.setdefault((settings.grace, settings.trail), []).append(request)
    for group in together.values():
        try:
            _turn(group, keepalive)
        except Exception as exc:
            if len(group) == 1:
                group[0].error = exc
                group[0].worker.turn_failed = True
            else:
                log.warning("a turn of %d sources failed (%s); serving each alone", len(group), exc)
                failing += group
    for request in failing:
        try:
            _turn([request], keepalive)
        except Exception as alone:
            request.error = alone
            request.worker.turn_failed = True


def _turn(batch: list[TurnRequest], keepalive: Callable[[], None]) -> None:
    """Enrich, resolve and index these sources' pending work in one turn. What each step did
    is reported as soon as it is done: a turn that fails while indexing is served again per
    source, and that finds nothing left to enrich."""
    first = batch[0].worker
    env, settings = first.env, first.settings
    with first.state() as state, ExitStack() as locks:
        held = [
            request
            for request in batch
            if locks.enter_context(ledger_lock(state, env, request.worker.source.name, wait=0))
        ]
        if not held:
            return
        now = datetime.now(UTC)
        enriched = enrich_pending_together(
            state,
            [Share(r.worker.source.store, r.policy) for r in held],
            now=now,
            grace=settings.grace,
            trail=settings.trail,
            between=keepalive,
        )
        for request in held:
            request.worker.report.enriched(
                request.worker.source.name, enriched[request.worker.source.name]
            )
        for request in held:
            # Orphans due for a retry, or whose late context has just been enriched, now
            # rather than at the next periodic look (one count query when there are none).
            worker, name = request.worker, request.worker.source.name
            if request.resolve or quarantine.revisit_count(state, env, name, now):
                resolved = resolve_quarantine(
                    worker.source.store, state, request.policy, now=now, grace=settings.grace
                )
                worker.report.enriched(name, resolved)
                enriched[name] += resolved
                keepalive()
        for request in held:
            if enriched[request.worker.source.name]:
                request.worker._checkpoint()
        shares = [
            IndexShare(r.worker.source.store, r.database, r.worker.source.retention_class)
            for r in held
        ]
        indexed = index_pending_together(
            held[0].client, shares, now=now, between=keepalive, feed=state
        )
        for request in held:
            worker, name = request.worker, request.worker.source.name
            worker.report.indexed(name, indexed[name])
            if indexed[name]:
                total = sum(h.indexed for h in indexed[name])
                worker._set(records_indexed=worker.status.records_indexed + total)
            request.held, worker.turn_failed = True, False


@dataclass(frozen=True)
class ParkedLook:
    """What a parked source compares: its published tables' change counters (PostgreSQL's
    cumulative statistics of inserted, updated, deleted and live rows, over the publication's
    tables and their partitions, read afresh at each look), and the WAL insert position when
    they were first read. A backend flushes its counters when it goes idle, within a second
    of a commit, later under contention or while a procedure commits in a loop: then the
    change waits for the WAL or ``park_most_seconds`` wake-up."""

    publication: str
    counters: tuple[int, int]
    wal_lsn: int

    #: No table lock (``pg_publication_tables`` opens every published table): a role that may
    #: lock one table must not be able to hang the look.
    _COUNTERS = """
        WITH RECURSIVE published(relid) AS (
            SELECT r.prrelid FROM pg_publication_rel AS r
            JOIN pg_publication AS p ON p.oid = r.prpubid WHERE p.pubname = %(publication)s
            UNION
            SELECT i.inhrelid FROM pg_inherits AS i JOIN published ON i.inhparent = published.relid
        )
        SELECT coalesce(sum(pg_stat_get_tuples_inserted(relid) + pg_stat_get_tuples_updated(relid)
            + pg_stat_get_tuples_deleted(relid)), 0)::bigint AS changed,
            coalesce(sum(pg_stat_get_live_tuples(relid)), 0)::bigint AS live
        FROM published
    """

    @classmethod
    def take(cls, conn: SourceQueries, publication: str) -> ParkedLook:
        # The insert position: a commit's record is inserted before its counters are
        # reported, so the stream having read past this position has read every change they
        # count (with asynchronous commit, the write position may still be behind it).
        row = conn.execute(
            f"SELECT c.changed, c.live, (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint"
            f" FROM ({cls._COUNTERS}) AS c",
            {"publication": publication},
        ).fetchone()
        assert row is not None  # an aggregate's row
        changed, live, wal_lsn = row
        return cls(publication, (changed, live), wal_lsn)

    def read_through(self, server_wal_end: int) -> bool:
        return server_wal_end >= self.wal_lsn

    def work(self, conn: SourceQueries, slot: str, wal_bytes: int) -> str | None:
        """Why a stream should read the slot now: ``counters`` (a change counted since the look
        was taken), ``wal`` (``wal_bytes`` or more not confirmed: a heartbeat), ``slot`` (gone:
        the attempt says so); None to stay parked. A slot another process holds is not work."""
        row = conn.execute(
            "SELECT c.changed, c.live, s.slot_name IS NOT NULL,"
            " (pg_current_wal_insert_lsn() - s.confirmed_flush_lsn)::bigint"
            f" FROM ({self._COUNTERS}) AS c"
            " LEFT JOIN pg_replication_slots AS s ON s.slot_name = %(slot)s",
            {"publication": self.publication, "slot": slot},
        ).fetchone()
        assert row is not None  # an aggregate's row
        changed, live, exists, unconfirmed = row
        if not exists:
            return "slot"
        if (changed, live) != self.counters:
            return "counters"
        if (unconfirmed or 0) >= wal_bytes:
            return "wal"
        return None


class SourceQueries:
    """A worker's connection to its source for queries (type names and keys for the decoder,
    the slot's confirmed position after each confirm), opened when asked and closed once
    unused for ``idle_seconds``: a quiet source holds its slot's stream and nothing else.

    Its queries are short: a lock or a lost network must fail them (an attempt that is
    retried and reported), never hang the worker (``SESSION``, TCP keepalives)."""

    SESSION = "SET statement_timeout = '30s'; SET lock_timeout = '5s'"

    def __init__(self, url: str, idle_seconds: float, application_name: str = "") -> None:
        self.idle_seconds = idle_seconds
        self.url = make_conninfo(url, application_name=application_name or None)
        self._conn: psycopg.Connection | None = None
        self._used = 0.0

    def execute(self, query: str, params: Params | None = None) -> psycopg.Cursor[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = connect_source(
                self.url,
                keepalives=1,
                keepalives_idle=30,
                keepalives_interval=10,
                keepalives_count=3,
            )
            self._conn.execute(self.SESSION)
        self._used = time.monotonic()
        return self._conn.execute(query, params)

    def close_if_idle(self) -> None:
        if self._conn is not None and time.monotonic() - self._used >= self.idle_seconds:
            self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _database_of(url: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(url).get("dbname") or "postgres")


class Supervisor:
    """Runs a worker per source until ``stop`` is set or ``lifetime`` has passed.

    ``sources`` is asked again every ``refresh_seconds``: a source that appears gets a worker,
    one that is gone has its worker stopped (the environment file is the truth). With
    ``until_caught_up`` it also stops once every worker has caught up with what was committed
    when it started, or is failing (a one-off catch-up run, and what tests run).
    """

    def __init__(
        self,
        sources: Callable[[], dict[str, SourceWorker]],
        *,
        lifetime: timedelta,
        stop: threading.Event | None = None,
        refresh_seconds: float = 30.0,
        report: LiveReport | None = None,
        until_caught_up: bool = False,
    ) -> None:
        self.sources, self.lifetime = sources, lifetime
        self.until_caught_up = until_caught_up
        self.stop = stop or threading.Event()
        self.refresh_seconds = refresh_seconds
        self.report = report or LiveReport()
        self.workers: dict[str, tuple[SourceWorker, threading.Event, threading.Thread]] = {}
        self.crashed: dict[str, BaseException] = {}
        self._started = time.monotonic()

    @property
    def deadline(self) -> float:
        return self._started + self.lifetime.total_seconds()

    def _start(self, name: str, worker: SourceWorker) -> None:
        own = StopEvent()

        def run() -> None:
            try:
                worker.run(own)
            except BaseException as exc:  # the worker is dead; the others go on
                self.crashed[name] = exc
                worker._set(state="crashed", error=f"{type(exc).__name__}: {exc}")
                log.exception("source %s: worker ended", name)
            finally:
                own.close()

        thread = threading.Thread(target=run, name=f"capture-{name}", daemon=True)
        self.workers[name] = (worker, own, thread)
        thread.start()

    def refresh(self) -> None:
        """Start workers for sources that appeared, stop those of sources that are gone."""
        try:
            wanted = self.sources()
        except Exception:  # keep the workers we have
            log.exception("cannot read the sources; keeping the current workers")
            return
        for name, worker in wanted.items():
            if name not in self.workers:
                self._start(name, worker)
        for name in [n for n in self.workers if n not in wanted]:
            _, own, thread = self.workers.pop(name)
            own.set()
            thread.join()

    def ticks(self, every: float = 1.0) -> Iterator[None]:
        """Run the workers, yielding about every ``every`` seconds until the end (so a caller
        reports progress from its own thread); then stop and join every worker."""
        self._started = time.monotonic()
        self.refresh()
        refreshed = time.monotonic()
        try:
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                self.stop.wait(min(every, max(0.0, self.deadline - time.monotonic())))
                if time.monotonic() - refreshed >= self.refresh_seconds:
                    self.refresh()
                    refreshed = time.monotonic()
                yield
                if self.until_caught_up and all(
                    s.caught_up or s.state in {"retrying", "crashed"}
                    for s in self.statuses().values()
                ):
                    break
        finally:
            self.shutdown()

    def run(self) -> None:
        for _ in self.ticks():
            pass

    def shutdown(self) -> None:
        """Each worker finishes its batch in hand, confirms it and closes its connections."""
        self.stop.set()
        for _, own, _ in self.workers.values():
            own.set()
        for _, _, thread in self.workers.values():
            thread.join()

    def statuses(self) -> dict[str, SourceStatus]:
        return {name: worker.status for name, (worker, _, _) in self.workers.items()}
