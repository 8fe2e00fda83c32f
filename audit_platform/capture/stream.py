"""Reading a logical replication slot over the streaming replication protocol.

Why streaming rather than the SQL functions: ``pg_logical_slot_peek_*`` decodes from the slot's
restart point on every call and the later advance decodes the same WAL again; a stream decodes
each change once, and the slot moves exactly when we confirm (``send_feedback``), which is what
"advance only after staging is durable" needs. psycopg 3 has no replication protocol support;
psycopg2's ``LogicalReplicationConnection`` does.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg2
import psycopg2.errors
from psycopg2.extras import LogicalReplicationConnection

from audit_platform.capture.messages import MAX_MESSAGE_BYTES, OWN_PREFIXES

_BEGIN, _COMMIT, _MESSAGE = 66, 67, 77
#: A batch closes past this many bytes of messages, whatever it counts in changes.
BATCH_BYTES = 64 * 1024 * 1024
_ROW_CHANGES = frozenset(b"IUDT")
#: A message counts toward a batch's changes as one, or one per this many bytes if it is
#: larger: what the decoder makes of a message grows with its size, and one message may carry
#: thousands of rows (a snapshot's chunk, ``capture.snapshot``) or one huge row. A row change
#: of ordinary size still counts one.
UNIT_BYTES = 512


def kept_message(payload: bytes) -> bytes | None:
    """A logical message as a batch keeps it: someone else's is dropped here, before it is
    buffered, and one of ours keeps at most MAX_MESSAGE_BYTES of content (with its declared
    length, so the decoder rejects it by size). So one oversized message costs the one read
    the driver makes of it, and a batch never holds many.
    """
    end = payload.find(0, 10)
    if payload[10:end] not in OWN_PREFIXES or not payload[1] & 1:
        return None
    return payload[: end + 5 + MAX_MESSAGE_BYTES]


class StopEvent(threading.Event):
    """A stop signal a ``select`` can wait on beside the replication socket, so a quiet
    worker can sleep long between its periodic looks and still stop at once."""

    def __init__(self) -> None:
        super().__init__()
        self._read, self._write = os.pipe()

    def set(self) -> None:
        super().set()
        with contextlib.suppress(OSError):
            os.write(self._write, b"x")

    def fileno(self) -> int:
        return self._read

    def close(self) -> None:
        for fd in (self._read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)


class SlotBusy(RuntimeError):
    """Another consumer holds the slot: at most one capture per slot runs at a time."""


@dataclass
class RawBatch:
    """About ``batch_changes`` row changes of pgoutput messages.

    ``complete`` batches end with a commit. A transaction larger than a batch is cut into
    incomplete batches first, so memory stays bounded however large a transaction is.
    """

    messages: list[bytes]
    changes: int
    payload_bytes: int
    complete: bool = True


class SlotStream:
    """A replication connection reading one slot up to a target LSN, in bounded batches."""

    def __init__(self, url: str, slot: str, publication: str) -> None:
        self.slot = slot
        self.publication = publication
        try:
            self.conn = psycopg2.connect(url, connection_factory=LogicalReplicationConnection)
        except psycopg2.OperationalError as exc:
            raise RuntimeError(
                f"cannot open a replication connection for slot {slot}: {exc}"
            ) from exc
        self.cursor = self.conn.cursor()
        self._kept_alive = 0.0

    def start(self) -> None:
        try:
            self.cursor.start_replication(
                slot_name=self.slot,
                decode=False,
                options={
                    "proto_version": "1",
                    "publication_names": self.publication,
                    "messages": "true",
                },
                status_interval=10,
            )
        except psycopg2.errors.ObjectInUse as exc:
            raise SlotBusy(
                f"slot {self.slot} is in use by another consumer (another capture run is "
                "reading it); only one capture per slot may run at a time"
            ) from exc

    def batches(
        self,
        target_lsn: int,
        batch_changes: int,
        idle_timeout: float = 60.0,
        batch_bytes: int = BATCH_BYTES,
    ) -> Iterator[RawBatch]:
        """Yield batches of complete transactions that committed at or before ``target_lsn``.

        Ends when the server reports it has sent everything up to the target. A batch closes at
        the first commit after ``batch_changes`` row changes and kept messages, or
        ``batch_bytes`` of them; inside a transaction that is still open then, it closes
        incomplete and the transaction goes on in the next batch. So memory is bounded by the
        batch whatever a transaction holds: many rows, large rows, or a flood of messages.
        """
        messages: list[bytes] = []
        changes = units = size = 0
        in_txn = False
        deadline = time.monotonic() + idle_timeout
        while True:
            message = self.cursor.read_message()
            if message is None:
                if not in_txn and self.cursor.wal_end >= target_lsn:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"slot {self.slot}: no progress for {idle_timeout:.0f}s before reaching "
                        f"the target LSN (server at {self.cursor.wal_end}, target {target_lsn})"
                    )
                readable, _, _ = select.select([self.conn], [], [], 0.2)
                if not readable:
                    # Quiet: ask for a keepalive, whose wal_end says how far the server has read.
                    self.cursor.send_feedback(reply=True)
                continue
            deadline = time.monotonic() + idle_timeout
            payload = message.payload
            kind = payload[0]
            if kind == _BEGIN:
                final_lsn = int.from_bytes(payload[1:9], "big")
                if final_lsn > target_lsn:
                    break  # committed after the target: the next capture takes it
                in_txn = True
            elif kind == _MESSAGE and (payload := kept_message(payload)) is None:
                continue
            messages.append(payload)
            size += len(payload)
            if kind in _ROW_CHANGES or kind == _MESSAGE:
                changes += kind != _MESSAGE
                units += max(1, len(payload) // UNIT_BYTES)
                if units >= batch_changes or size >= batch_bytes:
                    yield RawBatch(messages, changes, size, complete=False)
                    messages, changes, units, size = [], 0, 0, 0
            elif kind == _COMMIT:
                in_txn = False
                if units >= batch_changes or size >= batch_bytes:
                    yield RawBatch(messages, changes, size)
                    messages, changes, units, size = [], 0, 0, 0
        if messages:
            yield RawBatch(messages, changes, size)

    def live_batches(
        self,
        stop: threading.Event,
        *,
        flush_seconds: float | Callable[[], float],
        batch_changes: int,
        batch_bytes: int = BATCH_BYTES,
        idle_seconds: float = 1.0,
        quiet_poll_seconds: float = 0.0,
    ) -> Iterator[RawBatch | None]:
        """Read the slot until ``stop`` is set: batches as :meth:`batches` closes them (by
        changes, bytes and messages) and also by time, at the first commit once the batch's
        first message is ``flush_seconds`` old, so a quiet source's single change is not held.
        ``flush_seconds`` may be a function, asked as each batch opens (a pacer shared by
        many sources, ``live.py``).

        ``quiet_poll_seconds``: between transactions, after a wake-up that brought no change,
        the socket is not watched again for this long (the stop event and a held batch's
        flush time still are). A walsender sends its client a keepalive each time it has
        decoded WAL past the client's confirmed position, so a quiet slot on a server with a
        busy neighbour database gets one per neighbour commit (hundreds a second); read one
        wake-up at a time, they were most of what an idle source cost
        (benchmarks/results/idle_sources-issue25.md). The driver reads every keepalive waiting
        in one call, so looking a few times a second costs a few wake-ups, and a quiet
        source's next change waits at most this long more.

        Yields None when quiet (nothing held, between transactions) about every
        ``idle_seconds``, so the caller does its periodic work (heartbeat, quarantine); while
        quiet it waits on the socket, not in a busy loop. When ``stop`` is set it ends at the
        next transaction boundary, yielding what it holds; inside a transaction it ends at
        once and drops the transaction's unconfirmed messages (the next reader reads them
        again from the slot's confirmed position).
        """
        messages: list[bytes] = []
        changes = units = size = 0
        in_txn = False
        opened = 0.0  # when the held batch got its first message
        flush = flush_seconds if callable(flush_seconds) else lambda: flush_seconds
        flush_after = flush()  # the held batch's flush interval, fixed as it opens
        quiet_since = time.monotonic()
        woke = False  # the socket was readable at the last wait
        empty_wake = 0.0  # when a readable socket last brought no change (keepalives)

        def take(complete: bool = True) -> RawBatch:
            nonlocal messages, changes, units, size
            batch = RawBatch(messages, changes, size, complete=complete)
            messages, changes, units, size = [], 0, 0, 0
            return batch

        while True:
            message = self.cursor.read_message()
            if message is None:
                now = time.monotonic()
                if woke:
                    empty_wake, woke = now, False
                if stop.is_set():
                    if messages and not in_txn:
                        yield take()
                    return
                if not in_txn and messages and now - opened >= flush_after:
                    yield take()
                    quiet_since = time.monotonic()
                    continue
                if not in_txn and not messages and now - quiet_since >= idle_seconds:
                    yield None
                    # Ask for a keepalive: its wal_end says how far the server has read.
                    self.cursor.send_feedback(reply=True)
                    quiet_since = time.monotonic()
                    continue
                wait = idle_seconds - (now - quiet_since)
                if messages and not in_txn:
                    wait = min(wait, opened + flush_after - now)
                waiting = [self.conn, stop] if isinstance(stop, StopEvent) else [self.conn]
                if not in_txn and now - empty_wake < quiet_poll_seconds:
                    # Between transactions, and the last wake-up was keepalives: let them
                    # gather (a held batch still flushes at its time).
                    wait = min(wait, empty_wake + quiet_poll_seconds - now)
                    waiting = waiting[1:]
                timeout = max(0.01, min(wait, idle_seconds))
                if waiting:
                    woke = self.conn in select.select(waiting, [], [], timeout)[0]
                else:
                    time.sleep(timeout)
                continue
            woke = False
            payload = message.payload
            kind = payload[0]
            if kind == _BEGIN:
                in_txn = True
            elif kind == _MESSAGE and (payload := kept_message(payload)) is None:
                continue
            if not messages:
                opened, flush_after = time.monotonic(), flush()
            messages.append(payload)
            size += len(payload)
            if kind in _ROW_CHANGES or kind == _MESSAGE:
                changes += kind != _MESSAGE
                units += max(1, len(payload) // UNIT_BYTES)
                if units >= batch_changes or size >= batch_bytes:
                    yield take(complete=False)
                    if stop.is_set():
                        return  # mid-transaction: its parts stay unconfirmed, read again
            elif kind == _COMMIT:
                in_txn = False
                full = units >= batch_changes or size >= batch_bytes
                if full or stop.is_set() or time.monotonic() - opened >= flush_after:
                    yield take()
                    quiet_since = time.monotonic()
                    if stop.is_set():
                        return

    @property
    def server_wal_end(self) -> int:
        return self.cursor.wal_end

    @property
    def server_version(self) -> int:
        """The source's ``server_version_num``, as the connection reported it (no query)."""
        return self.conn.server_version

    def keepalive(self, every: float = 5.0) -> None:
        """Tell the server this reader is alive, at most every ``every`` seconds: a walsender
        that hears nothing from its reader for ``wal_sender_timeout`` (60 s) drops it, and a
        worker waiting for a lane or enriching a backlog reads nothing meanwhile."""
        now = time.monotonic()
        if now - self._kept_alive >= every:
            self.cursor.send_feedback(force=True)
            self._kept_alive = now

    def confirm(self, lsn: int) -> None:
        """Tell the server everything up to ``lsn`` is durable; it may release that WAL."""
        self.cursor.send_feedback(write_lsn=lsn, flush_lsn=lsn, reply=True, force=True)

    def close(self) -> None:
        self.conn.close()
