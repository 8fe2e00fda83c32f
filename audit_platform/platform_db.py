"""The platform's own PostgreSQL schema (``audit_platform``): quarantine, late contexts, API keys.

Every process that needs the schema (Dagster assets, the API, the command line, tests) calls
:func:`install`, which applies the missing migrations of ``resources/sql/platform``.
"""

from __future__ import annotations

from pathlib import Path

import psycopg

from audit_platform import migrations

_STATE_LOCK = 0x61756469745F7374


def install(conn: psycopg.Connection, sql_dir: Path) -> list[str]:
    """Create or upgrade the platform's tables; returns the names of migrations applied."""
    return migrations.apply(conn, "audit_platform", sql_dir / "platform", _STATE_LOCK)
