"""Indexing audit records into Elasticsearch: the template, the documents, the bulk writes.

Each record's ``_id`` is derived from (env, source, commit LSN, change index), so indexing the
same hour again replaces documents instead of adding copies (DESIGN.md, invariant 2). Documents
Elasticsearch refuses one by one (a mapping conflict, a value too large) are returned with their
reason for the dead-letter dataset; they never fail the documents around them.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl
from elasticsearch import Elasticsearch
from elasticsearch.helpers import streaming_bulk

from audit_platform.naming import index_name, template_name
from audit_platform.record import ECS_EVENT_TYPE, AuditRecord, Operation

DEAD_LETTER_SCHEMA = {"id": pl.String, "index": pl.String, "status": pl.Int32, "reason": pl.String}


def render_template(
    resources_dir: Path, env: str, replicas: int, lifecycle: str | None = None
) -> dict[str, Any]:
    """The template body; ``lifecycle`` names an ILM policy where the cluster has ILM."""
    text = (resources_dir / "elasticsearch" / "index-template.json").read_text()
    body = json.loads(text.replace("{env}", env).replace('"{replicas}"', str(replicas)))
    if lifecycle is not None:
        body["template"]["settings"]["index.lifecycle.name"] = lifecycle
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]
    body["_meta"]["template_hash"] = digest
    return body


@dataclass(frozen=True)
class TemplateInstall:
    name: str
    template_hash: str
    previous_hash: str | None

    @property
    def changed(self) -> bool:
        return self.template_hash != self.previous_hash


def install_template(
    client: Elasticsearch,
    resources_dir: Path,
    env: str,
    replicas: int,
    lifecycle: str | None = None,
) -> TemplateInstall:
    """Create or update the environment's index template; new indices pick up a change."""
    name = template_name(env)
    body = render_template(resources_dir, env, replicas, lifecycle)
    previous = installed_template_hash(client, env)
    if previous != body["_meta"]["template_hash"]:
        client.indices.put_index_template(name=name, **body)
    return TemplateInstall(name, body["_meta"]["template_hash"], previous)


def installed_template_hash(client: Elasticsearch, env: str) -> str | None:
    """The ``_meta.template_hash`` of the environment's installed template, if any."""
    found = client.options(ignore_status=404).indices.get_index_template(name=template_name(env))
    for template in found.get("index_templates", []):
        return template["index_template"].get("_meta", {}).get("template_hash")
    return None


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


@dataclass
class IndexResult:
    indexed: int = 0
    failed: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=DEAD_LETTER_SCHEMA))
    seconds: float = 0.0


def index_records(
    client: Elasticsearch,
    records: pl.DataFrame,
    *,
    database: str,
    ingested_at: datetime,
    chunk_size: int = 1000,
) -> IndexResult:
    """Bulk-index records; 429s are retried with backoff by the helper, 5xx and connection
    errors by the client's transport; a document refused for itself is returned, not raised."""
    started = time.monotonic()
    result = IndexResult()
    failures: list[tuple[str, str, int, str]] = []

    def actions() -> Iterator[dict[str, Any]]:
        for index, doc_id, document in documents(
            records, database=database, ingested_at=ingested_at
        ):
            yield {"_op_type": "index", "_index": index, "_id": doc_id, "_source": document}

    for ok, item in streaming_bulk(
        client,
        actions(),
        chunk_size=chunk_size,
        max_retries=5,
        initial_backoff=1,
        max_backoff=30,
        raise_on_error=False,
        raise_on_exception=True,
        yield_ok=True,
    ):
        if ok:
            result.indexed += 1
            continue
        outcome = item["index"]
        error = outcome.get("error", {})
        reason = error.get("reason", str(error)) if isinstance(error, dict) else str(error)
        kind = error.get("type", "error") if isinstance(error, dict) else "error"
        failures.append(
            (
                outcome.get("_id"),
                outcome.get("_index"),
                outcome.get("status", 0),
                f"{kind}: {reason}",
            )
        )
    result.failed = pl.DataFrame(failures, schema=DEAD_LETTER_SCHEMA, orient="row")
    result.seconds = time.monotonic() - started
    return result
