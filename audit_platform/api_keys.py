"""API keys of the Audit API: created, listed and revoked from the command line, verified per
request. Each key is scoped to one environment and optionally to sources, tables and organizations.

A key reads ``ak_<key id>_<secret>``. The key id is public (it appears in logs and listings); the
secret is shown once, at creation, and only its SHA-256 digest is stored.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

import psycopg

from audit_platform.naming import check_identifier
from audit_platform.platform_db import one
from audit_platform.record import MAX_ORGANIZATION_ID, organization_id

_KEY = re.compile(r"^ak_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*\.[A-Za-z_][A-Za-z0-9_$]*$")


class ApiKeyError(ValueError):
    """A key could not be created or changed; the message says why."""


#: What a key may do, each role including the ones before it.
ROLES = ("reader", "auditor", "admin")


@dataclass(frozen=True)
class Scope:
    """What a key may read: one environment, and within it all or some sources and tables, and
    all or some organizations (records whose ``organization.id`` is one of them; a record that
    names none is outside every organization); its role says whether it may also read the read
    log and proofs (auditor) and manage holds (admin)."""

    env: str
    sources: frozenset[str] | None = None
    tables: frozenset[str] | None = None  # 'schema.table'
    role: str = "reader"
    organizations: frozenset[str] | None = None

    def has_role(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)

    def allows(self, source: str, schema: str, table: str) -> bool:
        return (self.sources is None or source in self.sources) and (
            self.tables is None or f"{schema}.{table}" in self.tables
        )

    def allows_source(self, source: str) -> bool:
        """Whether the key may read some table of ``source``; every one only if
        :attr:`whole_sources`."""
        return self.sources is None or source in self.sources

    @property
    def whole_sources(self) -> bool:
        """Not limited to tables or organizations: a figure about a whole source (a
        transaction's change count, a checkpoint's size) tells it nothing it may not read."""
        return self.tables is None and self.organizations is None

    @property
    def whole_environment(self) -> bool:
        return self.sources is None and self.whole_sources


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    name: str
    scope: Scope
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class NewKey:
    key: ApiKey
    secret: str  # the whole key text, shown once


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def create_key(
    conn: psycopg.Connection,
    env: str,
    name: str,
    *,
    sources: list[str] | None = None,
    tables: list[str] | None = None,
    role: str = "reader",
    organizations: list[str] | None = None,
) -> NewKey:
    check_identifier("environment", env)
    if role not in ROLES:
        raise ApiKeyError(f"role {role!r}: choose one of {', '.join(ROLES)}")
    if not name.strip():
        raise ApiKeyError("give the key a name that says who uses it, e.g. --name support-team")
    for source in sources or []:
        check_identifier("source", source)
    for table in tables or []:
        if not _TABLE.match(table):
            raise ApiKeyError(f"table {table!r}: write it as schema.table, e.g. public.orders")
    for organization in organizations or []:
        if organization_id(organization) is None:
            raise ApiKeyError(
                f"organization {organization!r}: give the id records carry as organization.id "
                f"(1 to {MAX_ORGANIZATION_ID} printable characters)"
            )
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    text = f"ak_{key_id}_{secret}"
    row = one(
        conn.execute(
            "INSERT INTO audit_platform.api_keys"
            " (key_id, env, name, secret_sha256, sources, tables, role, organizations)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING created_at",
            (
                key_id,
                env,
                name,
                _digest(secret),
                sources or None,
                tables or None,
                role,
                organizations or None,
            ),
        )
    )
    scope = scope_of(env, sources, tables, role, organizations)
    return NewKey(ApiKey(key_id, name, scope, row[0], None), text)


def scope_of(
    env: str,
    sources: list[str] | None,
    tables: list[str] | None,
    role: str = "reader",
    organizations: list[str] | None = None,
) -> Scope:
    """The scope a key's stored row gives (an empty or NULL list means all)."""
    return Scope(
        env,
        frozenset(sources) if sources else None,
        frozenset(tables) if tables else None,
        role,
        frozenset(organizations) if organizations else None,
    )


def _key(row: tuple) -> ApiKey:
    key_id, env, name, sources, tables, role, organizations, created_at, revoked_at = row
    scope = scope_of(env, sources, tables, role, organizations)
    return ApiKey(key_id, name, scope, created_at, revoked_at)


_COLUMNS = "key_id, env, name, sources, tables, role, organizations, created_at, revoked_at"


def list_keys(conn: psycopg.Connection, env: str) -> list[ApiKey]:
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM audit_platform.api_keys WHERE env = %s ORDER BY created_at",
        (env,),
    ).fetchall()
    return [_key(row) for row in rows]


def revoke_key(conn: psycopg.Connection, env: str, key_id: str) -> bool:
    """Revoke a key of this environment; False when there is no such active key."""
    row = conn.execute(
        "UPDATE audit_platform.api_keys SET revoked_at = now()"
        " WHERE key_id = %s AND env = %s AND revoked_at IS NULL RETURNING key_id",
        (key_id, env),
    ).fetchone()
    return row is not None


def key_id_of(text: str) -> str | None:
    """The key id of a well-formed key text, for logs; None if it is not one."""
    match = _KEY.match(text)
    return match.group(1) if match else None


def verify_key(conn: psycopg.Connection, env: str, text: str) -> ApiKey | None:
    """The active key of ``env`` that ``text`` is, or None. A key of another environment is
    not found here at all, so it is refused exactly like a wrong key."""
    match = _KEY.match(text)
    if match is None:
        return None
    key_id, secret = match.groups()
    row = conn.execute(
        f"SELECT {_COLUMNS}, secret_sha256 FROM audit_platform.api_keys"
        " WHERE key_id = %s AND env = %s AND revoked_at IS NULL",
        (key_id, env),
    ).fetchone()
    if row is None or not hmac.compare_digest(bytes(row[-1]), _digest(secret)):
        return None
    return _key(row[:-1])
