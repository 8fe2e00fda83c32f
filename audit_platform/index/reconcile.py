"""Reconciliation: records staged for an hour against documents indexed for it, and, for an
hour that is short, which of its batches are short, so that only those are indexed again.

Documents are counted in the indices of the source's retention class, which every source of the
class shares, with a ``source.service`` term: where the source's records must be, not wherever
the read alias finds a copy (an index of the layout before classes, until it is migrated)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import polars as pl
from elasticsearch import Elasticsearch

from audit_platform.naming import STANDARD_CLASS, class_index_pattern
from audit_platform.staging.store import StagingStore, lsn_range


@dataclass(frozen=True)
class HourCounts:
    hour: datetime
    staged: int
    indexed: int
    dead_lettered: int

    @property
    def missing(self) -> int:
        return self.staged - self.dead_lettered - self.indexed


def hour_counts(
    client: Elasticsearch,
    store: StagingStore,
    hour: datetime,
    retention_class: str = STANDARD_CLASS,
) -> HourCounts:
    """Records staged for an hour against documents indexed for it (dead letters excluded).

    Staged counts come from the Parquet footers of the hour's files, so this reads no data.
    """
    staged = store.count_rows(store.hour_files("records", hour))
    dead = store.count_rows(store.hour_files("deadletter", hour))
    indexed = client.count(
        index=class_index_pattern(store.env, retention_class),
        query=_hour_query(store, hour),
        ignore_unavailable=True,
        allow_no_indices=True,
    )["count"]
    return HourCounts(hour, staged, indexed, dead)


def short_batches(
    client: Elasticsearch,
    store: StagingStore,
    hour: datetime,
    retention_class: str = STANDARD_CLASS,
) -> list[str]:
    """The records files of an hour with fewer documents indexed than records staged.

    Files are grouped where their LSN ranges overlap (the parts of a transaction lie inside the
    batch that completed it), so each group's range holds exactly its files' records; one range
    aggregation then counts the documents of every group.
    """
    files = store.hour_files("records", hour)
    dead = {path.rsplit("/", 1)[1]: path for path in store.hour_files("deadletter", hour)}
    groups: list[tuple[int, int, list[str]]] = []
    for path in sorted(files, key=lsn_range):
        first, last = lsn_range(path)
        if groups and first <= groups[-1][1]:
            low, high, members = groups[-1]
            groups[-1] = (low, max(high, last), [*members, path])
        else:
            groups.append((first, last, [path]))
    if not groups:
        return []
    found = client.search(
        index=class_index_pattern(store.env, retention_class),
        size=0,
        query=_hour_query(store, hour),
        aggs={
            "groups": {
                "range": {
                    "field": "transaction.lsn",
                    "ranges": [{"from": low, "to": high + 1} for low, high, _ in groups],
                }
            }
        },
        ignore_unavailable=True,
        allow_no_indices=True,
    )
    buckets = found.get("aggregations", {}).get("groups", {}).get("buckets", [])
    indexed = [bucket["doc_count"] for bucket in buckets] or [0] * len(groups)
    short: list[str] = []
    for (_, _, members), count in zip(groups, indexed, strict=True):
        names = [m.rsplit("/", 1)[1] for m in members]
        expected = store.count_rows(members) - store.count_rows(
            [dead[n] for n in names if n in dead]
        )
        if count < expected:
            short.extend(members)
    return short


def _hour_query(store: StagingStore, hour: datetime) -> dict:
    return {
        "bool": {
            "filter": [
                {"term": {"env": store.env}},
                {"term": {"source.service": store.source}},
                {
                    "range": {
                        "@timestamp": {
                            "gte": hour.isoformat(),
                            "lt": (hour + timedelta(hours=1)).isoformat(),
                        }
                    }
                },
            ]
        }
    }


@dataclass(frozen=True)
class HourTransactions:
    """Transactions of an hour against the records they should have (captured changes less
    those the policy ignores): fewer means changes were rejected or are still missing."""

    hour: datetime
    transactions: int
    incomplete: list[tuple[int, int, int]]  # (commit LSN, records expected, records staged)


def hour_transactions(store: StagingStore, hour: datetime) -> HourTransactions:
    files = store.hour_files("records", hour)
    if not files:
        return HourTransactions(hour, 0, [])
    frame = store.read(files, "records")
    if "txn_changes" not in frame.columns:  # records written before transactions were counted
        return HourTransactions(hour, frame["lsn"].n_unique(), [])
    per = frame.group_by("lsn").agg(
        (pl.col("txn_changes").first() - pl.col("txn_ignored").first().fill_null(0)).alias(
            "expected"
        ),
        pl.len().alias("staged"),
    )
    short = per.filter(pl.col("expected").is_not_null() & (pl.col("staged") < pl.col("expected")))
    return HourTransactions(hour, per.height, sorted(short.iter_rows()))
