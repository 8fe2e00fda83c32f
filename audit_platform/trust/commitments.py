"""Salted commitments to personal values, so a person's values can be erased while the trail
still verifies (docs/design.md, "Erasure").

A ``change`` leaf of a table that declares personal columns holds, in place of each non-null
personal value, ``c1:`` + hex SHA-256(salt || column || NUL || JCS(value)), where the salt is
HMAC-SHA256(the subject's key, context NUL record id NUL side): one per image of a record. The
keys are 32 random bytes per person and environment, kept in the platform database only
(``subject_keys``): with the key and the value anyone can recompute the commitment; with the key
destroyed, the commitment says nothing about the value, however few values it could have been.

An erasure keeps, in its own leaf, the commitment of every value it replaced; a leaf is then
rebuilt from those commitments instead of from the values, which are gone.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import psycopg

from audit_platform.trust.jcs import canonical

PREFIX = "c1:"
SALT_CONTEXT = b"audit-platform commitment v1"
SIDES = ("before", "after")
#: What an erased value reads as, everywhere the platform keeps it.
MARKER = re.compile(r"erased on \d{4}-\d{2}-\d{2} under request \d+")
#: The request an erased value names.
MARKER_REQUEST = re.compile(r"erased on \d{4}-\d{2}-\d{2} under request (\d+)")


def marker(request: int, at: datetime) -> str:
    return f"erased on {at:%Y-%m-%d} under request {request}"


def subject_name(of: str, subject_id: str) -> str:
    """How a person is named: their table and id (``public.customers:42``)."""
    return f"{of}:{subject_id}"


def salt(key: bytes, record_id: str, side: str) -> bytes:
    """The salt of one image of one record: revealing it (with the values) proves that image's
    values to whoever holds the leaf, and nothing of any other record's."""
    return hmac.digest(key, b"\0".join((SALT_CONTEXT, record_id.encode(), side.encode())), "sha256")


def commit_with(salt: bytes, column: str, value: Any) -> str:
    return PREFIX + hashlib.sha256(salt + column.encode() + b"\0" + canonical(value)).hexdigest()


def commit(key: bytes, record_id: str, side: str, column: str, value: Any) -> str:
    """The commitment of one value (:func:`salt`, then :func:`commit_with`)."""
    return commit_with(salt(key, record_id, side), column, value)


@dataclass(frozen=True)
class ErasedRecord:
    """What erasure leaves say of one record: per side and column, the text the value now
    reads and the commitment of the value it replaced."""

    values: dict[str, dict[str, tuple[str, str]]]


@dataclass
class Commitments:
    """The keys of the persons a frame or a document names, and the records erasures replaced
    values of. ``findings`` collects, for verification, what a rebuilt leaf could not follow:
    (kind, record id, detail)."""

    keys: dict[str, bytes] = field(default_factory=dict)
    erased: dict[str, ErasedRecord] = field(default_factory=dict)
    findings: list[tuple[str, str, str]] = field(default_factory=list)
    #: Capture's: a value without its key is an error, never a value in a leaf.
    strict: bool = True
    #: Records with a personal value that reads as an erasure's text no erasure leaf names:
    #: if their leaf then differs from the log's, a value was erased without an erasure.
    suspects: set[str] = field(default_factory=set)

    def seal(
        self,
        record_id: str,
        personal: dict[str, Any],
        images: tuple[dict[str, Any] | None, dict[str, Any] | None],
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The images as the leaf holds them: each personal value as its commitment."""
        erased = self.erased.get(record_id)
        sealed: list[dict[str, Any] | None] = []
        for side, image in zip(SIDES, images, strict=True):
            if image is None:
                sealed.append(None)
                continue
            subject = personal.get(side)
            if subject is None:  # whose the values are is unknown: nobody can have them erased
                sealed.append(image)
                continue
            image = dict(image)
            key = self.keys.get(subject_name(personal["of"], subject))
            salted = None if key is None else salt(key, record_id, side)
            kept = erased.values.get(side, {}) if erased is not None else {}
            for column in personal["columns"]:
                value = image.get(column)
                if value is None:
                    continue
                if column in kept:
                    text, image[column] = kept[column]
                    if value != text:
                        self.findings.append(
                            (
                                "not_erased",
                                record_id,
                                f"{side}.{column} still holds a value its erasure leaf "
                                f"replaced ({text})",
                            )
                        )
                elif salted is not None:
                    if not self.strict and isinstance(value, str) and MARKER.fullmatch(value):
                        self.suspects.add(record_id)
                    image[column] = commit_with(salted, column, value)
                elif self.strict:
                    raise ValueError(f"{record_id}: no key for {personal['of']}:{subject}")
                elif isinstance(value, str) and MARKER.fullmatch(value):
                    self.findings.append(
                        (
                            "erased_unlogged",
                            record_id,
                            f"{side}.{column} reads as erased, and no erasure leaf of the log "
                            "names it: a value was removed without an erasure",
                        )
                    )
                else:
                    self.findings.append(
                        (
                            "unverifiable",
                            record_id,
                            f"{side}.{column}: the key of {personal['of']}:{subject} is gone "
                            "and no erasure leaf names this value",
                        )
                    )
            sealed.append(image)
        return sealed[0], sealed[1]


def image_salts(
    commitments: Commitments, record_id: str, personal: dict[str, Any] | None
) -> dict[str, str]:
    """Side -> hex salt of each image of a record whose person's key is known: what a proof
    gives so that the record's values can be checked offline. Revealing it proves those values
    and nothing of any other record."""
    if personal is None:
        return {}
    erased = commitments.erased.get(record_id)
    found = {}
    for side in SIDES:
        subject = personal.get(side)
        if subject is None or (erased is not None and side in erased.values):
            continue  # nobody's values, or erased ones: their salt is gone with the key
        key = commitments.keys.get(subject_name(personal["of"], subject))
        if key is not None:
            found[side] = salt(key, record_id, side).hex()
    return found


def subjects_in(personal_texts: Iterable[str | None]) -> set[str]:
    """The persons a frame's ``personal`` column names."""
    found: set[str] = set()
    for text in personal_texts:
        if text is None:
            continue
        shape = orjson.loads(text)
        found.update(
            subject_name(shape["of"], shape[side]) for side in SIDES if shape.get(side) is not None
        )
    return found


# --- the keys -----------------------------------------------------------------------------


def _hash(subject: str) -> bytes:
    return hashlib.sha256(subject.encode()).digest()


def ensure_keys(conn: psycopg.Connection, env: str, subjects: set[str]) -> dict[str, bytes]:
    """The keys of ``subjects``, a new one for each person without one. Two statements, one of
    them only when a person is new; run under the source's ledger lock. An erasure holds the
    lock of every source naming the person while it plans and deletes their key, so no leaf is
    sealed with a key between the plan that covers it and the key's deletion."""
    keys = known_keys(conn, env, subjects)
    missing = sorted(subjects - set(keys))
    if missing:
        conn.execute(
            "INSERT INTO audit_platform.subject_keys (env, subject, subject_hash, key)"
            " SELECT %s, s, h, k FROM unnest(%s::text[], %s::bytea[], %s::bytea[]) AS t(s, h, k)"
            " ON CONFLICT DO NOTHING",
            (env, missing, [_hash(s) for s in missing], [os.urandom(32) for _ in missing]),
        )
        keys.update(known_keys(conn, env, set(missing)))
    return keys


def known_keys(conn: psycopg.Connection, env: str, subjects: set[str]) -> dict[str, bytes]:
    """The keys of those of ``subjects`` that have one."""
    if not subjects:
        return {}
    rows = conn.execute(
        "SELECT subject, key FROM audit_platform.subject_keys WHERE env = %s"
        " AND subject_hash = ANY(%s)",
        (env, [_hash(s) for s in subjects]),
    ).fetchall()
    return {subject: bytes(key) for subject, key in rows if subject in subjects}


def destroy_key(conn: psycopg.Connection, env: str, subject: str) -> None:
    conn.execute(
        "DELETE FROM audit_platform.subject_keys WHERE env = %s AND subject_hash = %s",
        (env, _hash(subject)),
    )


def all_keys(conn: psycopg.Connection, env: str) -> dict[str, bytes]:
    """Every key of an environment: what verification recomputes commitments with."""
    rows = conn.execute(
        "SELECT subject, key FROM audit_platform.subject_keys WHERE env = %s", (env,)
    ).fetchall()
    return {subject: bytes(key) for subject, key in rows}
