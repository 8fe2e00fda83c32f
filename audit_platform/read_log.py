"""Who read what: one row per request that returned audit records, counts or an export, from
the API and the Explorer alike; auditors query it, and it is part of the verifiable trail.

Each row becomes a leaf of the environment's read log (``<root>/<env>/_reads/_trust``), a
Merkle log like each source's, appended in id order by the hourly trust job and signed with the
same key; ``verify`` recomputes each row's leaf and names rows removed or edited since.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import polars as pl
import psycopg

from audit_platform.staging.store import StagingStore
from audit_platform.trust.leaves import LEAF_SCHEMA, VERSION, canonical, moment
from audit_platform.trust.log import TrustLog
from audit_platform.trust.merkle import leaf_hash

_COLUMNS = "id, env, at, key_id, method, route, params, status, returned"


def record_read(
    conn: psycopg.Connection, env: str, *, at: datetime, key_id: str, method: str, route: str,
    params: dict[str, Any], status: int, returned: int | None,
) -> None:  # fmt: skip
    conn.execute(
        "INSERT INTO audit_platform.read_log"
        " (env, at, key_id, method, route, params, status, returned)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (env, at, key_id, method, route, _storable(params), status, returned),
    )


def _storable(params: dict[str, Any]) -> str:
    """The filters as JSON PostgreSQL stores: a NUL character, which no PostgreSQL text can
    hold (a fuzzer sends them), is recorded as U+FFFD."""
    return json.dumps(params).replace("\\u0000", "\\ufffd")


def read_rows(
    conn: psycopg.Connection, env: str, *, after_id: int = 0, since: datetime | None = None,
    until: datetime | None = None, key_id: str | None = None, limit: int = 1_000,
) -> list[dict[str, Any]]:  # fmt: skip
    """Rows of the read log in id order, from after ``after_id``."""
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM audit_platform.read_log WHERE env = %s AND id > %s"
        " AND (%s::timestamptz IS NULL OR at >= %s) AND (%s::timestamptz IS NULL OR at < %s)"
        " AND (%s::text IS NULL OR key_id = %s) ORDER BY id LIMIT %s",
        (env, after_id, since, since, until, until, key_id, key_id, limit),
    ).fetchall()
    names = [c.strip() for c in _COLUMNS.split(",")]
    return [dict(zip(names, row, strict=True)) for row in rows]


def read_leaf(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "v": VERSION, "kind": "read", "env": row["env"], "id": str(row["id"]),
        "at": moment(row["at"]), "key_id": row["key_id"], "method": row["method"],
        "route": row["route"], "params": row["params"], "status": str(row["status"]),
        "returned": None if row["returned"] is None else str(row["returned"]),
    }  # fmt: skip


def read_leaves(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "position": [None] * len(rows), "kind": ["read"] * len(rows),
            "lsn": [r["id"] for r in rows], "seq": [0] * len(rows), "xid": [0] * len(rows),
            "time": [r["at"] for r in rows], "record_id": [str(r["id"]) for r in rows],
            "hash": [leaf_hash(canonical(read_leaf(r))) for r in rows],
        },
        schema=LEAF_SCHEMA,
    )  # fmt: skip


def read_trail(staging_root: str, env: str) -> TrustLog:
    """The environment's read log (not a source's: it lives beside the sources' folders)."""
    store = StagingStore(staging_root, env, "reads")
    return TrustLog(store, folder=f"{store.root}/{env}/_reads/_trust", name="_reads")


def append_reads(conn: psycopg.Connection, log: TrustLog, env: str, batch: int = 50_000) -> int:
    """Append every read-log row not yet in the read trail; returns how many."""
    appended = 0
    while True:
        rows = read_rows(conn, env, after_id=log.state().last_lsn, limit=batch)
        if not rows:
            return appended
        appended += log.append(read_leaves(rows))
