"""The Audit Explorer: the web UI investigators use, served by the Audit API under ``/ui``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from audit_platform.api.ui.auth import SignInRequired, login_location
from audit_platform.api.ui.pages import error_page, router

#: The pages load only from this server: no CDN, no font service, no framing by another site.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    # Page URLs hold queries (names, e-mail addresses); they never leave in a Referer.
    "Referrer-Policy": "same-origin",
}


def is_ui(request: Request) -> bool:
    return request.url.path == "/ui" or request.url.path.startswith("/ui/")


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=Path(__file__).parent / "static"), name="ui")
    # errors.py answers a browser on these paths with a page instead of JSON.
    app.state.html_errors = (is_ui, error_page)

    @app.get("/ui", include_in_schema=False)
    def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=308)

    @app.exception_handler(SignInRequired)
    def sign_in(request: Request, exc: SignInRequired) -> RedirectResponse:
        return RedirectResponse(login_location(exc.next_path), status_code=303)

    @app.middleware("http")
    async def headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        if is_ui(request):
            response.headers.update(SECURITY_HEADERS)
            if not request.url.path.startswith("/ui/static/"):
                # Audit data: not kept in shared caches or the browser's disk cache.
                response.headers.setdefault("Cache-Control", "no-store")
        return response
