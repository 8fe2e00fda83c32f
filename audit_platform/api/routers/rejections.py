"""Messages a source emitted under the platform's prefix that capture refused."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from pydantic import AfterValidator, BaseModel

from audit_platform.api.deps import AuditorDep, ServicesDep
from audit_platform.enrich.rejections import RejectedMessage, list_rejections
from audit_platform.query.filters import Moment, no_nul

router = APIRouter(prefix="/v1", tags=["gaps"])
_TABLE_LIMITED = (
    "rejected messages concern whole sources; this key is limited to some tables or "
    "organizations. Ask for a key without such a limit."
)


class Rejections(BaseModel):
    rejections: list[RejectedMessage]


@router.get("/rejections", response_model=Rejections)
def rejections(
    scope: AuditorDep,
    svc: ServicesDep,
    source: Annotated[
        str | None,
        Query(max_length=64, description="One source of the key's."),
        AfterValidator(no_nul),
    ] = None,
    since: Annotated[Moment | None, Query(description="Committed at or after.")] = None,
    until: Annotated[Moment | None, Query(description="Committed before.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Rejections:
    """Newest first: logical messages with the platform's prefix that were not valid contexts
    (malformed, oversized, or a forged late context), with where they were committed and why
    they were refused; never their content.

    Capture went on past each of them, and the changes of its transaction were recorded as
    unattributed. Rejections concern whole sources, so a key limited to tables or organizations
    cannot list them.
    """
    if not scope.whole_sources:
        raise HTTPException(403, _TABLE_LIMITED)
    sources = scope.sources
    if source is not None:
        if sources is not None and source not in sources:
            raise HTTPException(403, "this key may not read that source")
        sources = frozenset({source})
    with svc.pool.connection() as conn:
        found = list_rejections(conn, scope.env, sources, since=since, until=until, limit=limit)
    return Rejections(rejections=found)
