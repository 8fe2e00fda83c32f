"""Requests to erase a person: asked for, approved or waited out, refused under a legal hold,
cancelled (docs/design.md, "Erasure").

A request is data in the platform database (``erasure_requests``, migration 013), kept
whatever became of it: the record of who asked for what, and who let it happen. Destroying
data is the one operation of the platform that cannot be undone, so nobody does it alone and
at once: a second admin approves it, or it waits ``erasure.waiting_hours`` during which
anyone may cancel it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from elasticsearch import Elasticsearch

from audit_platform.holds import Hold, list_holds
from audit_platform.naming import read_alias
from audit_platform.platform_db import one
from audit_platform.policy import SourcePolicy
from audit_platform.trust.commitments import subject_name


class ErasureError(ValueError):
    """A request cannot be made, approved or run as asked; the message says why and what to do."""


class ErasureRefused(ErasureError):
    """A legal hold covers records of the person: nothing is erased while it is active."""


@dataclass(frozen=True)
class Subject:
    """A person, by the table of persons and their id there (``public.customers:42``)."""

    of: str
    id: str

    @property
    def name(self) -> str:
        return subject_name(self.of, self.id)

    @staticmethod
    def parse(text: str) -> Subject:
        table, sep, subject_id = text.partition(":")
        table = table.strip()  # the id is the row's value: kept as it is, spaces and all
        if not sep or not table or not subject_id:
            raise ErasureError(
                f"subject {text!r}: write it as TABLE:ID, the table whose rows are persons and "
                "the person's id there, e.g. public.customers:42"
            )
        if "." not in table:
            table = f"public.{table}"
        if table.count(".") != 1 or not all(table.split(".")):
            raise ErasureError(f"subject {text!r}: the table must be schema.table or table")
        return Subject(table, subject_id)

    def query(self) -> dict[str, Any]:
        """The Elasticsearch filter of the records holding this person's values: in their row
        images, or in their context, as its actor."""
        return {
            "bool": {
                "should": [self.rows_query(), self.contexts_query()],
                "minimum_should_match": 1,
            }
        }

    def rows_query(self) -> dict[str, Any]:
        return {
            "bool": {
                "filter": [
                    {"term": {"row.personal.of": self.of}},
                    {
                        "bool": {
                            "should": [
                                {"term": {"row.personal.before": self.id}},
                                {"term": {"row.personal.after": self.id}},
                            ],
                            "minimum_should_match": 1,
                        }
                    },
                ]
            }
        }

    def contexts_query(self) -> dict[str, Any]:
        return {
            "bool": {
                "filter": [
                    {"term": {"context_personal.of": self.of}},
                    {"term": {"context_personal.subject": self.id}},
                ]
            }
        }


@dataclass(frozen=True)
class ErasureRequest:
    id: int
    env: str
    subject: str
    reason: str
    requested_by: str
    requested_at: datetime
    not_before: datetime
    approved_by: str | None
    approved_at: datetime | None
    started_at: datetime | None
    key_retired_at: datetime | None
    done_at: datetime | None
    cancelled_at: datetime | None
    cancelled_by: str | None
    records: int | None

    @property
    def state(self) -> str:
        if self.done_at is not None:
            return "done"
        if self.cancelled_at is not None:
            return "cancelled"
        return "approved" if self.approved_by is not None else "waiting"

    def due(self, now: datetime) -> bool:
        return self.state == "approved" or (self.state == "waiting" and now >= self.not_before)


_COLUMNS = (
    "id, env, subject, reason, requested_by, requested_at, not_before, approved_by,"
    " approved_at, started_at, key_retired_at, done_at, cancelled_at, cancelled_by, records"
)


def covering_holds(
    state: psycopg.Connection, es: Elasticsearch, env: str, subject: Subject
) -> list[Hold]:
    """The active holds that cover any record of the person (asked of Elasticsearch, where
    every record a hold keeps is)."""
    found = []
    for hold in list_holds(state, env, active_only=True):
        query = {"bool": {"filter": [hold.query(), subject.query()]}}
        count = es.count(index=read_alias(env), query=query, ignore_unavailable=True)["count"]
        if count:
            found.append(hold)
    return found


def refuse_if_held(
    state: psycopg.Connection, es: Elasticsearch, env: str, subject: Subject
) -> None:
    holds = covering_holds(state, es, env, subject)
    if holds:
        named = "; ".join(f"hold {h.id} on {h.covers} ({h.reason})" for h in holds)
        raise ErasureRefused(
            f"{subject.name}: records of this person are under legal hold ({named}). Nothing "
            "is erased while a hold is active; ask its owner to release it (audit-platform "
            "hold release), then request the erasure again"
        )


def request_erasure(
    state: psycopg.Connection,
    es: Elasticsearch,
    env: str,
    subject: Subject,
    *,
    reason: str,
    requested_by: str,
    waiting: timedelta,
    declared: set[str] | None = None,
) -> ErasureRequest:
    """``declared``: the tables of persons the environment's policies name (``of``); a request
    for any other is refused rather than done with nothing erased."""
    if declared is not None and subject.of not in declared:
        named = ", ".join(sorted(declared)) or "none"
        raise ErasureError(
            f"subject {subject.name}: no policy of this environment declares personal data of "
            f"{subject.of} (declared: {named}); check the table, or declare its personal "
            "columns first (personal: in the policy)"
        )
    if not reason.strip():
        raise ErasureError(
            "give the reason for the erasure, e.g. --reason 'GDPR art. 17 request, ticket 812'"
        )
    refuse_if_held(state, es, env, subject)
    row = one(
        state.execute(
            "INSERT INTO audit_platform.erasure_requests"
            " (env, subject, reason, requested_by, not_before)"
            f" VALUES (%s, %s, %s, %s, now() + %s) RETURNING {_COLUMNS}",
            (env, subject.name, reason.strip(), requested_by, waiting),
        )
    )
    return ErasureRequest(*row)


def get_request(state: psycopg.Connection, env: str, request: int) -> ErasureRequest:
    row = state.execute(
        f"SELECT {_COLUMNS} FROM audit_platform.erasure_requests WHERE env = %s AND id = %s",
        (env, request),
    ).fetchone()
    if row is None:
        raise ErasureError(f"no erasure request {request} in {env}; see audit-platform erase list")
    return ErasureRequest(*row)


def list_requests(state: psycopg.Connection, env: str) -> list[ErasureRequest]:
    rows = state.execute(
        f"SELECT {_COLUMNS} FROM audit_platform.erasure_requests WHERE env = %s ORDER BY id",
        (env,),
    ).fetchall()
    return [ErasureRequest(*row) for row in rows]


def approve(state: psycopg.Connection, env: str, request: int, by: str) -> ErasureRequest:
    """A second admin's approval: it may run now, without waiting."""
    found = get_request(state, env, request)
    if found.state != "waiting":
        raise ErasureError(f"erasure request {request} is {found.state}: nothing to approve")
    if found.requested_by == by:
        raise ErasureError(
            f"erasure request {request} was requested by {by}: another admin must approve it, "
            "or it runs when its waiting period ends"
        )
    row = one(
        state.execute(
            "UPDATE audit_platform.erasure_requests SET approved_by = %s, approved_at = now()"
            " WHERE id = %s AND approved_by IS NULL AND done_at IS NULL AND cancelled_at IS NULL"
            f" RETURNING {_COLUMNS}",
            (by, request),
        )
    )
    return ErasureRequest(*row)


def cancel(state: psycopg.Connection, env: str, request: int, by: str) -> ErasureRequest:
    """Withdraw a request that has not started; one that has started finishes (a half-done
    erasure is what must never be left)."""
    found = get_request(state, env, request)
    if found.state not in ("waiting", "approved") or found.started_at is not None:
        started = "started" if found.started_at is not None else found.state
        raise ErasureError(f"erasure request {request} is {started}: it cannot be cancelled")
    row = one(
        state.execute(
            "UPDATE audit_platform.erasure_requests SET cancelled_at = now(), cancelled_by = %s"
            f" WHERE id = %s AND started_at IS NULL RETURNING {_COLUMNS}",
            (by, request),
        )
    )
    return ErasureRequest(*row)


def start(state: psycopg.Connection, request: int) -> datetime:
    """The erasure's own time, written once: a rerun after a crash gets the same. A request
    cancelled meanwhile does not start."""
    row = state.execute(
        "UPDATE audit_platform.erasure_requests SET started_at = coalesce(started_at, now())"
        " WHERE id = %s AND cancelled_at IS NULL AND done_at IS NULL RETURNING started_at",
        (request,),
    ).fetchone()
    if row is None:
        raise ErasureError(f"erasure request {request} was cancelled or is done: not started")
    return row[0]


def declared_tables(policies: Iterable[SourcePolicy]) -> set[str]:
    """The tables of persons the policies declare personal data of (rows and contexts)."""
    return {table for policy in policies for table in policy.persons_tables()}
