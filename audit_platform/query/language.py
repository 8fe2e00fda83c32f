"""The query language an investigator types, parsed into Elasticsearch clauses.

    actor:alice table:orders op:update,delete after.status:refunded -actor:bot since:-24h

A term is ``field:value``; values of one field separated by commas are alternatives (OR); a
leading ``-`` negates a term; double quotes keep spaces, commas and colons in a value or phrase
(``\\"`` is a quote inside one); words without a field search the row's values as text. Terms
are combined with AND. Values travel as data in term, range and match clauses, never as query
syntax, so no input can reach a field or an operator it does not name. Errors name the term, by
its position and text, and say what would work.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from audit_platform.record import AttributionStatus, Operation
from audit_platform_context.model import ActorType

#: Field name -> (what it matches, the Elasticsearch field or kind of clause).
FIELDS: dict[str, tuple[str, str]] = {
    "actor": ("the actor's id in the transaction context", "context.actor.id"),
    "actor_type": ("the actor's type: user, service, job, system", "context.actor.type"),
    "user": ("the end user's id", "user.id"),
    "organization": ("the organization (tenant) the change was made for", "organization.id"),
    "source": ("the source (service) name", "source.service"),
    "table": ("a table, as name or schema.name", "table"),
    "op": ("the operation: insert, update, delete, truncate, ddl, snapshot", "operation"),
    "column": ("a changed column", "changed_columns"),
    "object": ("the changed row's key, as the records print it", "object_id"),
    "request": ("the request id", "context.request_id"),
    "job": ("a job's name or run id", "job"),
    "trace": ("the trace id", "trace.id"),
    "service": ("the service named in the context", "service.name"),
    "ip": ("the client's IP address or a CIDR range", "client.ip"),
    "xid": ("the transaction id", "transaction.xid"),
    "attribution": ("attributed, late or unattributed", "attribution.status"),
    "reason": ("words of the context's reason", "context.reason"),
    "since": ("from this time: -30m, -24h, -7d, -2w, or an ISO date or time", "@timestamp"),
    "until": ("until this time, exclusive; same forms as since", "@timestamp"),
}
ALIASES = {
    "operation": "op",
    "request_id": "request",
    "trace_id": "trace",
    "object_id": "object",
    "client_ip": "ip",
    "org": "organization",
    "actor.type": "actor_type",
}
#: ``before.<column>`` and ``after.<column>``: the column's value before or after the change.
IMAGES = ("before", "after")
_RELATIVE = re.compile(r"^-(\d+)([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


#: What a time may be: Python's datetime holds years 1 to 9999; the index holds 1970 on.
ACCEPTED_TIMES = (
    "times from 0001-01-01 to 9999-12-31 UTC are accepted, and no record is older than 1970-01-01"
)


def utc_time(moment: datetime) -> datetime:
    """``moment`` in UTC (a time without an offset is taken as UTC). An offset can carry a
    time of year 1 or 9999 past what a datetime holds: that is a ValueError saying what is
    accepted, so a caller answers 422, not an OverflowError's 500."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError as exc:
        raise ValueError(f"{moment.isoformat()} is out of range in UTC: {ACCEPTED_TIMES}") from exc


class QuerySyntaxError(ValueError):
    """The query text is unusable; the message names the term and says what to do."""


@dataclass(frozen=True)
class Term:
    field: str  # a name of FIELDS, or before.<column> / after.<column>
    values: tuple[str, ...]
    negated: bool
    text: str  # as typed, for messages


@dataclass(frozen=True)
class ParsedQuery:
    terms: tuple[Term, ...] = ()
    words: tuple[str, ...] = ()  # free text that must match the row's values
    not_words: tuple[str, ...] = ()  # free text that must not
    since: datetime | None = None
    until: datetime | None = None

    def clauses(self) -> list[dict[str, Any]]:
        """Filter clauses; negated terms and words become one ``must_not`` clause."""
        positive = [term_clause(t) for t in self.terms if not t.negated]
        negative = [term_clause(t) for t in self.terms if t.negated]
        positive += [_words_clause(w) for w in self.words]
        negative += [_words_clause(w) for w in self.not_words]
        if negative:
            positive.append({"bool": {"must_not": negative}})
        return positive

    def image_columns(self) -> list[tuple[str, str]]:
        """(before|after, column) of every value filter, for the policy check."""
        images = [t.field.partition(".") for t in self.terms if t.field.startswith(IMAGES)]
        return [(image, column) for image, _, column in images]


def parse(text: str, *, now: datetime) -> ParsedQuery:
    terms: list[Term] = []
    words: list[str] = []
    not_words: list[str] = []
    bounds: dict[str, datetime] = {}
    for number, (raw, negated, field, values) in enumerate(_tokens(text), start=1):
        where = f"term {number} `{raw}`"
        if field is None:
            (not_words if negated else words).append(values[0])
            continue
        name = _field_name(field, where)
        if name in ("since", "until"):
            if negated or len(values) != 1:
                raise QuerySyntaxError(f"{where}: {name} takes one time and no '-'")
            if name in bounds:
                raise QuerySyntaxError(f"{where}: {name} is given twice")
            bounds[name] = _time(values[0], now, where)
            continue
        for value in values:
            _check_value(name, value, where)
        terms.append(Term(name, tuple(values), negated, raw))
    return ParsedQuery(
        tuple(terms), tuple(words), tuple(not_words), bounds.get("since"), bounds.get("until")
    )


def term_clause(term: Term) -> dict[str, Any]:
    """One term's values as an OR of exact matches (a match clause for reason)."""
    return any_of([_value_clause(term.field, value) for value in term.values])


def _value_clause(name: str, value: str) -> dict[str, Any]:
    if name.startswith(IMAGES):
        return {"term": {name: value}}
    target = FIELDS[name][1]
    if name == "table":
        return table_clause(value)
    if name == "job":
        return any_of(
            [{"term": {"context.job.name": value}}, {"term": {"context.job.run_id": value}}]
        )
    if name == "reason":
        return {"match": {target: {"query": value, "operator": "and"}}}
    if name == "xid":
        return {"term": {target: int(value)}}
    return {"term": {target: value}}


def table_clause(table: str) -> dict[str, Any]:
    if "." in table:
        schema, name = table.split(".", 1)
        return {
            "bool": {"filter": [{"term": {"table.schema": schema}}, {"term": {"table.name": name}}]}
        }
    return {"term": {"table.name": table}}


def any_of(clauses: list[dict[str, Any]]) -> dict[str, Any]:
    return (
        clauses[0]
        if len(clauses) == 1
        else {"bool": {"should": clauses, "minimum_should_match": 1}}
    )


def _words_clause(words: str) -> dict[str, Any]:
    return {"match": {"values_text": {"query": words, "operator": "and"}}}


def _field_name(field: str, where: str) -> str:
    name = ALIASES.get(field, field)
    if name in FIELDS:
        return name
    image, _, column = name.partition(".")
    if image in IMAGES and column:
        return name
    known = ", ".join([*FIELDS, "before.<column>", "after.<column>"])
    raise QuerySyntaxError(
        f"{where}: unknown field {field!r}; known fields: {known}. To search the text "
        f"{field}:... itself, put it in double quotes"
    )


def _check_value(name: str, value: str, where: str) -> None:
    allowed = {"op": Operation, "actor_type": ActorType, "attribution": AttributionStatus}
    if name in allowed and value not in {member.value for member in allowed[name]}:
        choices = ", ".join(member.value for member in allowed[name])
        raise QuerySyntaxError(f"{where}: {value!r} is not one of {choices}")
    if name == "xid" and not (value.isdigit() and int(value) < 2**63):
        raise QuerySyntaxError(f"{where}: a transaction id is a whole number, not {value!r}")
    if name == "ip":
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError as exc:
            raise QuerySyntaxError(
                f"{where}: {value!r} is not an IP address or a CIDR range"
            ) from exc
    if value == "":
        raise QuerySyntaxError(f"{where}: a value is empty; quote it if it has spaces")


def _time(value: str, now: datetime, where: str) -> datetime:
    if match := _RELATIVE.match(value):
        try:
            return now - timedelta(**{_UNITS[match[2]]: int(match[1])})
        except OverflowError as exc:
            raise QuerySyntaxError(f"{where}: {value} goes back too far: {ACCEPTED_TIMES}") from exc
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise QuerySyntaxError(
            f"{where}: {value!r} is not a time; write -30m, -24h, -7d, -2w, "
            "2026-11-27 or 2026-11-27T08:00:00Z"
        ) from exc
    try:
        return utc_time(moment)
    except ValueError as exc:
        raise QuerySyntaxError(f"{where}: {exc}") from exc


def _tokens(text: str):
    """(as typed, negated, field or None, values) per whitespace-separated term."""
    i, n = 0, len(text)
    while i < n:
        if text[i].isspace():
            i += 1
            continue
        start = i
        negated = text[i] == "-" and i + 1 < n and not text[i + 1].isspace()
        if negated:
            i += 1
        # Pieces of the term: (characters, quoted) so separators inside quotes stay literal.
        pieces: list[tuple[str, bool]] = []
        while i < n and not text[i].isspace():
            if text[i] == '"':
                opened = i
                i += 1
                quoted = []
                while i < n and text[i] != '"':
                    if text[i] == "\\" and i + 1 < n:
                        i += 1
                    quoted.append(text[i])
                    i += 1
                if i >= n:
                    raise QuerySyntaxError(
                        f"the quote opened at character {opened + 1} (`{text[start:]}`) is "
                        "never closed"
                    )
                i += 1
                pieces.append(("".join(quoted), True))
            else:
                j = i
                while j < n and not text[j].isspace() and text[j] != '"':
                    j += 1
                pieces.append((text[i:j], False))
                i = j
        yield (text[start:i], negated, *_split_term(pieces))


def _split_term(pieces: list[tuple[str, bool]]) -> tuple[str | None, list[str]]:
    """The field (before the first unquoted ':') and the comma-separated values after it."""
    field: str | None = None
    values: list[str] = [""]
    for chunk, quoted in pieces:
        if quoted:
            values[-1] += chunk
            continue
        for char in chunk:
            if char == ":" and field is None:
                field, values = values[0], [""]
            elif char == "," and field is not None:
                values.append("")
            else:
                values[-1] += char
    return field, values
