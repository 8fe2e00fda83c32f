"""Everything one request, one job run or one trace changed, across every source."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from audit_platform.api.deps import ScopeDep, ServicesDep
from audit_platform.api.params import MAX_TRANSACTION_PAGE
from audit_platform.api.paths import Id
from audit_platform.query import reads
from audit_platform.query.models import Correlation

router = APIRouter(prefix="/v1", tags=["correlation"])

Limit = Annotated[int, Query(ge=1, le=MAX_TRANSACTION_PAGE, description="Changes per page.")]
Cursor = Annotated[str | None, Query(max_length=1024, description="`next_cursor` of the last.")]


@router.get("/requests/{request_id:id}", response_model=Correlation)
def request_changes(
    request_id: Id, scope: ScopeDep, svc: ServicesDep, limit: Limit = 500, cursor: Cursor = None
) -> Correlation:
    """Every change made under one request id, in every source this key may read, in commit
    order, grouped by transaction. Sources the key may not read are left out silently."""
    return reads.correlated(
        svc.es, scope, "request", {"request_id": request_id}, limit=limit, cursor=cursor
    )


@router.get("/jobs/{name:id}/runs/{run_id:id}", response_model=Correlation)
def job_run_changes(
    name: Id,
    run_id: Id,
    scope: ScopeDep,
    svc: ServicesDep,
    limit: Limit = 500,
    cursor: Cursor = None,
) -> Correlation:
    """Every change one run of a job made, in every source this key may read."""
    return reads.correlated(
        svc.es, scope, "job_run", {"job": name, "run_id": run_id}, limit=limit, cursor=cursor
    )


@router.get("/traces/{trace_id}", response_model=Correlation)
def trace_changes(
    trace_id: Id, scope: ScopeDep, svc: ServicesDep, limit: Limit = 500, cursor: Cursor = None
) -> Correlation:
    """Every change made under one trace id (a distributed trace across services)."""
    return reads.correlated(
        svc.es, scope, "trace", {"trace_id": trace_id}, limit=limit, cursor=cursor
    )
