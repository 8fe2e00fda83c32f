"""Bulk indexing of audit records into Elasticsearch.

Each record's ``_id`` is derived from (env, source, commit LSN, change index), so indexing the
same records again replaces documents instead of adding copies (DESIGN.md, invariant 2).
Documents Elasticsearch refuses one by one (a mapping conflict, a value too large) are returned
with their reason for the dead-letter dataset; they never fail the documents around them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import polars as pl
from elasticsearch import Elasticsearch
from elasticsearch.helpers import streaming_bulk

from audit_platform.index.documents import documents

DEAD_LETTER_SCHEMA = {"id": pl.String, "index": pl.String, "status": pl.Int32, "reason": pl.String}


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
