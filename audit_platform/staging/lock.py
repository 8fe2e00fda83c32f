"""One writer at a time of a source's derived data: records files, the pending ledger, the trail.

The long-lived capture run enriches and indexes a source's batches as they are staged; a
backfill or a reconciliation may rebuild the same hours' records files meanwhile, and a records
file is rewritten by read-modify-write (a late context replaces one record). Two writers at
once could put an older version back. So every step that writes a source's derived data holds
a PostgreSQL advisory lock of that environment and source, on the platform database
(``AUDIT_PG_URL``), for the duration of the step: a session lock, which the server releases
when the holder's connection ends, so a process killed while holding it holds nothing.

Staging itself needs no lock: the slot admits one reader at a time (invariant 3).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg


def _key(env: str, source: str) -> str:
    return f"audit_platform.ledger/{env}/{source}"


@contextmanager
def ledger_lock(
    state: psycopg.Connection, env: str, source: str, *, wait: float | None = None
) -> Iterator[bool]:
    """Hold the source's ledger lock for the block; yields whether it is held.

    ``wait`` None: block until it is free. Otherwise try for up to ``wait`` seconds and yield
    False if it stayed taken (the caller skips its step and tries again later).
    """
    key = _key(env, source)
    held = False
    if wait is None:
        state.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (key,))
        held = True
    else:
        deadline = time.monotonic() + wait
        while True:
            row = state.execute(
                "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (key,)
            ).fetchone()
            held = bool(row and row[0])
            if held or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
    try:
        yield held
    finally:
        if held and not state.closed:
            state.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (key,))
