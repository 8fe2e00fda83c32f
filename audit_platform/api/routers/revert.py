"""Revert plans: the SQL that would undo a transaction, a request, a job run or an actor's
changes in a window. Returned as text to review; the platform never runs it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.responses import PlainTextResponse

from audit_platform.api.deps import ScopeDep, Services, ServicesDep
from audit_platform.api.downloads import attachment
from audit_platform.api.paths import Id
from audit_platform.api_keys import Scope
from audit_platform.query import reads
from audit_platform.query.filters import EventFilter, Moment
from audit_platform.query.revert import RevertPlan

router = APIRouter(prefix="/v1", tags=["revert"])

Format = Annotated[
    Literal["json", "sql"],
    Query(
        description="`json`: statements and conflicts; `sql`: one file to review and run, "
        "a script per source (each on its own database)."
    ),
]
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/sql": {}}, "description": "format=sql: the file."}
}


def _answer(plan: RevertPlan | None, what: str, format: str) -> RevertPlan | PlainTextResponse:
    if plan is None:
        raise HTTPException(404, f"no change of {what} in this environment and key's scope")
    if format == "json":
        return plan
    return sql_download(plan)


def sql_download(plan: RevertPlan) -> PlainTextResponse:
    return PlainTextResponse(
        plan.sql_file(),
        media_type="application/sql",
        headers=attachment(plan.file_name()),
    )


@router.get("/transactions/{source}/{xid}/revert", response_model=RevertPlan, responses=RESPONSES)
def revert_transaction(
    source: Annotated[str, Path(max_length=64)],
    xid: Annotated[int, Path(ge=0, le=2**63 - 1)],
    scope: ScopeDep,
    svc: ServicesDep,
    format: Format = "json",
):
    """The plan undoing one transaction."""
    plan = transaction_plan(svc, scope, source, xid)
    return _answer(plan, f"transaction {xid} of source {source!r}", format)


def transaction_plan(svc: Services, scope: Scope, source: str, xid: int) -> RevertPlan | None:
    """The plan undoing one transaction (the API's and the Explorer's)."""
    f = EventFilter(source=[source], xid=xid)
    return reads.revert_plan(
        svc.es, scope, {"source": source, "xid": str(xid)}, f, svc.policies, limits=svc.limits
    )


def request_plan(svc: Services, scope: Scope, request_id: str) -> RevertPlan | None:
    """The plan undoing everything one request changed (the API's and the Explorer's)."""
    return reads.revert_plan(
        svc.es,
        scope,
        {"request_id": request_id},
        EventFilter(request_id=request_id),
        svc.policies,
        limits=svc.limits,
    )


@router.get("/requests/{request_id:id}/revert", response_model=RevertPlan, responses=RESPONSES)
def revert_request(request_id: Id, scope: ScopeDep, svc: ServicesDep, format: Format = "json"):
    """The plan undoing everything one request changed, in every source the key may read."""
    return _answer(request_plan(svc, scope, request_id), f"request {request_id!r}", format)


@router.get(
    "/jobs/{name:id}/runs/{run_id:id}/revert", response_model=RevertPlan, responses=RESPONSES
)
def revert_job_run(
    name: Id, run_id: Id, scope: ScopeDep, svc: ServicesDep, format: Format = "json"
):
    """The plan undoing what one run of a job changed (the broken nightly job)."""
    f = EventFilter(job=name, job_run_id=run_id)
    plan = reads.revert_plan(
        svc.es, scope, {"job": name, "run_id": run_id}, f, svc.policies, limits=svc.limits
    )
    return _answer(plan, f"run {run_id!r} of job {name!r}", format)


@router.get("/actors/{actor_id:id}/revert", response_model=RevertPlan, responses=RESPONSES)
def revert_actor(
    actor_id: Id,
    since: Annotated[Moment, Query(description="From this commit time (inclusive).")],
    scope: ScopeDep,
    svc: ServicesDep,
    until: Annotated[Moment | None, Query(description="Until (exclusive); default now.")] = None,
    format: Format = "json",
):
    """The plan undoing what one actor changed in a time window."""
    f = EventFilter(actor_id=actor_id, since=since, until=until)
    of = {
        "actor": actor_id,
        "since": since.isoformat(),
        **({"until": until.isoformat()} if until else {}),
    }
    plan = reads.revert_plan(svc.es, scope, of, f, svc.policies, limits=svc.limits)
    return _answer(plan, f"actor {actor_id!r} in that window", format)
