"""Records a pgoutput session from a real PostgreSQL into ``data/pgoutput_session.json``, for
``test_pgoutput_recorded.py`` (which needs no server).

The session is the SQL in ``SESSION`` below, as one database's publication emits it: the bytes
PostgreSQL wrote, not bytes this project built, so the decoder is tested against the protocol
as the server speaks it (type output functions, unchanged TOAST markers, truncate flags,
messages). Run it again when PostgreSQL's major version changes:

    eval "$(audit-platform stack env)"
    .venv/bin/python -m audit_platform_tests.unit.capture.record_pgoutput
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

from audit_platform.capture.messages import CONTEXT_PREFIX

OUT = Path(__file__).parent / "data" / "pgoutput_session.json"
TABLE_DDL = """
CREATE TABLE kinds (
    id bigint PRIMARY KEY,
    amount numeric,
    ratio float8,
    active boolean,
    note text,
    doc jsonb,
    tags int[],
    at timestamptz,
    day date,
    raw bytea,
    ref uuid,
    big text
);
ALTER TABLE kinds REPLICA IDENTITY FULL;
CREATE TABLE other (id int PRIMARY KEY);
CREATE PUBLICATION rec FOR TABLE kinds;
"""
CONTEXT = {"actor": {"type": "user", "id": "u-1", "name": "Zoë"}, "reason": "recorded"}
#: One statement list per transaction; the first is rolled back (it must not appear).
SESSION = [
    ["INSERT INTO kinds (id) VALUES (99)", "ROLLBACK"],
    [
        f"SELECT pg_logical_emit_message(true, '{CONTEXT_PREFIX}', '{json.dumps(CONTEXT)}')",
        "INSERT INTO kinds VALUES (1, 12345678901234567890.125, 0.5, true,"
        " E'quote '' and \"double\", line\\nbreak, tab\\t, unicode Zoë ✓',"
        " '{\"b\": [1, 2], \"a\": null}', '{1,NULL,3}', '2026-12-01 10:00:00.123456+00',"
        " '2026-12-01', '\\x00ff10', '0f8fad5b-d9cb-469f-a165-70867728950e',"
        " (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 400) i))",
        "COMMIT",
    ],
    ["UPDATE kinds SET amount = amount + 1, note = NULL WHERE id = 1", "COMMIT"],
    [
        "SELECT pg_logical_emit_message(true, 'someone.else', 'not ours')",
        "SELECT pg_logical_emit_message(false, 'audit_platform.context.v1', '{}')",
        "INSERT INTO other VALUES (7)",
        "INSERT INTO kinds (id, ratio) VALUES (2, 'NaN')",
        "DELETE FROM kinds WHERE id = 2",
        "COMMIT",
    ],
    ["TRUNCATE kinds", "COMMIT"],
]


def record(admin_url: str) -> dict:
    name = f"pgoutput_{uuid.uuid4().hex[:8]}"
    slot = f"rec_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = psycopg.conninfo.make_conninfo(admin_url, dbname=name)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(TABLE_DDL)
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
            for statements in SESSION:
                conn.execute("BEGIN")
                for statement in statements[:-1]:
                    conn.execute(statement)
                conn.execute(statements[-1])
            conn.execute("SET TimeZone = 'UTC'")  # the type output functions' zone
            rows = conn.execute(
                "SELECT data FROM pg_logical_slot_get_binary_changes(%s, NULL, NULL,"
                " 'proto_version', '1', 'publication_names', 'rec', 'messages', 'true')",
                (slot,),
            ).fetchall()
            oids = conn.execute(
                "SELECT a.atttypid::bigint, format_type(a.atttypid, NULL) FROM pg_attribute a"
                " WHERE a.attrelid = 'kinds'::regclass AND a.attnum > 0"
            ).fetchall()
            version = conn.execute("SHOW server_version_num").fetchone()
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
    return {
        "server_version_num": int(version[0]) if version else 0,
        "types": {str(oid): type_name for oid, type_name in oids},
        "primary_keys": {"public.kinds": ["id"]},
        "messages": [bytes(row[0]).hex() for row in rows],
    }


if __name__ == "__main__":
    session = record(os.environ["AUDIT_PG_URL"])
    OUT.write_text(json.dumps(session, indent=1) + "\n")
    print(f"{len(session['messages'])} messages written to {OUT}")
