"""Transaction context SDK: record who and why, once per transaction, without logging code.

Importable without Dagster or FastAPI. Typical use in a service::

    from audit_platform_context import audit_context, Actor
    from audit_platform_context.psycopg_hook import connect

    conn = connect(DATABASE_URL)
    with audit_context(actor=Actor(type="user", id=user.id), reason="refund"):
        with conn.transaction():
            conn.execute("UPDATE orders SET status = 'refunded' WHERE id = %s", (order_id,))
"""

from audit_platform_context.model import (
    MAX_CONTEXT_BYTES,
    Actor,
    ActorType,
    Job,
    Organization,
    TransactionContext,
    merge_fields,
)
from audit_platform_context.scope import audit_context, audit_job, current_context

__all__ = [
    "MAX_CONTEXT_BYTES",
    "Actor",
    "ActorType",
    "Job",
    "Organization",
    "TransactionContext",
    "audit_context",
    "audit_job",
    "current_context",
    "merge_fields",
]
