"""Small helpers shared by tests: reading a slot the simple way, making policies."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest

from audit_platform.policy import SourcePolicy, TablePolicy
from audit_platform.settings import Settings

#: Lines a test wants in the session summary (the fault matrix's recovery times); conftest
#: prints them. Here, not in conftest: pytest may import conftest under another module name.
SUMMARY: dict[str, list[str]] = {}

#: Run a test with staging on a local folder and on object storage (the stack's S3Proxy): the
#: paths where the two differ (durable writes, listings, removal) are exercised on both.
ON_BOTH_STORES = pytest.mark.parametrize("staging_root", ["local", "s3"], indirect=True)

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


#: A table with a column of (nearly) every type, and a row of strange values in text form.
ZOO_DDL = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN positive AS integer CHECK (VALUE > 0);
CREATE TABLE zoo (
    id int PRIMARY KEY,
    i2 smallint, i8 bigint, num numeric, num_scaled numeric(30, 10),
    f4 real, f8 double precision, txt text, vc varchar(20), ch char(3), bin bytea, flag boolean,
    d date, t time, tz timetz, ts timestamp, tstz timestamptz, iv interval, u uuid,
    j json, jb jsonb, arr int[], tarr text[], m mood, p positive, r int4range, tsr tstzrange,
    ip inet, money_col money, bits bit varying(8)
);
ALTER TABLE zoo REPLICA IDENTITY FULL;
"""

ZOO_ROW = {
    "id": "1",
    "i2": "-32768",
    "i8": "9223372036854775807",
    "num": "123456789012345678901234567890.123456789012345678901234567890",
    "num_scaled": "-0.0000000001",
    "f4": "NaN",
    "f8": "-Infinity",
    "txt": "héllo 世界 🎉 \\ \" ' \t newline\n",
    "vc": "",
    "ch": "ab ",
    "bin": "\\x00ff10",
    "flag": "f",
    "d": "infinity",
    "t": "23:59:59.999999",
    "tz": "12:00:00+05:30",
    "ts": "-infinity",
    "tstz": "2026-11-26 10:00:00.123456+00",
    "iv": "1 year 2 mons 3 days 04:05:06.789",
    "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    "j": '{"b": 1,   "a": [1, 2]}',
    "jb": '{"a": [1, 2], "b": 1}',
    "arr": "{1,NULL,3}",
    "tarr": '{"a b","c,d",NULL}',
    "m": "happy",
    "p": "42",
    "r": "[1,10)",
    "tsr": '["2026-01-01 00:00:00+00",infinity)',
    "ip": "192.168.0.1/24",
    "money_col": "$1,234.56",
    "bits": "1011",
}


@dataclass(frozen=True)
class DecodedRow:
    xid: int
    data: str


def context_source(url: str, ddl: str, slot: str) -> str:
    """A database with the audit schema, ``ddl`` applied, and a test_decoding slot to read."""
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


def raw_messages(rows: list[DecodedRow], prefix: str = CONTEXT_PREFIX) -> list[tuple[int, str]]:
    """(xid, content as sent) of each transactional message with ``prefix``."""
    marker = f"message: transactional: 1 prefix: {prefix}, sz: "
    return [(r.xid, r.data.split(" content:", 1)[1]) for r in rows if r.data.startswith(marker)]


def changes(rows: list[DecodedRow], table: str) -> list[tuple[int, str]]:
    return [(r.xid, r.data) for r in rows if r.data.startswith(f"table {table}: ")]


def policy_for(source: str, **tables: dict) -> SourcePolicy:
    return SourcePolicy(
        source=source,
        version=1,
        tables={name.replace("__", "."): TablePolicy(**spec) for name, spec in tables.items()},
    )


# --- an independent ground truth: a classic trigger-based audit table ----------------------


def ground_truth_ddl(table: str) -> str:
    """A ``truth`` table and a trigger on ``table`` recording every row change, in the same
    transaction, with values as the type's output function prints them (``hstore(row)``), as
    logical decoding does. The platform never reads it."""
    return f"""
CREATE EXTENSION IF NOT EXISTS hstore;
CREATE TABLE truth (seq bigserial PRIMARY KEY, xid bigint, op text, before jsonb, after jsonb);
CREATE FUNCTION record_truth() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO truth (xid, op, before, after) VALUES (
        txid_current() % 4294967296, lower(TG_OP),
        CASE WHEN TG_OP <> 'INSERT' THEN hstore_to_jsonb(hstore(OLD)) END,
        CASE WHEN TG_OP <> 'DELETE' THEN hstore_to_jsonb(hstore(NEW)) END);
    RETURN NULL;
END $$;
CREATE TRIGGER {table}_truth AFTER INSERT OR UPDATE OR DELETE ON {table}
    FOR EACH ROW EXECUTE FUNCTION record_truth();
"""


def canonical(image: dict | None) -> str:
    return json.dumps(image, sort_keys=True)


def ground_truth(url: str) -> list[tuple[int, str, str, str]]:
    """Every change the trigger saw as (xid, operation, before, after), sorted: compare with
    the same tuples of the audit records."""
    with psycopg.connect(url, connect_timeout=5) as conn:
        rows = conn.execute("SELECT xid, op, before, after FROM truth").fetchall()
    return sorted((xid, op, canonical(b), canonical(a)) for xid, op, b, a in rows)


def record_tuple(record: dict) -> tuple[int, str, str, str]:
    """An audit record (a document or an API answer) as a :func:`ground_truth` tuple."""
    return (
        record["transaction"]["xid"],
        record["operation"],
        canonical(record["before"]),
        canonical(record["after"]),
    )


def processes_with_environ(text: str) -> list[int]:
    """PIDs (other than this one) whose environment contains ``text``: every process a
    deployment starts inherits its DAGSTER_HOME, code servers and run workers included."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if text.encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@contextmanager
def serving_api(
    env: dict[str, str], log: Path, *args: str
) -> Iterator[tuple[str, subprocess.Popen]]:
    """``audit-platform api serve`` on a free port of 127.0.0.1, until the block ends: its URL
    once ``/readyz`` answers, and its process.

    Its output goes to ``log``: a pipe nobody reads fills up (64 KB of log lines, a few
    thousand requests) and then blocks the server in the middle of a request.
    """
    from audit_platform_dev.stack.system import free_port

    port = free_port()
    serve = [str(Path(sys.executable).with_name("audit-platform")), "api", "serve"]
    command = [*serve, "--host", "127.0.0.1", "--port", str(port), *args]
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the API did not start: {log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url, process
    finally:
        process.terminate()
        process.wait(timeout=30)


def environment_resources(
    tmp_path: Path, env: str, environment_yaml: str = "sources: {}\n"
) -> Path:
    """A copy of the repository's resources with an environment file for ``env``: the command
    line refuses an environment it has no file for (a mistyped ``--env``)."""
    resources = tmp_path / "resources"
    shutil.copytree(Settings().resources_dir, resources)
    (resources / "environments" / f"{env}.yaml").write_text(environment_yaml)
    return resources


def offline(proof: dict, tmp_path: Path, public_key: str) -> subprocess.CompletedProcess:
    """``docs/verify_record.py`` on a proof, as an auditor runs it: no code of the platform."""
    path = tmp_path / "proof.json"
    path.write_text(json.dumps(proof))
    script = Path(__file__).parents[1] / "docs" / "verify_record.py"
    return subprocess.run(
        [sys.executable, str(script), str(path), "--public-key", public_key],
        capture_output=True,
        text=True,
    )
