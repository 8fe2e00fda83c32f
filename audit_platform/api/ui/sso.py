"""Single sign-on to the Explorer: OpenID Connect's authorization code flow with PKCE (S256).

``/ui/sso/start`` sends the browser to the identity provider with a fresh state, nonce and PKCE
challenge; ``/ui/sso/callback`` takes the code back, exchanges it (with the verifier and the
client's secret) for tokens, verifies the ID token (signature by the provider's published keys,
issuer, audience, expiry, nonce), and opens the same kind of session a key opens: a random token
in a cookie, its digest stored, the scope the person's groups give (``audit_platform.sso``).
Authlib does the protocol; the state, nonce and verifier travel to the callback in a short-lived
signed cookie of the ``/ui/sso`` path only (Starlette's session middleware).

The provider's tokens are not kept: the session is the platform's, so signing out of the
Explorer ends it, and a person removed from a group loses that access at their next sign-in
(``audit-platform ui revoke`` ends their sessions at once).
"""

from __future__ import annotations

import html
import logging
from datetime import timedelta

from authlib.integrations.starlette_client import OAuth, OAuthError
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import HTMLResponse
from joserfc.errors import JoseError
from starlette.concurrency import run_in_threadpool
from starlette.middleware.sessions import SessionMiddleware

from audit_platform.api.deps import ServicesDep
from audit_platform.api.ui.auth import safe_next, set_session_cookie
from audit_platform.api.ui.pages import error_page
from audit_platform.settings import Settings
from audit_platform.sso import NoAccess, display_name, principal, scope_for
from audit_platform.ui_sessions import open_person_session

router = APIRouter(prefix="/ui/sso", include_in_schema=False)
log = logging.getLogger(__name__)
#: How long a sign-in may take at the provider before its state is forgotten.
SIGN_IN_SECONDS = 600


def install(app: FastAPI, settings: Settings) -> None:
    sso = settings.sso
    if not sso.enabled:
        return
    assert sso.issuer is not None
    oauth = OAuth()
    oauth.register(
        "provider",
        server_metadata_url=sso.issuer.rstrip("/") + "/.well-known/openid-configuration",
        client_id=sso.client_id,
        client_secret=sso.client_secret.get_secret_value() if sso.client_secret else None,
        client_kwargs={"scope": sso.scopes, "code_challenge_method": "S256"},
    )
    app.state.sso = oauth.create_client("provider")
    app.add_middleware(
        SessionMiddleware,
        secret_key=sso.state_key(),
        session_cookie=f"audit_ui_sso_{settings.env}",
        path="/ui/sso",
        max_age=SIGN_IN_SECONDS,
        # Lax: the provider's redirect back is a top-level navigation from another site.
        same_site="lax",
        # Secure wherever the provider is reached over HTTPS, which is everywhere but a
        # provider on this machine (SsoSettings): the Explorer is then served over HTTPS too.
        https_only=sso.issuer.startswith("https://"),
    )
    app.include_router(router)


@router.get("/start")
async def start(request: Request, next: str | None = None) -> Response:
    request.session.clear()
    request.session["next"] = safe_next(next)
    redirect = str(request.url_for("sso_callback"))
    return await request.app.state.sso.authorize_redirect(request, redirect)


@router.get("/callback", name="sso_callback")
async def callback(request: Request, svc: ServicesDep) -> Response:
    settings = svc.settings
    next_path = safe_next(request.session.get("next"))
    client = request.app.state.sso
    try:
        metadata = await client.load_server_metadata()
        # The issuer the provider names, and this client as the token's audience: Authlib
        # checks only the issuer unless told both.
        expected = {
            "iss": {"essential": True, "values": [metadata["issuer"]]},
            "aud": {"essential": True, "value": client.client_id},
        }
        token = await client.authorize_access_token(request, claims_options=expected)
    except OAuthError as exc:  # the provider's error, a forged or replayed state
        # The code only: a description comes from the query string, which anyone can write.
        log.info("single sign-on refused: %s: %s", exc.error, exc.description)
        return _refused(request, f"{exc.error}")
    except JoseError as exc:  # an ID token whose signature or claims do not verify
        return _refused(request, f"the identity provider's token does not verify ({exc.error})")
    finally:
        request.session.clear()
    claims = token.get("userinfo") or {}
    try:
        who = principal(claims)
        scope = scope_for(claims, settings.sso.grants, settings.sso.groups_claim, settings.env)
    except NoAccess as exc:
        return error_page(request, 403, f"No access: {exc}.")
    lifetime = timedelta(hours=settings.ui.session_hours)

    def opened() -> str:  # a database's wait in a worker thread, not on the event loop
        with svc.pool.connection() as conn:
            return open_person_session(conn, who, display_name(claims), scope, lifetime)

    session = await run_in_threadpool(opened)
    # A page that moves on, not a redirect: the provider's redirect made this a cross-site
    # navigation, on which the browser would withhold the new SameSite=Strict cookie; a
    # navigation this page starts is the Explorer's own.
    response = HTMLResponse(_CONTINUE.format(url=html.escape(next_path, quote=True)))
    set_session_cookie(response, request, settings.env, session, lifetime)
    return response


def _refused(request: Request, why: str) -> Response:
    return error_page(
        request,
        401,
        f"Single sign-on did not complete ({why}). Start again from the sign-in page.",
    )


_CONTINUE = (
    '<!doctype html><html><head><meta charset="utf-8">'
    '<meta http-equiv="refresh" content="0;url={url}"><title>Signed in</title></head>'
    '<body><p>Signed in. <a href="{url}">Continue to the Audit Explorer</a>.</p></body></html>'
)
