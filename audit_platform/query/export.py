"""Search results as NDJSON or CSV, produced line by line from a hit iterator.

NDJSON holds every value exactly. CSV is for spreadsheets, which run a cell starting with
``=``, ``+``, ``-`` or ``@`` as a formula (and strip a leading tab or carriage return first);
the trail's values come from the audited service (an actor id, a request id from an HTTP
header), so such a cell is written with a leading single quote, and every cell is quoted, as
OWASP's CSV-injection rule says. The exact values are in the NDJSON export.

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

from audit_platform.record import AuditRecord, model_leaves
from audit_platform_context.model import TransactionContext

#: CSV columns, derived from the record and the context contract: every field of
#: :class:`AuditRecord` (``id`` first) by its dotted name, with ``context`` spread into the
#: fields of :class:`TransactionContext`; row images and free-form attributes as JSON text,
#: lists joined with ``;``.
CSV_COLUMNS = tuple(
    column
    for field in model_leaves(AuditRecord)
    for column in (
        [f"context.{c}" for c in model_leaves(TransactionContext)]
        if field == "context"
        else [field]
    )
)


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


#: A spreadsheet reads a cell starting with one of these as a formula (OWASP, CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list):
        value = ";".join(str(v) for v in value)
    elif isinstance(value, dict):
        value = json.dumps(value, separators=(",", ":"), sort_keys=True)
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def _at(document: dict[str, Any], column: str) -> Any:
    value: Any = document
    for part in column.split(".") if column not in document else [column]:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def csv_row(hit: dict[str, Any]) -> list[Any]:
    document = {"id": hit["_id"], **hit["_source"]}
    return [_cell(_at(document, column)) for column in CSV_COLUMNS]


def csv_lines(hits: Iterable[dict[str, Any]]) -> Iterator[str]:
    def rows() -> Iterator[str]:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_ALL)
        writer.writerow(CSV_COLUMNS)
        yield buffer.getvalue()
        for hit in hits:
            buffer.seek(0)
            buffer.truncate()
            writer.writerow(csv_row(hit))
            yield buffer.getvalue()

    return _chunks(rows())
