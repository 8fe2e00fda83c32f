"""Any search's result as a streamed file."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from audit_platform.api.deps import ScopeDep, Services, ServicesDep
from audit_platform.api.downloads import attachment
from audit_platform.api.params import ExportFormat, ExportParams
from audit_platform.api.reads_logged import log_read
from audit_platform.api_keys import Scope
from audit_platform.query import reads
from audit_platform.query.export import csv_lines, ndjson_lines
from audit_platform.query.filters import EventFilter, Order

router = APIRouter(prefix="/v1", tags=["export"])

MEDIA = {"ndjson": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


@router.get(
    "/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {MEDIA["ndjson"]: {}, MEDIA["csv"]: {}},
            "description": "The matching records, streamed.",
        }
    },
)
def export(
    request: Request, params: Annotated[ExportParams, Query()], scope: ScopeDep, svc: ServicesDep
) -> StreamingResponse:
    """Every record matching the filters (same as /v1/events), streamed page by page: the
    server holds one page in memory whatever the size of the result."""
    return streamed(request, svc, scope, params.filter(), params.format, params.order)


def streamed(
    request: Request,
    svc: Services,
    scope: Scope,
    f: EventFilter,
    format: ExportFormat,
    order: Order,
) -> StreamingResponse:
    """The export of ``f`` as a download; the first page is read before the response starts,
    so a refused query is an error status, not a file cut short. The read log gets its row
    when the last record is sent (or the client goes away), with how many were sent."""
    hits = reads.iter_hits(svc.es, scope, svc.checked(f, scope), order=order, limits=svc.limits)
    route = request.scope["route"].path
    sent = [0]

    def counted() -> Iterator[dict]:
        try:
            for hit in hits:
                sent[0] += 1
                yield hit
        finally:
            log_read(request, route, 200, sent[0])

    lines = csv_lines(counted()) if format == "csv" else ndjson_lines(counted())
    name = f"audit-{scope.env}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.{format}"
    return StreamingResponse(
        lines,
        media_type=MEDIA[format],
        headers=attachment(name),
    )
