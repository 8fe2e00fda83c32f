"""The platform's own logical decoding messages, and how untrusted ones are judged.

Any role that can connect to a source database can call ``pg_logical_emit_message`` with any
prefix and any bytes (docs/design.md, invariant 10: sources are not trusted). So a message is
data, never an instruction: one with a prefix that is not ours is skipped without looking at its
content, and one with our prefix is validated exactly as ``audit.set_context`` validates (the
same :class:`TransactionContext` contract) and re-serialised, so what is staged is compact JSON
that nothing downstream (the bulk body, the trail) has to distrust. A message that fails is a
:class:`Rejection`: it is staged as such, counted and recorded, and its transaction's changes are
captured as if it had recorded no context (they go through the quarantine to ``unattributed``).

Late attribution is not a message any more: ``audit.attach_context`` writes a row into
``audit.attached_contexts``, a table only that function can write (source migration 002), so a
role that may not attribute cannot forge an attachment by emitting our prefix itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import orjson
from pydantic import ValidationError

from audit_platform_context.model import (
    MAX_CONTEXT_BYTES,
    Actor,
    Job,
    Organization,
    TransactionContext,
)

CONTEXT_PREFIX = "audit_platform.context.v1"
ATTACH_PREFIX = "audit_platform.attach.v1"
OWN_PREFIXES = frozenset({CONTEXT_PREFIX.encode(), ATTACH_PREFIX.encode()})
#: The table ``audit.attach_context`` writes late contexts into (source migration 002).
ATTACHMENTS_TABLE = ("audit", "attached_contexts")

#: The largest content of one of our messages that is read at all. ``audit.set_context``
#: refuses a context over MAX_CONTEXT_BYTES of compact JSON; the text PostgreSQL emits for
#: jsonb adds a space after every ``:`` and ``,``, so twice that bounds every valid one.
#: Anything larger is rejected by its declared length, and the capture stream keeps only this
#: many bytes of it, so a message of hundreds of MB is never copied or decoded.
MAX_MESSAGE_BYTES = 2 * MAX_CONTEXT_BYTES


#: At most this many of our messages are read per transaction (``set_context`` is called once or
#: a few times); the rest are counted in one rejection, so a transaction of a million messages
#: costs one row and one leaf, not a million.
MAX_MESSAGES_PER_TRANSACTION = 100


class Rejection(ValueError):
    """Why a message with our prefix is not a context. Its text is built from the contract's
    own field names and fixed words, never from the message (that is the untrusted part: it
    would otherwise reach the trail, which can never forget it, and the API)."""


def parse_context(content: bytes | memoryview) -> str:
    """The context a message carries as compact, key-sorted JSON, or :class:`Rejection`.

    Everything ``audit.set_context`` accepts passes, as the record will show it: integers past
    64 bits become strings of their digits, numbers with a fraction or exponent are doubles (as
    every JSON reader downstream reads them), and the size is counted in UTF-8 as PostgreSQL
    counts it.
    What jsonb can never hold is refused: invalid UTF-8, NUL, lone surrogates, ``NaN`` and
    numbers beyond a double, each of which would otherwise fail a later stage (the Parquet
    writer, the bulk body) instead of being recorded here.
    """
    if len(content) > MAX_MESSAGE_BYTES:
        raise Rejection(f"message is {len(content)} bytes; the limit is {MAX_MESSAGE_BYTES}")
    try:
        value = json.loads(bytes(content).decode(), parse_constant=_no_constant, parse_int=_integer)
    except UnicodeDecodeError:
        raise Rejection("message is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise Rejection(f"message is not JSON (at character {exc.pos})") from None
    except (ValueError, RecursionError) as exc:
        raise Rejection(f"message is not JSON that jsonb holds ({type(exc).__name__})") from None
    if not isinstance(value, dict):
        raise Rejection(f"a context must be a JSON object, not {type(value).__name__}")
    for item in _scalars(value):
        if isinstance(item, float) and item in (_INF, -_INF):
            raise Rejection("a number in the context is beyond a double's range")
        if isinstance(item, str) and "\x00" in item:
            raise Rejection("a context cannot hold NUL (U+0000), which jsonb refuses")
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    try:
        text.encode()
    except UnicodeEncodeError:
        raise Rejection("a context cannot hold a lone surrogate, which jsonb refuses") from None
    try:
        TransactionContext.model_validate(value)
    except ValidationError as exc:
        raise Rejection(f"not a valid context: {_errors(exc)}") from None
    return text


def _integer(text: str) -> int | str:
    """An integer, or its digits as a string past 64 bits: a number no JSON reader downstream
    can hold (Elasticsearch, its client, the trail's canonical bytes) would otherwise come back
    changed, and the trail would call the record altered."""
    value = int(text)
    return value if -(2**63) <= value < 2**64 else text


def _no_constant(name: str) -> None:
    raise ValueError(name)


_INF = float("inf")


def _scalars(value: object) -> Iterator[object]:
    """Every key and every leaf value of a parsed JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _scalars(item)
    elif isinstance(value, list):
        for item in value:
            yield from _scalars(item)
    else:
        yield value


#: The contract's field names: the only names a rejection may repeat.
_FIELDS = frozenset(
    name for model in (TransactionContext, Actor, Job, Organization) for name in model.model_fields
)


def _errors(exc: ValidationError) -> str:
    """Where (the contract's field names) and what (pydantic's error type), nothing else."""
    parts = []
    for error in exc.errors(include_input=False, include_url=False, include_context=False):
        path = ".".join(
            p if isinstance(p, str) and p in _FIELDS else "<unknown field>"
            for p in error["loc"]
            if not isinstance(p, int)
        )
        parts.append(f"{path or 'context'}: {error['type']}")
    text = "; ".join(dict.fromkeys(parts))
    return text if len(text) <= 500 else text[:497] + "..."


def rejection_json(prefix: str, size: int, reason: str) -> str:
    """What is staged for a rejected message in place of its context."""
    return orjson.dumps(
        {"prefix": prefix, "bytes": size, "reason": reason}, option=orjson.OPT_SORT_KEYS
    ).decode()
