"""Schemathesis hooks (``SCHEMATHESIS_HOOKS``): a check that no answer, whatever the request,
holds anything outside the scope of the key the run sends.

The scope comes from ``AUDIT_TEST_SCOPE`` (JSON): the environment, the sources, tables and
organizations the key may read (null: all), the key ids whose reads it may see (null: all), and the names and key
ids that exist in the environment but lie outside the key's scope. Records, statistics, gaps, correlations, revert plans and read-log
rows in JSON answers are checked field by field; exports line by line; and no answer, error or
not, may hold a name or key id from outside the scope unless the request itself sent it.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import schemathesis

SCOPE: dict[str, Any] = json.loads(os.environ.get("AUDIT_TEST_SCOPE", "{}"))


def _source_ok(source: Any) -> bool:
    return SCOPE["sources"] is None or source in SCOPE["sources"]


def _table_ok(schema: Any, name: Any) -> bool:
    return SCOPE["tables"] is None or f"{schema}.{name}" in SCOPE["tables"]


def _part_only() -> bool:
    """Whether the key sees only part of a transaction (so no figure of the whole)."""
    return SCOPE["tables"] is not None or SCOPE.get("organizations") is not None


def record_problems(record: dict[str, Any], where: str) -> Iterator[str]:
    """An audit record (the API's model or an export's line) outside the key's scope."""
    source, table = record.get("source") or {}, record.get("table") or {}
    if record.get("env") not in (None, SCOPE["env"]):
        yield f"{where}: a record of environment {record.get('env')!r}"
    if not _source_ok(source.get("service")):
        yield f"{where}: a record of source {source.get('service')!r}"
    if not _table_ok(table.get("schema"), table.get("name")):
        yield f"{where}: a record of table {table.get('schema')}.{table.get('name')}"
    organizations = SCOPE.get("organizations")
    organization = (record.get("organization") or {}).get("id")
    if organizations is not None and organization not in organizations:
        yield f"{where}: a record of organization {organization!r}"
    if _part_only():
        for figure in ("changes", "ignored"):
            if (record.get("transaction") or {}).get(figure) is not None:
                yield f"{where}: transaction.{figure}, a count of the whole transaction"


def problems(value: Any, sent: str, where: str = "$") -> Iterator[str]:
    """Everything in a JSON answer that lies outside the key's scope (a source named in the
    request, such as an object's, is echoed back: that tells the caller nothing)."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield from problems(item, sent, f"{where}[{i}]")
        return
    if not isinstance(value, dict):
        return
    source = value.get("source")
    if isinstance(source, dict) and isinstance(value.get("table"), dict):
        yield from record_problems(value, where)
    elif isinstance(source, str) and not _source_ok(source) and source not in sent:
        yield f"{where}.source: {source!r}"
    if "key_id" in value and "route" in value:  # a read-log row: its params are as sent
        readers = SCOPE["readers"]  # null: a key of the whole environment sees every read
        if readers and value["key_id"] not in readers:
            yield f"{where}: a read by key {value['key_id']}, whose scope is wider"
        return
    for source in value.get("sources", []) if isinstance(value.get("sources"), list) else []:
        if isinstance(source, str) and not _source_ok(source):
            yield f"{where}.sources: {source!r}"
    for bucket in value.get("by_source", []):
        if not _source_ok(bucket["key"]):
            yield f"{where}.by_source: {bucket['key']!r}"
    for bucket in value.get("by_table", []):
        if not _table_ok(*bucket["key"].split(".", 1)):
            yield f"{where}.by_table: {bucket['key']!r}"
    if _part_only() and isinstance(value.get("completeness"), dict):
        for figure in ("captured", "ignored", "waiting", "missing"):
            if value["completeness"].get(figure) is not None:
                yield f"{where}.completeness.{figure}: a figure of the whole transaction"
    for name, item in value.items():
        yield from problems(item, sent, f"{where}.{name}")


def export_problems(media_type: str, body: str) -> Iterator[str]:
    """An export's records, line by line (a body kept only in part ends mid-line)."""
    lines = body.splitlines()[:-1] if not body.endswith("\n") else body.splitlines()
    if media_type.startswith("application/x-ndjson"):
        for i, line in enumerate(lines):
            yield from record_problems(json.loads(line), f"line {i + 1}")
    elif media_type.startswith("text/csv"):
        for i, row in enumerate(csv.DictReader(io.StringIO("\n".join(lines)))):
            record = {
                "env": row.get("env"),
                "source": {"service": row.get("source.service")},
                "table": {"schema": row.get("table.schema"), "name": row.get("table.name")},
                "organization": {"id": row.get("organization.id") or None},
                "transaction": {
                    "changes": row.get("transaction.changes") or None,
                    "ignored": row.get("transaction.ignored") or None,
                },
            }
            yield from record_problems(record, f"row {i + 1}")


@schemathesis.check
def within_the_keys_scope(ctx, response, case) -> None:
    """No record, name, count or read outside the key's scope, in any answer."""
    body = response.content.decode("utf-8", errors="replace")
    sent = unquote(str(response.request.url)) + str(response.request.body or "")
    leaked = [name for name in SCOPE["hidden"] if name in body and name not in sent]
    found = [f"{name!r} appears in the answer" for name in leaked]
    media_type = (response.headers.get("content-type") or [""])[0]
    if media_type.startswith("application/json") and response.content_size == len(response.content):
        found += problems(json.loads(body), sent)
    else:
        found += export_problems(media_type, body)
    if found:
        raise AssertionError("outside the key's scope: " + "; ".join(found[:10]))
