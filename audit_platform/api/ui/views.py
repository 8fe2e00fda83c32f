"""What the Explorer's pages compute before rendering: query terms for facet links, chart
geometry, a record's columns side by side, how an environment looks. Pure functions, so the
rules are unit-tested without a browser."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote as url_quote

from audit_platform.query.models import Bucket, TimeBucket
from audit_platform.record import AuditRecord, Operation

#: Values the query language reads as they are; anything else is quoted.
_BARE = re.compile(r"^[^\s,:\"()-][^\s,:\"()]*$")

#: Facets of the search page: the title, the statistics' bucket list, the query field.
FACETS: tuple[tuple[str, str, str], ...] = (
    ("Source", "by_source", "source"),
    ("Table", "by_table", "table"),
    ("Operation", "by_operation", "op"),
    ("Actor", "by_actor", "actor"),
    ("Attribution", "by_attribution", "attribution"),
)
#: Bucket key the statistics use for "no value" (no actor): it cannot be searched for.
NONE_KEY = "(none)"

Tone = Literal["production", "staging", "development"]


def quote(value: str) -> str:
    """``value`` as the query language reads it back: bare when it can be, else quoted."""
    if _BARE.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def term(field: str, value: str) -> str:
    return f"{field}:{quote(value)}"


def refine(query: str, field: str, value: str) -> str:
    """The query narrowed to ``field:value`` (unchanged if it already says so)."""
    added = term(field, value)
    if added in query.split():
        return query
    return f"{query.strip()} {added}".strip()


def environment_tone(env: str) -> Tone:
    """How the pages of ``env`` look: production is unmistakable, so nobody takes it for a
    test environment (and the other way round)."""
    name = env.lower()
    if re.search(r"(^|[_-])(prod|production|prd|live)($|[_-])", name):
        return "production"
    if re.search(r"(^|[_-])(staging|stage|stg|uat|preprod|qa)($|[_-])", name):
        return "staging"
    return "development"


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str
    count: int


@dataclass(frozen=True)
class Chart:
    """A bar chart over time as SVG geometry, drawn by the page itself (no script library)."""

    width: int
    height: int
    bars: list[Bar]
    peak: int
    first: str
    last: str
    total: int


def time_chart(
    buckets: list[TimeBucket], *, width: int = 960, height: int = 140, unit: str = "hour"
) -> Chart:
    """Bars of equal width filling ``width``; the tallest reaches the top. Each bar's label
    is its start and count, for the tooltip and the table read by screen readers."""
    peak = max((b.count for b in buckets), default=0)
    step = width / len(buckets) if buckets else 0.0
    gap = min(1.0, step * 0.2)
    layout = "%Y-%m-%d %H:%M" if unit in ("minute", "hour") else "%Y-%m-%d"
    bars = []
    for i, bucket in enumerate(buckets):
        tall = (bucket.count / peak) * (height - 4) if peak else 0.0
        if bucket.count and tall < 1:
            tall = 1.0  # a bucket with changes is never invisible
        label = f"{bucket.start.strftime(layout)} UTC: {bucket.count:,}"
        bars.append(
            Bar(
                round(i * step, 2),
                round(height - tall, 2),
                round(max(step - gap, 0.5), 2),
                round(tall, 2),
                label,
                bucket.count,
            )
        )
    return Chart(
        width,
        height,
        bars,
        peak,
        first=buckets[0].start.strftime(layout) if buckets else "",
        last=buckets[-1].start.strftime(layout) if buckets else "",
        total=sum(b.count for b in buckets),
    )


def share(buckets: list[Bucket], key: str) -> float:
    """The fraction of all counts in the bucket ``key`` (0 when there are none)."""
    total = sum(b.count for b in buckets)
    return sum(b.count for b in buckets if b.key == key) / total if total else 0.0


@dataclass(frozen=True)
class ColumnRow:
    column: str
    before: str | None
    after: str | None
    changed: bool
    key: bool


def show(value: Any) -> str:
    """A column value as the page prints it: text as is, anything else as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def columns(record: AuditRecord) -> list[ColumnRow]:
    """Every column of the row, before and after, in the row's order; key columns first, then
    the changed ones, so the page can fold the rest. A schema change's rows are the table's
    columns with their types, and its name, key and replica identity."""
    if record.operation is Operation.ddl:
        return _shape_rows(record)
    before, after = record.before or {}, record.after or {}
    names = list(dict.fromkeys([*before, *after]))
    changed = set(record.changed_columns)
    if record.operation.value in ("insert", "delete"):
        changed = set(names)
    keys = set(record.row.key) if record.row else set()
    rows = [
        ColumnRow(
            name,
            show(before[name]) if name in before and record.before is not None else None,
            show(after[name]) if name in after and record.after is not None else None,
            name in changed,
            name in keys,
        )
        for name in names
    ]
    return sorted(rows, key=lambda r: (not r.key, not r.changed))


#: A schema change's facts about the table as a whole, shown after its columns (in
#: parentheses, which the page sets apart from column names).
_TABLE_FACTS = ("(name)", "(primary key)", "(replica identity)")


def _shape_rows(record: AuditRecord) -> list[ColumnRow]:
    before, after = record.before, record.after
    old, new = (before or {}).get("columns") or {}, (after or {}).get("columns") or {}
    keys = set((after or before or {}).get("primary_key") or [])
    changed = set(record.changed_columns)
    rows = [
        ColumnRow(
            name,
            show(old[name]) if name in old else None,
            show(new[name]) if name in new else None,
            name in changed,
            name in keys,
        )
        for name in dict.fromkeys([*old, *new])
    ]

    def fact(shape: dict | None, label: str) -> str | None:
        if shape is None:
            return None
        if label == "(name)":
            return f"{shape.get('schema')}.{shape.get('table')}"
        if label == "(primary key)":
            return ", ".join(shape.get("primary_key") or []) or "none"
        return str(shape.get("replica_identity"))

    for label in _TABLE_FACTS:
        was, now = fact(before, label), fact(after, label)
        rows.append(ColumnRow(label, was, now, was != now, False))
    return sorted(rows, key=lambda r: (not r.key, not r.changed))


def utc(moment: datetime | None) -> str:
    """A moment as every page prints it: UTC, to the millisecond."""
    if moment is None:
        return ""
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d} UTC"


def segment(value: object) -> str:
    """``value`` as one segment of a page's path: a slash or a '?' in an id stays in it."""
    return url_quote(str(value), safe="")


def record_links(record: AuditRecord) -> dict[str, str]:
    """Where a record leads: its transaction, its table, its object, its request, its actor."""
    source = segment(record.source.service)
    table = segment(f"{record.table.schema_}.{record.table.name}")
    links = {
        "transaction": f"/ui/transactions/{source}/{record.transaction.xid}",
        "table": f"/ui/tables/{source}/{table}",
    }
    if record.object_id is not None:
        links["object"] = f"/ui/objects/{source}/{table}/{segment(record.object_id)}"
    context = record.context or {}
    if context.get("request_id"):
        links["request"] = f"/ui/requests/{segment(context['request_id'])}"
    if isinstance(context.get("actor"), dict) and context["actor"].get("id"):
        links["actor"] = f"/ui/actors/{segment(context['actor']['id'])}"
    return links
