"""From an investigator's question to an Elasticsearch query: filters, scope, order, cursors.

Every value a caller gives travels as data inside a term, range or match clause; nothing is
spliced into query-string syntax. Every query of the API is built by :func:`bool_query`, which
always adds the key's scope, so no parameter can widen what a key sees (docs/design.md,
invariant 6).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from audit_platform.api_keys import Scope
from audit_platform.policy import SourcePolicy
from audit_platform.query.language import (
    IMAGES,
    ParsedQuery,
    QuerySyntaxError,
    Term,
    any_of,
    parse,
    table_clause,
    term_clause,
    utc_time,
)
from audit_platform.record import AttributionStatus, Operation
from audit_platform_context.model import ActorType

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


_Text = TypeVar("_Text", str, str | None)


def no_nul(value: _Text) -> _Text:
    """Refuse NUL: PostgreSQL text cannot hold it, so no value in the trail has one, and the
    read log (jsonb) could not record the request that asked for it."""
    if value is not None and "\x00" in value:
        raise ValueError(
            "holds a NUL character (U+0000), which no value in the trail can hold "
            "(PostgreSQL text cannot store it): remove it"
        )
    return value


#: A time a caller gives, in UTC; one out of range is a 422 saying which times are accepted.
Moment = Annotated[datetime, AfterValidator(utc_time)]

#: ``column:value``: the value a column held before or after a change, in the text form
#: records keep (a masked column by its masked value).
ImageValue = Annotated[str, Field(pattern=r"^[^:]+:.*$", max_length=1024)]


class EventFilter(BaseModel):
    """The filters of a search, an export and the statistics. All given filters must match."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    since: Moment | None = Field(default=None, description="Commit time from (inclusive).")
    until: Moment | None = Field(default=None, description="Commit time until (exclusive).")
    source: list[str] = Field(default=[], description="Source (service) names; any of them.")
    table: list[str] = Field(
        default=[], description="Tables as 'name' or 'schema.name'; any of them."
    )
    operation: list[Operation] = Field(default=[], description="Any of these operations.")
    column: list[str] = Field(default=[], description="Changed column; any of them.")
    object_id: str | None = Field(default=None, max_length=1024)
    actor_id: str | None = Field(default=None, max_length=256)
    actor_type: ActorType | None = None
    organization_id: str | None = Field(
        default=None, max_length=256, description="The organization (tenant) id."
    )
    request_id: str | None = Field(default=None, max_length=256)
    job: str | None = Field(default=None, max_length=256, description="Job name or run id.")
    job_run_id: str | None = Field(default=None, max_length=256, description="A job run's id.")
    trace_id: str | None = Field(default=None, max_length=256)
    service: str | None = Field(
        default=None, max_length=256, description="The service named in the context."
    )
    client_ip: str | None = Field(
        default=None, max_length=64, description="The client's IP address or a CIDR range."
    )
    xid: int | None = Field(default=None, ge=0, le=2**63 - 1, description="Transaction id.")
    attribution: list[AttributionStatus] = Field(default=[])
    before: list[ImageValue] = Field(
        default=[],
        description="`column:value` the row held before the change; all must hold. Also "
        "written `before.<column>=<value>`. With `after`, a transition: `before=status:paid"
        "&after=status:refunded`.",
    )
    after: list[ImageValue] = Field(
        default=[],
        description="`column:value` the row held after the change; also `after.<column>=`.",
    )
    q: str | None = Field(
        default=None, max_length=512, description="Free text over the row's values."
    )
    query: str | None = Field(
        default=None,
        max_length=2048,
        description="The query language: `actor:alice table:orders op:update,delete "
        "after.status:refunded -actor:bot since:-24h` and free words; see the API "
        "description.",
        examples=["actor:alice table:orders op:update after.status:refunded since:-24h"],
    )
    _parsed: ParsedQuery = PrivateAttr(default_factory=ParsedQuery)

    @model_validator(mode="before")
    @classmethod
    def _image_parameters(cls, data: Any) -> Any:
        """``after.status=refunded`` as a parameter is ``after=status:refunded``."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key in [k for k in data if isinstance(k, str) and k.startswith(("before.", "after."))]:
            image, column = key.split(".", 1)
            values = data.pop(key)
            values = values if isinstance(values, list) else [values]
            data[image] = [*data.get(image, []), *(f"{column}:{v}" for v in values)]
        return data

    @field_validator("*")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                no_nul(text)
        return value

    @model_validator(mode="after")
    def _parse_query(self) -> EventFilter:
        if self.query:
            try:
                parsed = parse(self.query, now=datetime.now(UTC))
            except QuerySyntaxError as exc:
                raise ValueError(f"query: {exc}") from exc
            for bound in ("since", "until"):
                if getattr(parsed, bound) and getattr(self, bound):
                    raise ValueError(f"{bound} is given both as a parameter and in the query")
            self._parsed = parsed
        if self.client_ip is not None:
            try:
                ipaddress.ip_network(self.client_ip, strict=False)
            except ValueError as exc:
                raise ValueError(
                    f"client_ip {self.client_ip!r} is not an IP address or a CIDR range"
                ) from exc
        return self

    @property
    def bounds(self) -> tuple[datetime | None, datetime | None]:
        """since and until, from the parameters or the query."""
        return self.since or self._parsed.since, self.until or self._parsed.until

    def image_columns(self) -> list[tuple[str, str]]:
        """(before|after, column) of every value filter, for the policy check."""
        given = [
            (image, value.split(":", 1)[0]) for image in IMAGES for value in getattr(self, image)
        ]
        return [*given, *self._parsed.image_columns()]


#: The earliest commit time the index can hold (``@timestamp`` is ``date_nanos``).
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def time_range(
    since: datetime | None,
    until: datetime | None,
    *,
    now: datetime,
    default: timedelta,
    maximum: timedelta,
) -> tuple[datetime, datetime]:
    """The bounded range a search covers: ``until`` defaults to now, ``since`` to ``default``
    before it; a range longer than ``maximum`` is refused rather than silently cut."""
    end = utc_time(until) if until else now
    if end <= EPOCH:  # before computing a default since, which could go back past year 1
        raise QueryError(
            "until",
            f"until ({end.isoformat()}) is before 1970-01-01: commit "
            "times are kept in nanoseconds since then",
        )
    start = utc_time(since) if since else end - default
    # Nothing can be older than 1970 (date_nanos); a range reaching further back is cut there,
    # which changes no answer, instead of failing in Elasticsearch mid-way through an export.
    start = max(start, EPOCH)
    if start >= end:
        raise QueryError(
            "since", f"since ({start.isoformat()}) must be before until ({end.isoformat()})"
        )
    if end - start > maximum:
        raise QueryError(
            "since",
            f"the range {start.isoformat()} .. {end.isoformat()} is longer than the maximum "
            f"of {maximum.days} days: narrow it, or export several ranges",
        )
    return start, end


def check_value_filters(f: EventFilter, policies: Mapping[str, SourcePolicy], scope: Scope) -> None:
    """Refuse a value filter on a column a policy keeps out of every record (``exclude``, or
    not in ``include``) in a table this search covers: it could only ever match nothing, and an
    empty answer would look like "no such change". Name the table to filter a column of the
    same name that another table does capture. Only tables the key may read are checked, so
    the refusal never names, nor betrays, a table outside its scope."""
    columns = f.image_columns()
    if not columns:
        return
    for source, policy in sorted(policies.items()):
        if (scope.sources is not None and source not in scope.sources) or (
            f.source and source not in f.source
        ):
            continue
        for name, table in sorted(policy.tables.items()):
            if f.table and name not in f.table and name.split(".", 1)[1] not in f.table:
                continue
            if not scope.allows(source, *name.split(".", 1)):
                continue
            for image, column in columns:
                if column in table.exclude or (
                    table.include is not None and column not in table.include
                ):
                    raise QueryError(
                        f"{image}.{column}",
                        f"column {column} of {source} {name} is excluded by its policy: it "
                        "never leaves the source database, so no record holds its value. "
                        "Filter on another column, or name a table that captures it",
                    )


def scope_clauses(scope: Scope) -> list[dict[str, Any]]:
    """What a key may see, as filters; added to every query, whatever else it asks."""
    clauses: list[dict[str, Any]] = [{"term": {"env": scope.env}}]
    if scope.sources is not None:
        clauses.append({"terms": {"source.service": sorted(scope.sources)}})
    if scope.tables is not None:
        clauses.append(any_of([table_clause(t) for t in sorted(scope.tables)]))
    if scope.organizations is not None:
        clauses.append({"terms": {"organization.id": sorted(scope.organizations)}})
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
        clauses.append(any_of([table_clause(t) for t in f.table]))
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
        "organization.id": f.organization_id,
        "context.request_id": f.request_id,
        "context.job.run_id": f.job_run_id,
        "trace.id": f.trace_id,
        "service.name": f.service,
        "client.ip": f.client_ip,
        "transaction.xid": f.xid,
    }
    clauses.extend({"term": {field: value}} for field, value in terms.items() if value is not None)
    for image in IMAGES:
        for value in getattr(f, image):
            column, _, wanted = value.partition(":")
            clauses.append({"term": {f"{image}.{column}": wanted}})
    if f.job is not None:
        clauses.append(term_clause(Term("job", (f.job,), False, f.job)))
    clauses.extend(f._parsed.clauses())
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
    if (
        not isinstance(after, list)
        or len(after) != len(_SORT_TYPES)
        or not all(
            isinstance(v, t) and not isinstance(v, bool)
            for v, t in zip(after, _SORT_TYPES, strict=True)
        )
    ):
        raise QueryError("cursor", problem)
    if cursor_order != order:
        raise QueryError(
            "cursor",
            f"the cursor belongs to order={cursor_order}; keep the order of the first page",
        )
    return after
