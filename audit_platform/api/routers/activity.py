"""Counts over a time range, and one actor's activity."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from audit_platform.api.deps import ScopeDep, ServicesDep
from audit_platform.api.params import StatsParams
from audit_platform.api.paths import Id
from audit_platform.query import reads
from audit_platform.query.models import ActorActivity, Stats

router = APIRouter(prefix="/v1", tags=["activity"])


@router.get("/stats", response_model=Stats)
def stats(params: Annotated[StatsParams, Query()], scope: ScopeDep, svc: ServicesDep) -> Stats:
    """Counts by source, table, operation, actor, attribution and time bucket."""
    return reads.stats(
        svc.es,
        scope,
        svc.checked(params.filter(), scope),
        interval=params.interval,
        limits=svc.limits,
    )


@router.get("/actors/{actor_id:id}/activity", response_model=ActorActivity)
def actor_activity(
    actor_id: Id,
    params: Annotated[StatsParams, Query()],
    scope: ScopeDep,
    svc: ServicesDep,
) -> ActorActivity:
    """What one actor changed: counts, first and last seen, and the latest records."""
    return reads.actor_activity(
        svc.es,
        scope,
        actor_id,
        svc.checked(params.filter(), scope),
        interval=params.interval,
        limits=svc.limits,
    )
