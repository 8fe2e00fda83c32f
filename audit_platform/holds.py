"""Legal holds: while one is active, retention deletes nothing it covers.

A hold names an environment's source, and optionally a table ('schema.table') and an object in
it, with the reason (a case, a request from counsel). It keeps the indices holding any record it
covers, and the source's staged hours (they mix every table of the source); the trail's log and
checkpoints are never pruned at all. Releasing a hold records who released it and when; holds
are never deleted, so the record of what was kept, and why, stays.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from audit_platform.naming import check_identifier
from audit_platform.platform_db import one


class HoldError(ValueError):
    """A hold could not be created or released; the message says why."""


@dataclass(frozen=True)
class Hold:
    id: int
    env: str
    source: str
    schema: str | None
    table: str | None
    object_id: str | None
    reason: str
    created_by: str
    created_at: datetime
    released_at: datetime | None
    released_by: str | None

    @property
    def covers(self) -> str:
        where = self.source
        if self.table:
            where += f" {self.schema}.{self.table}"
        if self.object_id is not None:
            where += f" object {self.object_id}"
        return where

    def query(self) -> dict[str, Any]:
        """The Elasticsearch filter of the records it covers."""
        clauses: list[dict[str, Any]] = [{"term": {"source.service": self.source}}]
        if self.table:
            clauses += [
                {"term": {"table.schema": self.schema}},
                {"term": {"table.name": self.table}},
            ]
        if self.object_id is not None:
            clauses.append({"term": {"object_id": self.object_id}})
        return {"bool": {"filter": clauses}}


_COLUMNS = (
    "id, env, source, schema_name, table_name, object_id, reason, created_by,"
    " created_at, released_at, released_by"
)


def create_hold(
    conn: psycopg.Connection,
    env: str,
    source: str,
    *,
    reason: str,
    created_by: str,
    table: str | None = None,
    object_id: str | None = None,
) -> Hold:
    check_identifier("environment", env)
    check_identifier("source", source)
    if not reason.strip():
        raise HoldError("give the reason for the hold, e.g. --reason 'case 2026-114, counsel'")
    if object_id is not None and table is None:
        raise HoldError("an object is held within a table: give --table schema.table too")
    schema = name = None
    if table is not None:
        if table.count(".") != 1:
            raise HoldError(f"table {table!r}: write it as schema.table, e.g. public.orders")
        schema, name = table.split(".")
    row = one(
        conn.execute(
            f"INSERT INTO audit_platform.legal_holds (env, source, schema_name, table_name,"
            f" object_id, reason, created_by) VALUES (%s, %s, %s, %s, %s, %s, %s)"
            f" RETURNING {_COLUMNS}",
            (env, source, schema, name, object_id, reason.strip(), created_by),
        )
    )
    return Hold(*row)


def list_holds(conn: psycopg.Connection, env: str, *, active_only: bool = False) -> list[Hold]:
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM audit_platform.legal_holds WHERE env = %s"
        " AND (NOT %s OR released_at IS NULL) ORDER BY id",
        (env, active_only),
    ).fetchall()
    return [Hold(*row) for row in rows]


def release_hold(conn: psycopg.Connection, env: str, hold_id: int, released_by: str) -> bool:
    """Release an active hold; False when there is no such active hold in ``env``."""
    row = conn.execute(
        "UPDATE audit_platform.legal_holds SET released_at = now(), released_by = %s"
        " WHERE id = %s AND env = %s AND released_at IS NULL RETURNING id",
        (released_by, hold_id, env),
    ).fetchone()
    return row is not None
