"""Deliver streams: per stream and source, the feed's entries after its cursor, in order.

At least once, in indexing order per source (commit order, but for records that became
searchable later: an orphan released from the quarantine, a late context). A message is one
chunk of one entry's records that the stream's filter and organizations allow. The cursor
moves only after the destination took the message, so a crash in between (``streams.sent``)
sends that one message again, under the same id: duplicates are bounded by one message per
stream and source.

A message the destination refuses holds up its source's later ones (order is the contract);
it is tried again after a backoff that doubles up to ``backoff_max_seconds``, so a receiver that
comes back after an hour is caught up with within that time. Only after ``dead_letter_attempts``
attempts spread over at least ``dead_letter_after`` is it given up on: kept in
``stream_dead_letters`` (what it held, the last error) and passed, so one poisoned message
cannot stop a stream for ever. Both bounds together: a short outage never dead-letters.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from elasticsearch import Elasticsearch

from audit_platform.environment import StreamSettings
from audit_platform.faults import crash_point
from audit_platform.index import feed
from audit_platform.naming import read_alias
from audit_platform.query.language import parse
from audit_platform.query.reads import records_by_id
from audit_platform.staging.store import StagingStore
from audit_platform.streams.definitions import Stream, list_streams
from audit_platform.streams.destinations import (
    DeliveryFailed,
    Destination,
    Message,
    destination,
)

log = logging.getLogger(__name__)
#: Feed entries every live stream has passed are removed once this old, and looked for this
#: often: the feed stays one hour of batches, whatever streams exist.
FEED_KEEP = timedelta(hours=1)
TRIM_EVERY_SECONDS = 300.0
Outcome = Literal["delivered", "dead", "failed"]


@dataclass
class Cursor:
    seq: int
    chunk: int = 0
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


class Deliverer:
    """Delivers an environment's streams; one per process (a live capture run's shard 0, or
    ``audit-platform streams deliver``). Two at once would each deliver, so each message
    could go twice; their cursors stay right."""

    def __init__(
        self,
        env: str,
        state: Callable[[], Any],
        es: Elasticsearch,
        store: Callable[[str], StagingStore],
        *,
        signer: Ed25519PrivateKey | None = None,
        settings: StreamSettings | None = None,
    ) -> None:
        self.env, self.state, self.es, self.store = env, state, es, store
        self.signer = signer
        self.settings = settings or StreamSettings()
        self._destinations: dict[int, Destination] = {}
        self._visible_through = 0  # feed entries up to this seq are searchable
        self._trimmed_at = 0.0  # time.monotonic() of the last trim

    def run(self, stop: threading.Event) -> None:
        """Pass after pass until ``stop``, and one more after it (what the run indexed last
        goes out before it ends); a pass that fails (the platform database or Elasticsearch
        down) is logged and the next one tries again."""
        while True:
            last = stop.is_set()
            try:
                found = self.deliver()
            except Exception:
                log.exception("streams of %s: a delivery pass failed", self.env)
                found = PassResult()
            if last:
                break
            if not found.messages:
                stop.wait(self.settings.poll_seconds)
        self.close()

    def close(self) -> None:
        for sink in self._destinations.values():
            sink.close()
        self._destinations.clear()

    def deliver(self, now: datetime | None = None) -> PassResult:
        """One pass over every live stream and source."""
        result = PassResult()
        with self.state() as conn:
            streams = list_streams(conn, self.env)
            for gone in set(self._destinations) - {s.id for s in streams}:
                self._destinations.pop(gone).close()
            for stream in streams:
                for source in feed.sources(conn, self.env, stream.start_seq):
                    self._source(conn, stream, source, result, now)
            if time.monotonic() - self._trimmed_at >= TRIM_EVERY_SECONDS:
                feed.trim(conn, self.env, (now or datetime.now(UTC)) - FEED_KEEP)
                self._trimmed_at = time.monotonic()
        return result

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
        for entry in feed.entries(
            conn, self.env, source, cursor.seq, self.settings.entries_per_pass
        ):
            if entry.seq > self._visible_through:
                self._refresh(conn)
            ids = entry.record_ids(self.store(source))
            size = self.settings.chunk_records
            chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
            first = cursor.chunk if entry.seq == cursor.seq else 0
            for number in range(first, len(chunks)):
                records = records_by_id(self.es, stream.scope, chunks[number], clauses)
                if records:
                    message = Message(
                        f"msg_{stream.id}_{entry.seq}_{number}",
                        stream,
                        source,
                        entry.seq,
                        number,
                        entry.indexed_at,
                        records,
                    )
                    if not _live(conn, stream):
                        return  # deleted mid-way: not one message more
                    outcome = self._send(conn, stream, cursor, message, result, now)
                    if outcome == "failed":
                        return
                    if outcome == "dead":
                        records = []
                _advance(conn, stream, source, entry.seq, number + 1, len(records))
                cursor = Cursor(entry.seq, number + 1)
            _advance(conn, stream, source, entry.seq + 1, 0, 0)
            cursor = Cursor(entry.seq + 1)

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
            sink = self._destinations.get(stream.id)
            if sink is None:
                sink = self._destinations[stream.id] = destination(stream, self.signer)
            sink.send(message)
        except DeliveryFailed as exc:
            result.failures += 1
            result.errors[stream.name] = str(exc)
            return self._failed(conn, stream, cursor, message, str(exc), result, now)
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
        error: str,
        result: PassResult,
        now: datetime | None,
    ) -> Outcome:
        s, at = self.settings, now or datetime.now(UTC)
        again = (cursor.seq, cursor.chunk) == (message.seq, message.chunk)
        attempts = cursor.attempts + 1 if again else 1
        since = (cursor.failing_since if again else None) or at
        if attempts >= s.dead_letter_attempts and at - since >= s.dead_letter_after:
            conn.execute(
                "INSERT INTO audit_platform.stream_dead_letters (stream, message_id, source, seq,"
                " chunk, record_ids, attempts, failing_since, last_error)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (stream, message_id) DO NOTHING",
                (
                    stream.id,
                    message.id,
                    message.source,
                    message.seq,
                    message.chunk,
                    [r["id"] for r in message.records],
                    attempts,
                    since,
                    error,
                ),
            )
            result.dead_lettered += 1
            log.warning("stream %s: message %s dead-lettered: %s", stream.name, message.id, error)
            return "dead"
        wait = min(s.backoff_max_seconds, s.backoff_first_seconds * 2 ** (attempts - 1))
        wait *= random.uniform(0.8, 1.0)  # receivers that come back are not hit all at once
        conn.execute(
            "UPDATE audit_platform.stream_cursors SET seq = %s, chunk = %s, attempts = %s,"
            " failing_since = %s, next_attempt_at = %s, last_error = %s"
            " WHERE stream = %s AND source = %s",
            (
                message.seq,
                message.chunk,
                attempts,
                since,
                at + timedelta(seconds=wait),
                error,
                stream.id,
                message.source,
            ),
        )
        return "failed"

    def _refresh(self, conn: psycopg.Connection) -> None:
        """Make every entry the feed holds now searchable: an entry is added after its
        documents were accepted, so one refresh after reading the last seq covers them."""
        last = feed.last_seq(conn)
        self.es.indices.refresh(index=read_alias(self.env), ignore_unavailable=True)
        self._visible_through = last


def _cursor(conn: psycopg.Connection, stream: Stream, source: str) -> Cursor:
    conn.execute(
        "INSERT INTO audit_platform.stream_cursors (stream, source, seq) VALUES (%s, %s, %s)"
        " ON CONFLICT DO NOTHING",
        (stream.id, source, stream.start_seq + 1),
    )
    row = conn.execute(
        "SELECT seq, chunk, attempts, failing_since, next_attempt_at, last_error"
        " FROM audit_platform.stream_cursors WHERE stream = %s AND source = %s",
        (stream.id, source),
    ).fetchone()
    assert row is not None
    return Cursor(*row)


def _advance(
    conn: psycopg.Connection, stream: Stream, source: str, seq: int, chunk: int, records: int
) -> None:
    conn.execute(
        "UPDATE audit_platform.stream_cursors SET seq = %s, chunk = %s, attempts = 0,"
        " failing_since = NULL, next_attempt_at = NULL, last_error = NULL,"
        " delivered = delivered + %s,"
        " delivered_at = CASE WHEN %s > 0 THEN now() ELSE delivered_at END"
        " WHERE stream = %s AND source = %s",
        (seq, chunk, records, records, stream.id, source),
    )


def _live(conn: psycopg.Connection, stream: Stream) -> bool:
    row = conn.execute(
        "SELECT deleted_at IS NULL FROM audit_platform.streams WHERE id = %s", (stream.id,)
    ).fetchone()
    return bool(row and row[0])


@dataclass(frozen=True)
class StreamStatus:
    """One stream's delivery of one source, as its checks and ``streams list`` show it."""

    stream: str
    source: str
    delivered: int
    behind: int  # feed entries not delivered yet
    lag_seconds: float  # since the oldest of them was indexed; 0 when none
    attempts: int
    last_error: str | None
    dead_letters: int


def status(conn: psycopg.Connection, env: str, now: datetime | None = None) -> list[StreamStatus]:
    rows = conn.execute(
        """
        SELECT s.name, f.source, coalesce(c.delivered, 0), count(f.seq) FILTER (
                   WHERE f.seq >= coalesce(c.seq, s.start_seq + 1)),
               min(f.indexed_at) FILTER (WHERE f.seq >= coalesce(c.seq, s.start_seq + 1)),
               coalesce(c.attempts, 0), c.last_error,
               (SELECT count(*) FROM audit_platform.stream_dead_letters AS d
                 WHERE d.stream = s.id AND d.source = f.source)
        FROM audit_platform.streams AS s
        JOIN audit_platform.stream_feed AS f ON f.env = s.env AND f.seq > s.start_seq
        LEFT JOIN audit_platform.stream_cursors AS c ON c.stream = s.id AND c.source = f.source
        WHERE s.env = %s AND s.deleted_at IS NULL
        GROUP BY s.id, s.name, f.source, c.delivered, c.attempts, c.last_error
        ORDER BY s.name, f.source
        """,
        (env,),
    ).fetchall()
    at = now or datetime.now(UTC)
    return [
        StreamStatus(
            name,
            source,
            delivered,
            behind,
            (at - oldest).total_seconds() if oldest is not None else 0.0,
            attempts,
            error,
            dead,
        )
        for name, source, delivered, behind, oldest, attempts, error, dead in rows
    ]


@contextmanager
def delivering(deliverer: Deliverer) -> Iterator[None]:
    """Deliver in a thread of its own while the block runs (a live capture run's shard 0):
    a slow receiver never slows capture, and capture's turns never delay a delivery."""
    stop = threading.Event()
    thread = threading.Thread(target=deliverer.run, args=(stop,), name="streams", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
