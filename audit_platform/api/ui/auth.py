"""Who is browsing: the session cookie, turned into the scope of the key that opened it.

The cookie is HttpOnly (no script reads it), SameSite=Strict (no other site's page can send it),
Secure when the Explorer is served over TLS, and holds only a random token; the platform keeps
the token's digest (:mod:`audit_platform.ui_sessions`). Its name carries the environment, so the
Explorers of two environments on one host (cookies ignore ports) do not sign each other out.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated
from urllib.parse import quote as url_quote
from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Request, Response

from audit_platform.api.deps import Services, services
from audit_platform.api_keys import ApiKey
from audit_platform.ui_sessions import session_key


class SignInRequired(Exception):
    """No live session: the handler sends the browser to the sign-in page, then back."""

    def __init__(self, next_path: str) -> None:
        self.next_path = next_path


def cookie_name(env: str) -> str:
    return f"audit_ui_{env}"


def signed_in(request: Request, svc: Annotated[Services, Depends(services)]) -> ApiKey:
    token = request.cookies.get(cookie_name(svc.settings.env))
    key = None
    if token:
        idle = timedelta(minutes=svc.settings.ui.idle_minutes)
        with svc.pool.connection() as conn:
            key = session_key(conn, svc.settings.env, token, idle)
    if key is None:
        raise SignInRequired(
            str(request.url.path) + (f"?{request.url.query}" if request.url.query else "")
        )
    request.state.key_id = key.key_id
    return key


SignedIn = Annotated[ApiKey, Depends(signed_in)]


def set_session_cookie(
    response: Response, request: Request, env: str, token: str, lifetime: timedelta
) -> None:
    response.set_cookie(
        cookie_name(env),
        token,
        max_age=int(lifetime.total_seconds()),
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def clear_session_cookie(response: Response, env: str) -> None:
    response.delete_cookie(cookie_name(env), path="/ui", httponly=True, samesite="strict")


def same_origin(request: Request) -> None:
    """Refuse a form posted from another origin. SameSite=Strict already keeps the cookie off
    such a request; this also stops a forged sign-in (signing a victim in as the attacker)."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if origin is None:
        return  # a browser always sends one with a form post; a script may not, harmlessly
    parts = urlsplit(origin)
    if f"{parts.scheme}://{parts.netloc}" != f"{request.url.scheme}://{request.url.netloc}":
        raise HTTPException(403, "this form must be sent from the Audit Explorer's own pages")


def safe_next(path: str | None) -> str:
    """Where to go after signing in: only a page of the Explorer itself (no open redirect)."""
    if not path or not path.startswith("/ui") or path.startswith("//") or "\\" in path:
        return "/ui/"
    parts = urlsplit(path)
    if parts.scheme or parts.netloc:
        return "/ui/"
    return path


def login_location(next_path: str) -> str:
    return "/ui/login?next=" + url_quote(next_path, safe="")
