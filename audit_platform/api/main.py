"""The Audit API application: ``uvicorn --factory audit_platform.api.main:create_app``.

One deployment serves one environment (``AUDIT_ENV``): it reads only that environment's alias and
accepts only that environment's keys.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from cachetools import TTLCache
from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from psycopg_pool import ConnectionPool

from audit_platform import platform_db
from audit_platform.api import metrics as api_metrics
from audit_platform.api import ui
from audit_platform.api.deps import Services, scope
from audit_platform.api.errors import install_handlers
from audit_platform.api.reads_logged import after_sending, is_read, log_read
from audit_platform.api.routers import (
    activity,
    correlation,
    erasures,
    events,
    export,
    gaps,
    health,
    objects,
    rejections,
    revert,
    streams,
    tables,
    trust,
)
from audit_platform.api.ui import sso as ui_sso
from audit_platform.api_keys import ApiKey
from audit_platform.clients import elasticsearch_client, pg_url_from_settings
from audit_platform.query import timing
from audit_platform.query.language import FIELDS
from audit_platform.settings import Settings

access_log = logging.getLogger("audit_platform.api.access")

DESCRIPTION = (
    """
Who changed what, where, when and why, from the audit trail of one environment.

Every endpoint except `/healthz` and `/readyz` needs an API key (`X-API-Key` header or
`Authorization: Bearer`); so do this document and `/metrics` unless the deployment leaves them
open (`AUDIT_API_DOCS`, `AUDIT_API_METRICS`). A key belongs to one environment and may be
limited to some sources and tables; whatever the parameters say, a key sees nothing outside that
scope.

## The query language

`/v1/events`, `/v1/stats` and `/v1/export` take `query=`, what an investigator types:

    actor:alice table:orders op:update,delete after.status:refunded -actor:bot since:-24h

- `field:value`; all terms must match. `op:insert,delete`: any of the values.
- `-field:value` excludes; `"two words"` and `field:"a value, with: commas"` quote.
- Words without a field search the row's values as text (`-word` excludes).
- Fields: """
    + ", ".join(f"`{name}` ({what})" for name, (what, _) in FIELDS.items())
    + """,
  `before.<column>` and `after.<column>` (the column's value before or after the change, in the
  text form records keep; a masked column by its masked value; an excluded column is refused).
- A transition is both: `before.status:paid after.status:refunded`.
- Errors (422) name the term by position and text.

The structured parameters keep working and combine with the query (AND); `after.status=refunded`
and `before.status=paid` are parameters too.
"""
)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.elasticsearch is None:
            raise RuntimeError("AUDIT_ES_URL is not set: the API reads from Elasticsearch")
        # Few retries and a short timeout: a caller should get a quick 503, not a long wait.
        es = elasticsearch_client(
            settings.elasticsearch, request_timeout=settings.api.es_timeout_seconds
        )
        es = es.options(max_retries=1)
        # Checked before each hand-out: after the database restarts, a pooled connection is
        # dead, and handing it out once would answer that request with a 503.
        pool = ConnectionPool(
            pg_url_from_settings(settings),
            min_size=1,
            max_size=8,
            open=False,
            check=ConnectionPool.check_connection,
            kwargs={"autocommit": True, "application_name": f"audit-api-{settings.env}"},
        )
        pool.open(wait=False)
        try:
            with pool.connection(timeout=30) as conn:
                platform_db.install(conn, settings.resources_dir / "sql")
            ttl = settings.api.key_cache_seconds
            cache: TTLCache[str, ApiKey] | None = (
                TTLCache(maxsize=4096, ttl=ttl) if ttl > 0 else None
            )
            app.state.services = Services(settings, es, pool, cache)
            yield
        finally:
            pool.close()
            es.close()

    # The documents hold no audit data, but they map the whole API: AUDIT_API_DOCS says who may
    # read them (open on a developer's machine, off or keyed in the Helm chart).
    docs_open = settings.api.docs == "open"
    app = FastAPI(
        title=f"audit-platform Audit API ({settings.env})",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_url="/openapi.json" if docs_open else None,
        docs_url="/docs" if docs_open else None,
        redoc_url="/redoc" if docs_open else None,
    )
    if settings.api.docs == "keyed":
        # For tools (code generators, Schemathesis) that send a key; the browser pages cannot.
        @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(scope)])
        def openapi() -> JSONResponse:
            return JSONResponse(app.openapi())

    install_handlers(app)
    # Ids may hold a slash ({name:id}, api/paths.py; %2F is decoded before routing), so revert's
    # /requests/{id}/revert is tried before correlation's /requests/{id}, which would take
    # "x/revert" as an id. An id that itself ends in "/revert" reads as that id's plan.
    for module in (
        events,
        objects,
        tables,
        activity,
        revert,
        correlation,
        export,
        gaps,
        rejections,
        trust,
        streams,
        erasures,
        health,
    ):
        app.include_router(module.router)
    ui.install(app)
    ui_sso.install(app, settings)
    metrics = api_metrics.install(app, settings.api.metrics)

    @app.middleware("http")
    async def log_request(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        """One line per request with the key id (never the key) and the route's template (never
        the values in the path or query, which may be personal data such as an e-mail key)."""
        started = time.perf_counter()
        spent = timing.start()
        count = timing.start_count()
        response = await call_next(request)
        # Where the time went, for a client's developer tools or a benchmark: Elasticsearch
        # (as its client measured each call) and the whole request inside this process.
        total_ms = (time.perf_counter() - started) * 1000
        response.headers["Server-Timing"] = (
            f'es;dur={sum(spent) * 1000:.2f};desc="Elasticsearch ({len(spent)} calls)", '
            f"total;dur={total_ms:.2f}"
        )
        route = request.scope.get("route")
        template = getattr(route, "path", "(no route)")
        metrics.observe(
            template, request.method, response.status_code, total_ms / 1000, sum(spent), count[0]
        )
        if is_read(request, route):
            # Written once the answer is sent, so the reader does not wait for it.
            # A read has a route with a path (is_read checks), so the template is that path.
            after_sending(response, log_read, request, template, response.status_code, count[0])
        access_log.info(
            "key=%s %s %s %d %.1fms",
            getattr(request.state, "key_id", "-"),
            request.method,
            getattr(route, "path", "(no route)"),
            response.status_code,
            (time.perf_counter() - started) * 1000,
        )
        return response

    return app
