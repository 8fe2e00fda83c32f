"""What a slot holds, asked cheaply: the questions a sensor or an asset check asks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from psycopg.abc import Params

from audit_platform.clients import connect_source
from audit_platform.lsn import lsn_text, parse_lsn


class Queries(Protocol):
    """What capture asks a source with: a connection, or a worker's ``SourceQueries`` that
    opens one when asked and closes it when idle."""

    def execute(self, query: str, params: Params | None = None) -> psycopg.Cursor[Any]: ...


class SlotMissing(LookupError):
    """The slot does not exist: never set up, or dropped by hand."""


class SlotLost(RuntimeError):
    """PostgreSQL invalidated the slot (``wal_status = lost``): WAL it needed was removed.

    Changes after the slot's confirmed position can no longer be read. Capture stops loudly
    rather than skip them; replacing the slot records the range as a gap in the trail.
    """


@dataclass(frozen=True)
class SlotState:
    confirmed_lsn: int
    current_lsn: int
    active_pid: int | None
    #: reserved, extended, unreserved or lost (pg_replication_slots.wal_status).
    wal_status: str | None = None

    @property
    def lag_bytes(self) -> int:
        return max(0, self.current_lsn - self.confirmed_lsn)

    @property
    def lost(self) -> bool:
        return self.wal_status == "lost"


def slot_state(conn: Queries, slot: str) -> SlotState:
    row = conn.execute(
        "SELECT confirmed_flush_lsn::text, pg_current_wal_lsn()::text, active_pid, wal_status"
        " FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    if row is None:
        raise SlotMissing(
            f"slot {slot} does not exist; run `audit-platform source setup` for this "
            "environment and source (if it existed before, setup records the changes it "
            "missed as a gap)"
        )
    return SlotState(parse_lsn(row[0] or "0/0"), parse_lsn(row[1]), row[2], row[3])


def usable_slot_state(conn: Queries, slot: str) -> SlotState:
    """The slot's state, or :class:`SlotLost` when PostgreSQL has invalidated it."""
    state = slot_state(conn, slot)
    if state.lost:
        raise SlotLost(
            f"slot {slot} was invalidated by PostgreSQL (wal_status = lost): WAL after "
            f"{lsn_text(state.confirmed_lsn)} was removed before it was captured, usually "
            "because max_slot_wal_keep_size was reached. Run `audit-platform source setup "
            "--replace-lost-slot` to create a new slot; the range it could not capture is "
            "recorded as a gap in the trail"
        )
    return state


@dataclass(frozen=True)
class SlotPeek:
    state: SlotState
    has_changes: bool


def peek(url: str, slot: str, publication: str) -> SlotPeek:
    """Whether the slot holds at least one change, without consuming anything.

    Decodes from the slot's restart point only until the first change (``upto_nchanges`` 1),
    which is cheap while capture keeps up. A slot held by a running capture is reported as
    having no changes for us: that capture is taking them.
    """
    with connect_source(url) as conn:
        state = usable_slot_state(conn, slot)
        if state.active_pid is not None or state.lag_bytes == 0:
            return SlotPeek(state, False)
        try:
            rows = conn.execute(
                "SELECT 1 FROM pg_logical_slot_peek_binary_changes(%s, NULL, 1,"
                " 'proto_version', '1', 'publication_names', %s, 'messages', 'true') LIMIT 1",
                (slot, publication),
            ).fetchall()
        except psycopg.errors.ObjectInUse:
            return SlotPeek(state, False)
    return SlotPeek(state, bool(rows))


def parked_name(slot: str) -> str:
    """The ``application_name`` of a parked live worker's connection (``live.py``): a slot that
    no process streams may still be a running capture's, and setup and checks must know."""
    return f"parked {slot}"[:63]


def parked_pid(conn: Queries, slot: str) -> int | None:
    """The backend of a worker parked on ``slot``, if any. Only sessions of the role asking
    count: a role that merely connects cannot pass for the capture by naming a session."""
    row = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
        " AND datname = current_database() AND usename = current_user LIMIT 1",
        (parked_name(slot),),
    ).fetchone()
    return row[0] if row else None
