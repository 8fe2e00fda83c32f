"""The Audit Explorer's pages: server-rendered HTML over the same query layer as the API.

Every page is a GET whose URL holds its whole state (the query, the cursor, the moment), so a
pasted link opens the same page, the back button works, and no script is needed to read it.
Every read goes through :mod:`audit_platform.query.reads` with the session's scope, exactly as
the JSON API does: a key limited to one table sees only that table here too.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from audit_platform.api.deps import Services, ServicesDep
from audit_platform.api.params import ExportFormat
from audit_platform.api.paths import Id, ObjectId
from audit_platform.api.routers.events import waiting as quarantine_waiting
from audit_platform.api.routers.export import streamed
from audit_platform.api.routers.revert import request_plan, sql_download, transaction_plan
from audit_platform.api.ui import views
from audit_platform.api.ui.auth import (
    SignedIn,
    clear_session_cookie,
    cookie_name,
    safe_next,
    same_origin,
    set_session_cookie,
)
from audit_platform.api_keys import ApiKey, verify_key
from audit_platform.query import reads
from audit_platform.query.filters import EventFilter, QueryError
from audit_platform.query.language import utc_time
from audit_platform.query.models import Completeness
from audit_platform.record import AuditRecord
from audit_platform.ui_sessions import close_session, open_session

router = APIRouter(prefix="/ui", include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
templates.env.globals.update(
    utc=views.utc,
    show=views.show,
    term=views.term,
    refine=views.refine,
    FACETS=views.FACETS,
    NONE_KEY=views.NONE_KEY,
)

PAGE_SIZE = 50
RANGES = {
    "1h": ("hour", "minute"),
    "24h": ("day", "hour"),
    "7d": ("7 days", "hour"),
    "30d": ("30 days", "day"),
    "90d": ("90 days", "day"),
}
Range = Literal["1h", "24h", "7d", "30d", "90d"]


def page(
    request: Request, name: str, key: ApiKey | None, status: int = 200, **context: Any
) -> HTMLResponse:
    """A page with what every page shows: the environment, how it looks, who is signed in."""
    settings = request.app.state.services.settings
    return templates.TemplateResponse(
        request,
        name,
        {"env": settings.env, "tone": views.environment_tone(settings.env), "key": key, **context},
        status_code=status,
    )


def error_page(request: Request, status: int, message: str) -> HTMLResponse:
    return page(request, "error.html", None, status=status, status_code=status, message=message)


def interval_for(f: EventFilter, limits: reads.Limits) -> str:
    """A histogram interval giving a readable number of bars for the search's time range."""
    start, end = f.bounds
    end = end or datetime.now(UTC)
    span = end - (start or end - limits.default_range)
    if span <= timedelta(hours=3):
        return "minute"
    if span <= timedelta(days=8):
        return "hour"
    return "day" if span <= timedelta(days=400) else "week"


def _filter(svc: Services, key: ApiKey, query: str) -> EventFilter:
    """The search ``query`` asks for; refused with the language's own message if it is wrong."""
    try:
        f = EventFilter(query=query or None)
    except ValidationError as exc:
        raise QueryError(
            "query", "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        ) from exc
    return svc.checked(f, key.scope)


# --- signing in and out -------------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str | None = None) -> HTMLResponse:
    return page(request, "login.html", None, next=safe_next(next), error=None)


@router.post("/login")
def login(
    request: Request,
    svc: ServicesDep,
    key: Annotated[str, Form(max_length=200)],
    next: Annotated[str, Form(max_length=2048)] = "/ui/",
) -> Response:
    same_origin(request)
    # No cache here: a key revoked a second ago must not open a session.
    with svc.pool.connection() as conn:
        found = verify_key(conn, svc.settings.env, key.strip())
        if found is None:
            return page(
                request,
                "login.html",
                None,
                status=401,
                next=safe_next(next),
                error=f"That is not an active API key of environment {svc.settings.env}. Keys "
                "look like ak_<12 hex>_<secret>; ask for one (`audit-platform keys create`), "
                "or check that it was not revoked.",
            )
        lifetime = timedelta(hours=svc.settings.ui.session_hours)
        token = open_session(conn, found, lifetime)
    response = RedirectResponse(safe_next(next), status_code=303)
    set_session_cookie(response, request, svc.settings.env, token, lifetime)
    return response


@router.post("/logout")
def logout(request: Request, svc: ServicesDep) -> Response:
    same_origin(request)
    token = request.cookies.get(cookie_name(svc.settings.env))
    if token:
        with svc.pool.connection() as conn:
            close_session(conn, token)
    response = RedirectResponse("/ui/login", status_code=303)
    clear_session_cookie(response, svc.settings.env)
    return response


# --- overview and search ------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
def overview(
    request: Request, key: SignedIn, svc: ServicesDep, range: Range = "24h"
) -> HTMLResponse:
    since = f"since:-{range}"
    interval = RANGES[range][1]
    summary = reads.stats(
        svc.es, key.scope, EventFilter(query=since), interval=interval, limits=svc.limits
    )
    unattributed_query = f"{since} attribution:unattributed"
    unattributed = reads.search_events(
        svc.es, key.scope, EventFilter(query=unattributed_query), limit=20, limits=svc.limits
    )
    return page(
        request,
        "overview.html",
        key,
        range=range,
        ranges=RANGES,
        stats=summary,
        chart=views.time_chart(summary.over_time, unit=interval),
        unattributed_share=views.share(summary.by_attribution, "unattributed"),
        unattributed=unattributed,
        unattributed_query=unattributed_query,
    )


@router.get("/search", response_class=HTMLResponse)
def search(
    request: Request,
    key: SignedIn,
    svc: ServicesDep,
    q: Annotated[str, Query(max_length=2048)] = "",
    cursor: Annotated[str | None, Query(max_length=1024)] = None,
    page_number: Annotated[int, Query(alias="page", ge=1, le=100_000)] = 1,
) -> HTMLResponse:
    try:
        f = _filter(svc, key, q)
        results = reads.search_events(
            svc.es, key.scope, f, limit=PAGE_SIZE, cursor=cursor, limits=svc.limits
        )
        interval = interval_for(f, svc.limits)
        facets = reads.stats(svc.es, key.scope, f, interval=interval, limits=svc.limits)
    except QueryError as exc:
        return page(
            request,
            "search.html",
            key,
            status=422,
            q=q,
            error=str(exc),
            results=None,
            facets=None,
            chart=None,
        )
    return page(
        request,
        "search.html",
        key,
        q=q,
        error=None,
        results=results,
        facets=facets,
        chart=views.time_chart(facets.over_time, unit=interval, height=80),
        page_number=page_number,
        cursor=cursor,
    )


@router.get("/export")
def export(
    request: Request,
    key: SignedIn,
    svc: ServicesDep,
    q: Annotated[str, Query(max_length=2048)] = "",
    format: ExportFormat = "csv",
) -> Response:
    """The current search as a file; newest first, like the results table."""
    return streamed(request, svc, key.scope, _filter(svc, key, q), format, "desc")


# --- one record, object, transaction, request, actor --------------------------------------


@router.get("/events/{event_id}", response_class=HTMLResponse)
def event(
    request: Request,
    key: SignedIn,
    svc: ServicesDep,
    event_id: Annotated[str, PathParam(max_length=256)],
) -> HTMLResponse:
    found = reads.get_event(svc.es, key.scope, event_id)
    if found is None:
        raise HTTPException(
            404, f"No record {event_id} in this environment that your key may read."
        )
    rows = views.columns(found)
    return page(
        request,
        "event.html",
        key,
        record=found,
        rows=rows,
        folded=sum(1 for r in rows if not (r.changed or r.key)),
    )


@router.get("/objects/{source}/{table}/{object_id:id}", response_class=HTMLResponse)
def object_page(
    request: Request,
    key: SignedIn,
    svc: ServicesDep,
    source: Annotated[str, PathParam(max_length=64)],
    table: Annotated[str, PathParam(max_length=128)],
    object_id: ObjectId,
    at: Annotated[str | None, Query(max_length=40)] = None,
    cursor: Annotated[str | None, Query(max_length=1024)] = None,
) -> HTMLResponse:
    moment = _moment(at)
    history = reads.object_history(
        svc.es, key.scope, source, table, object_id, order="desc", limit=PAGE_SIZE, cursor=cursor
    )
    state = reads.object_state(
        svc.es, key.scope, source, table, object_id, moment or datetime.now(UTC)
    )
    return page(
        request,
        "object.html",
        key,
        source=source,
        table=table,
        object_id=object_id,
        history=history,
        state=state,
        at=moment,
        cursor=cursor,
    )


@router.get("/tables/{source}/{table}", response_class=HTMLResponse)
def table_page(
    request: Request,
    key: SignedIn,
    svc: ServicesDep,
    source: Annotated[str, PathParam(max_length=64)],
    table: Annotated[str, PathParam(max_length=128)],
    cursor: Annotated[str | None, Query(max_length=1024)] = None,
) -> HTMLResponse:
    """A table's page: its columns as last recorded and its schema history, newest first."""
    history = reads.schema_history(svc.es, key.scope, source, table, limit=PAGE_SIZE, cursor=cursor)
    latest = history.changes[0] if history.changes and cursor is None else None
    return page(
        request,
        "table.html",
        key,
        source=source,
        table=table,
        history=history,
        latest=latest,
        changes=[(change, views.columns(change)) for change in history.changes],
        cursor=cursor,
    )


def _moment(at: str | None) -> datetime | None:
    """The moment picked on the page (a datetime-local field, read as UTC) or typed in ISO."""
    if not at:
        return None
    try:
        moment = datetime.fromisoformat(at)
    except ValueError as exc:
        raise QueryError(
            "at",
            f"{at!r} is not a moment: write it as 2026-11-27T14:30 "
            "(UTC) or in ISO 8601 with an offset",
        ) from exc
    try:
        return utc_time(moment)
    except ValueError as exc:
        raise QueryError("at", str(exc)) from exc


def _completeness(svc: Services, key: ApiKey, changes: list[AuditRecord]) -> Completeness:
    """Of a transaction whose every indexed change is ``changes``."""
    first = changes[0]
    waiting = quarantine_waiting(svc, key.scope, first.source.service, first.transaction.lsn)
    return reads.completeness(first, len(changes), waiting, key.scope)


Xid = Annotated[int, PathParam(ge=0, le=2**63 - 1)]
SourceName = Annotated[str, PathParam(max_length=64)]


@router.get("/transactions/{source}/{xid}", response_class=HTMLResponse)
def transaction(
    request: Request,
    key: SignedIn,
    svc: ServicesDep,
    source: SourceName,
    xid: Xid,
    cursor: Annotated[str | None, Query(max_length=1024)] = None,
) -> HTMLResponse:
    def waiting(lsn: int) -> int | None:
        return quarantine_waiting(svc, key.scope, source, lsn)

    found = reads.get_transaction(
        svc.es, key.scope, source, xid, limit=500, cursor=cursor, waiting=waiting
    )
    if found is None:
        raise HTTPException(
            404,
            f"No transaction {xid} of source {source} in this environment that your key may read.",
        )
    plan = transaction_plan(svc, key.scope, source, xid)
    return page(
        request,
        "transaction.html",
        key,
        txn=found,
        plan=plan,
        download=f"/ui/transactions/{views.segment(source)}/{xid}/revert.sql",
    )


@router.get("/transactions/{source}/{xid}/revert.sql")
def transaction_revert(key: SignedIn, svc: ServicesDep, source: SourceName, xid: Xid) -> Response:
    plan = transaction_plan(svc, key.scope, source, xid)
    if plan is None:
        raise HTTPException(
            404, f"No change of transaction {xid} of source {source} that your key may read."
        )
    return sql_download(plan)


# Before the request's page: an id may hold a slash, and that page's route would take
# "x/revert.sql" as an id.
@router.get("/requests/{request_id:id}/revert.sql")
def request_revert(key: SignedIn, svc: ServicesDep, request_id: Id) -> Response:
    plan = request_plan(svc, key.scope, request_id)
    if plan is None:
        raise HTTPException(404, f"No change of request {request_id} that your key may read.")
    return sql_download(plan)


@router.get("/requests/{request_id:id}", response_class=HTMLResponse)
def request_page(
    request: Request,
    key: SignedIn,
    svc: ServicesDep,
    request_id: Id,
    cursor: Annotated[str | None, Query(max_length=1024)] = None,
) -> HTMLResponse:
    found = reads.correlated(
        svc.es, key.scope, "request", {"request_id": request_id}, limit=500, cursor=cursor
    )
    plan = request_plan(svc, key.scope, request_id) if found.transactions else None
    # Each whole transaction's completeness; the last one may go on on the next page.
    whole = found.transactions[:-1] if found.next_cursor else found.transactions
    checks = {(g.source, g.xid): _completeness(svc, key, g.changes) for g in whole}
    return page(
        request,
        "request.html",
        key,
        request_id=request_id,
        found=found,
        plan=plan,
        checks=checks,
        download=f"/ui/requests/{views.segment(request_id)}/revert.sql",
    )


@router.get("/actors/{actor_id:id}", response_class=HTMLResponse)
def actor(
    request: Request, key: SignedIn, svc: ServicesDep, actor_id: Id, range: Range = "7d"
) -> HTMLResponse:
    interval = RANGES[range][1]
    activity = reads.actor_activity(
        svc.es,
        key.scope,
        actor_id,
        EventFilter(query=f"since:-{range}"),
        interval=interval,
        limits=svc.limits,
    )
    return page(
        request,
        "actor.html",
        key,
        activity=activity,
        range=range,
        ranges=RANGES,
        chart=views.time_chart(activity.stats.over_time, unit=interval),
    )


templates.env.globals["links"] = views.record_links
templates.env.filters["seg"] = views.segment
