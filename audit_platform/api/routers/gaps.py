"""Ranges of a source's changes that capture could not read (an invalidated or dropped slot)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from audit_platform.api.deps import ScopeDep, Services, ServicesDep
from audit_platform.api_keys import Scope
from audit_platform.capture.gaps import Gap, list_gaps

router = APIRouter(prefix="/v1", tags=["gaps"])


class Gaps(BaseModel):
    gaps: list[Gap]


@router.get("/gaps", response_model=Gaps)
def gaps(scope: ScopeDep, svc: ServicesDep) -> Gaps:
    """Every recorded gap of the sources this key may read, oldest first.

    A gap says that changes committed between two WAL positions of a source were not captured
    (its slot was invalidated by PostgreSQL or dropped), so no search can return them. An empty
    list means the trail of these sources has no known hole. A key limited to tables but not
    to sources gets the gaps of the sources whose policy captures one of its tables.
    """
    with svc.pool.connection() as conn:
        found = list_gaps(conn, scope.env, scope.sources)
    return Gaps(gaps=[gap for gap in found if _readable(svc, scope, gap.source)])


def _readable(svc: Services, scope: Scope, source: str) -> bool:
    """A gap covers every table of its source, so it concerns any key that may read one of
    them; a key's sources are named by the key itself, a table-limited key's through the
    sources' policies (a source it has no table of is not even named to it)."""
    if scope.sources is not None or scope.tables is None:
        return scope.allows_source(source)
    policy = svc.policies.get(source)
    return policy is not None and not scope.tables.isdisjoint(policy.tables)
