"""Streams as an operator defines them: a destination, a filter, an optional organization scope.

A stream is kept in the platform database and never edited: to change one, create another and
delete the old (a change of filter mid-way would make "what was delivered" a question with two
answers). Deleting marks it deleted; its cursors and dead letters stay, as the record of what it
delivered. A webhook's secret is made here, shown once, and kept for signing, as the trail's
signing key is kept for signing.
"""

from __future__ import annotations

import base64
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import urlsplit

import psycopg

from audit_platform.api_keys import Scope
from audit_platform.index import feed
from audit_platform.naming import check_identifier
from audit_platform.platform_db import one
from audit_platform.query.language import QuerySyntaxError, parse
from audit_platform.record import MAX_ORGANIZATION_ID, organization_id

Kind = Literal["webhook", "bucket"]
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
#: Hosts a webhook may reach over plain HTTP (a receiver on the same machine; tests, the demo).
LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


class StreamError(ValueError):
    """A stream could not be created or deleted; the message says why and what to do."""


@dataclass(frozen=True)
class Stream:
    id: int
    env: str
    name: str
    kind: Kind
    target: str
    secret: str | None = field(repr=False)
    filter: str
    organizations: frozenset[str] | None
    start_seq: int
    created_by: str
    created_at: datetime
    deleted_at: datetime | None = None

    @property
    def scope(self) -> Scope:
        """What the stream may read: as a reader key limited to its organizations."""
        return Scope(self.env, organizations=self.organizations)


@dataclass(frozen=True)
class NewStream:
    stream: Stream
    secret: str | None  # shown once


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def check_target(kind: Kind, target: str, *, loopback_http: bool = True) -> str:
    """``loopback_http``: whether plain HTTP to this machine is allowed (the command line, for
    a receiver beside the platform; not the API, whose callers must not reach local ports)."""
    parts = urlsplit(target)
    if kind == "webhook":
        local = loopback_http and parts.scheme == "http" and parts.hostname in LOOPBACK
        secure = parts.scheme == "https" or local
        if secure and parts.hostname:
            return target
        raise StreamError(
            f"webhook {target!r}: give an https:// URL (plain http:// to localhost only from the "
            "command line, for a receiver on this machine); deliveries carry records, which "
            "must not cross a network unencrypted"
        )
    if parts.scheme == "s3" and parts.netloc:
        return target.rstrip("/")
    raise StreamError(f"bucket {target!r}: give an s3:// URL, e.g. s3://audit-exports/streams")


def check_filter(text: str) -> str:
    try:
        parsed = parse(text, now=datetime.now(UTC))
    except QuerySyntaxError as exc:
        raise StreamError(f"filter: {exc}") from exc
    if parsed.since is not None or parsed.until is not None:
        raise StreamError(
            "filter: since: and until: have no meaning for a stream, which delivers records as "
            "they are indexed; leave them out"
        )
    return text.strip()


def create_stream(
    conn: psycopg.Connection,
    env: str,
    name: str,
    kind: Kind,
    target: str,
    *,
    created_by: str,
    filter: str = "",
    organizations: list[str] | None = None,
    can_sign: bool = True,
    loopback_http: bool = True,
) -> NewStream:
    """``can_sign``: whether the environment has a signing key, which a bucket's digests need;
    ``loopback_http``: as :func:`check_target` says."""
    check_identifier("environment", env)
    if not _NAME.match(name):
        raise StreamError(
            f"stream name {name!r}: use 1 to 63 lowercase letters, digits, '-' and '_', "
            "starting with a letter"
        )
    target = check_target(kind, target, loopback_http=loopback_http)
    if kind == "bucket" and not can_sign:
        raise StreamError(
            "a bucket stream signs a digest of every object it writes: set AUDIT_SIGNING_KEY "
            "(audit-platform keygen) first"
        )
    text = check_filter(filter)
    for organization in organizations or []:
        if organization_id(organization) is None:
            raise StreamError(
                f"organization {organization!r}: give the id records carry as organization.id "
                f"(1 to {MAX_ORGANIZATION_ID} printable characters)"
            )
    secret = new_secret() if kind == "webhook" else None
    start = feed.last_seq(conn)
    try:
        row = one(
            conn.execute(
                "INSERT INTO audit_platform.streams (env, name, kind, target, secret, filter,"
                " organizations, start_seq, created_by) VALUES"
                " (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                (
                    env,
                    name,
                    kind,
                    target,
                    secret,
                    text,
                    sorted(organizations) if organizations else None,
                    start,
                    created_by,
                ),
            )
        )
    except psycopg.errors.UniqueViolation as exc:
        raise StreamError(
            f"environment {env} has a stream named {name} already: delete it first, or choose "
            "another name"
        ) from exc
    stream = get_stream(conn, row[0])
    assert stream is not None  # just inserted
    return NewStream(stream, secret)


_COLUMNS = (
    "id, env, name, kind, target, secret, filter, organizations, start_seq, created_by,"
    " created_at, deleted_at"
)


def _stream(row: tuple) -> Stream:
    id_, env, name, kind, target, secret, text, organizations, start, by, at, deleted = row
    orgs = frozenset(organizations) if organizations else None
    return Stream(id_, env, name, kind, target, secret, text, orgs, start, by, at, deleted)


def list_streams(
    conn: psycopg.Connection, env: str, *, include_deleted: bool = False
) -> list[Stream]:
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM audit_platform.streams WHERE env = %s"
        " AND (%s OR deleted_at IS NULL) ORDER BY name, id",
        (env, include_deleted),
    ).fetchall()
    return [_stream(row) for row in rows]


def get_stream(conn: psycopg.Connection, stream_id: int, *, live: bool = False) -> Stream | None:
    """The stream, or None; with ``live``, None also once it is deleted."""
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM audit_platform.streams WHERE id = %s"
        " AND (NOT %s OR deleted_at IS NULL)",
        (stream_id, live),
    ).fetchone()
    return _stream(row) if row else None


def delete_stream(conn: psycopg.Connection, env: str, name: str, *, deleted_by: str) -> Stream:
    row = conn.execute(
        "UPDATE audit_platform.streams SET deleted_at = now(), deleted_by = %s"
        f" WHERE env = %s AND name = %s AND deleted_at IS NULL RETURNING {_COLUMNS}",
        (deleted_by, env, name),
    ).fetchone()
    if row is None:
        raise StreamError(f"environment {env} has no stream named {name}: see `streams list`")
    return _stream(row)
