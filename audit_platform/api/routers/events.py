"""Search, one event, one transaction."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query

from audit_platform.api.deps import ScopeDep, Services, ServicesDep
from audit_platform.api.params import MAX_TRANSACTION_PAGE, SearchParams
from audit_platform.api_keys import Scope
from audit_platform.enrich import quarantine
from audit_platform.query import reads
from audit_platform.query.models import EventPage, TransactionView
from audit_platform.record import AuditRecord

router = APIRouter(prefix="/v1", tags=["events"])


@router.get("/events", response_model=EventPage)
def search_events(
    params: Annotated[SearchParams, Query()], scope: ScopeDep, svc: ServicesDep
) -> EventPage:
    """Audit records matching every given filter, newest first unless `order=asc`.

    Without `since`, the last 7 days (AUDIT_API_DEFAULT_RANGE_DAYS) are searched; a range may
    span at most 400 days (AUDIT_API_MAX_RANGE_DAYS). Pages hold at most 500 records; follow
    `next_cursor` for the next one.
    """
    return reads.search_events(
        svc.es,
        scope,
        svc.checked(params.filter(), scope),
        order=params.order,
        limit=params.limit,
        cursor=params.cursor,
        limits=svc.limits,
    )


@router.get("/events/{event_id}", response_model=AuditRecord)
def get_event(
    event_id: Annotated[str, Path(max_length=256)], scope: ScopeDep, svc: ServicesDep
) -> AuditRecord:
    """One record by its id (`env:source:LSN:index`)."""
    event = reads.get_event(svc.es, scope, event_id)
    if event is None:
        raise HTTPException(404, f"no event {event_id!r} in this environment and key's scope")
    return event


@router.get("/transactions/{source}/{xid}", response_model=TransactionView)
def get_transaction(
    source: Annotated[str, Path(max_length=64)],
    xid: Annotated[int, Path(ge=0, le=2**63 - 1)],
    scope: ScopeDep,
    svc: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=MAX_TRANSACTION_PAGE)] = 500,
    cursor: Annotated[str | None, Query(max_length=1024)] = None,
) -> TransactionView:
    """Every change of one transaction in commit order, with its context, and whether it is
    complete: how many changes capture staged, how many are indexed, waiting for a context in
    the quarantine, ignored by policy, or missing."""

    found = reads.get_transaction(
        svc.es,
        scope,
        source,
        xid,
        limit=limit,
        cursor=cursor,
        waiting=lambda lsn: waiting(svc, scope, source, lsn),
    )
    if found is None:
        raise HTTPException(
            404, f"no transaction {xid} of source {source!r} in this environment and key's scope"
        )
    return found


def waiting(svc: Services, scope: Scope, source: str, lsn: int) -> int | None:
    """Changes of the transaction at commit ``lsn`` still in the quarantine; None for a key
    limited to tables (the quarantine does not know a change's table, so the count would
    include tables the key may not read)."""
    if not scope.whole_sources:
        return None
    with svc.pool.connection() as conn:
        return quarantine.waiting_in_transaction(conn, scope.env, source, lsn)
