"""Ranges of a source's changes that capture could not read (an invalidated or dropped slot)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from audit_platform.api.deps import ScopeDep, ServicesDep
from audit_platform.capture.gaps import Gap, list_gaps

router = APIRouter(prefix="/v1", tags=["gaps"])


class Gaps(BaseModel):
    gaps: list[Gap]


@router.get("/gaps", response_model=Gaps)
def gaps(scope: ScopeDep, svc: ServicesDep) -> Gaps:
    """Every recorded gap of the sources this key may read, oldest first.

    A gap says that changes committed between two WAL positions of a source were not captured
    (its slot was invalidated by PostgreSQL or dropped), so no search can return them. An empty
    list means the trail of these sources has no known hole.
    """
    with svc.pool.connection() as conn:
        return Gaps(gaps=list_gaps(conn, scope.env, scope.sources))
