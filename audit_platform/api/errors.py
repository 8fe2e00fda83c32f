"""Errors as the API's callers should see them: what was wrong and what to do, never a trace.

- A parameter the query layer cannot use: 422, in FastAPI's own shape (field and reason).
- Elasticsearch or the platform database unreachable, overloaded or failing: 503 with
  ``Retry-After``; the cause is logged, not sent.
- Anything else: 500 with a generic message; the cause is logged with the request's key id.

Under the Explorer's paths (``app.state.html_errors``) the same errors are pages, not JSON.
"""

from __future__ import annotations

import logging

import psycopg
from elasticsearch import ApiError, TransportError
from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from audit_platform.query.filters import QueryError

log = logging.getLogger("audit_platform.api")


def _page(request: Request, status: int, message: str) -> Response | None:
    """The error as a page, when the request came from the Explorer."""
    html = getattr(request.app.state, "html_errors", None)
    if html is None or not html[0](request):
        return None
    return html[1](request, status, message)


def _unprocessable(request: Request, field: str, message: str) -> Response:
    if page := _page(request, 422, f"{field}: {message}"):
        return page
    detail = [{"loc": ["query", field], "msg": message, "type": "value_error"}]
    return JSONResponse(status_code=422, content={"detail": detail})


def _unavailable(request: Request, what: str) -> Response:
    seconds = request.app.state.services.settings.api.retry_after_seconds
    message = f"{what} is unavailable; retry in {seconds} seconds"
    answer = _page(request, 503, message) or JSONResponse(
        status_code=503, content={"detail": message, "retry_after_seconds": seconds}
    )
    answer.headers["Retry-After"] = str(seconds)
    return answer


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(QueryError)
    def query_error(request: Request, exc: QueryError) -> Response:
        return _unprocessable(request, exc.field, str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code >= 400 and (page := _page(request, exc.status_code, str(exc.detail))):
            return page
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors()
        )
        if page := _page(request, 422, reasons):
            return page
        return await request_validation_exception_handler(request, exc)

    @app.exception_handler(TransportError)
    def transport_error(request: Request, exc: TransportError) -> Response:
        log.warning("elasticsearch unreachable: %s", exc)
        return _unavailable(request, "Elasticsearch")

    @app.exception_handler(ApiError)
    def api_error(request: Request, exc: ApiError) -> Response:
        if exc.meta.status == 400:
            # Parameters are validated before a query is sent; this is a last line of defence.
            log.warning("elasticsearch refused a query: %s", exc)
            return _unprocessable(
                request, "query", f"Elasticsearch refused the query: {exc.message}"
            )
        log.error("elasticsearch error %s: %s", exc.meta.status, exc)
        return _unavailable(request, "Elasticsearch")

    @app.exception_handler(psycopg.OperationalError)
    def database_error(request: Request, exc: psycopg.OperationalError) -> Response:
        log.warning("platform database unreachable: %s", exc)
        return _unavailable(request, "The platform database")
