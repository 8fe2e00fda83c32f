"""The platform's own PostgreSQL schema (``audit_platform``): quarantine, late contexts, API keys.

Migrations are the numbered files under ``resources/sql/platform/``; every process that needs the
schema (Dagster assets, the API, the command line, tests) calls :func:`install`, which applies the
missing ones in order under an advisory lock, so concurrent starters do not race.
"""

from __future__ import annotations

from pathlib import Path

import psycopg

_STATE_LOCK = 0x61756469745F7374


def migrations(sql_dir: Path) -> list[tuple[int, str, Path]]:
    """(version, name, file) of each ``NNN_name.sql``, in version order."""
    found = []
    for path in sorted((sql_dir / "platform").glob("[0-9][0-9][0-9]_*.sql")):
        number, name = path.stem.split("_", 1)
        found.append((int(number), name, path))
    return found


def install(conn: psycopg.Connection, sql_dir: Path) -> list[str]:
    """Create or upgrade the platform's tables; returns the names of migrations applied."""
    applied = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_STATE_LOCK,))
        conn.execute(
            "CREATE SCHEMA IF NOT EXISTS audit_platform;"
            "CREATE TABLE IF NOT EXISTS audit_platform.schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {
            row[0] for row in conn.execute("SELECT version FROM audit_platform.schema_migrations")
        }
        for version, name, path in migrations(sql_dir):
            if version in done:
                continue
            conn.execute(path.read_text())
            conn.execute(
                "INSERT INTO audit_platform.schema_migrations (version, name) VALUES (%s, %s)",
                (version, name),
            )
            applied.append(f"{version:03d}_{name}")
    return applied
