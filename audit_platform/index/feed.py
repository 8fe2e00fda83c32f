"""The streams' feed: what indexing did, per source in the order it did it.

Indexing adds each ledger entry whose documents are in (``index.batch``) before the entry leaves
the ledger, so a crash between the two re-indexes the entry and adds nothing: an entry is known
by what it indexes, its records files and ids, so neither a second indexing nor the same batch's
entry written again under another name by a recovery adds a second one. A delivery reads
entries after its cursor and, from their records files, the ids of the records to send, in
commit order; the documents themselves it reads from Elasticsearch, so a stream sends what a
search returns (a record dead-lettered by Elasticsearch is not sent, a
record re-indexed with its late context is sent again, as it now reads).

Why entries and not a time or an LSN range: records become searchable out of commit order (an
orphan released from the quarantine, a late context), and a cursor over either would skip or
repeat them. The feed is small (one row per batch, not per record) and trimmed once every
stream has passed an entry (``trim``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import polars as pl
import psycopg

from audit_platform.staging.store import PendingBatch, StagingStore


@dataclass(frozen=True)
class FeedEntry:
    seq: int
    source: str
    records: tuple[str, ...]
    ids: tuple[str, ...] | None
    indexed_at: datetime

    def records_in(self, store: StagingStore) -> list[tuple[str, tuple[int, int]]]:
        """The entry's records as (id, (commit LSN, change index)), in that order, less those
        the indexing dead-lettered (Elasticsearch refused them; ``index.batch``); a file
        retention has removed reads as none. A quarantine resolution may add records to the
        files later: a position, not an offset, says how far a stream is."""
        frame = store.read(self.records, columns=["id", "lsn", "change_index"])
        if frame.is_empty():
            return []
        if self.ids is not None:
            frame = frame.filter(pl.col("id").is_in(pl.Series(self.ids, dtype=pl.String).implode()))
        refused = store.read(
            [p.replace("/records/", "/deadletter/", 1) for p in self.records], columns=["id"]
        )
        if refused.height:
            frame = frame.filter(~pl.col("id").is_in(refused.get_column("id").implode()))
        frame = frame.unique("id").sort("lsn", "change_index")
        return [
            (i, (lsn, index))
            for i, lsn, index in frame.select("id", "lsn", "change_index").iter_rows()
        ]


def add(conn: psycopg.Connection, env: str, source: str, entries: Iterable[PendingBatch]) -> None:
    rows = []
    for entry in entries:
        if not entry.records:
            continue
        records, ids = sorted(entry.records), sorted(entry.ids) if entry.ids else None
        contents = hashlib.sha256(json.dumps([records, ids]).encode()).digest()
        rows.append((env, source, entry.name, contents, records, ids))
    if not rows:
        return
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO audit_platform.stream_feed (env, source, entry, contents, records, ids)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (env, source, contents) DO NOTHING",
            rows,
        )


def last_seq(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT coalesce(max(seq), 0) FROM audit_platform.stream_feed").fetchone()
    return int(row[0]) if row else 0


def sources(conn: psycopg.Connection, env: str, after: int) -> list[str]:
    """Sources with entries after ``after`` (a stream's start)."""
    rows = conn.execute(
        "SELECT DISTINCT source FROM audit_platform.stream_feed WHERE env = %s AND seq > %s",
        (env, after),
    ).fetchall()
    return sorted(row[0] for row in rows)


def entries(
    conn: psycopg.Connection, env: str, source: str, from_seq: int, limit: int
) -> list[FeedEntry]:
    """The source's entries from ``from_seq`` on, oldest first."""
    rows = conn.execute(
        "SELECT seq, source, records, ids, indexed_at FROM audit_platform.stream_feed"
        " WHERE env = %s AND source = %s AND seq >= %s ORDER BY seq LIMIT %s",
        (env, source, from_seq, limit),
    ).fetchall()
    return [
        FeedEntry(seq, src, tuple(records), tuple(ids) if ids is not None else None, at)
        for seq, src, records, ids, at in rows
    ]


def trim(conn: psycopg.Connection, env: str, keep_after: datetime) -> int:
    """Remove entries every live stream of ``env`` has passed and that are older than
    ``keep_after`` (a stream created later starts after them anyway)."""
    cur = conn.execute(
        """
        DELETE FROM audit_platform.stream_feed AS f
        WHERE f.env = %(env)s AND f.indexed_at < %(keep_after)s
          AND NOT EXISTS (
            SELECT 1 FROM audit_platform.streams AS s
            LEFT JOIN audit_platform.stream_cursors AS c ON c.stream = s.id AND c.source = f.source
            WHERE s.env = f.env AND s.deleted_at IS NULL AND f.seq > s.start_seq
              AND (c.seq IS NULL OR c.seq <= f.seq)
          )
        """,
        {"env": env, "keep_after": keep_after},
    )
    return cur.rowcount
