"""The platform's own PostgreSQL schema (``audit_platform``): quarantine, late contexts, API keys.

Every process that needs the schema (Dagster assets, the API, the command line, tests) calls
:func:`install`, which applies the missing migrations of ``resources/sql/platform``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from audit_platform import migrations

_STATE_LOCK = 0x61756469745F7374


def install(conn: psycopg.Connection, sql_dir: Path) -> list[str]:
    """Create or upgrade the platform's tables; returns the names of migrations applied."""
    return migrations.apply(conn, "audit_platform", sql_dir / "platform", _STATE_LOCK)


def one(cursor: psycopg.Cursor[Any]) -> tuple[Any, ...]:
    """The row a statement always returns (a count, an ``INSERT ... RETURNING``): no row is a
    bug in the statement, raised as one rather than as an error indexing ``None``."""
    row = cursor.fetchone()
    if row is None:
        raise LookupError("a statement that always returns a row returned none")
    return row
