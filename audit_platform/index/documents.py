"""Records as Elasticsearch documents, shaped by :class:`AuditRecord`, with their index and id."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import polars as pl

from audit_platform.naming import index_name
from audit_platform.record import ECS_EVENT_TYPE, AuditRecord, Operation


def documents(
    records: pl.DataFrame, *, database: str, ingested_at: datetime
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(index, _id, document) for each record, shaped by :class:`AuditRecord`."""
    for row in records.iter_rows(named=True):
        context = json.loads(row["context"]) if row["context"] is not None else None
        actor = (context or {}).get("actor", {})
        before = json.loads(row["before"]) if row["before"] is not None else None
        after = json.loads(row["after"]) if row["after"] is not None else None
        operation = Operation(row["operation"])
        committed: datetime = row["commit_time"]
        lsn = row["lsn"]
        document = {
            "@timestamp": committed.isoformat(),
            "env": row["env"],
            "source": {"service": row["source"], "database": database},
            "table": {"schema": row["schema"], "name": row["table"]},
            "operation": operation.value,
            "event": {
                "action": operation.value,
                "kind": "event",
                "category": ["database"],
                "type": ECS_EVENT_TYPE[operation],
            },
            "object_id": row["object_id"],
            "changed_columns": json.loads(row["changed_columns"]),
            "before": before,
            "after": after,
            "values_text": " ".join(
                str(v) for image in (before, after) if image for v in image.values() if v
            ),
            "context": context,
            "user": {"id": actor.get("id"), "name": actor.get("name")},
            "service": {"name": (context or {}).get("service")},
            "trace": {"id": (context or {}).get("trace_id")},
            "client": {"ip": (context or {}).get("client_addr")},
            "attribution": {
                "status": row["attribution_status"],
                "lag_seconds": row["attribution_lag_seconds"],
            },
            "transaction": {
                "xid": row["xid"],
                "commit_lsn": f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}",
                "lsn": lsn,
                "change_index": row["change_index"],
            },
            "policy_version": row["policy_version"],
            "ingested_at": ingested_at.isoformat(),
        }
        index = index_name(row["env"], row["source"], committed.year, committed.month)
        yield index, row["id"], document


def validate_document(document_id: str, document: dict[str, Any]) -> AuditRecord:
    """The record model is the contract; tests hold every document to it."""
    return AuditRecord.model_validate({"id": document_id, **document})
