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

from audit_platform.api_keys import Scope
from audit_platform.staging.store import StagingStore
from audit_platform.trust.leaves import LEAF_SCHEMA, VERSION, canonical, moment
from audit_platform.trust.log import TrustLog
from audit_platform.trust.merkle import leaf_hash

_COLUMNS = "id, env, at, key_id, method, route, params, status, returned"


def record_read(
    conn: psycopg.Connection,
    env: str,
    *,
    at: datetime,
    key_id: str,
    method: str,
    route: str,
    params: dict[str, Any],
    status: int,
    returned: int | None,
) -> None:
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
    conn: psycopg.Connection,
    env: str,
    *,
    after_id: int = 0,
    since: datetime | None = None,
    until: datetime | None = None,
    key_id: str | None = None,
    limit: int = 1_000,
    within: Scope | None = None,
) -> list[dict[str, Any]]:
    """Rows of the read log in id order, from after ``after_id``.

    ``within`` a key's scope: only the rows of keys whose own scope lies inside it (their
    sources among its sources, their tables among its tables, their organizations among its
    organizations, where it has a limit). Whatever
    such a key asked for and was told is about records the asking key may read too; a row of a
    wider key (its filters, the count it got) may be about records it may not. A row whose key
    id names no key of the environment counts as the widest."""
    sources = None if within is None or within.sources is None else sorted(within.sources)
    tables = None if within is None or within.tables is None else sorted(within.tables)
    orgs = None if within is None or within.organizations is None else sorted(within.organizations)
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM audit_platform.read_log r WHERE env = %(env)s AND id > %(after)s"
        " AND (%(since)s::timestamptz IS NULL OR at >= %(since)s)"
        " AND (%(until)s::timestamptz IS NULL OR at < %(until)s)"
        " AND (%(key_id)s::text IS NULL OR key_id = %(key_id)s)"
        " AND ((%(sources)s::text[] IS NULL AND %(tables)s::text[] IS NULL"
        "       AND %(orgs)s::text[] IS NULL) OR EXISTS ("
        "   SELECT FROM audit_platform.api_keys k WHERE k.key_id = r.key_id AND k.env = r.env"
        "   AND (%(sources)s::text[] IS NULL OR cardinality(k.sources) > 0"
        "        AND k.sources <@ %(sources)s::text[])"
        "   AND (%(tables)s::text[] IS NULL OR cardinality(k.tables) > 0"
        "        AND k.tables <@ %(tables)s::text[])"
        "   AND (%(orgs)s::text[] IS NULL OR cardinality(k.organizations) > 0"
        "        AND k.organizations <@ %(orgs)s::text[])))"
        " ORDER BY id LIMIT %(limit)s",
        {
            "env": env,
            "after": after_id,
            "since": since,
            "until": until,
            "key_id": key_id,
            "sources": sources,
            "tables": tables,
            "orgs": orgs,
            "limit": limit,
        },
    ).fetchall()
    names = [c.strip() for c in _COLUMNS.split(",")]
    return [dict(zip(names, row, strict=True)) for row in rows]


def read_leaf(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "v": VERSION,
        "kind": "read",
        "env": row["env"],
        "id": str(row["id"]),
        "at": moment(row["at"]),
        "key_id": row["key_id"],
        "method": row["method"],
        "route": row["route"],
        "params": row["params"],
        "status": str(row["status"]),
        "returned": None if row["returned"] is None else str(row["returned"]),
    }


def read_leaves(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "position": [None] * len(rows),
            "kind": ["read"] * len(rows),
            "lsn": [r["id"] for r in rows],
            "seq": [0] * len(rows),
            "xid": [0] * len(rows),
            "time": [r["at"] for r in rows],
            "record_id": [str(r["id"]) for r in rows],
            "hash": [leaf_hash(canonical(read_leaf(r))) for r in rows],
        },
        schema=LEAF_SCHEMA,
    )


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
