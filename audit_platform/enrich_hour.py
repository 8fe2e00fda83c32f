"""Enrich one staged hour of one source: read, join, write records, update the quarantine.

The hour is rebuilt whole every time (from its immutable staged files), so running it again,
from a capture run, a quarantine retry or a backfill, gives the same records.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import polars as pl
import psycopg

from audit_platform import quarantine
from audit_platform.capture.run import CHANGES_SCHEMA, CONTEXTS_SCHEMA
from audit_platform.enrich import EnrichResult, enrich, transaction_contexts
from audit_platform.policy import SourcePolicy
from audit_platform.staging import StagingStore


@dataclass
class HourResult:
    hour: datetime
    changes: int
    result: EnrichResult
    records_path: str | None
    rejected_path: str | None

    @property
    def metadata(self) -> dict[str, int | float]:
        counts = self.result.counts
        orphan_rate = (
            (counts["orphans_waiting"] + counts["unattributed"]) / self.changes
            if self.changes
            else 0.0
        )
        return {"changes": self.changes, **counts, "orphan_rate": round(orphan_rate, 4)}


def _empty(schema: dict) -> pl.DataFrame:
    frame = pl.DataFrame(schema={k: v for k, v in schema.items() if k != "commit_time_us"})
    return frame.with_columns(pl.lit(None, pl.Datetime("us", "UTC")).alias("commit_time"))


def enrich_hour(
    store: StagingStore,
    state: psycopg.Connection,
    policy: SourcePolicy,
    hour: datetime,
    *,
    now: datetime,
    grace: timedelta,
) -> HourResult:
    changes = store.read_hour("changes", hour)
    contexts = store.read_hour("contexts", hour)
    changes = changes if changes is not None else _empty(CHANGES_SCHEMA)
    contexts = contexts if contexts is not None else _empty(CONTEXTS_SCHEMA)
    env, source = store.env, store.source
    with state.transaction():
        quarantine.store_late_contexts(state, env, source, contexts)
        own = transaction_contexts(contexts).select("lsn", "xid")
        unmatched = changes.join(own, on=["lsn", "xid"], how="anti")["xid"].unique().to_list()
        late = quarantine.late_contexts_for(state, env, source, unmatched)
        result = enrich(changes, contexts, policy, now=now, grace=grace, late_contexts=late)
        records_path = rejected_path = None
        if not changes.is_empty():
            records_path = store.replace_hour("records", hour, result.records)
        if result.rejected:
            rejected = pl.DataFrame(
                result.rejected, schema=["lsn", "change_index", "reason"], orient="row"
            )
            rejected_path = store.replace_hour("rejected", hour, rejected)
        quarantine.record_orphans(state, env, source, result.orphans, now=now)
        quarantine.settle(state, env, source, result.records, now=now)
    return HourResult(hour, changes.height, result, records_path, rejected_path)
