"""Search results as NDJSON or CSV, produced line by line from a hit iterator.

Nothing here holds more than one record: the iterator pages through Elasticsearch, and each
record is written out as soon as it is read, so an export of millions of records runs in the
memory of one page.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from typing import Any

#: CSV columns: the record's flat fields, then the images and context as JSON text.
CSV_COLUMNS = (
    "id", "@timestamp", "env", "source", "table", "operation", "object_id", "changed_columns",
    "actor_type", "actor_id", "actor_name", "request_id", "reason", "attribution",
    "xid", "commit_lsn", "change_index", "before", "after", "context",
)  # fmt: skip


CHUNK_BYTES = 64 * 1024


def _chunks(lines: Iterable[str]) -> Iterator[str]:
    """Lines joined into chunks of about 64 KiB: one network write per chunk, not per line."""
    pending: list[str] = []
    size = 0
    for line in lines:
        pending.append(line)
        size += len(line)
        if size >= CHUNK_BYTES:
            yield "".join(pending)
            pending, size = [], 0
    if pending:
        yield "".join(pending)


def ndjson_lines(hits: Iterable[dict[str, Any]]) -> Iterator[str]:
    return _chunks(
        json.dumps({"id": hit["_id"], **hit["_source"]}, separators=(",", ":")) + "\n"
        for hit in hits
    )


def _json(value: Any) -> str:
    return "" if value is None else json.dumps(value, separators=(",", ":"), sort_keys=True)


def csv_row(hit: dict[str, Any]) -> list[Any]:
    doc = hit["_source"]
    context = doc.get("context") or {}
    actor = context.get("actor") or {}
    tx = doc["transaction"]
    return [
        hit["_id"], doc["@timestamp"], doc["env"], doc["source"]["service"],
        f"{doc['table']['schema']}.{doc['table']['name']}", doc["operation"],
        doc.get("object_id") or "", ";".join(doc.get("changed_columns") or []),
        actor.get("type", ""), actor.get("id", ""), actor.get("name") or "",
        context.get("request_id") or "", context.get("reason") or "",
        doc["attribution"]["status"], tx["xid"], tx["commit_lsn"], tx["change_index"],
        _json(doc.get("before")), _json(doc.get("after")), _json(doc.get("context")),
    ]  # fmt: skip


def csv_lines(hits: Iterable[dict[str, Any]]) -> Iterator[str]:
    def rows() -> Iterator[str]:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        yield buffer.getvalue()
        for hit in hits:
            buffer.seek(0)
            buffer.truncate()
            writer.writerow(csv_row(hit))
            yield buffer.getvalue()

    return _chunks(rows())
