"""Small helpers shared by tests: reading a slot the simple way, making policies."""

from __future__ import annotations

import json
from dataclasses import dataclass

import psycopg

from audit_platform.policy import SourcePolicy, TablePolicy

#: Lines a test wants in the session summary (the fault matrix's recovery times); conftest
#: prints them. Here, not in conftest: pytest may import conftest under another module name.
SUMMARY: dict[str, list[str]] = {}

CONTEXT_PREFIX = "audit_platform.context.v1"
ATTACH_PREFIX = "audit_platform.attach.v1"

#: The tables of the demo policy (resources/sources/shop.yaml), keyed and REPLICA IDENTITY FULL.
SHOP_DDL = """
CREATE TABLE customers (id int PRIMARY KEY, email text, phone text, password_hash text,
                        updated_at timestamptz);
CREATE TABLE orders (id int PRIMARY KEY, customer_id int, status text, updated_at timestamptz);
CREATE TABLE order_lines (id int PRIMARY KEY, order_id int, sku text, quantity int);
CREATE TABLE payments (id int PRIMARY KEY, order_id int, card_last4 text);
ALTER TABLE customers REPLICA IDENTITY FULL; ALTER TABLE orders REPLICA IDENTITY FULL;
ALTER TABLE order_lines REPLICA IDENTITY FULL; ALTER TABLE payments REPLICA IDENTITY FULL;
"""


@dataclass(frozen=True)
class DecodedRow:
    xid: int
    data: str


def context_source(url: str, ddl: str, slot: str) -> str:
    """A database with the audit schema, ``ddl`` applied, and a test_decoding slot to read."""
    from audit_platform.settings import Settings
    from audit_platform.sources.setup import apply_migrations

    with psycopg.connect(url, autocommit=True) as conn:
        apply_migrations(conn, Settings().resources_dir / "sql")
        conn.execute(ddl)
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (slot,))
    return url


def read_test_decoding(url: str, slot: str) -> list[DecodedRow]:
    """Consume a test_decoding slot: one row per change or message, with its transaction id."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT xid::text::bigint, data FROM pg_logical_slot_get_changes(%s, NULL, NULL)",
            (slot,),
        ).fetchall()
    return [DecodedRow(xid, data) for xid, data in rows]


def messages(rows: list[DecodedRow], prefix: str = CONTEXT_PREFIX) -> list[tuple[int, dict]]:
    """(xid, payload) of each transactional message with ``prefix``."""
    found = []
    marker = f"message: transactional: 1 prefix: {prefix}, sz: "
    for row in rows:
        if row.data.startswith(marker):
            content = row.data.split(" content:", 1)[1]
            found.append((row.xid, json.loads(content)))
    return found


def changes(rows: list[DecodedRow], table: str) -> list[tuple[int, str]]:
    return [(r.xid, r.data) for r in rows if r.data.startswith(f"table {table}: ")]


def policy_for(source: str, **tables: dict) -> SourcePolicy:
    return SourcePolicy(
        source=source,
        version=1,
        tables={name.replace("__", "."): TablePolicy(**spec) for name, spec in tables.items()},
    )
