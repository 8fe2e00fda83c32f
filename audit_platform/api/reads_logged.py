"""The read log's side in the API process: which requests are reads, and writing their row.

Every request made with a key that authenticated (API) or a session (Explorer) to a route that
answers with audit data is a read, refused or not: an auditor wants the attempts too. A request
whose key fails to authenticate is not: nobody is proven to have made it, and anyone could send
it (:mod:`audit_platform.api.refusals` counts and logs those). Health, documentation, static
files and signing in are not reads either. An export is logged when its last line is sent, with the
number of records it held (``audit_platform.api.routers.export``).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from fastapi import Request, Response
from starlette.background import BackgroundTask, BackgroundTasks

from audit_platform.read_log import record_read

log = logging.getLogger("audit_platform.api.read_log")

NOT_READS = {"/healthz", "/readyz", "/metrics", "/ui", "/ui/login", "/ui/logout"}


def is_read(request: Request, route: Any) -> bool:
    path = getattr(route, "path", None)
    if path is None or getattr(request.state, "key_id", None) is None:
        return False
    if path in NOT_READS or path.endswith("/export") or path.startswith("/ui/static"):
        return False
    return path.startswith(("/v1/", "/ui/"))


def filters(request: Request) -> dict[str, Any]:
    """The request's path and query parameters, as the read log keeps them."""
    query: dict[str, Any] = {}
    for name in request.query_params:
        values = request.query_params.getlist(name)
        query[name] = values[0] if len(values) == 1 else values
    return {**request.path_params, **query}


def log_read(request: Request, route: str, status: int, returned: int | None) -> None:
    """Write the request's row; a failure is logged as an error (the answer is already sent)."""
    try:
        _write(request, route, status, returned)
    except Exception:
        log.exception(
            "read log: the row of %s %s by key %s was not written",
            request.method,
            route,
            getattr(request.state, "key_id", "-"),
        )


def _write(request: Request, route: str, status: int, returned: int | None) -> None:
    svc = request.app.state.services
    with svc.pool.connection() as conn:
        record_read(
            conn,
            svc.settings.env,
            at=datetime.now(UTC),
            key_id=request.state.key_id,
            method=request.method,
            route=route,
            params=filters(request),
            status=status,
            returned=returned,
        )


def after_sending(response: Response, function, *args) -> None:
    """Run ``function(*args)`` once the response is sent (after any task it already has)."""
    tasks = BackgroundTasks([response.background] if response.background else [])
    tasks.add_task(function, *args)
    response.background = tasks if response.background else BackgroundTask(function, *args)
