"""A table's schema history: its columns, key and replica identity, change by change."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from audit_platform.api.deps import ScopeDep, ServicesDep
from audit_platform.api.params import MAX_HISTORY_PAGE
from audit_platform.api.paths import SourcePath, TablePath
from audit_platform.query import reads
from audit_platform.query.models import SchemaHistory

router = APIRouter(prefix="/v1/tables", tags=["tables"])


@router.get("/{source}/{table}/schema", response_model=SchemaHistory)
def schema(
    source: SourcePath,
    table: TablePath,
    scope: ScopeDep,
    svc: ServicesDep,
    order: Literal["asc", "desc"] = "desc",
    limit: Annotated[int, Query(ge=1, le=MAX_HISTORY_PAGE)] = 50,
    cursor: Annotated[str | None, Query(max_length=1024)] = None,
) -> SchemaHistory:
    """The table's schema changes (operation `ddl`), newest first by default, each with the
    table's shape before and after and the transaction's context: who added, dropped, retyped
    or renamed what, and when (docs/design.md, "Schema history")."""
    return reads.schema_history(
        svc.es, scope, source, table, order=order, limit=limit, cursor=cursor
    )
