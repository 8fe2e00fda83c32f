"""From an investigator's question to an Elasticsearch query: filters, scope, order, cursors.

Every value a caller gives travels as data inside a term, range or match clause; nothing is
spliced into query-string syntax. Every query of the API is built by :func:`bool_query`, which
always adds the key's scope, so no parameter can widen what a key sees (DESIGN.md, invariant 6).
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from audit_platform.api_keys import Scope
from audit_platform.context.model import ActorType
from audit_platform.record import AttributionStatus, Operation

#: Total order of records in an environment: commit time, then the source, then the commit
#: LSN and the change's index (the LSN orders commits within one source exactly).
SORT_FIELDS = ("@timestamp", "source.service", "transaction.lsn", "transaction.change_index")
_SORT_TYPES = (int, str, int, int)

Order = Literal["asc", "desc"]


class QueryError(ValueError):
    """A parameter is unusable; ``field`` names it, the message says why and what to do."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class EventFilter(BaseModel):
    """The filters of a search, an export and the statistics. All given filters must match."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    since: datetime | None = Field(default=None, description="Commit time from (inclusive).")
    until: datetime | None = Field(default=None, description="Commit time until (exclusive).")
    source: list[str] = Field(default=[], description="Source (service) names; any of them.")
    table: list[str] = Field(
        default=[], description="Tables as 'name' or 'schema.name'; any of them."
    )
    operation: list[Operation] = Field(default=[], description="Any of these operations.")
    column: list[str] = Field(default=[], description="Changed column; any of them.")
    object_id: str | None = Field(default=None, max_length=1024)
    actor_id: str | None = Field(default=None, max_length=256)
    actor_type: ActorType | None = None
    request_id: str | None = Field(default=None, max_length=256)
    job: str | None = Field(default=None, max_length=256, description="Job name or run id.")
    xid: int | None = Field(default=None, ge=0, le=2**63 - 1, description="Transaction id.")
    attribution: list[AttributionStatus] = Field(default=[])
    q: str | None = Field(
        default=None, max_length=512, description="Free text over the row's values."
    )


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def time_range(
    since: datetime | None, until: datetime | None, *, now: datetime, default: timedelta,
    maximum: timedelta,
) -> tuple[datetime, datetime]:  # fmt: skip
    """The bounded range a search covers: ``until`` defaults to now, ``since`` to ``default``
    before it; a range longer than ``maximum`` is refused rather than silently cut."""
    end = _utc(until) if until else now
    start = _utc(since) if since else end - default
    if start >= end:
        raise QueryError("since", f"since ({start.isoformat()}) must be before until "
                                  f"({end.isoformat()})")  # fmt: skip
    if end - start > maximum:
        raise QueryError(
            "since",
            f"the range {start.isoformat()} .. {end.isoformat()} is longer than the maximum "
            f"of {maximum.days} days: narrow it, or export several ranges",
        )
    return start, end


def _table_clause(table: str) -> dict[str, Any]:
    if "." in table:
        schema, name = table.split(".", 1)
        return {"bool": {"filter": [{"term": {"table.schema": schema}},
                                    {"term": {"table.name": name}}]}}  # fmt: skip
    return {"term": {"table.name": table}}


def _any(clauses: list[dict[str, Any]]) -> dict[str, Any]:
    return clauses[0] if len(clauses) == 1 else {"bool": {"should": clauses,
                                                          "minimum_should_match": 1}}  # fmt: skip


def scope_clauses(scope: Scope) -> list[dict[str, Any]]:
    """What a key may see, as filters; added to every query, whatever else it asks."""
    clauses: list[dict[str, Any]] = [{"term": {"env": scope.env}}]
    if scope.sources is not None:
        clauses.append({"terms": {"source.service": sorted(scope.sources)}})
    if scope.tables is not None:
        clauses.append(_any([_table_clause(t) for t in sorted(scope.tables)]))
    return clauses


def filter_clauses(f: EventFilter, start: datetime | None, end: datetime | None) -> list[dict]:
    clauses: list[dict[str, Any]] = []
    if start is not None or end is not None:
        bounds = {}
        if start is not None:
            bounds["gte"] = start.isoformat()
        if end is not None:
            bounds["lt"] = end.isoformat()
        clauses.append({"range": {"@timestamp": bounds}})
    if f.source:
        clauses.append({"terms": {"source.service": f.source}})
    if f.table:
        clauses.append(_any([_table_clause(t) for t in f.table]))
    if f.operation:
        clauses.append({"terms": {"operation": [o.value for o in f.operation]}})
    if f.column:
        clauses.append({"terms": {"changed_columns": f.column}})
    if f.attribution:
        clauses.append({"terms": {"attribution.status": [a.value for a in f.attribution]}})
    terms = {
        "object_id": f.object_id,
        "context.actor.id": f.actor_id,
        "context.actor.type": f.actor_type.value if f.actor_type else None,
        "context.request_id": f.request_id,
        "transaction.xid": f.xid,
    }
    clauses.extend({"term": {field: value}} for field, value in terms.items() if value is not None)
    if f.job is not None:
        clauses.append(_any([{"term": {"context.job.name": f.job}},
                             {"term": {"context.job.run_id": f.job}}]))  # fmt: skip
    return clauses


def bool_query(
    scope: Scope, clauses: list[dict[str, Any]], text: str | None = None
) -> dict[str, Any]:
    query: dict[str, Any] = {"filter": [*scope_clauses(scope), *clauses]}
    if text:
        # `match` analyses the text as data: no operators, no syntax errors, no field access.
        query["must"] = [{"match": {"values_text": {"query": text, "operator": "and"}}}]
    return {"bool": query}


def sort(order: Order) -> list[dict[str, str]]:
    return [{name: order} for name in SORT_FIELDS]


def encode_cursor(sort_values: list[Any], order: Order) -> str:
    raw = json.dumps({"after": sort_values, "order": order}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, order: Order) -> list[Any]:
    """The ``search_after`` values in a cursor this API issued for the same order."""
    problem = "it is not a cursor this API issued: pass next_cursor from the previous page as is"
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        after, cursor_order = data["after"], data["order"]
    except (binascii.Error, ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise QueryError("cursor", problem) from exc
    if not isinstance(after, list) or len(after) != len(_SORT_TYPES) or not all(
        isinstance(v, t) and not isinstance(v, bool) for v, t in zip(after, _SORT_TYPES,
                                                                   strict=True)
    ):  # fmt: skip
        raise QueryError("cursor", problem)
    if cursor_order != order:
        raise QueryError("cursor", f"the cursor belongs to order={cursor_order}; "
                                   "keep the order of the first page")  # fmt: skip
    return after
