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

import orjson
from pydantic import ValidationError

from audit_platform.context.model import MAX_CONTEXT_BYTES, TransactionContext

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


class Rejection(ValueError):
    """Why a message with our prefix is not a context (its text says so, never its content)."""


def parse_context(content: bytes | memoryview) -> str:
    """The context a message carries as compact, key-sorted JSON, or :class:`Rejection`.

    orjson is strict where the standard library is lenient in ways that matter here: it
    refuses invalid UTF-8, lone surrogates, ``NaN`` and numbers that overflow a double, each
    of which would otherwise travel on and fail a later stage (the bulk body, the Parquet
    writer) instead of being rejected here.
    """
    if len(content) > MAX_MESSAGE_BYTES:
        raise Rejection(
            f"message content is {len(content)} bytes; the limit is {MAX_MESSAGE_BYTES}"
        )
    try:
        value = orjson.loads(bytes(content))
    except orjson.JSONDecodeError as exc:
        raise Rejection(f"message content is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise Rejection(f"a context must be a JSON object, got {type(value).__name__}")
    try:
        TransactionContext.model_validate(value)
    except ValidationError as exc:
        raise Rejection(f"not a valid context: {_errors(exc)}") from None
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def _errors(exc: ValidationError) -> str:
    """Where and what, never the offending input: that is the untrusted part."""
    parts = [
        f"{'.'.join(str(p) for p in error['loc']) or 'context'}: {error['msg']}"
        for error in exc.errors(include_input=False, include_url=False)
    ]
    text = "; ".join(parts)
    return text if len(text) <= 500 else text[:497] + "..."


def rejection_json(prefix: str, size: int, reason: str) -> str:
    """What is staged for a rejected message in place of its context."""
    return orjson.dumps(
        {"prefix": prefix, "bytes": size, "reason": reason}, option=orjson.OPT_SORT_KEYS
    ).decode()
