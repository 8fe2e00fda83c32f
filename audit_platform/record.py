"""The audit record: one document per row change. The one definition of its shape.

Field names follow the Elastic Common Schema where ECS has the field (``@timestamp``,
``event.action``, ``user.id``, ``user.name``, ``service.name``, ``trace.id``, ``client.ip``), so
Kibana and SIEM tools read the index without mapping work; the rest lives under ``audit``-
specific names documented here.

Each field says, beside its type, the records column it is staged in (:class:`Column`: name,
Parquet type, and the key the trail's ``change`` leaf commits it under) and, where its Python
type does not decide it, its Elasticsearch mapping (:class:`Mapped`). From this one declaration
come the records' Parquet schema (:data:`RECORD_SCHEMA`), the index mapping
(:func:`mapping_properties`), the documents' plain fields (``index.documents``) and the export
columns (:func:`model_leaves`); tests hold the trail's leaves to it (docs/design.md, "The
record"). Adding a field is its line here, the code that computes it, and its tests.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from enum import Enum, StrEnum
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import polars as pl
from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

from audit_platform_context.model import TransactionContext


@dataclass(frozen=True)
class Column:
    """The records column (``records/`` Parquet) a field is staged in, and its type there.

    ``leaf``: the key under which the trail's ``change`` leaf commits the column
    (``trust.leaves``), or None where the trail does not commit it as a change's fact (the
    attribution, which a late context changes; the context, which has leaves of its own).
    ``added``: the column came after records files were first written, so an older file may
    lack it (read as null); any other column missing is an error, not a null."""

    name: str
    dtype: pl.DataType
    leaf: str | None = None
    added: bool = False

    @staticmethod
    def of(info: FieldInfo) -> Column | None:
        return _marker(info, Column)


@dataclass(frozen=True)
class Mapped:
    """A field's Elasticsearch mapping, where its Python type does not decide it."""

    mapping: dict[str, Any]


_M = TypeVar("_M")
INTEGER = Mapped({"type": "integer"})
NANOS = Mapped({"type": "date_nanos"})
#: A row image: its columns are searchable by value without a mapping per column.
IMAGE = Mapped({"type": "flattened", "ignore_above": 4096})
#: By Python type, where a field says nothing (``Mapped``); a list maps as its items.
_BY_TYPE: dict[type, dict[str, Any]] = {
    str: {"type": "keyword"},
    bool: {"type": "boolean"},
    int: {"type": "long"},
    float: {"type": "float"},
    datetime: {"type": "date"},
}


def model_in(annotation: Any) -> type[BaseModel] | None:
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


def _properties(model: type[BaseModel], overrides: dict[str, Mapped] | None = None) -> dict:
    """The mapping properties of a model's fields (by alias), nested models as objects."""
    found: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        key = info.alias or name
        given = (overrides or {}).get(key) or _marker(info, Mapped)
        nested = model_in(info.annotation)
        if given is not None:
            found[key] = dict(given.mapping)
        elif nested is not None:
            found[key] = {"properties": _properties(nested)}
        else:
            found[key] = _mapping_by_type(info.annotation, f"{model.__name__}.{name}")
    return found


def _mapping_by_type(annotation: Any, where: str) -> dict[str, Any]:
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (Union, types.UnionType) and len(args) == 1:
        return _mapping_by_type(args[0], where)
    if get_origin(annotation) is list:
        return _mapping_by_type(args[0], where)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return {"type": "keyword"}
    for python_type, mapping in _BY_TYPE.items():
        if annotation is python_type:
            return dict(mapping)
    raise TypeError(f"{where}: no Elasticsearch mapping for {annotation!r}; declare it (Mapped)")


def _marker(info: FieldInfo, kind: type[_M]) -> _M | None:
    return next((m for m in info.metadata if isinstance(m, kind)), None)


#: The context as services record it (``TransactionContext``): searchable by each field.
CONTEXT = Mapped(
    {
        "properties": _properties(
            TransactionContext,
            {
                "reason": Mapped(
                    {
                        "type": "text",
                        "fields": {"keyword": {"type": "keyword", "ignore_above": 1024}},
                    }
                ),
                "attributes": Mapped({"type": "flattened"}),
            },
        )
    }
)


class Operation(StrEnum):
    insert = "insert"
    update = "update"
    delete = "delete"
    truncate = "truncate"
    #: A tracked table's schema changed: its images are the table's shape before and after
    #: (``capture.schema_changes``), not row values.
    ddl = "ddl"
    #: A row as a snapshot found it (``capture.snapshot``): its known beginning, where it
    #: existed before the source joined, or a new baseline after a gap.
    snapshot = "snapshot"


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
    service: Annotated[str, Column("source", pl.String(), leaf="source")] = Field(
        description="The source's name in this platform (its policy file)."
    )
    database: str
    server_version: Annotated[
        int | None, Column("server_version", pl.Int32(), added=True), INTEGER
    ] = Field(
        default=None,
        description="The source's PostgreSQL version (server_version_num, for example 150010) "
        "when capture read the change: what wrote the row images, across a major upgrade "
        "(absent on changes staged before template version 5).",
    )


class Table(_Model):
    schema_: Annotated[str, Column("schema", pl.String(), leaf="schema")] = Field(alias="schema")
    name: Annotated[str, Column("table", pl.String(), leaf="table")]


class Attribution(_Model):
    status: Annotated[AttributionStatus, Column("attribution_status", pl.String())]
    lag_seconds: Annotated[float | None, Column("attribution_lag_seconds", pl.Float64())] = Field(
        default=None, description="Commit of the change to commit of its late context."
    )


class Transaction(_Model):
    xid: Annotated[int, Column("xid", pl.Int64(), leaf="xid")]
    commit_lsn: str = Field(description="Commit LSN as PostgreSQL prints it (X/X).")
    lsn: Annotated[int, Column("lsn", pl.Int64(), leaf="commit_lsn")] = Field(
        description="The same LSN as a number: the order of commits in a source."
    )
    change_index: Annotated[int, Column("change_index", pl.Int32(), leaf="index"), INTEGER]
    changes: Annotated[
        int | None, Column("txn_changes", pl.Int32(), leaf="txn_changes", added=True), INTEGER
    ] = Field(
        default=None,
        description="Changes capture staged for this transaction (absent on "
        "records indexed before template version 4).",
    )
    ignored: Annotated[
        int | None, Column("txn_ignored", pl.Int32(), leaf="txn_ignored", added=True), INTEGER
    ] = Field(
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


class OrganizationField(_Model):
    """The tenant the change belongs to: the row's own (``row.organization``) where its table's
    policy names the column, else the context's ``organization``. What keys and sessions
    limited to organizations see (docs/design.md, "Organizations"); the name is the context's,
    given only where the context names the same organization."""

    id: str | None = None
    name: str | None = None


class ServiceField(_Model):
    name: str | None = None


class TraceField(_Model):
    id: str | None = None


class Client(_Model):
    ip: Annotated[str | None, Mapped({"type": "ip", "ignore_malformed": True})] = None


#: A record's personal declaration: searchable by whose its values are (``row.personal.after``,
#: what an erasure finds), as one field.
PERSONAL = Mapped({"type": "flattened"})

ECS_EVENT_TYPE = {
    Operation.insert: ["creation"],
    Operation.update: ["change"],
    Operation.delete: ["deletion"],
    Operation.truncate: ["deletion"],
    Operation.ddl: ["change"],
    Operation.snapshot: ["info"],
}


class RowShape(_Model):
    key: Annotated[list[str], Column("key_columns", pl.String(), leaf="key", added=True)] = Field(
        description="Columns that identify the row: its primary key, or the key its policy names."
    )
    organization: Annotated[
        str | None, Column("row_organization", pl.String(), leaf="org", added=True)
    ] = Field(
        default=None,
        description="The organization the row belongs to, from the column its table's policy "
        "names (``organization``); absent where the policy names none.",
    )
    personal: Annotated[
        dict[str, Any] | None,
        Column("personal", pl.String(), leaf="personal", added=True),
        PERSONAL,
    ] = Field(
        default=None,
        description="Where the table's policy declares personal data: ``of`` (the persons' "
        "table), ``columns`` (the personal ones) and ``before``/``after`` (whose each image's "
        "values are). The trail commits those values through commitments, so an erasure can "
        'remove them (docs/design.md, "Erasure"); absent elsewhere.',
    )
    types: Annotated[
        dict[str, str],
        Column("column_types", pl.String(), leaf="types", added=True),
        Mapped({"type": "object", "enabled": False}),
    ] = Field(
        description="Each captured column's PostgreSQL type, as format_type prints it "
        "(what a revert plan casts its literals to)."
    )


class AuditRecord(_Model):
    """One row change, with who, what, where, when and why."""

    id: Annotated[str, Column("id", pl.String(), leaf="id")] = Field(
        description="Deterministic: env, source, commit LSN, change index."
    )
    timestamp: Annotated[
        datetime, Column("commit_time", pl.Datetime("us", "UTC"), leaf="time"), NANOS
    ] = Field(alias="@timestamp", description="Commit time (UTC).")
    env: Annotated[str, Column("env", pl.String(), leaf="env")]
    source: Source
    table: Table
    operation: Annotated[Operation, Column("operation", pl.String(), leaf="op")]
    event: Event
    object_id: Annotated[str | None, Column("object_id", pl.String(), leaf="object_id")] = Field(
        description="Primary key as text; composite keys joined with ',' (',' and '\\' in a "
        "value are escaped with '\\'). None for a truncate."
    )
    changed_columns: Annotated[
        list[str], Column("changed_columns", pl.String(), leaf="changed")
    ]  # staged as a JSON array
    before: Annotated[dict[str, Any] | None, Column("before", pl.String(), leaf="before"), IMAGE]
    after: Annotated[dict[str, Any] | None, Column("after", pl.String(), leaf="after"), IMAGE]
    values_text: Annotated[str, Mapped({"type": "text"})] = Field(
        description="The row's values as free text, for full-text search."
    )
    context: Annotated[dict[str, Any] | None, Column("context", pl.String()), CONTEXT]
    context_personal: Annotated[
        dict[str, Any] | None, Column("context_personal", pl.String(), added=True), PERSONAL
    ] = Field(
        default=None,
        description="Where the source's policy declares its contexts' personal fields and the "
        "actor is a person: ``of`` (the persons' table), ``subject`` (the actor's id) and "
        "``fields``. The trail commits those values through commitments, so an erasure can "
        'remove them (docs/design.md, "Erasure"); absent elsewhere.',
    )
    user: User
    organization: OrganizationField = Field(
        default_factory=OrganizationField,
        description="Absent on records indexed before records named their organization.",
    )
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
    policy_version: Annotated[str, Column("policy_version", pl.String(), leaf="policy")]
    ingested_at: datetime

    def document(self) -> dict[str, Any]:
        """The Elasticsearch document (``_id`` is :attr:`id`, not part of the body)."""
        return self.model_dump(mode="json", by_alias=True, exclude={"id"})


#: The longest organization id: what contexts may carry (source migration 007) and keys name.
MAX_ORGANIZATION_ID = 256


def organization_id(value: Any) -> str | None:
    """``value`` if it is an organization id a key can name (1 to 256 printable characters),
    else None: a row's value is the source's data, and one Elasticsearch could not index as a
    term, or no key could hold, must not decide whose a record is."""
    if isinstance(value, str) and 0 < len(value) <= MAX_ORGANIZATION_ID and value.isprintable():
        return value
    return None


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


def mapping_properties() -> dict[str, Any]:
    """The index mapping's properties: every document field (``id`` is the ``_id``)."""
    properties = _properties(AuditRecord)
    del properties["id"]
    return properties


@dataclass(frozen=True)
class Leaf:
    """One field of the record, by its dotted name, with what is declared of it."""

    name: str
    info: FieldInfo

    @property
    def column(self) -> Column | None:
        return Column.of(self.info)


def record_fields(model: type[BaseModel] = AuditRecord, prefix: str = "") -> Iterator[Leaf]:
    """Every leaf field of a model (the record by default; nested models expanded), by dotted
    alias, in declaration order."""
    for name, info in model.model_fields.items():
        key = prefix + (info.alias or name)
        nested = model_in(info.annotation)
        if nested is not None:
            yield from record_fields(nested, key + ".")
        else:
            yield Leaf(key, info)


#: The record as enrichment stages it (``records/`` Parquet, one row per record): flat columns,
#: with the row images, the context and the changed columns kept as the JSON text capture wrote,
#: so indexing splices them into documents without parsing them again
#: (``index.documents.document_frame`` maps these columns onto :class:`AuditRecord`).
RECORD_SCHEMA = pl.Schema(
    {leaf.column.name: leaf.column.dtype for leaf in record_fields() if leaf.column is not None}
)
#: Columns a records file written by an earlier version may lack (read as null).
ADDED_COLUMNS = tuple(
    leaf.column.name for leaf in record_fields() if leaf.column is not None and leaf.column.added
)


def model_leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted names (by alias) of a model's fields, nested models expanded, in declaration
    order: how exports and contract tests walk the record without restating it."""
    return [leaf.name for leaf in record_fields(model, prefix)]
