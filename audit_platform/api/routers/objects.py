"""One object's history and its state at a moment."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query

from audit_platform.api.deps import ScopeDep, ServicesDep
from audit_platform.api.params import MAX_HISTORY_PAGE
from audit_platform.api.paths import ObjectId, SourcePath, TablePath
from audit_platform.query import reads
from audit_platform.query.filters import Moment
from audit_platform.query.models import ObjectHistory, ObjectState

router = APIRouter(prefix="/v1/objects", tags=["objects"])


@router.get("/{source}/{table}/{object_id:id}/history", response_model=ObjectHistory)
def history(
    source: SourcePath,
    table: TablePath,
    object_id: ObjectId,
    scope: ScopeDep,
    svc: ServicesDep,
    order: Literal["asc", "desc"] = "asc",
    limit: Annotated[int, Query(ge=1, le=MAX_HISTORY_PAGE)] = 100,
    cursor: Annotated[str | None, Query(max_length=1024)] = None,
) -> ObjectHistory:
    """The object's changes in commit order, each with its column diff."""
    return reads.object_history(
        svc.es, scope, source, table, object_id, order=order, limit=limit, cursor=cursor
    )


@router.get("/{source}/{table}/{object_id:id}/state", response_model=ObjectState)
def state(
    source: SourcePath,
    table: TablePath,
    object_id: ObjectId,
    scope: ScopeDep,
    svc: ServicesDep,
    at: Annotated[Moment | None, Query(description="Moment (default: now).")] = None,
) -> ObjectState:
    """The row as it was at `at`, rebuilt from its records; `unknown` says why when it
    cannot be (for example, retention has removed the records needed)."""
    return reads.object_state(svc.es, scope, source, table, object_id, at or datetime.now(UTC))
