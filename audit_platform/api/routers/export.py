"""Any search's result as a streamed file."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from audit_platform.api.deps import ScopeDep, ServicesDep
from audit_platform.api.params import ExportParams
from audit_platform.query import reads
from audit_platform.query.export import csv_lines, ndjson_lines

router = APIRouter(prefix="/v1", tags=["export"])

MEDIA = {"ndjson": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


@router.get(
    "/export",
    response_class=StreamingResponse,
    responses={200: {"content": {MEDIA["ndjson"]: {}, MEDIA["csv"]: {}},
                     "description": "The matching records, streamed."}},
)  # fmt: skip
def export(
    params: Annotated[ExportParams, Query()], scope: ScopeDep, svc: ServicesDep
) -> StreamingResponse:
    """Every record matching the filters (same as /v1/events), streamed page by page: the
    server holds one page in memory whatever the size of the result."""
    hits = reads.iter_hits(svc.es, scope, svc.checked(params.filter(), scope), order=params.order,
                           limits=svc.limits)  # fmt: skip
    lines = csv_lines(hits) if params.format == "csv" else ndjson_lines(hits)
    name = f"audit-{scope.env}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.{params.format}"
    return StreamingResponse(
        lines, media_type=MEDIA[params.format],
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )  # fmt: skip
