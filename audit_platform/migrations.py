"""Numbered SQL migrations (``NNN_name.sql``), applied once each, in order, under a lock.

Two schemas are migrated this way: ``audit`` in every source database (resources/sql/source) and
``audit_platform`` in the platform's database (resources/sql/platform). Each keeps its own
``schema_migrations`` table, so either can be upgraded by running its setup again.
"""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
from psycopg import sql

_MIGRATION = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


def migrations(folder: Path) -> list[tuple[int, str, Path]]:
    """(version, name, file) of each migration in ``folder``, in version order."""
    found = []
    for path in sorted(folder.glob("*.sql")):
        if match := _MIGRATION.match(path.name):
            found.append((int(match.group(1)), match.group(2), path))
    return found


def apply(conn: psycopg.Connection, schema: str, folder: Path, lock: int) -> list[str]:
    """Apply the migrations of ``folder`` not yet recorded in ``schema``; returns their names.

    One transaction under an advisory lock: concurrent starters wait for each other, and a
    failing migration leaves nothing half-applied.
    """
    applied: list[str] = []
    table = sql.Identifier(schema, "schema_migrations")
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (version integer PRIMARY KEY,"
                " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(table)
        )
        done = {row[0] for row in conn.execute(sql.SQL("SELECT version FROM {}").format(table))}
        for version, name, path in migrations(folder):
            if version in done:
                continue
            conn.execute(path.read_text())
            conn.execute(
                sql.SQL("INSERT INTO {} (version, name) VALUES (%s, %s)").format(table),
                (version, name),
            )
            applied.append(f"{version:03d}_{name}")
    return applied
