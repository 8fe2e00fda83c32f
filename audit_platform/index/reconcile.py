"""Reconciliation: records staged for an hour against documents indexed for it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from elasticsearch import Elasticsearch

from audit_platform.naming import read_alias
from audit_platform.staging.store import StagingStore


@dataclass(frozen=True)
class HourCounts:
    hour: datetime
    staged: int
    indexed: int
    dead_lettered: int

    @property
    def missing(self) -> int:
        return self.staged - self.dead_lettered - self.indexed


def hour_counts(client: Elasticsearch, store: StagingStore, hour: datetime) -> HourCounts:
    """Records staged for an hour against documents indexed for it (dead letters excluded).

    Staged counts come from the Parquet footers of the hour's files, so this reads no data.
    """
    staged = store.count_rows(store.hour_files("records", hour))
    dead = store.count_rows(store.hour_files("deadletter", hour))
    indexed = client.count(
        index=read_alias(store.env),
        query={
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
        },
        ignore_unavailable=True,
        allow_no_indices=True,
    )["count"]
    return HourCounts(hour, staged, indexed, dead)
