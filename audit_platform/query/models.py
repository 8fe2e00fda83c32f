"""The answers the query layer gives: pages of records, transactions, histories, states, counts.

These are the Audit API's response bodies, so they are the API's contract too; every record in
them is an :class:`~audit_platform.record.AuditRecord`, the one shape of an audit document.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from audit_platform.record import Attribution, AuditRecord


class Total(BaseModel):
    value: int
    exact: bool = Field(description="False when there are more than `value` matches.")


class EventPage(BaseModel):
    events: list[AuditRecord]
    total: Total
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page."
    )


class TransactionGroup(BaseModel):
    source: str
    xid: int
    commit_lsn: str
    timestamp: datetime = Field(description="Commit time (UTC).")
    context: dict[str, Any] | None
    attribution: Attribution
    changes: list[AuditRecord]


class Completeness(BaseModel):
    """Whether every change capture staged for a transaction is searchable, as Debezium's
    transaction metadata lets a consumer check its event count.

    For a key limited to tables, only ``indexed`` is given (counted within its tables); the
    others are null: they are figures of the whole transaction, which may hold changes of
    tables the key may not read."""

    captured: int | None = Field(description="Changes capture staged for the transaction.")
    ignored: int | None = Field(
        description="Of those, dropped by the policy's ignore_changes_to: no record is expected."
    )
    indexed: int = Field(description="Records of the transaction in the index.")
    waiting: int | None = Field(description="Changes in the quarantine, waiting for a context.")
    missing: int | None = Field(
        description="Expected but neither indexed nor waiting: "
        "dead-lettered, rejected, or not indexed yet."
    )
    complete: bool | None
    explanation: str

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "captured": 3,
                    "ignored": 1,
                    "indexed": 1,
                    "waiting": 0,
                    "missing": 1,
                    "complete": False,
                    "explanation": "1 of 3 neither indexed nor waiting: see the source's "
                    "dead-letter and rejected datasets, or wait for the next run",
                }
            ]
        }
    )


class TransactionView(TransactionGroup):
    completeness: Completeness | None = None
    next_cursor: str | None


class Correlation(BaseModel):
    """Every change made under one request id, job run or trace, across the sources a key may
    read, in commit order and grouped by transaction."""

    kind: Literal["request", "job_run", "trace"]
    key: dict[str, str] = Field(description="What the changes share, e.g. the request id.")
    transactions: list[TransactionGroup] = Field(
        description="On this page, in commit order. A transaction cut by the page's end goes "
        "on at the start of the next page."
    )
    sources: list[str] = Field(description="Sources with changes on this page.")
    next_cursor: str | None

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "kind": "request",
                    "key": {"request_id": "req-42"},
                    "sources": ["billing", "shop"],
                    "transactions": [],
                    "next_cursor": None,
                }
            ]
        }
    )


class ColumnDiff(BaseModel):
    column: str
    before: Any = None
    after: Any = None


class HistoryEntry(BaseModel):
    event: AuditRecord
    diff: list[ColumnDiff] = Field(description="Each changed column with its old and new value.")


class ObjectHistory(BaseModel):
    source: str
    table: str
    object_id: str
    changes: list[HistoryEntry]
    next_cursor: str | None


class SchemaHistory(BaseModel):
    """A table's schema changes (records with operation ``ddl``), each with its images: the
    table's shape before and after (columns and types, primary key, replica identity)."""

    source: str
    table: str
    changes: list[AuditRecord]
    next_cursor: str | None


class ObjectState(BaseModel):
    source: str
    table: str
    object_id: str
    at: datetime
    status: Literal["present", "deleted", "unknown"] = Field(
        description="present: `row` is the row at `at`; deleted: deleted (or truncated) by then; "
        "unknown: no record at or before `at` is kept, see `explanation`."
    )
    row: dict[str, Any] | None = Field(
        description="Columns as the tracking policy records them (masked columns are hashes, "
        "excluded columns are absent)."
    )
    as_of: AuditRecord | None = Field(description="The record the state was taken from.")
    explanation: str | None = None
    earliest_retained: datetime | None = Field(
        default=None, description="Oldest record kept for this source (when status is unknown)."
    )
    columns: dict[str, str] | None = Field(
        default=None,
        description="The table's columns at `at` and their types, from its schema history (the "
        "last schema change at or before `at`); `row` holds only these. None: no schema change "
        "of the table is recorded by then, and `row` is as its record has it.",
    )
    schema_as_of: AuditRecord | None = Field(
        default=None, description="The schema change `columns` were taken from."
    )
    not_recorded: list[str] = Field(
        default=[],
        description="Columns the table had at `at` that were added after the row's record: "
        "their value then is not in the trail (the column's default, unless set without a "
        "recorded change).",
    )


class Bucket(BaseModel):
    key: str
    count: int


class TimeBucket(BaseModel):
    start: datetime
    count: int


class Stats(BaseModel):
    since: datetime
    until: datetime
    total: int
    by_source: list[Bucket]
    by_table: list[Bucket]
    by_operation: list[Bucket]
    by_actor: list[Bucket]
    by_attribution: list[Bucket]
    over_time: list[TimeBucket]


class ActorActivity(BaseModel):
    actor_id: str
    first_seen: datetime | None
    last_seen: datetime | None
    stats: Stats
    recent: list[AuditRecord]
