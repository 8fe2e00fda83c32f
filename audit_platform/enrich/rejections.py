"""Rejected messages: what a source emitted under our prefix that is not a valid context.

The decoder stages such a message as a context of kind ``rejected`` (its size and the reason,
never its content: see ``capture.messages``); enrichment records it here, once, in the same
transaction as the rest of the batch's state, and appends a leaf for it to the trail. The API
lists them, so "someone on this database tried to attribute changes with a forged or broken
context" is a fact an investigator can find, not a log line.
"""

from __future__ import annotations

from datetime import datetime

import orjson
import polars as pl
import psycopg
from psycopg.rows import class_row
from pydantic import BaseModel

REJECTED = "rejected"


class RejectedMessage(BaseModel):
    env: str
    source: str
    commit_lsn: str
    xid: int
    committed_at: datetime
    prefix: str
    bytes: int
    reason: str


def rejected_frame(contexts: pl.DataFrame) -> pl.DataFrame:
    """The staged contexts that are rejections, with their detail as columns."""
    rejected = contexts.filter(pl.col("kind") == REJECTED)
    details = [orjson.loads(text) for text in rejected["context"]]
    return rejected.select("lsn", "seq", "xid", "commit_time").with_columns(
        pl.Series("prefix", [d["prefix"] for d in details], pl.String),
        pl.Series("bytes", [d["bytes"] for d in details], pl.Int64),
        pl.Series("reason", [d["reason"] for d in details], pl.String),
    )


def store_rejections(
    conn: psycopg.Connection, env: str, source: str, rejected: pl.DataFrame
) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO audit_platform.rejected_messages (env, source, lsn, seq, xid,"
            " committed_at, prefix, bytes, reason) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT DO NOTHING",
            [
                (env, source, *row)
                for row in rejected.select(
                    "lsn", "seq", "xid", "commit_time", "prefix", "bytes", "reason"
                ).iter_rows()
            ],
        )


def list_rejections(
    conn: psycopg.Connection,
    env: str,
    sources: frozenset[str] | None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
) -> list[RejectedMessage]:
    with conn.cursor(row_factory=class_row(RejectedMessage)) as cur:
        return cur.execute(
            "SELECT env, source, (pg_lsn '0/0' + lsn)::text AS commit_lsn, xid, committed_at,"
            " prefix, bytes, reason FROM audit_platform.rejected_messages"
            " WHERE env = %(env)s"
            " AND (%(sources)s::text[] IS NULL OR source = ANY(%(sources)s::text[]))"
            " AND (%(since)s::timestamptz IS NULL OR committed_at >= %(since)s)"
            " AND (%(until)s::timestamptz IS NULL OR committed_at < %(until)s)"
            " ORDER BY committed_at DESC, source, lsn, seq LIMIT %(limit)s",
            {
                "env": env,
                "sources": sorted(sources) if sources is not None else None,
                "since": since,
                "until": until,
                "limit": limit,
            },
        ).fetchall()
