"""Erasure requests, for admins: ask for a person's values to be erased, approve another
admin's request, cancel one, see what became of each (docs/design.md, "Erasure").

Only keys of the whole environment with role admin may: an erasure removes values from every
source and tenant, which a key limited to some must not decide. The erasure itself runs in the
housekeeping schedule (or ``audit-platform erase run``), not in the API's process: it rewrites
staged files and holds sources' ledger locks.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field

from audit_platform.api.deps import AdminDep, ServicesDep
from audit_platform.api_keys import Scope
from audit_platform.environment import load_environment
from audit_platform.erasure import requests as erasure
from audit_platform.policy import load_policy, policy_path

router = APIRouter(prefix="/v1/erasures", tags=["erasures"])


class ErasureIn(BaseModel):
    subject: str = Field(
        description="The person as TABLE:ID: their table and id, e.g. public.customers:42.",
        max_length=512,
    )
    reason: str = Field(description="Why: the request it answers.", min_length=1, max_length=2000)


class ErasureOut(BaseModel):
    id: int
    subject: str
    reason: str
    state: str = Field(description="waiting, approved, done or cancelled.")
    requested_by: str
    requested_at: datetime
    runs_from: datetime = Field(description="When it runs without a second admin's approval.")
    approved_by: str | None
    done_at: datetime | None
    records: int | None = Field(description="Records whose values it replaced, once done.")


def _out(found: erasure.ErasureRequest) -> ErasureOut:
    return ErasureOut(
        id=found.id,
        subject=found.subject,
        reason=found.reason,
        state=found.state,
        requested_by=found.requested_by,
        requested_at=found.requested_at,
        runs_from=found.not_before,
        approved_by=found.approved_by,
        done_at=found.done_at,
        records=found.records,
    )


def _operator(scope: Scope) -> None:
    if not scope.whole_environment:
        raise HTTPException(
            403,
            "erasures are requested with a key of the whole environment (no sources, tables or "
            "organizations): an erasure removes values from every source",
        )


def _by(request: Request) -> str:
    return f"key {request.state.key_id}"


@router.get("", response_model=list[ErasureOut])
def erasures(scope: AdminDep, svc: ServicesDep) -> list[ErasureOut]:
    """Every erasure request of the environment and what became of it."""
    _operator(scope)
    with svc.pool.connection() as conn:
        return [_out(r) for r in erasure.list_requests(conn, scope.env)]


@router.post("", response_model=ErasureOut, status_code=201)
def request_erasure(
    body: ErasureIn, request: Request, scope: AdminDep, svc: ServicesDep
) -> ErasureOut:
    """Request an erasure. It runs after another admin's key approves it, or after the
    environment's waiting period; refused (409) while a legal hold covers the person."""
    _operator(scope)
    environment = load_environment(svc.settings.resources_dir, scope.env)
    with svc.pool.connection() as conn:
        try:
            found = erasure.request_erasure(
                conn,
                svc.es,
                scope.env,
                erasure.Subject.parse(body.subject),
                reason=body.reason,
                requested_by=_by(request),
                waiting=environment.erasure_waiting,
                declared=erasure.declared_tables(
                    load_policy(policy_path(svc.settings.resources_dir, source))
                    for source in environment.sources
                ),
            )
        except erasure.ErasureRefused as exc:
            raise HTTPException(409, str(exc)) from exc
        except erasure.ErasureError as exc:
            raise HTTPException(422, str(exc)) from exc
    return _out(found)


@router.post("/{request_id}/approve", response_model=ErasureOut)
def approve(request_id: int, request: Request, scope: AdminDep, svc: ServicesDep) -> ErasureOut:
    """Approve a request made with another key: it may run now."""
    _operator(scope)
    with svc.pool.connection() as conn:
        try:
            return _out(erasure.approve(conn, scope.env, request_id, _by(request)))
        except erasure.ErasureError as exc:
            raise HTTPException(409, str(exc)) from exc


@router.post("/{request_id}/cancel", response_model=ErasureOut)
def cancel(request_id: int, request: Request, scope: AdminDep, svc: ServicesDep) -> ErasureOut:
    """Withdraw a request that has not started."""
    _operator(scope)
    with svc.pool.connection() as conn:
        try:
            return _out(erasure.cancel(conn, scope.env, request_id, _by(request)))
        except erasure.ErasureError as exc:
            raise HTTPException(409, str(exc)) from exc
