"""Sessions of the Audit Explorer: a person signs in once, with an API key or through the
company's identity provider (single sign-on), and then browses with that scope, without the key
or a token of the provider travelling with every request.

The browser keeps a random token in a cookie; the platform keeps only its SHA-256 digest, whom
it stands for, and when it expires. A key's session joins the key at every lookup, so a revoked
key ends its sessions at the next click. A person's session holds the scope their groups gave at
sign-in (``sso.grant_for``); it ends at sign-out, expiry, idleness, or ``revoke_person``.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

import psycopg

from audit_platform.api_keys import ApiKey, Scope, scope_of

#: A session's last-seen time is written at most this often (not on every page view).
TOUCH_EVERY = timedelta(minutes=1)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def open_session(conn: psycopg.Connection, key: ApiKey, lifetime: timedelta) -> str:
    """A new session of ``key`` ending after ``lifetime``; returns the token for the cookie.
    Expired sessions of every key are removed on the way, so the table stays small."""
    conn.execute("DELETE FROM audit_platform.ui_sessions WHERE expires_at < now()")
    token = secrets.token_urlsafe(32)
    conn.execute(
        "INSERT INTO audit_platform.ui_sessions (token_sha256, key_id, env, expires_at)"
        " VALUES (%s, %s, %s, now() + %s)",
        (_digest(token), key.key_id, key.scope.env, lifetime),
    )
    return token


def open_person_session(
    conn: psycopg.Connection, principal: str, name: str, scope: Scope, lifetime: timedelta
) -> str:
    """A new session of a person signed in by single sign-on, with the scope their groups gave;
    returns the token for the cookie. ``principal``: who, as the read log names them."""
    conn.execute("DELETE FROM audit_platform.ui_sessions WHERE expires_at < now()")
    token = secrets.token_urlsafe(32)
    conn.execute(
        "INSERT INTO audit_platform.ui_sessions (token_sha256, env, expires_at, principal,"
        " display_name, role, sources, tables, organizations)"
        " VALUES (%s, %s, now() + %s, %s, %s, %s, %s, %s, %s)",
        (
            _digest(token),
            scope.env,
            lifetime,
            principal,
            name,
            scope.role,
            sorted(scope.sources) if scope.sources is not None else None,
            sorted(scope.tables) if scope.tables is not None else None,
            sorted(scope.organizations) if scope.organizations is not None else None,
        ),
    )
    return token


def session_key(conn: psycopg.Connection, env: str, token: str, idle: timedelta) -> ApiKey | None:
    """Whom a live session of ``env`` stands for, as a key: not expired, not idle longer than
    ``idle``, and its key (where it has one) not revoked. A person's session reads as a key
    whose id is the person (``sso:...``), which no API key can be. None otherwise (the caller
    signs the person in again)."""
    row = conn.execute(
        "SELECT coalesce(k.key_id, s.principal), coalesce(k.name, s.display_name),"
        "       coalesce(k.sources, s.sources), coalesce(k.tables, s.tables),"
        "       coalesce(k.role, s.role), coalesce(k.organizations, s.organizations),"
        "       coalesce(k.created_at, s.created_at), s.last_seen_at < now() - %s AS stale"
        " FROM audit_platform.ui_sessions s LEFT JOIN audit_platform.api_keys k"
        "   ON k.key_id = s.key_id AND k.env = s.env AND k.revoked_at IS NULL"
        " WHERE s.token_sha256 = %s AND s.env = %s AND (k.key_id IS NOT NULL OR s.key_id IS NULL)"
        "   AND s.expires_at > now() AND s.last_seen_at > now() - %s",
        (TOUCH_EVERY, _digest(token), env, idle),
    ).fetchone()
    if row is None:
        return None
    key_id, name, sources, tables, role, organizations, created_at, stale = row
    if stale:
        conn.execute(
            "UPDATE audit_platform.ui_sessions SET last_seen_at = now() WHERE token_sha256 = %s",
            (_digest(token),),
        )
    scope = scope_of(env, sources, tables, role, organizations)
    return ApiKey(key_id, name, scope, created_at, None)


def revoke_person(conn: psycopg.Connection, env: str, principal: str) -> int:
    """End every session of a person signed in by single sign-on; returns how many."""
    cur = conn.execute(
        "DELETE FROM audit_platform.ui_sessions WHERE env = %s AND principal = %s",
        (env, principal),
    )
    return cur.rowcount


def person_sessions(conn: psycopg.Connection, env: str) -> list[tuple[str, str, str, object]]:
    """(principal, name, role, expires_at) of live sessions opened by single sign-on."""
    rows = conn.execute(
        "SELECT principal, display_name, role, expires_at FROM audit_platform.ui_sessions"
        " WHERE env = %s AND principal IS NOT NULL AND expires_at > now()"
        " ORDER BY principal, expires_at",
        (env,),
    ).fetchall()
    return [tuple(row) for row in rows]


def close_session(conn: psycopg.Connection, token: str) -> None:
    conn.execute(
        "DELETE FROM audit_platform.ui_sessions WHERE token_sha256 = %s", (_digest(token),)
    )
