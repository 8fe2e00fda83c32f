"""Salted commitments to personal values, so a person's values can be erased while the trail
still verifies (docs/design.md, "Erasure").

A ``change`` leaf of a table that declares personal columns holds, in place of each non-null
personal value, ``c1:`` + hex SHA-256(salt || column || NUL || JCS(value)), where the salt is
HMAC-SHA256(the subject's key, context NUL record id NUL side): one per image of a record. The
keys are 32 random bytes per person and environment, kept in the platform database only
(``subject_keys``): with the key and the value anyone can recompute the commitment; with the key
destroyed, the commitment says nothing about the value, however few values it could have been.

A ``context`` or ``attach`` leaf of a source that declares its contexts' personal fields
(``context_personal``) does the same for the actor's: the salt's record part is then the leaf's
own name (:func:`context_ref`, :func:`attach_ref`) and its side ``context``.

An erasure keeps, in its own leaf, the commitment of every value it replaced; a leaf is then
rebuilt from those commitments instead of from the values, which are gone.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

import orjson
import psycopg

from audit_platform.trust.jcs import canonical

PREFIX = "c1:"
SALT_CONTEXT = b"audit-platform commitment v1"
SIDES = ("before", "after")
#: The "side" of a context's personal fields, in salts and erasure leaves.
CONTEXT = "context"
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
        before, after = (
            None
            if image is None
            else self._seal(
                record_id, side, personal["of"], personal.get(side), personal["columns"], image
            )
            for side, image in zip(SIDES, images, strict=True)
        )
        return before, after

    def seal_context(
        self, ref: str, shape: dict[str, Any] | None, context: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        """A context as its leaf holds it (``ref``: :func:`context_ref` or :func:`attach_ref`):
        each personal field of its actor (``context_personal``) as its commitment."""
        if shape is None or context is None:
            return context
        fields = shape["fields"]
        values = {f: context_field(context, f) for f in fields}
        sealed = self._seal(ref, CONTEXT, shape["of"], shape["subject"], fields, values)
        return _with_fields(context, {f: sealed[f] for f in fields if values[f] is not None})

    def _seal(
        self,
        record_id: str,
        side: str,
        of: str,
        subject: str | None,
        columns: list[str],
        image: dict[str, Any],
    ) -> dict[str, Any]:
        if subject is None:  # whose the values are is unknown: nobody can have them erased
            return image
        erased = self.erased.get(record_id)
        image = dict(image)
        key = self.keys.get(subject_name(of, subject))
        salted = None if key is None else salt(key, record_id, side)
        kept = erased.values.get(side, {}) if erased is not None else {}
        for column in columns:
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
                raise ValueError(f"{record_id}: no key for {of}:{subject}")
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
                        f"{side}.{column}: the key of {of}:{subject} is gone "
                        "and no erasure leaf names this value",
                    )
                )
        return image


@lru_cache(maxsize=1024)
def context_shape(spec: str | None, context: str | None) -> str | None:
    """The record's ``context_personal``: the contexts' personal declaration as staged with the
    context (``of``, ``fields``) and whose they are (``subject``: the actor's id), where the
    actor is of a type the declaration names persons. Cached: a transaction's changes share
    their context."""
    if spec is None or context is None:
        return None
    declared = json.loads(spec)
    actor = json.loads(context).get("actor") or {}
    if actor.get("type") not in declared["actors"] or actor.get("id") is None:
        return None
    shape = {"of": declared["of"], "subject": str(actor["id"]), "fields": declared["fields"]}
    return json.dumps(shape, separators=(",", ":"))


def context_ref(source: str, lsn: str) -> str:
    """What names a ``context`` leaf among an environment's commitments (its salt's record
    part): its source and its transaction's commit LSN as leaves write it."""
    return f"context:{source}:{lsn}"


def attach_ref(source: str, target_xid: int | str, time: str) -> str:
    """What names an ``attach`` leaf: its source, the transaction it attaches to and when it
    committed, as leaves write them."""
    return f"attach:{source}:{target_xid}:{time}"


def context_field(context: dict[str, Any], name: str) -> Any:
    """A context field by its dotted name (``actor.name``)."""
    value: Any = context
    for part in name.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _with_fields(context: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of a context with fields (by dotted name) set; the rest shared."""
    out = dict(context)
    for name, value in values.items():
        *parents, last = name.split(".")
        node = out
        for part in parents:
            node[part] = dict(node[part])
            node = node[part]
        node[last] = value
    return out


def erase_context(context: dict[str, Any], fields: list[str], text: str) -> dict[str, Any]:
    """A context with each personal field that has a value replaced by an erasure's text."""
    return _with_fields(context, {f: text for f in fields if context_field(context, f) is not None})


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


def context_salt(commitments: Commitments, name: str, shape: dict[str, Any]) -> str | None:
    """The hex salt of a context leaf's personal fields (``name``: its ``context_ref`` or
    ``attach_ref``) where the actor's key is known and nothing of it was erased."""
    erased = commitments.erased.get(name)
    if erased is not None and CONTEXT in erased.values:
        return None
    key = commitments.keys.get(subject_name(shape["of"], shape["subject"]))
    return None if key is None else salt(key, name, CONTEXT).hex()


def subjects_in(personal_texts: Iterable[str | None]) -> set[str]:
    """The persons a frame's ``personal`` (or ``context_personal``) column names."""
    found: set[str] = set()
    for text in personal_texts:
        if text is None:
            continue
        shape = orjson.loads(text)
        found.update(
            subject_name(shape["of"], shape[side])
            for side in (*SIDES, "subject")
            if shape.get(side) is not None
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
