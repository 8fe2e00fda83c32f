"""psycopg 3 hook: the current context travels with COMMIT, in the same round trip.

``AuditedConnection`` is a drop-in ``psycopg.Connection``. When a transaction commits inside an
``audit_context`` scope, the connection sends ``SELECT audit.set_context_if_writing(...); COMMIT``
as one simple-query message, so attributing a transaction costs no extra round trip, and a
read-only transaction costs nothing (the function only records when the transaction has an xid).
An invalid context fails the commit: the transaction is rolled back, never stored unattributed.

Every commit path in psycopg 3 (``commit()``, ``with conn:``, ``conn.transaction()``) ends in
``_exec_command(b"COMMIT")``; hooking that one private method covers them all. The psycopg pin in
pyproject.toml and the tests guard it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import errors, generators, pq, sql

from audit_platform_context.scope import current_context

if TYPE_CHECKING:
    from psycopg.abc import PQGen, QueryNoTemplate
    from psycopg.pq.abc import PGresult

    # The mixin only ever sits in front of a psycopg connection, so mypy checks it against one;
    # at run time it stays a plain class so the MRO of the two connections is unchanged.
    _ConnectionBase = psycopg.BaseConnection[Any]
else:
    _ConnectionBase = object

_COMMIT = b"COMMIT"


class _RecordsContextAtCommit(_ConnectionBase):
    """Shared by the sync and async connections: both commit through ``_exec_command``."""

    def _exec_command(
        self, command: QueryNoTemplate, result_format: pq.Format = pq.Format.TEXT
    ) -> PQGen[PGresult | None]:
        context = current_context() if command == _COMMIT else None
        if context is None or self._pipeline:
            return (yield from super()._exec_command(command, result_format))
        self._check_connection_ok()
        literal = sql.Literal(context.to_json()).as_bytes(self)
        self.pgconn.send_query(
            b"SELECT audit.set_context_if_writing(" + literal + b"::jsonb); COMMIT"
        )
        results = yield from generators.execute(self.pgconn)
        for result in results:
            if result.status == pq.ExecStatus.FATAL_ERROR:
                raise errors.error_from_result(result, encoding=self.pgconn._encoding)
        return results[-1]


class AuditedConnection(_RecordsContextAtCommit, psycopg.Connection):
    """A psycopg connection that records the current audit context at commit."""


class AsyncAuditedConnection(_RecordsContextAtCommit, psycopg.AsyncConnection):
    """The asyncio twin, for async services (FastAPI endpoints, workers)."""


def connect(conninfo: str = "", **kwargs: Any) -> AuditedConnection:
    """``psycopg.connect`` returning an :class:`AuditedConnection`."""
    return AuditedConnection.connect(conninfo, **kwargs)


async def connect_async(conninfo: str = "", **kwargs: Any) -> AsyncAuditedConnection:
    """``psycopg.AsyncConnection.connect`` returning an :class:`AsyncAuditedConnection`."""
    return await AsyncAuditedConnection.connect(conninfo, **kwargs)
