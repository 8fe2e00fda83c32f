"""Records as Elasticsearch documents, built columnar: one JSON text per record, no dict per row.

The layout is :class:`AuditRecord`'s: its fields are the records columns the record declares,
nested as it nests them, and the few computed here (``_computed``) or spliced as JSON (``_RAW``).
Scalar fields are encoded by polars as one nested struct; the row images, the context and the
lists are already JSON text in the records and are spliced in as they are, so nothing is parsed
and re-encoded per row on the way to Elasticsearch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

import polars as pl
from pydantic import BaseModel

from audit_platform.lsn import lsn_text
from audit_platform.naming import STANDARD_CLASS, index_name
from audit_platform.record import (
    ADDED_COLUMNS,
    ECS_EVENT_TYPE,
    RECORD_SCHEMA,
    AuditRecord,
    Column,
    model_in,
)

#: ``event`` per operation (ECS).
EVENTS = {
    op.value: {"action": op.value, "kind": "event", "category": ["database"], "type": types}
    for op, types in ECS_EVENT_TYPE.items()
}
_EVENT = {op: json.dumps(event, separators=(",", ":")) for op, event in EVENTS.items()}
_ISO_MICROS = "%Y-%m-%dT%H:%M:%S%.6f+00:00"


def _context(path: str) -> pl.Expr:
    return pl.col("context").str.json_path_match(f"$.{path}")


def _image_values(column: str) -> pl.Expr:
    """The string values of a row image (values are PostgreSQL's text form, or null)."""
    return (
        pl.col(column)
        .str.extract_all(r'":\s*"(?:[^"\\]|\\.)*"')
        .list.eval(pl.element().str.replace(r'^":\s*', "").str.json_decode(pl.String))
        .fill_null(pl.lit([], pl.List(pl.String)))
    )


#: The row's own organization where its table names the column (``""``: the change names none
#: a key could hold, ``enrich.join._row_organization``), else the context's.
_ROW_ORGANIZATION = pl.col("row_organization")
_ORGANIZATION = (
    pl.when(_ROW_ORGANIZATION.is_null())
    .then(_context("organization.id"))
    .when(_ROW_ORGANIZATION != "")
    .then(_ROW_ORGANIZATION)
)

#: Fields whose records column is JSON text already: spliced into the document as it is.
_RAW = {"event", "changed_columns", "before", "after", "context", "context_personal", "row"}


#: A value of each record's source: the same for all, or the source's (a turn of many).
PerSource = str | Mapping[str, str]


def per_source(value: PerSource) -> pl.Expr:
    if isinstance(value, str):
        return pl.lit(value)
    return pl.col("source").replace_strict(dict(value), return_dtype=pl.String)


def _computed(database: PerSource, ingested_at: datetime) -> dict[str, pl.Expr]:
    """The fields indexing computes; every other is its records column (``record.Column``)."""
    return {
        "@timestamp": pl.col("commit_time").dt.convert_time_zone("UTC").dt.to_string(_ISO_MICROS),
        "source.database": per_source(database),
        "values_text": pl.concat_list(_image_values("before"), _image_values("after"))
        .list.eval(pl.element().filter(pl.element() != ""))
        .list.join(" "),
        "user.id": _context("actor.id"),
        "user.name": _context("actor.name"),
        "organization.id": _ORGANIZATION,
        "organization.name": pl.when(_context("organization.id") == _ORGANIZATION).then(
            _context("organization.name")
        ),
        "service.name": _context("service"),
        "trace.id": _context("trace_id"),
        "client.ip": _context("client_addr"),
        "transaction.commit_lsn": pl.col("commit_lsn"),
        "ingested_at": pl.lit(ingested_at.isoformat()),
    }


def _fields(model: type[BaseModel], prefix: str, computed: dict[str, pl.Expr]) -> list[pl.Expr]:
    """The document's fields other than ``_RAW``, nested as the record declares them."""
    found = []
    for name, info in model.model_fields.items():
        key = info.alias or name
        dotted = prefix + key
        if dotted == "id" or dotted in _RAW:
            continue
        nested, column = model_in(info.annotation), Column.of(info)
        if dotted in computed:
            expr = computed[dotted]
        elif nested is not None:
            expr = pl.struct(_fields(nested, dotted + ".", computed))
        elif column is not None:
            expr = pl.col(column.name)
        else:
            raise TypeError(f"record field {dotted} has no records column and is not computed")
        found.append(expr.alias(key))
    return found


def _scalars(database: PerSource, ingested_at: datetime) -> pl.Expr:
    """Every field that is not JSON text already, nested as in the document."""
    return pl.struct(
        _fields(AuditRecord, "", _computed(database, ingested_at))
    ).struct.json_encode()


def _image_strings(image: Any) -> Iterator[Any]:
    """An image's values in the order its JSON text has them, as indexing's free text reads
    them (every string that is an object's value, at any depth, and no array's item): a row
    image is flat, a schema change's shape holds its columns as an object."""
    if isinstance(image, dict):
        for value in image.values():
            yield from _image_strings(value) if isinstance(value, dict | list) else (value,)
    elif isinstance(image, list):
        for item in image:
            if isinstance(item, dict | list):
                yield from _image_strings(item)


def free_text(before: Any, after: Any) -> str:
    """A document's ``values_text`` from its images, one document at a time (what verification
    derives again, and an erasure writes anew); a test holds it to the frame's."""
    images = [*_image_strings(before), *_image_strings(after)]
    return " ".join(v for v in images if isinstance(v, str) and v != "")


def _raw(name: str, column: pl.Expr) -> list[pl.Expr]:
    return [pl.lit(f',"{name}":'), column.fill_null(pl.lit("null"))]


def document_frame(
    records: pl.DataFrame,
    *,
    database: PerSource,
    ingested_at: datetime,
    retention_class: PerSource = STANDARD_CLASS,
) -> pl.DataFrame:
    """``index``, ``id`` and ``document`` (JSON text) for each record; ``retention_class`` is
    their source's (``EnvironmentConfig.retention_class_of``), naming the monthly index.
    Records of several sources give ``database`` and ``retention_class`` per source."""
    # Records files written before these columns were kept lack them.
    records = records.with_columns(
        pl.lit(None, RECORD_SCHEMA[name]).alias(name)
        for name in ADDED_COLUMNS
        if name not in records.columns
    )
    lsns = records["lsn"].unique()
    retention = per_source(retention_class)
    month = pl.concat_str(
        "env", retention, pl.col("commit_time").dt.strftime("%Y/%m"), separator="/"
    )
    keys = records.select(month.alias("key"), "env", retention.alias("class"), "commit_time")
    names = {  # through naming.index_name, the one definition of index names
        key: index_name(env, retained, committed.year, committed.month)
        for key, env, retained, committed in keys.unique("key").iter_rows()
    }
    return records.with_columns(
        pl.col("lsn")
        .replace_strict(lsns, [lsn_text(v) for v in lsns], return_dtype=pl.String)
        .alias("commit_lsn")
    ).select(
        month.replace_strict(names, return_dtype=pl.String).alias("index"),
        pl.col("id"),
        pl.concat_str(
            _scalars(database, ingested_at).str.strip_suffix("}"),
            *_raw("event", pl.col("operation").replace_strict(_EVENT, return_dtype=pl.String)),
            *_raw("changed_columns", pl.col("changed_columns")),
            *_raw("before", pl.col("before")),
            *_raw("after", pl.col("after")),
            # Capture stages contexts as compact JSON (capture.messages); a file staged before
            # it did may hold a context with line breaks between its tokens, which would end
            # the bulk body's line. Outside strings they are only whitespace.
            *_raw("context", pl.col("context").str.replace_all("[\r\n]", " ")),
            *_raw("context_personal", pl.col("context_personal")),
            pl.lit(',"row":{"key":'),
            pl.col("key_columns").fill_null(pl.lit("[]")),
            pl.lit(',"types":'),
            pl.col("column_types").fill_null(pl.lit("{}")),
            *_raw("personal", pl.col("personal")),
            pl.lit(","),
            pl.struct(pl.col("row_organization").alias("organization"))
            .struct.json_encode()
            .str.strip_prefix("{"),
            pl.lit("}"),
        ).alias("document"),
    )


def documents(
    records: pl.DataFrame,
    *,
    database: str,
    ingested_at: datetime,
    retention_class: str = STANDARD_CLASS,
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(index, _id, document as a dict): for tests, exports and comparisons, not for indexing."""
    frame = document_frame(
        records, database=database, ingested_at=ingested_at, retention_class=retention_class
    )
    for index, doc_id, document in frame.iter_rows():
        yield index, doc_id, json.loads(document)


def validate_document(document_id: str, document: dict[str, Any]) -> AuditRecord:
    """The record model is the contract; tests hold every document to it."""
    return AuditRecord.model_validate({"id": document_id, **document})
