"""The questions investigators ask, answered from Elasticsearch.

Each function takes the caller's :class:`~audit_platform.api_keys.Scope`, reads only the
environment's alias, and builds its query with :func:`~audit_platform.query.filters.bool_query`,
so scope is applied in one place. Pagination is ``search_after`` on a total order (never deep
from/size): a page costs the same at record ten million as at record ten.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from elasticsearch import Elasticsearch

from audit_platform.api_keys import Scope
from audit_platform.naming import read_alias
from audit_platform.policy import SourcePolicy
from audit_platform.query import timing
from audit_platform.query.filters import (
    EventFilter,
    Order,
    QueryError,
    bool_query,
    decode_cursor,
    encode_cursor,
    filter_clauses,
    sort,
    time_range,
)
from audit_platform.query.language import any_of
from audit_platform.query.models import (
    ActorActivity,
    Bucket,
    ColumnDiff,
    Completeness,
    Correlation,
    EventPage,
    HistoryEntry,
    ObjectHistory,
    ObjectState,
    SchemaHistory,
    Stats,
    TimeBucket,
    Total,
    TransactionGroup,
    TransactionView,
)
from audit_platform.query.revert import RevertPlan, plan_revert
from audit_platform.record import AuditRecord, Operation

#: Totals are counted exactly up to here; beyond, "at least" (counting every hit costs time).
TOTAL_HITS_LIMIT = 10_000
INTERVALS = {
    "minute": timedelta(minutes=1),
    "hour": timedelta(hours=1),
    "day": timedelta(days=1),
    "week": timedelta(weeks=1),
}
MAX_BUCKETS = 2_000


@dataclass(frozen=True)
class Limits:
    """How much one request may ask for; documented in the API's parameter descriptions."""

    default_range: timedelta = timedelta(days=7)
    max_range: timedelta = timedelta(days=400)
    max_page: int = 500


def record(hit: dict[str, Any]) -> AuditRecord:
    timing.returned(1)
    return AuditRecord.model_validate({"id": hit["_id"], **hit["_source"]})


#: Figures of a record about its whole transaction, which may span tables a key limited to
#: tables may not read: left out of every record such a key gets (API, Explorer, exports).
WHOLE_TRANSACTION_FIELDS = ["transaction.changes", "transaction.ignored"]


def _search(es: Elasticsearch, scope: Scope, **body: Any) -> dict[str, Any]:
    if not scope.whole_sources:
        body["source_excludes"] = WHOLE_TRANSACTION_FIELDS
    # A new environment has no index yet: that is an empty answer, not an error.
    response = es.search(
        index=read_alias(scope.env), ignore_unavailable=True, allow_no_indices=True, **body
    )
    timing.record(response.meta.duration)
    if scope.organizations is not None:
        for hit in response.body.get("hits", {}).get("hits", []):
            _without_other_organizations(hit.get("_source") or {}, scope.organizations)
    return response.body


def records_by_id(
    es: Elasticsearch, scope: Scope, ids: list[str], clauses: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Of these records, the documents ``scope`` and ``clauses`` allow, in commit order, each
    with its ``id``: a stream's message, read as any search reads (``_search``). A shard that
    does not answer fails the search rather than leaving its records out."""
    if not ids:
        return []
    found = _search(
        es,
        scope,
        query=bool_query(scope, [{"ids": {"values": ids}}, *clauses]),
        sort=[{"transaction.lsn": "asc"}, {"transaction.change_index": "asc"}],
        size=len(ids),
        track_total_hits=False,
        allow_partial_search_results=False,
    )
    # One document per record, should an index migration leave a record in two indices.
    unique: dict[str, dict[str, Any]] = {}
    for hit in found["hits"]["hits"]:
        unique.setdefault(hit["_id"], hit)
    return [{"id": i, **hit["_source"]} for i, hit in unique.items()]


def existing_ids(es: Elasticsearch, env: str, ids: list[str]) -> set[str]:
    """Which of these records Elasticsearch holds, whatever their content (no scope: this
    tells only that a record a stream did not get was left out by its filter, not lost)."""
    response = es.search(
        index=read_alias(env),
        query={"ids": {"values": ids}},
        source=False,
        size=len(ids),
        track_total_hits=False,
        allow_partial_search_results=False,
        ignore_unavailable=True,
        allow_no_indices=True,
    )
    return {hit["_id"] for hit in response.body["hits"]["hits"]}


def _without_other_organizations(document: dict[str, Any], allowed: frozenset[str]) -> None:
    """A record of the key's organization whose context names another (someone acting for
    another tenant changed this tenant's row) keeps who did it, but not which organization
    they acted for: a key limited to organizations learns of no other's existence."""
    context = document.get("context")
    if not isinstance(context, dict):
        return
    named = context.get("organization")
    if isinstance(named, dict) and named.get("id") not in allowed:
        del context["organization"]


def _page(
    es: Elasticsearch,
    scope: Scope,
    clauses: list[dict[str, Any]],
    *,
    order: Order,
    limit: int,
    cursor: str | None,
    text: str | None = None,
    count: bool = False,
) -> tuple[list[dict[str, Any]], str | None, Total | None]:
    """One page and the cursor of the next; one extra hit is fetched to know if there is one."""
    body: dict[str, Any] = {
        "query": bool_query(scope, clauses, text),
        "sort": sort(order),
        "size": limit + 1,
        "track_total_hits": TOTAL_HITS_LIMIT if count else False,
    }
    if cursor is not None:
        body["search_after"] = decode_cursor(cursor, order)
    found = _search(es, scope, **body)
    hits = found["hits"]["hits"]
    following = encode_cursor(hits[limit - 1]["sort"], order) if len(hits) > limit else None
    total = None
    if count:
        reported = found["hits"]["total"]
        total = Total(value=reported["value"], exact=reported["relation"] == "eq")
    return hits[:limit], following, total


def search_events(
    es: Elasticsearch,
    scope: Scope,
    f: EventFilter,
    *,
    order: Order = "desc",
    limit: int = 50,
    cursor: str | None = None,
    limits: Limits = Limits(),
    now: datetime | None = None,
) -> EventPage:
    start, end = time_range(
        *f.bounds,
        now=now or datetime.now(UTC),
        default=limits.default_range,
        maximum=limits.max_range,
    )
    hits, following, total = _page(
        es,
        scope,
        filter_clauses(f, start, end),
        order=order,
        limit=limit,
        cursor=cursor,
        text=f.q,
        count=True,
    )
    assert total is not None
    return EventPage(events=[record(h) for h in hits], total=total, next_cursor=following)


def get_event(es: Elasticsearch, scope: Scope, event_id: str) -> AuditRecord | None:
    found = _search(es, scope, query=bool_query(scope, [{"ids": {"values": [event_id]}}]), size=1)
    hits = found["hits"]["hits"]
    return record(hits[0]) if hits else None


def get_transaction(
    es: Elasticsearch,
    scope: Scope,
    source: str,
    xid: int,
    *,
    limit: int,
    cursor: str | None = None,
    waiting: Callable[[int], int | None] = lambda lsn: 0,
) -> TransactionView | None:
    """``waiting(commit LSN)`` counts the transaction's changes still in the quarantine."""
    clauses: list[dict[str, Any]] = [
        {"term": {"source.service": source}},
        {"term": {"transaction.xid": xid}},
    ]
    hits, following, total = _page(
        es, scope, clauses, order="asc", limit=limit, cursor=cursor, count=True
    )
    if not hits:
        return None
    changes = [record(h) for h in hits]
    first = changes[0]
    assert total is not None
    return TransactionView(
        source=source,
        xid=xid,
        commit_lsn=first.transaction.commit_lsn,
        timestamp=first.timestamp,
        context=first.context,
        attribution=first.attribution,
        changes=changes,
        next_cursor=following,
        completeness=completeness(first, total.value, waiting(first.transaction.lsn), scope),
    )


def completeness(
    first: AuditRecord, indexed: int, waiting: int | None, scope: Scope
) -> Completeness:
    """How complete a transaction is, from its records' counts (see :class:`Completeness`).
    For a key limited to tables or organizations only ``indexed`` is given, counted within
    them (the answer is then the key's part of the transaction, and says so): the other
    figures are of the whole transaction, which may hold changes of tables it may not read
    (the quarantine does not record tables, so ``waiting`` cannot be narrowed either)."""
    captured, ignored = first.transaction.changes, first.transaction.ignored
    if not scope.whole_sources or waiting is None:
        why = "counted only for keys that may read every table of the source: the transaction "
        why += (
            "may hold changes outside this key's tables"
            if scope.organizations is None
            else "may hold changes of rows outside this key's organizations; this is its part"
        )
        return Completeness(
            captured=None,
            ignored=None,
            indexed=indexed,
            waiting=None,
            missing=None,
            complete=None,
            explanation=why,
        )
    if captured is None:
        why = "indexed before capture counted transactions: rebuild its hour (a backfill) to "
        why += "count it"
        return Completeness(
            captured=None,
            ignored=None,
            indexed=indexed,
            waiting=waiting,
            missing=None,
            complete=None,
            explanation=why,
        )
    missing = max(0, captured - (ignored or 0) - indexed - waiting)
    if missing:
        explanation = (
            f"{missing} of {captured} neither indexed nor waiting: see the source's "
            "dead-letter and rejected datasets, or wait for the next run"
        )
    elif waiting:
        explanation = f"{waiting} waiting for a context in the quarantine"
    else:
        explanation = "every change capture staged is indexed or ignored by policy"
    return Completeness(
        captured=captured,
        ignored=ignored,
        indexed=indexed,
        waiting=waiting,
        missing=missing,
        complete=missing == 0 and waiting == 0,
        explanation=explanation,
    )


def group_transactions(changes: list[AuditRecord]) -> list[TransactionGroup]:
    """Consecutive records of one (source, xid) as one transaction (records come in commit
    order, where a transaction's changes are adjacent)."""
    groups: list[TransactionGroup] = []
    for change in changes:
        last = groups[-1] if groups else None
        if last is None or (last.source, last.xid) != (
            change.source.service,
            change.transaction.xid,
        ):
            groups.append(
                TransactionGroup(
                    source=change.source.service,
                    xid=change.transaction.xid,
                    commit_lsn=change.transaction.commit_lsn,
                    timestamp=change.timestamp,
                    context=change.context,
                    attribution=change.attribution,
                    changes=[change],
                )
            )
        else:
            last.changes.append(change)
    return groups


def correlated(
    es: Elasticsearch,
    scope: Scope,
    kind: Literal["request", "job_run", "trace"],
    key: dict[str, str],
    *,
    limit: int,
    cursor: str | None = None,
) -> Correlation:
    """Every change under one request, job run or trace id, in every source the key may read.

    No time range: a request id names its changes wherever they are, and the term filters on
    keyword fields keep the search cheap however far back it looks.
    """
    fields = {
        "request": ["context.request_id"],
        "trace": ["trace.id"],
        "job_run": ["context.job.name", "context.job.run_id"],
    }[kind]
    clauses = [{"term": {field: value}} for field, value in zip(fields, key.values(), strict=True)]
    hits, following, _ = _page(es, scope, clauses, order="asc", limit=limit, cursor=cursor)
    changes = [record(h) for h in hits]
    return Correlation(
        kind=kind,
        key=key,
        transactions=group_transactions(changes),
        sources=sorted({c.source.service for c in changes}),
        next_cursor=following,
    )


def _table_clauses(source: str, table: str) -> list[dict[str, Any]]:
    """A source's table, named 'name' or 'schema.name'."""
    return [
        {"term": {"source.service": source}},
        *filter_clauses(EventFilter(table=[table]), None, None),
    ]


def _object_clauses(source: str, table: str, object_id: str) -> list[dict[str, Any]]:
    return [*_table_clauses(source, table), {"term": {"object_id": object_id}}]


def diff(event: AuditRecord) -> list[ColumnDiff]:
    before, after = event.before or {}, event.after or {}
    return [
        ColumnDiff(column=c, before=before.get(c), after=after.get(c))
        for c in event.changed_columns
    ]


def object_history(
    es: Elasticsearch,
    scope: Scope,
    source: str,
    table: str,
    object_id: str,
    *,
    order: Order = "asc",
    limit: int = 100,
    cursor: str | None = None,
) -> ObjectHistory:
    clauses = _object_clauses(source, table, object_id)
    hits, following, _ = _page(es, scope, clauses, order=order, limit=limit, cursor=cursor)
    entries = []
    for hit in hits:
        event = record(hit)
        entries.append(HistoryEntry(event=event, diff=diff(event)))
    return ObjectHistory(
        source=source, table=table, object_id=object_id, changes=entries, next_cursor=following
    )


def schema_history(
    es: Elasticsearch,
    scope: Scope,
    source: str,
    table: str,
    *,
    order: Order = "desc",
    limit: int = 50,
    cursor: str | None = None,
) -> SchemaHistory:
    """Every schema change of the table that is kept, whatever its age (a table's shape is
    read against records of any time, so the default search range does not apply)."""
    clauses = [*_table_clauses(source, table), {"term": {"operation": Operation.ddl.value}}]
    hits, following, _ = _page(es, scope, clauses, order=order, limit=limit, cursor=cursor)
    return SchemaHistory(
        source=source, table=table, changes=[record(h) for h in hits], next_cursor=following
    )


def _edge(es: Elasticsearch, scope: Scope, clauses: list[dict], order: Order) -> datetime | None:
    """Commit time of the first (asc) or last (desc) matching record, at full precision
    (a min/max aggregation would round nanosecond dates to milliseconds)."""
    hits, _, _ = _page(es, scope, clauses, order=order, limit=1, cursor=None)
    return datetime.fromisoformat(hits[0]["_source"]["@timestamp"]) if hits else None


def earliest_record(es: Elasticsearch, scope: Scope, source: str) -> datetime | None:
    return _edge(es, scope, [{"term": {"source.service": source}}], "asc")


def object_state(
    es: Elasticsearch,
    scope: Scope,
    source: str,
    table: str,
    object_id: str,
    at: datetime,
) -> ObjectState:
    """The row as it was at ``at``: the after-image of its last change at or before then.

    A truncate of the table after that change means the row was gone. With no record at all,
    the answer is "unknown", and says how far back the kept records reach: the row may have
    been last changed before retention removed that record, or may not have existed.
    """
    at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    clauses = [
        *_table_clauses(source, table),
        # With every digit written out: Elasticsearch fills a missing fraction of a second
        # with its maximum under "lte", so "12:00:00" would include changes up to 12:00:00.999.
        {"range": {"@timestamp": {"lte": at.isoformat(timespec="microseconds")}}},
        {
            "bool": {
                "should": [
                    {"term": {"object_id": object_id}},
                    {"term": {"operation": Operation.truncate.value}},
                ],
                "minimum_should_match": 1,
            }
        },
    ]
    hits, _, _ = _page(es, scope, clauses, order="desc", limit=1, cursor=None)
    base = {"source": source, "table": table, "object_id": object_id, "at": at}
    if not hits:
        earliest = earliest_record(es, scope, source)
        if earliest is None:
            why = f"no record of source {source!r} is kept (none indexed yet, or all expired)"
        else:
            why = (
                f"no change to this object is recorded at or before {at.isoformat()}; records "
                f"of source {source!r} are kept from {earliest.isoformat()}, so either the "
                "object was last changed before that (retention has removed the record) or it "
                "did not exist then"
            )
        return ObjectState(
            **base,
            status="unknown",
            row=None,
            as_of=None,
            explanation=why,
            earliest_retained=earliest,
        )
    event = record(hits[0])
    if event.operation in (Operation.delete, Operation.truncate):
        return ObjectState(**base, status="deleted", row=None, as_of=event)
    return _with_columns_at(
        es, scope, ObjectState(**base, status="present", row=event.after, as_of=event)
    )


#: Schema changes between a row's record and the moment asked for that are read to find the
#: columns added meanwhile; a table altered more often than this in that span is told so.
MAX_SCHEMA_CHANGES = 500


def _with_columns_at(es: Elasticsearch, scope: Scope, state: ObjectState) -> ObjectState:
    """The state with the table's columns as they were at its moment (docs/design.md, "Schema
    history"): a column dropped after the row's record is left out, one added after it is named
    as not recorded, and a table dropped (or created anew) after it means the row was gone.

    The schema changes are those of the record's own table (its schema and name as the record
    has them, not as the caller spelled them), ordered by commit position, so a change in the
    row's own transaction or in the same microsecond falls on the right side."""
    as_of = state.as_of
    assert as_of is not None and state.row is not None
    ddl = [
        {"term": {"source.service": as_of.source.service}},
        {"term": {"table.schema": as_of.table.schema_}},
        {"term": {"table.name": as_of.table.name}},
        {"term": {"operation": Operation.ddl.value}},
    ]
    moment = state.at.isoformat(timespec="microseconds")
    hits, _, _ = _page(
        es,
        scope,
        [*ddl, {"range": {"@timestamp": {"lte": moment}}}],
        order="desc",
        limit=1,
        cursor=None,
    )
    if not hits:
        return state
    change = record(hits[0])
    position = (as_of.transaction.lsn, as_of.transaction.change_index)
    since = as_of.timestamp.isoformat(timespec="microseconds")
    later, more, _ = _page(
        es,
        scope,
        [*ddl, {"range": {"@timestamp": {"gte": since, "lte": moment}}}],
        order="asc",
        limit=MAX_SCHEMA_CHANGES,
        cursor=None,
    )
    after = [
        r for r in map(record, later) if (r.transaction.lsn, r.transaction.change_index) > position
    ]
    if gone := next((r for r in after if r.before is None or r.after is None), None):
        what = "dropped" if gone.after is None else "created anew"
        return state.model_copy(
            update={
                "status": "deleted",
                "row": None,
                "schema_as_of": gone,
                "explanation": f"the table was {what} at {gone.timestamp.isoformat()}, after "
                "the row's last record",
            }
        )
    if change.after is None:
        return state  # dropped before the row's record, and created again since: as recorded
    columns = {name: str(kind) for name, kind in (change.after.get("columns") or {}).items()}
    row = {name: value for name, value in state.row.items() if name in columns}
    dropped = sorted(set(state.row) - set(columns))
    added: set[str] = set()
    for shapes in after:
        before = (shapes.before or {}).get("columns") or {}
        added |= set((shapes.after or {}).get("columns") or {}) - set(before)
    notes = []
    if dropped:
        notes.append(f"columns dropped by then are left out: {', '.join(dropped)}")
    if more is not None:
        notes.append(
            f"the table changed shape more than {MAX_SCHEMA_CHANGES} times since the row's "
            "record; columns added in the later changes are not named in not_recorded"
        )
    return state.model_copy(
        update={
            "row": row,
            "columns": columns,
            "schema_as_of": change,
            "not_recorded": sorted((added & set(columns)) - set(row)),
            "explanation": "; ".join(notes) or None,
        }
    )


def _buckets(aggregation: dict[str, Any]) -> list[Bucket]:
    return [Bucket(key=str(b["key"]), count=b["doc_count"]) for b in aggregation["buckets"]]


def stats(
    es: Elasticsearch,
    scope: Scope,
    f: EventFilter,
    *,
    interval: str = "hour",
    limits: Limits = Limits(),
    now: datetime | None = None,
) -> Stats:
    start, end = time_range(
        *f.bounds,
        now=now or datetime.now(UTC),
        default=limits.default_range,
        maximum=limits.max_range,
    )
    step = INTERVALS[interval]
    if (end - start) / step > MAX_BUCKETS:
        raise QueryError(
            "interval",
            f"{interval} buckets over this range would be more than "
            f"{MAX_BUCKETS}: choose a longer interval",
        )
    terms = {
        "by_source": "source.service",
        "by_operation": "operation",
        "by_actor": "context.actor.id",
        "by_attribution": "attribution.status",
    }
    aggs: dict[str, Any] = {
        name: {"terms": {"field": field, "size": 50, "missing": "(none)"}}
        for name, field in terms.items()
    }
    aggs["by_table"] = {
        "terms": {"field": "table.name", "size": 50},
        "aggs": {"schema": {"terms": {"field": "table.schema", "size": 10}}},
    }
    fixed = {"minute": "1m", "hour": "1h", "day": "1d", "week": "7d"}[interval]
    aggs["over_time"] = {
        "date_histogram": {
            "field": "@timestamp",
            "fixed_interval": fixed,
            "min_doc_count": 0,
            "extended_bounds": {
                "min": start.isoformat(),
                "max": (end - timedelta(milliseconds=1)).isoformat(),
            },
        }
    }
    found = _search(
        es,
        scope,
        size=0,
        track_total_hits=True,
        aggs=aggs,
        query=bool_query(scope, filter_clauses(f, start, end), f.q),
    )
    results = found.get("aggregations")
    if results is None:  # no index yet
        return Stats(
            since=start,
            until=end,
            total=0,
            by_source=[],
            by_table=[],
            by_operation=[],
            by_actor=[],
            by_attribution=[],
            over_time=[],
        )
    tables = [
        Bucket(key=f"{s['key']}.{t['key']}", count=s["doc_count"])
        for t in results["by_table"]["buckets"]
        for s in t["schema"]["buckets"]
    ]
    return Stats(
        since=start,
        until=end,
        total=found["hits"]["total"]["value"],
        by_table=sorted(tables, key=lambda b: -b.count),
        over_time=[
            TimeBucket(start=datetime.fromtimestamp(b["key"] / 1000, UTC), count=b["doc_count"])
            for b in results["over_time"]["buckets"]
        ],
        **{name: _buckets(results[name]) for name in terms},
    )


def actor_activity(
    es: Elasticsearch,
    scope: Scope,
    actor_id: str,
    f: EventFilter,
    *,
    interval: str = "day",
    recent: int = 20,
    limits: Limits = Limits(),
    now: datetime | None = None,
) -> ActorActivity:
    f = f.model_copy(update={"actor_id": actor_id})
    summary = stats(es, scope, f, interval=interval, limits=limits, now=now)
    bounded = f.model_copy(update={"since": summary.since, "until": summary.until})
    page = search_events(es, scope, bounded, order="desc", limit=recent, limits=limits, now=now)
    actor = [{"term": {"context.actor.id": actor_id}}]
    return ActorActivity(
        actor_id=actor_id,
        first_seen=_edge(es, scope, actor, "asc"),
        last_seen=_edge(es, scope, actor, "desc"),
        stats=summary,
        recent=page.events,
    )


def iter_hits(
    es: Elasticsearch,
    scope: Scope,
    f: EventFilter,
    *,
    order: Order = "asc",
    page_size: int = 1_000,
    limits: Limits = Limits(),
    now: datetime | None = None,
) -> Iterator[dict[str, Any]]:
    """Every matching hit, a page at a time: memory holds one page, whatever the total.

    The range is resolved and the first page fetched before this returns, so a bad parameter
    or a query Elasticsearch refuses is an error before any byte of an export is sent (after
    the status line, a failure could only cut the file short).
    """
    start, end = time_range(
        *f.bounds,
        now=now or datetime.now(UTC),
        default=limits.default_range,
        maximum=limits.max_range,
    )
    clauses = filter_clauses(f, start, end)
    first, cursor, _ = _page(
        es, scope, clauses, order=order, limit=page_size, cursor=None, text=f.q
    )

    def pages(hits: list[dict[str, Any]], cursor: str | None) -> Iterator[dict[str, Any]]:
        while True:
            yield from hits
            if cursor is None:
                return
            hits, cursor, _ = _page(
                es, scope, clauses, order=order, limit=page_size, cursor=cursor, text=f.q
            )

    return pages(first, cursor)


#: Changes one revert plan may cover; a larger set is refused (narrow it) rather than cut.
MAX_REVERT_CHANGES = 10_000


def revert_plan(
    es: Elasticsearch,
    scope: Scope,
    of: dict[str, str],
    f: EventFilter,
    policies: Mapping[str, SourcePolicy],
    *,
    limits: Limits = Limits(),
    now: datetime | None = None,
) -> RevertPlan | None:
    """The plan undoing every change ``f`` selects (within the key's scope), with the later
    changes to the same rows as conflicts; None when nothing matches."""
    now = now or datetime.now(UTC)
    if f.bounds == (None, None):  # a transaction or a request: wherever it is
        f = f.model_copy(update={"since": now - limits.max_range})
    records = []
    for hit in iter_hits(es, scope, f, limits=limits, now=now):
        records.append(record(hit))
        if len(records) > MAX_REVERT_CHANGES:
            raise QueryError(
                "since",
                f"more than {MAX_REVERT_CHANGES:,} changes match: narrow "
                "the time range, or revert part by part",
            )
    if not records:
        return None
    return plan_revert(of, records, policies, _later_changes(es, scope, records), generated_at=now)


def _later_changes(
    es: Elasticsearch, scope: Scope, records: list[AuditRecord]
) -> list[AuditRecord]:
    """Changes to the same rows committed from the plan's first change on (the plan decides
    which of them came after the change it would undo)."""
    objects: dict[tuple[str, str, str], set[str]] = {}
    for r in records:
        if r.object_id is not None:
            objects.setdefault((r.source.service, r.table.schema_, r.table.name), set()).add(
                r.object_id
            )
    if not objects:
        return []
    groups = [
        {
            "bool": {
                "filter": [
                    {"term": {"source.service": source}},
                    {"term": {"table.schema": schema}},
                    {"term": {"table.name": table}},
                    {"terms": {"object_id": sorted(ids)}},
                ]
            }
        }
        for (source, schema, table), ids in objects.items()
    ]
    first = min(r.timestamp for r in records)
    clauses = [{"range": {"@timestamp": {"gte": first.isoformat()}}}, any_of(groups)]
    found: list[AuditRecord] = []
    cursor: str | None = None
    while len(found) < MAX_REVERT_CHANGES:
        hits, cursor, _ = _page(es, scope, clauses, order="asc", limit=1_000, cursor=cursor)
        found.extend(record(h) for h in hits)
        if cursor is None:
            break
    return found
