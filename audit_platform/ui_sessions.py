"""Sessions of the Audit Explorer: a person signs in once with an API key and then browses with
that key's scope, without the key travelling with every request.

The browser keeps a random token in a cookie; the platform keeps only its SHA-256 digest, the
key it stands for, and when it expires. Every lookup joins the key, so a revoked key ends its
sessions at the next click, not at the next sign-in.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

import psycopg

from audit_platform.api_keys import ApiKey, scope_of

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


def session_key(conn: psycopg.Connection, env: str, token: str, idle: timedelta) -> ApiKey | None:
    """The key of a live session of ``env``: not expired, not idle longer than ``idle``, and
    its key not revoked. None otherwise (the caller signs the person in again)."""
    row = conn.execute(
        "SELECT k.key_id, k.name, k.sources, k.tables, k.role, k.organizations, k.created_at,"
        "       s.last_seen_at < now() - %s AS stale"
        " FROM audit_platform.ui_sessions s JOIN audit_platform.api_keys k USING (key_id)"
        " WHERE s.token_sha256 = %s AND s.env = %s AND k.env = s.env"
        "   AND k.revoked_at IS NULL AND s.expires_at > now() AND s.last_seen_at > now() - %s",
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


def close_session(conn: psycopg.Connection, token: str) -> None:
    conn.execute(
        "DELETE FROM audit_platform.ui_sessions WHERE token_sha256 = %s", (_digest(token),)
    )
