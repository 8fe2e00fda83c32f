"""SQLAlchemy hook: every transaction an engine commits carries the current audit context.

With the psycopg 3 driver (``postgresql+psycopg://``) the engine's DBAPI connections become
:class:`AuditedConnection`, so the context rides with COMMIT in one round trip. With other
PostgreSQL drivers that take ``%s`` parameters (psycopg2), the context is sent just before
COMMIT on the same connection: one extra round trip per writing transaction.
"""

from __future__ import annotations

from typing import Any

from audit_platform_context.psycopg_hook import AuditedConnection
from audit_platform_context.scope import current_context

SET_CONTEXT = "SELECT audit.set_context_if_writing(%s::jsonb)"


def instrument_engine(engine: Any) -> Any:
    """Install the hook on ``engine`` (a sqlalchemy Engine) and return it."""
    from sqlalchemy import event

    if engine.dialect.driver == "psycopg":

        @event.listens_for(engine, "do_connect")
        def _audited_connect(dialect, conn_rec, cargs, cparams):
            return AuditedConnection.connect(*cargs, **cparams)

    elif engine.dialect.driver == "psycopg2":

        @event.listens_for(engine, "commit")
        def _set_context_before_commit(conn):
            context = current_context()
            if context is None:
                return
            cursor = conn.connection.dbapi_connection.cursor()
            try:
                cursor.execute(SET_CONTEXT, (context.to_json(),))
            finally:
                cursor.close()

    else:
        raise ValueError(
            f"audit context hook supports the psycopg and psycopg2 drivers, not "
            f"{engine.dialect.driver!r}; call audit.set_context yourself in each transaction"
        )
    return engine
