"""Deliver streams: per stream and source, the feed's entries after its cursor, in order.

At least once, in indexing order per source (commit order, but for records that became
searchable later: an orphan released from the quarantine, a late context). A message is a run
of one entry's records that the stream's filter and organizations allow: at most
``chunk_records`` of the entry's records, and at most ``max_message_bytes`` of them (a single
larger record goes alone). Its id names the entry, its first record's position and how many
records it spans, so it is the same at every attempt, and a message that would hold other
records has another id. The cursor (the entry, and the position of the last record passed)
moves only after the destination took the message, so a crash in between (``streams.sent``)
sends that one message again under the same id: duplicates are bounded by one message per
stream and source.

Nothing indexed is passed over unseen. A record of the entry that Elasticsearch does not
return at all (a shard down, a partial answer, a document not yet restored) holds the stream up
as a failed attempt until it does; only records the indexing itself dead-lettered, and records
the filter leaves out, are passed.

A message the destination refuses holds up its source's later ones (order is the contract) and
is tried again after a backoff that doubles up to ``backoff_max_seconds``. A receiver that is
down, overloaded, or refuses the signature (a 5xx, 408, 429, 401, 403, 404, a timeout) is
waited for, however long: nothing is dead-lettered, and the ``stream_lag`` check says the stream
is failing. A receiver that refuses the message itself (400, 413, 415, 422) has it retried
``dead_letter_attempts`` times and then kept in ``stream_dead_letters`` and passed, so one
poisoned message cannot stop a stream.

Each stream is delivered by a thread of its own with a connection of its own (``run``), so one
slow or hostile receiver delays only its own stream, never another's or capture.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from elasticsearch import Elasticsearch

from audit_platform.environment import StreamSettings
from audit_platform.faults import crash_point
from audit_platform.index import feed
from audit_platform.naming import read_alias
from audit_platform.query.language import parse
from audit_platform.query.reads import existing_ids, records_by_id
from audit_platform.staging.store import StagingStore
from audit_platform.streams.definitions import Stream, get_stream, list_streams
from audit_platform.streams.destinations import (
    DeliveryFailed,
    Destination,
    Message,
    destination,
    encoded,
)

log = logging.getLogger(__name__)
#: Feed entries every live stream has passed are removed once this old, and looked for this
#: often: the feed stays one hour of batches, whatever streams exist.
FEED_KEEP = timedelta(hours=1)
TRIM_EVERY_SECONDS = 300.0
#: How long ``run`` waits, once stopped, for the stream threads' last passes: a receiver that
#: hangs must not keep a capture run from ending.
SHUTDOWN_SECONDS = 15.0
#: How often ``run`` looks for streams created or deleted.
REFRESH_SECONDS = 2.0
#: How often a stream looks for sources it has not delivered yet.
SOURCES_SECONDS = 10.0
Outcome = Literal["delivered", "dead", "failed"]
Connect = Callable[[], psycopg.Connection]


#: A record's position in its source: (commit LSN, change index).
Position = tuple[int, int]


@dataclass
class Cursor:
    seq: int
    after: Position | None = None  # the last record of entry ``seq`` passed; None: none yet
    attempts: int = 0
    failing_since: datetime | None = None
    next_attempt_at: datetime | None = None
    last_error: str | None = None


@dataclass
class PassResult:
    messages: int = 0
    records: int = 0
    failures: int = 0
    dead_lettered: int = 0
    errors: dict[str, str] = field(default_factory=dict)  # stream name: last error


class NotSearchable(Exception):
    """Records of a feed entry that Elasticsearch does not return (yet): the stream waits."""


class Deliverer:
    """Delivers an environment's streams; one per environment (a live capture run's shard 0,
    or ``audit-platform streams deliver``). Two at once keep their cursors right, but each may
    send a message the other sent."""

    def __init__(
        self,
        env: str,
        connect: Connect,
        es: Elasticsearch,
        store: Callable[[str], StagingStore],
        *,
        signer: Ed25519PrivateKey | None = None,
        settings: StreamSettings | None = None,
    ) -> None:
        self.env, self.connect, self.es, self.store = env, connect, es, store
        self.signer = signer
        self.settings = settings or StreamSettings()
        self._sinks: dict[int, Destination] = {}
        self._lock = threading.Lock()  # the sinks
        self._refreshing = threading.Lock()
        self._visible_through = 0  # feed entries up to this seq are searchable
        #: Per stream: the sources its feed entries name, and when that was read. Read at
        #: most every ``SOURCES_SECONDS``: a stream whose receiver fails keeps the feed long,
        #: and its thread looks four times a second.
        self._sources: dict[int, tuple[float, list[str]]] = {}
        self._trimmed_at = 0.0  # time.monotonic() of the last trim

    # -- running -------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """A thread per live stream until ``stop``; streams created or deleted meanwhile are
        picked up. Once stopped, each thread makes a last pass (what the run indexed last goes
        out before it ends), for at most ``SHUTDOWN_SECONDS`` in all."""
        workers: dict[int, tuple[threading.Thread, threading.Event]] = {}
        while not stop.is_set():
            try:
                with closing(self.connect()) as conn:
                    live = {s.id: s for s in list_streams(conn, self.env)}
                    self._trim(conn)
            except Exception:  # the platform database down: the threads go on as they can
                log.exception("streams of %s: cannot read the streams", self.env)
                stop.wait(REFRESH_SECONDS)
                continue
            for stream_id, stream in live.items():
                if stream_id not in workers:
                    own = threading.Event()
                    thread = threading.Thread(
                        target=self._work,
                        args=(stream, own),
                        name=f"stream-{stream.name}",
                        daemon=True,
                    )
                    workers[stream_id] = (thread, own)
                    thread.start()
            for stream_id in [i for i in workers if i not in live]:
                workers.pop(stream_id)[1].set()
            stop.wait(REFRESH_SECONDS)
        for _, own in workers.values():
            own.set()
        deadline = time.monotonic() + SHUTDOWN_SECONDS
        for thread, _ in workers.values():
            thread.join(max(0.0, deadline - time.monotonic()))
        self.close()

    def _work(self, stream: Stream, stop: threading.Event) -> None:
        """One stream's passes until ``stop``, and one more after it. A failed pass (the
        platform database down) closes the connection and waits, doubling, before the next."""
        conn: psycopg.Connection | None = None
        failures = 0
        try:
            while True:
                last = stop.is_set()
                found = PassResult()
                try:
                    if conn is None or conn.closed:
                        conn = self.connect()
                    self.deliver_stream(conn, stream, found, fresh=last)
                    failures = 0
                except Exception:
                    failures += 1
                    log.exception("stream %s: a delivery pass failed", stream.name)
                    if conn is not None:
                        conn.close()
                        conn = None
                if last:
                    return
                if failures:
                    stop.wait(min(self.settings.backoff_max_seconds, 2.0**failures))
                elif not found.messages:
                    stop.wait(self.settings.poll_seconds)
        finally:
            if conn is not None:
                conn.close()
            with self._lock:
                sink = self._sinks.pop(stream.id, None)
            if sink is not None:
                sink.close()

    def close(self) -> None:
        with self._lock:
            for sink in self._sinks.values():
                sink.close()
            self._sinks.clear()

    def deliver(self, now: datetime | None = None) -> PassResult:
        """One pass over every live stream, one after another (``streams deliver --once``)."""
        result = PassResult()
        with closing(self.connect()) as conn:
            for stream in list_streams(conn, self.env):
                self.deliver_stream(conn, stream, result, now)
            self._trim(conn, now)
        return result

    def deliver_stream(
        self,
        conn: psycopg.Connection,
        stream: Stream,
        result: PassResult,
        now: datetime | None = None,
        fresh: bool = True,
    ) -> None:
        """A pass over one stream's sources. An error of one source (Elasticsearch refusing
        the stream's filter, a bucket's credentials) is that source's failed attempt, with
        its backoff; the others go on."""
        for source in self._sources_of(conn, stream, fresh):
            try:
                self._source(conn, stream, source, result, now)
            except psycopg.Error:
                raise  # the platform database: the pass ends, and its caller waits
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"[:500]
                result.failures += 1
                result.errors[stream.name] = error
                cursor = _cursor(conn, stream, source)
                self._hold(conn, stream, source, cursor, cursor.seq, cursor.after, error, now)

    def _sources_of(self, conn: psycopg.Connection, stream: Stream, fresh: bool) -> list[str]:
        """The sources to deliver; read again when ``fresh``, when none were found yet, or
        every ``SOURCES_SECONDS`` (a source that starts indexing waits that long at most)."""
        read_at, found = self._sources.get(stream.id, (0.0, []))
        if fresh or not found or time.monotonic() - read_at >= SOURCES_SECONDS:
            found = feed.sources(conn, self.env, stream.start_seq)
            self._sources[stream.id] = (time.monotonic(), found)
        return found

    # -- one source ----------------------------------------------------------------------------

    def _source(
        self,
        conn: psycopg.Connection,
        stream: Stream,
        source: str,
        result: PassResult,
        now: datetime | None,
    ) -> None:
        cursor = _cursor(conn, stream, source)
        at = now or datetime.now(UTC)
        if cursor.next_attempt_at is not None and cursor.next_attempt_at > at:
            return
        clauses = parse(stream.filter, now=at).clauses()
        entries = feed.entries(conn, self.env, source, cursor.seq, self.settings.entries_per_pass)
        for entry in entries:
            if entry.seq > self._visible_through:
                self._refresh(conn)
            listed = entry.records_in(self.store(source))
            after = cursor.after if entry.seq == cursor.seq else None
            if after is not None:
                listed = [(i, position) for i, position in listed if position > after]
            while listed:
                chunk = listed[: self.settings.chunk_records]
                wanted = [i for i, _ in chunk]
                records = records_by_id(self.es, stream.scope, wanted, clauses)
                if {r["id"] for r in records} != set(wanted):
                    _all_searchable(self.es, self.env, entry.seq, wanted, records)
                records, taken = self._fitting(records, wanted)
                passed = chunk[taken - 1][1]
                if records:
                    first = chunk[0][1]
                    message = Message(
                        f"msg_{stream.id}_{entry.seq}_{first[0]:X}_{first[1]}_{taken}",
                        stream,
                        source,
                        entry.seq,
                        cursor.after if entry.seq == cursor.seq else None,
                        entry.indexed_at,
                        records,
                    )
                    if get_stream(conn, stream.id, live=True) is None:
                        return  # deleted mid-way: not one message more
                    outcome = self._send(conn, stream, cursor, message, result, now)
                    if outcome == "failed":
                        return
                    if outcome == "dead":
                        records = []
                listed = listed[taken:]
                _advance(conn, stream, source, entry.seq, passed, len(records))
                cursor = Cursor(entry.seq, passed)
            _advance(conn, stream, source, entry.seq + 1, None, 0)
            cursor = Cursor(entry.seq + 1)

    def _fitting(self, records: list[dict], wanted: list[str]) -> tuple[list[dict], int]:
        """The records of one message (as many as ``max_message_bytes`` holds, one at
        least), and how many of ``wanted`` they span (up to the first one left for the next
        message, or all of them when every record fits)."""
        records = sorted(records, key=lambda r: wanted.index(r["id"]))
        budget, size = self.settings.max_message_bytes, 0
        for n, record in enumerate(records):
            size += len(encoded(record)) + 1
            if size > budget and n > 0:
                return records[:n], wanted.index(record["id"])
        return records, len(wanted)

    def _send(
        self,
        conn: psycopg.Connection,
        stream: Stream,
        cursor: Cursor,
        message: Message,
        result: PassResult,
        now: datetime | None,
    ) -> Outcome:
        try:
            with self._lock:
                sink = self._sinks.get(stream.id)
                if sink is None:
                    sink = self._sinks[stream.id] = destination(stream, self.signer)
            sink.send(message)
        except DeliveryFailed as exc:
            result.failures += 1
            result.errors[stream.name] = str(exc)
            return self._failed(conn, stream, cursor, message, exc, result, now)
        crash_point("streams.sent")
        result.messages += 1
        result.records += len(message.records)
        return "delivered"

    def _failed(
        self,
        conn: psycopg.Connection,
        stream: Stream,
        cursor: Cursor,
        message: Message,
        failure: DeliveryFailed,
        result: PassResult,
        now: datetime | None,
    ) -> Outcome:
        again = (cursor.seq, cursor.after) == (message.seq, message.after)
        attempts = cursor.attempts + 1 if again else 1
        if failure.permanent and attempts >= self.settings.dead_letter_attempts:
            conn.execute(
                "INSERT INTO audit_platform.stream_dead_letters (stream, message_id, source, seq,"
                " record_ids, attempts, failing_since, last_error)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (stream, message_id) DO NOTHING",
                (
                    stream.id,
                    message.id,
                    message.source,
                    message.seq,
                    [r["id"] for r in message.records],
                    attempts,
                    (cursor.failing_since if again else None) or now or datetime.now(UTC),
                    str(failure),
                ),
            )
            result.dead_lettered += 1
            log.warning("stream %s: message %s dead-lettered: %s", stream.name, message.id, failure)
            return "dead"
        base = cursor if again else Cursor(message.seq, message.after)
        self._hold(
            conn, stream, message.source, base, message.seq, message.after, str(failure), now
        )
        return "failed"

    def _hold(
        self,
        conn: psycopg.Connection,
        stream: Stream,
        source: str,
        cursor: Cursor,
        seq: int,
        after: Position | None,
        error: str,
        now: datetime | None,
    ) -> None:
        """The message after ``after`` in entry ``seq`` failed once more: try it again after
        a backoff."""
        s, at = self.settings, now or datetime.now(UTC)
        attempts = cursor.attempts + 1
        wait = min(s.backoff_max_seconds, s.backoff_first_seconds * 2 ** (attempts - 1))
        wait *= random.uniform(0.8, 1.0)  # receivers that come back are not hit all at once
        conn.execute(
            "UPDATE audit_platform.stream_cursors SET seq = %s, after_lsn = %s, after_change = %s,"
            " attempts = %s, failing_since = coalesce(failing_since, %s), next_attempt_at = %s,"
            " last_error = %s WHERE stream = %s AND source = %s",
            (
                seq,
                *(after or (None, None)),
                attempts,
                at,
                at + timedelta(seconds=wait),
                error,
                stream.id,
                source,
            ),
        )

    def _refresh(self, conn: psycopg.Connection) -> None:
        """Make every entry the feed holds now searchable: an entry is added after its
        documents were accepted, so one refresh after reading the last seq covers them."""
        with self._refreshing:
            last = feed.last_seq(conn)
            if last <= self._visible_through:
                return
            self.es.indices.refresh(index=read_alias(self.env), ignore_unavailable=True)
            self._visible_through = last

    def _trim(self, conn: psycopg.Connection, now: datetime | None = None) -> None:
        if time.monotonic() - self._trimmed_at >= TRIM_EVERY_SECONDS:
            feed.trim(conn, self.env, (now or datetime.now(UTC)) - FEED_KEEP)
            self._trimmed_at = time.monotonic()


def _all_searchable(
    es: Elasticsearch, env: str, seq: int, wanted: list[str], records: list[dict]
) -> None:
    """Raise unless every record of ``wanted`` that the stream did not get is in
    Elasticsearch (then its filter or organizations left it out)."""
    got = {r["id"] for r in records}
    absent = [i for i in wanted if i not in got]
    missing = set(absent) - existing_ids(es, env, absent)
    if missing:
        raise NotSearchable(
            f"{len(missing)} records of feed entry {seq} are not in Elasticsearch (such as "
            f"{min(missing)}): the stream waits for them (`audit-platform verify` and the "
            "staged_vs_indexed check say why)"
        )


def _cursor(conn: psycopg.Connection, stream: Stream, source: str) -> Cursor:
    conn.execute(
        "INSERT INTO audit_platform.stream_cursors (stream, source, seq) VALUES (%s, %s, %s)"
        " ON CONFLICT DO NOTHING",
        (stream.id, source, stream.start_seq + 1),
    )
    row = conn.execute(
        "SELECT seq, after_lsn, after_change, attempts, failing_since, next_attempt_at,"
        " last_error FROM audit_platform.stream_cursors WHERE stream = %s AND source = %s",
        (stream.id, source),
    ).fetchone()
    assert row is not None
    seq, lsn, change, *rest = row
    return Cursor(seq, None if lsn is None else (lsn, change), *rest)


def _advance(
    conn: psycopg.Connection,
    stream: Stream,
    source: str,
    seq: int,
    after: Position | None,
    records: int,
) -> None:
    conn.execute(
        "UPDATE audit_platform.stream_cursors SET seq = %s, after_lsn = %s, after_change = %s,"
        " attempts = 0,"
        " failing_since = NULL, next_attempt_at = NULL, last_error = NULL,"
        " delivered = delivered + %s,"
        " delivered_at = CASE WHEN %s > 0 THEN now() ELSE delivered_at END"
        " WHERE stream = %s AND source = %s",
        (seq, *(after or (None, None)), records, records, stream.id, source),
    )


@contextmanager
def delivering(deliverer: Deliverer) -> Iterator[None]:
    """Deliver in threads of their own while the block runs (a live capture run's shard 0):
    a slow receiver never slows capture, and capture's turns never delay a delivery. Leaving
    the block waits at most ``SHUTDOWN_SECONDS`` for the streams' last passes."""
    stop = threading.Event()
    thread = threading.Thread(target=deliverer.run, args=(stop,), name="streams", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(SHUTDOWN_SECONDS + REFRESH_SECONDS + 5)
