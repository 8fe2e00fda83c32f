"""The quarantine: changes waiting for their context, kept in the platform's PostgreSQL.

An orphan is recorded with its attempts and next retry time (exponential backoff with jitter, so
a burst of orphans does not retry in lockstep). Nothing waits in memory and nothing blocks: an
orphan that is due, or whose context has arrived, is enriched again on its own
(``enrich.batch.resolve_quarantine``), and the result (attributed, late, still waiting, or
released as unattributed) is written back here.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

import polars as pl
import psycopg

from audit_platform.enrich.join import Orphan
from audit_platform.platform_db import one
from audit_platform.staging.schemas import with_context_spec


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter, capped."""

    base: timedelta = timedelta(seconds=30)
    cap: timedelta = timedelta(minutes=30)

    def delay(self, attempts: int, rng: random.Random | None = None) -> timedelta:
        ceiling = min(self.cap, self.base * (2 ** max(0, attempts - 1)))
        return ceiling * (rng or random).uniform(0.5, 1.0)


def record_orphans(
    conn: psycopg.Connection,
    env: str,
    orphans: Iterable[Orphan],
    *,
    now: datetime,
    backoff: Backoff = Backoff(),
) -> int:
    """Add new orphans (of any of the environment's sources), or count another attempt for
    known ones; returns how many."""
    rows = [
        (
            env,
            o.source,
            o.lsn,
            o.change_index,
            o.xid,
            o.commit_time,
            now,
            now + backoff.delay(1),
            now + backoff.delay(2),
        )
        for o in orphans
    ]
    if not rows:
        return 0
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO audit_platform.quarantine AS q (env, source, commit_lsn,"
            " change_index, xid, commit_time, first_seen, next_retry_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (env, source, commit_lsn, change_index) DO UPDATE"
            " SET attempts = q.attempts + 1, next_retry_at = %s, status = 'waiting'"
            " WHERE q.status = 'waiting'",
            rows,
        )
    return len(rows)


def settle(conn: psycopg.Connection, env: str, records: pl.DataFrame, *, now: datetime) -> int:
    """Write back what enrichment decided for changes that were (or now become) orphans, of
    any of the environment's sources (the records' ``source``).

    Unattributed records are entered as released even if they never waited (they were past the
    grace window when first seen), so a context attached even later still finds its change.
    Late records resolve their entry.
    """
    orphans = records.filter(pl.col("attribution_status") != "attributed").select(
        "source", "lsn", "change_index", "xid", "commit_time", "attribution_status"
    )
    if orphans.is_empty():  # the usual batch: no round trips
        return 0
    released = [
        (env, source, lsn, index, xid, commit_time, now, now, now, now)
        for source, lsn, index, xid, commit_time, status in orphans.iter_rows()
        if status == "unattributed"
    ]
    resolved = [
        (now, env, source, lsn, index)
        for source, lsn, index, _, _, status in orphans.iter_rows()
        if status != "unattributed"
    ]
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO audit_platform.quarantine AS q (env, source, commit_lsn,"
            " change_index, xid, commit_time, first_seen, next_retry_at, status,"
            " settled_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 'released', %s)"
            " ON CONFLICT (env, source, commit_lsn, change_index) DO UPDATE"
            " SET status = 'released', settled_at = %s WHERE q.status = 'waiting'",
            released,
        )
        cur.executemany(
            "UPDATE audit_platform.quarantine SET status = 'resolved', settled_at = %s"
            " WHERE env = %s AND source = %s AND commit_lsn = %s AND change_index = %s"
            " AND status <> 'resolved'",
            resolved,
        )
    return len(released) + len(resolved)


def store_late_contexts(
    conn: psycopg.Connection, env: str, source: str, contexts: pl.DataFrame
) -> int:
    """Remember contexts attached to past transactions (kind 'attach') seen in staged data."""
    attach = with_context_spec(contexts).filter(pl.col("kind") == "attach")
    rows = [
        (env, source, xid, lsn, context, at, spec)
        for xid, lsn, context, at, spec in attach.select(
            "target_xid", "lsn", "context", "commit_time", "personal_spec"
        ).iter_rows()
    ]
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO audit_platform.late_contexts (env, source, target_xid, lsn,"
            " context, attached_at, personal_spec) VALUES (%s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT DO NOTHING",
            rows,
        )
    return attach.height


def late_contexts_for(
    conn: psycopg.Connection, env: str, source: str, xids: list[int]
) -> pl.DataFrame:
    rows = conn.execute(
        "SELECT source, target_xid, context, attached_at, personal_spec"
        " FROM audit_platform.late_contexts"
        " WHERE env = %s AND source = %s AND target_xid = ANY(%s)",
        (env, source, xids),
    ).fetchall()
    return pl.DataFrame(
        rows,
        schema={
            "source": pl.String,
            "target_xid": pl.Int64,
            "context": pl.String,
            "attached_at": pl.Datetime("us", "UTC"),
            "personal_spec": pl.String,
        },
        orient="row",
    )


_REVISIT = (
    " FROM audit_platform.quarantine q WHERE q.env = %s AND q.source = %s AND ("
    "   (q.status = 'waiting' AND q.next_retry_at <= %s)"
    "   OR (q.status <> 'resolved' AND EXISTS (SELECT 1 FROM audit_platform.late_contexts l"
    "       WHERE l.env = q.env AND l.source = q.source AND l.target_xid = q.xid"
    "       AND l.attached_at >= q.commit_time)))"
)


def entries_to_revisit(
    conn: psycopg.Connection, env: str, source: str, now: datetime, *, limit: int = 10_000
) -> pl.DataFrame:
    """Orphans due for a retry, or whose late context has arrived, oldest first."""
    rows = conn.execute(
        "SELECT q.commit_lsn, q.change_index, q.xid, q.commit_time"
        + _REVISIT
        + " ORDER BY q.commit_lsn, q.change_index LIMIT %s",
        (env, source, now, limit),
    ).fetchall()
    return pl.DataFrame(
        rows,
        schema={
            "lsn": pl.Int64,
            "change_index": pl.Int32,
            "xid": pl.Int64,
            "commit_time": pl.Datetime("us", "UTC"),
        },
        orient="row",
    )


def revisit_count(conn: psycopg.Connection, env: str, source: str, now: datetime) -> int:
    """How many orphans are due or have their context: what the quarantine sensor asks."""
    return one(conn.execute("SELECT count(*)" + _REVISIT, (env, source, now)))[0]


@dataclass(frozen=True)
class QuarantineStats:
    waiting: int
    released: int
    oldest_waiting: datetime | None


def stats(conn: psycopg.Connection, env: str, source: str) -> QuarantineStats:
    return stats_by_source(conn, env, [source])[source]


def stats_by_source(
    conn: psycopg.Connection, env: str, sources: list[str]
) -> dict[str, QuarantineStats]:
    """Every named source's figures in one query (a live run reports a whole shard)."""
    found = {
        source: QuarantineStats(waiting, released, oldest)
        for source, waiting, released, oldest in conn.execute(
            "SELECT source, count(*) FILTER (WHERE status = 'waiting'),"
            " count(*) FILTER (WHERE status = 'released'),"
            " min(commit_time) FILTER (WHERE status = 'waiting')"
            " FROM audit_platform.quarantine WHERE env = %s AND source = ANY(%s)"
            " GROUP BY source",
            (env, sources),
        )
    }
    return {s: found.get(s, QuarantineStats(0, 0, None)) for s in sources}


def waiting_in_transaction(conn: psycopg.Connection, env: str, source: str, lsn: int) -> int:
    """Changes of one transaction (by commit LSN) still waiting here for a context."""
    return one(
        conn.execute(
            "SELECT count(*) FROM audit_platform.quarantine WHERE env = %s AND source = %s"
            " AND commit_lsn = %s AND status = 'waiting'",
            (env, source, lsn),
        )
    )[0]
