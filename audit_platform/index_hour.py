"""Index one enriched hour, and reconcile staged records with indexed documents per hour.

Both read the hour's records from staging, so indexing an hour again (reconciliation, backfill,
a retried run) produces the same documents under the same ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from elasticsearch import Elasticsearch

from audit_platform.index import IndexResult, index_records
from audit_platform.naming import read_alias
from audit_platform.staging import StagingStore


@dataclass
class HourIndexed:
    hour: datetime
    records: int
    result: IndexResult
    dead_letter_path: str | None

    @property
    def metadata(self) -> dict[str, float | int]:
        return {
            "records": self.records,
            "indexed": self.result.indexed,
            "failed": self.result.failed.height,
            "seconds": round(self.result.seconds, 3),
        }


def index_hour(
    client: Elasticsearch, store: StagingStore, hour: datetime, *, database: str, now: datetime
) -> HourIndexed:
    records = store.read_hour("records", hour)
    if records is None or records.is_empty():
        return HourIndexed(hour, 0, IndexResult(), None)
    result = index_records(client, records, database=database, ingested_at=now)
    dead_letter = None
    if result.failed.height:
        dead_letter = store.replace_hour("deadletter", hour, result.failed)
    return HourIndexed(hour, records.height, result, dead_letter)


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
    """Records staged for an hour against documents indexed for it (dead letters excluded)."""
    records = store.read_hour("records", hour)
    dead = store.read_hour("deadletter", hour)
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
    staged = 0 if records is None else records.height
    return HourCounts(hour, staged, indexed, 0 if dead is None else dead.height)
