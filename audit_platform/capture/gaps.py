"""Gaps: ranges of a source's WAL that capture could not read, recorded as facts of the trail.

A slot is lost when PostgreSQL invalidates it (``max_slot_wal_keep_size`` reached) or when
someone drops it. Capture then stops loudly (:class:`~audit_platform.capture.slot.SlotLost`,
:class:`~audit_platform.capture.slot.SlotMissing`); replacing the slot with
``audit-platform source setup`` records what fell between the old slot's last confirmed position
and the new slot's start here, so an investigator sees "changes between these positions were
not captured" instead of a silent hole.
"""

from __future__ import annotations

from datetime import datetime

import polars as pl
import psycopg
from psycopg.rows import class_row
from pydantic import BaseModel, ConfigDict, Field

from audit_platform.lsn import lsn_text
from audit_platform.platform_db import one
from audit_platform.staging import StagingStore, lsn_range


class Gap(BaseModel):
    env: str
    source: str
    from_lsn: int
    to_lsn: int
    last_captured_at: datetime | None
    detected_at: datetime | None = None
    reason: str
    rebaselined_by: str | None = Field(
        default=None,
        description="The snapshot that recorded the source's rows after the gap: from its "
        "records on, every row's state is known again. None: no snapshot has yet.",
    )
    rebaselined_at: datetime | None = None

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "env": "prod",
                    "source": "shop",
                    "from_lsn": 23806728,
                    "to_lsn": 91431168,
                    "last_captured_at": "2026-11-27T03:12:09.123456Z",
                    "detected_at": "2026-11-27T04:00:00Z",
                    "reason": "the slot was invalidated by PostgreSQL (wal_status = lost) "
                    "and replaced",
                    "rebaselined_by": "20261127T041500Z-3f9a0c",
                    "rebaselined_at": "2026-11-27T04:31:12Z",
                }
            ]
        }
    )

    def describe(self) -> str:
        since = ""
        if self.last_captured_at is not None:
            since = f" (last change captured at {self.last_captured_at:%Y-%m-%d %H:%M:%S%z})"
        if self.rebaselined_by is None:
            after = (
                f"; no snapshot has re-baselined it yet: audit-platform source snapshot --env "
                f"{self.env} --source {self.source} records every row as it is now"
            )
        else:
            after = f"; re-baselined by snapshot {self.rebaselined_by}"
        return (
            f"changes of source {self.source} committed after {lsn_text(self.from_lsn)} and "
            f"before {lsn_text(self.to_lsn)} were not captured{since}: {self.reason}{after}"
        )


def last_staged(store: StagingStore) -> tuple[int, datetime | None] | None:
    """The end LSN of the last staged batch and its last commit time; None if nothing is."""
    files = store.files("changes")
    if not files:
        return None
    last = max(files, key=lambda path: lsn_range(path)[1])
    commit = pl.read_parquet(store.fs.open(last, "rb"), columns=["commit_time"])["commit_time"]
    latest = commit.max()
    return lsn_range(last)[1], latest if isinstance(latest, datetime) else None


def record_gap(conn: psycopg.Connection, gap: Gap) -> Gap:
    row = one(
        conn.execute(
            "INSERT INTO audit_platform.capture_gaps"
            " (env, source, from_lsn, to_lsn, last_captured_at, reason)"
            " VALUES (%s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (env, source, from_lsn) DO UPDATE SET to_lsn = EXCLUDED.to_lsn"
            " RETURNING detected_at",
            (gap.env, gap.source, gap.from_lsn, gap.to_lsn, gap.last_captured_at, gap.reason),
        )
    )
    return gap.model_copy(update={"detected_at": row[0]})


#: A gap's columns, as :class:`Gap` reads them.
_COLUMNS = (
    "env, source, from_lsn, to_lsn, last_captured_at, detected_at, reason, rebaselined_by,"
    " rebaselined_at"
)


def list_gaps(conn: psycopg.Connection, env: str, sources: frozenset[str] | None) -> list[Gap]:
    with conn.cursor(row_factory=class_row(Gap)) as cur:
        return cur.execute(
            f"SELECT {_COLUMNS} FROM audit_platform.capture_gaps WHERE env = %(env)s"
            " AND (%(sources)s::text[] IS NULL OR source = ANY(%(sources)s::text[]))"
            " ORDER BY detected_at, source",
            {"env": env, "sources": sorted(sources) if sources is not None else None},
        ).fetchall()


def rebaseline_gaps(
    conn: psycopg.Connection, env: str, source: str, snapshot_id: str, started_lsn: int
) -> list[Gap]:
    """Name ``snapshot_id`` in every gap of the source it re-baselines, and return those.

    The caller has finished a snapshot of every tracked table, without a condition, that began
    at ``started_lsn``: each gap that ends at or before that (and has no snapshot yet) is
    behind it. A gap that ends later happened while the snapshot ran, and some of its chunks
    may have fallen into it: then the snapshot vouches for nothing, and no gap names it."""
    with conn.cursor(row_factory=class_row(Gap)) as cur:
        return cur.execute(
            "UPDATE audit_platform.capture_gaps SET rebaselined_by = %s, rebaselined_at = now()"
            " WHERE env = %s AND source = %s AND rebaselined_by IS NULL AND to_lsn <= %s"
            " AND NOT EXISTS (SELECT FROM audit_platform.capture_gaps later"
            " WHERE later.env = %s AND later.source = %s AND later.to_lsn > %s)"
            f" RETURNING {_COLUMNS}",
            (snapshot_id, env, source, started_lsn, env, source, started_lsn),
        ).fetchall()


def gap_of_new_slot(
    env: str,
    source: str,
    store: StagingStore,
    *,
    slot_start: int | None,
    replaced_from: int | None,
) -> Gap | None:
    """The gap a slot created by setup leaves, if any.

    A replaced (invalidated) slot leaves the range after what it had confirmed. A slot created
    where staging already holds batches of this source replaces one that was dropped: it leaves
    the range after the last staged batch. A first slot leaves none.
    """
    if slot_start is None:
        return None
    staged = last_staged(store)
    if replaced_from is not None:
        reason = "the slot was invalidated by PostgreSQL (wal_status = lost) and replaced"
        start = replaced_from
    elif staged is not None:
        reason = "the slot was missing (dropped outside audit-platform) and was created again"
        start = staged[0]
    else:
        return None
    return Gap(
        env=env,
        source=source,
        from_lsn=start,
        to_lsn=max(start, slot_start),
        last_captured_at=staged[1] if staged else None,
        reason=reason,
    )
