"""Errors as the API's callers should see them: what was wrong and what to do, never a trace.

- A parameter the query layer cannot use: 422, in FastAPI's own shape (field and reason).
- Elasticsearch or the platform database unreachable, overloaded or failing: 503 with
  ``Retry-After``; the cause is logged, not sent.
- Anything else: 500 with a generic message; the cause is logged with the request's key id.
"""

from __future__ import annotations

import logging

import psycopg
from elasticsearch import ApiError, TransportError
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from audit_platform.query.filters import QueryError

log = logging.getLogger("audit_platform.api")


def _unprocessable(field: str, message: str) -> JSONResponse:
    detail = [{"loc": ["query", field], "msg": message, "type": "value_error"}]
    return JSONResponse(status_code=422, content={"detail": detail})


def _unavailable(request: Request, what: str) -> JSONResponse:
    seconds = request.app.state.services.settings.api_retry_after_seconds
    return JSONResponse(
        status_code=503,
        headers={"Retry-After": str(seconds)},
        content={"detail": f"{what} is unavailable; retry in {seconds} seconds",
                 "retry_after_seconds": seconds},
    )  # fmt: skip


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(QueryError)
    def query_error(request: Request, exc: QueryError) -> JSONResponse:
        return _unprocessable(exc.field, str(exc))

    @app.exception_handler(TransportError)
    def transport_error(request: Request, exc: TransportError) -> JSONResponse:
        log.warning("elasticsearch unreachable: %s", exc)
        return _unavailable(request, "Elasticsearch")

    @app.exception_handler(ApiError)
    def api_error(request: Request, exc: ApiError) -> JSONResponse:
        if exc.meta.status == 400:
            # Parameters are validated before a query is sent; this is a last line of defence.
            log.warning("elasticsearch refused a query: %s", exc)
            return _unprocessable("query", f"Elasticsearch refused the query: {exc.message}")
        log.error("elasticsearch error %s: %s", exc.meta.status, exc)
        return _unavailable(request, "Elasticsearch")

    @app.exception_handler(psycopg.OperationalError)
    def database_error(request: Request, exc: psycopg.OperationalError) -> JSONResponse:
        log.warning("platform database unreachable: %s", exc)
        return _unavailable(request, "The platform database")
