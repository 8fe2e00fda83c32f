"""The audit record: one document per row change. The one definition of its shape.

Field names follow the Elastic Common Schema where ECS has the field (``@timestamp``,
``event.action``, ``user.id``, ``user.name``, ``service.name``, ``trace.id``, ``client.ip``), so
Kibana and SIEM tools read the index without mapping work; the rest lives under ``audit``-
specific names documented here.
"""

from __future__ import annotations

import types
from datetime import datetime
from enum import StrEnum
from typing import Any, Union, get_args, get_origin

import polars as pl
from pydantic import BaseModel, ConfigDict, Field


class Operation(StrEnum):
    insert = "insert"
    update = "update"
    delete = "delete"
    truncate = "truncate"


class AttributionStatus(StrEnum):
    #: The transaction recorded its context itself.
    attributed = "attributed"
    #: The context arrived after the change (audit.attach_context), within the grace window
    #: or after the change had been released.
    late = "late"
    #: No context arrived within the grace window; re-enriched if one arrives later.
    unattributed = "unattributed"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Source(_Model):
    service: str = Field(description="The source's name in this platform (its policy file).")
    database: str


class Table(_Model):
    schema_: str = Field(alias="schema")
    name: str


class Attribution(_Model):
    status: AttributionStatus
    lag_seconds: float | None = Field(
        default=None, description="Commit of the change to commit of its late context."
    )


class Transaction(_Model):
    xid: int
    commit_lsn: str = Field(description="Commit LSN as PostgreSQL prints it (X/X).")
    lsn: int = Field(description="The same LSN as a number: the order of commits in a source.")
    change_index: int
    changes: int | None = Field(
        default=None,
        description="Changes capture staged for this transaction (absent on "
        "records indexed before template version 4).",
    )
    ignored: int | None = Field(
        default=None,
        description="Of those, how many the policy's ignore_changes_to dropped "
        "(no record is expected for them).",
    )


class Event(_Model):
    action: Operation
    kind: str = "event"
    category: list[str] = ["database"]
    type: list[str] = Field(description="ECS event.type: creation, change or deletion.")


class User(_Model):
    id: str | None = None
    name: str | None = None


class ServiceField(_Model):
    name: str | None = None


class TraceField(_Model):
    id: str | None = None


class Client(_Model):
    ip: str | None = None


ECS_EVENT_TYPE = {
    Operation.insert: ["creation"],
    Operation.update: ["change"],
    Operation.delete: ["deletion"],
    Operation.truncate: ["deletion"],
}


class RowShape(_Model):
    key: list[str] = Field(
        description="Columns that identify the row: its primary key, or the key its policy names."
    )
    types: dict[str, str] = Field(
        description="Each captured column's PostgreSQL type, as format_type prints it "
        "(what a revert plan casts its literals to)."
    )


class AuditRecord(_Model):
    """One row change, with who, what, where, when and why."""

    id: str = Field(description="Deterministic: env, source, commit LSN, change index.")
    timestamp: datetime = Field(alias="@timestamp", description="Commit time (UTC).")
    env: str
    source: Source
    table: Table
    operation: Operation
    event: Event
    object_id: str | None = Field(
        description="Primary key as text; composite keys joined with ',' (',' and '\\' in a "
        "value are escaped with '\\'). None for a truncate."
    )
    changed_columns: list[str]
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    values_text: str = Field(description="The row's values as free text, for full-text search.")
    context: dict[str, Any] | None
    user: User
    service: ServiceField
    trace: TraceField
    client: Client
    attribution: Attribution
    transaction: Transaction
    row: RowShape | None = Field(
        default=None,
        description="The row's key and column types; absent on records indexed "
        "before template version 3.",
    )
    policy_version: str
    ingested_at: datetime

    def document(self) -> dict[str, Any]:
        """The Elasticsearch document (``_id`` is :attr:`id`, not part of the body)."""
        return self.model_dump(mode="json", by_alias=True, exclude={"id"})


def object_id(values: list[str | None]) -> str:
    """Join key values reversibly: ``\\`` and ``,`` inside a value are escaped with ``\\``."""
    parts = ["" if v is None else v.replace("\\", "\\\\").replace(",", "\\,") for v in values]
    return ",".join(parts)


def split_object_id(text: str) -> list[str]:
    """The inverse of :func:`object_id`."""
    parts, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ",":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def record_id(env: str, source: str, commit_lsn: int, change_index: int) -> str:
    """Re-processing the same change always produces the same ``_id`` (invariant 2)."""
    return f"{env}:{source}:{commit_lsn:016X}:{change_index}"


#: The record as enrichment stages it (``records/`` Parquet, one row per record): flat columns,
#: with the row images, the context and the changed columns kept as the JSON text capture wrote,
#: so indexing splices them into documents without parsing them again
#: (``index.documents.document_frame`` maps these columns onto :class:`AuditRecord`).
RECORD_SCHEMA = pl.Schema(
    {
        "id": pl.String(),
        "commit_time": pl.Datetime("us", "UTC"),
        "env": pl.String(),
        "source": pl.String(),
        "schema": pl.String(),
        "table": pl.String(),
        "operation": pl.String(),
        "object_id": pl.String(),
        "changed_columns": pl.String(),  # JSON array
        "before": pl.String(),  # JSON object or null
        "after": pl.String(),
        "context": pl.String(),
        "attribution_status": pl.String(),
        "attribution_lag_seconds": pl.Float64(),
        "xid": pl.Int64(),
        "lsn": pl.Int64(),
        "change_index": pl.Int32(),
        "key_columns": pl.String(),  # JSON array
        "column_types": pl.String(),  # JSON object: column -> type
        "txn_changes": pl.Int32(),  # changes capture staged for the record's transaction
        "txn_ignored": pl.Int32(),  # of those, dropped by the policy's ignore_changes_to
        "policy_version": pl.String(),
    }
)


def model_leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted names (by alias) of a model's fields, nested models expanded, in declaration
    order: how exports and contract tests walk the record without restating it."""
    found: list[str] = []
    for name, info in model.model_fields.items():
        key = prefix + (info.alias or name)
        nested = _model_in(info.annotation)
        found.extend(model_leaves(nested, key + ".") if nested else [key])
    return found


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model inside ``Model`` or ``Model | None``, if any."""
    candidates = (
        get_args(annotation)
        if get_origin(annotation) in (Union, types.UnionType)
        else (annotation,)
    )
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None
