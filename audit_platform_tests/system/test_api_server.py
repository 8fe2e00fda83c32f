"""The Audit API as it runs in production: `audit-platform api serve` in its own process.

Two promises need the real server rather than an in-process client: an export of a result far
larger than a page streams in bounded memory (measured on the server process), and Schemathesis,
generating requests from the OpenAPI document, finds no server error, with a key of each role,
and no answer outside the scope of a narrow key (``schemathesis_scope.py``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest

from audit_platform import platform_db
from audit_platform.api_keys import create_key
from audit_platform.capture.gaps import Gap, record_gap
from audit_platform.settings import Settings
from audit_platform_dev.demo.run import first_record_seconds
from audit_platform_tests.capture_support import capture_enrich_index, make_source
from audit_platform_tests.conftest import new_database
from audit_platform_tests.helpers import policy_for, serving_api

ROWS = 100_000
#: Rows of a table the narrow key may not read, written in the orders' transaction.
SECRET_ROWS = 3
#: Rows of a multi-tenant table, half of each organization; the organization key reads acme's.
TENANT_ROWS = 20
GLOBEX_ONLY = "globex_only_value"


@dataclass
class Server:
    url: str
    env: str
    key: str
    #: reader, auditor, admin; narrow: one source, one table (auditor); organization: acme's
    #: records (auditor)
    keys: dict[str, str]
    process: subprocess.Popen
    log: Path

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM in /proc status")


@pytest.fixture(scope="module")
def server(servers, es, tmp_path_factory) -> Iterator[Server]:
    """A served API of an environment holding 100,000 records from a real capture."""
    env = f"srv_{uuid.uuid4().hex[:8]}"
    with new_database(servers) as url:
        source = make_source(
            url,
            tmp_path_factory.mktemp("srv"),
            "CREATE TABLE orders (id int PRIMARY KEY, status text, note text);"
            "ALTER TABLE orders REPLICA IDENTITY FULL;"
            "CREATE TABLE payroll_secret (id int PRIMARY KEY, amount int);"
            "CREATE TABLE accounts (id int PRIMARY KEY, org text, note text);",
            policy_for(
                "shop",
                public__orders={},
                public__payroll_secret={},
                public__accounts={"organization": "org"},
            ),
            env=env,
        )
        with psycopg.connect(url) as conn:
            conn.execute(
                "SELECT audit.set_context(%s::jsonb)",
                ('{"actor": {"type": "job", "id": "import"}}',),
            )
            conn.execute(
                "INSERT INTO orders SELECT i, 'new', repeat('x', 200) || i"
                " FROM generate_series(1, %s) AS i",
                (ROWS,),
            )
            conn.execute(
                "INSERT INTO payroll_secret SELECT i, i FROM generate_series(1, %s) i",
                (SECRET_ROWS,),
            )
        with psycopg.connect(url) as conn:  # one transaction, for acme, touching both tenants
            conn.execute(
                "SELECT audit.set_context(%s::jsonb)",
                ('{"actor": {"type": "user", "id": "ada"}, "organization": {"id": "acme"}}',),
            )
            conn.execute(
                "INSERT INTO accounts SELECT i, CASE WHEN i %% 2 = 0 THEN 'acme' ELSE 'globex' END,"
                " CASE WHEN i %% 2 = 0 THEN 'acme note' ELSE %s END"
                " FROM generate_series(1, %s) AS i",
                (GLOBEX_ONLY, TENANT_ROWS),
            )
        with psycopg.connect(servers.pg_url, autocommit=True) as state:
            platform_db.install(state, Settings().resources_dir / "sql")
            assert capture_enrich_index(source, state, es) == ROWS + SECRET_ROWS + TENANT_ROWS
            keys = {
                role: create_key(state, env, role, role=role).secret
                for role in ("reader", "auditor", "admin")
            }
            keys["narrow"] = create_key(
                state, env, "narrow", sources=["shop"], tables=["public.orders"], role="auditor"
            ).secret
            keys["organization"] = create_key(
                state, env, "acme", organizations=["acme"], role="auditor"
            ).secret
            # A source the narrow key may not read, known to the environment by its gap.
            record_gap(
                state,
                Gap(
                    env=env,
                    source="hr_secret",
                    from_lsn=1,
                    to_lsn=2,
                    last_captured_at=None,
                    reason="dropped",
                ),
            )
        log = tmp_path_factory.mktemp("srv-log") / "api.log"
        try:
            with serving_api({**os.environ, "AUDIT_ENV": env}, log) as (base, process):
                yield Server(base, env, keys["reader"], keys, process, log)
        finally:
            for index in es.indices.get(index=f"audit-{env}-*", expand_wildcards="all"):
                es.indices.delete(index=index)
            es.indices.delete_index_template(name=f"audit-{env}")


def test_a_large_export_streams_in_bounded_memory(server):
    before = server.peak_rss_mib()
    lines = size = 0
    headers = {"X-API-Key": server.key}
    with httpx.stream("GET", f"{server.url}/v1/export", headers=headers, timeout=300) as reply:
        assert reply.status_code == 200
        for chunk in reply.iter_bytes():
            lines += chunk.count(b"\n")
            size += len(chunk)
    growth = server.peak_rss_mib() - before
    assert lines == ROWS + SECRET_ROWS + TENANT_ROWS
    exported_mib = size / 2**20
    # Holding the result would cost several times its size in Python objects; a page of 1,000
    # records costs a few MiB. The bound leaves room for allocator noise, not for the result.
    assert growth < exported_mib / 3, (growth, exported_mib)
    print(f"exported {exported_mib:.0f} MiB; server peak RSS grew {growth:.1f} MiB")


def _key_id(key: str) -> str:
    return key.split("_")[1]


def schemathesis(
    server: Server, key: str, scope: dict, examples: int, phases: str, report: Path
) -> str:
    """One Schemathesis run with ``key``: no server error, nothing outside ``scope``."""
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{server.url}/openapi.json",
        "--checks",
        "not_a_server_error,within_the_keys_scope",
        "--header",
        f"X-API-Key: {server.keys[key]}",
        "--max-examples",
        str(examples),
        "--phases",
        phases,
        "--seed",
        "20261126",
        "--request-timeout",
        "30",
    ]
    hooks = Path(__file__).parents[1] / "schemathesis_scope.py"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(hooks), "AUDIT_TEST_SCOPE": json.dumps(scope)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    report.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, key + result.stdout[-6000:] + result.stderr[-2000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", result.stdout)
    assert generated and generated[1] == generated[2], result.stdout
    return generated[1]


#: Examples per operation and phases, per key. The admin key (every operation answers) and the
#: narrow one (whose answers the scope check can catch) get every phase; the reader and the
#: auditor differ from the admin only in which operations refuse them, so a quick pass each.
RUNS = {
    "admin": (10, "examples,coverage,fuzzing,stateful"),
    "narrow": (20, "examples,coverage,fuzzing,stateful"),
    "organization": (10, "examples,coverage,fuzzing,stateful"),
    "auditor": (5, "examples,fuzzing"),
    "reader": (5, "examples,fuzzing"),
}


def test_schemathesis_finds_no_server_error_nor_an_answer_outside_the_keys_scope(server, tmp_path):
    """Requests generated from the OpenAPI document (valid and invalid ones), with a key of
    each role and a narrow one, never get a 5xx, and the narrow key never gets a record, name,
    count or read from outside its one source and table; nor the organization key from
    outside acme's records."""
    whole = {"env": server.env, "sources": None, "tables": None, "readers": None, "hidden": []}
    organization = {
        "env": server.env,
        "sources": None,
        "tables": None,
        "organizations": ["acme"],
        "readers": [_key_id(server.keys["organization"])],
        "hidden": [
            GLOBEX_ONLY,
            "globex",
            *(_key_id(k) for name, k in server.keys.items() if name != "organization"),
        ],
    }
    narrow = {
        "env": server.env,
        "sources": ["shop"],
        "tables": ["public.orders"],
        "readers": [_key_id(server.keys["narrow"])],
        "hidden": [
            "payroll_secret",
            "hr_secret",
            *(_key_id(k) for name, k in server.keys.items() if name != "narrow"),
        ],
    }
    for key, (examples, phases) in RUNS.items():
        scope = {"narrow": narrow, "organization": organization}.get(key, whole)
        report = tmp_path / f"{key}.txt"
        generated = schemathesis(server, key, scope, examples, phases, report)
        assert int(generated) > 10 * examples, (key, generated)
    # A failure after the status line (a streamed export) reaches no client as a 5xx: the
    # server's own log must not have one either.
    log = server.log.read_text().splitlines()
    errors = [i for i, line in enumerate(log) if "Exception in ASGI application" in line]
    assert errors == [], "\n".join(line[:300] for line in log[errors[0] : errors[0] + 60])


def test_the_demos_first_records_check_ignores_records_from_before_it_started(server):
    # After a restart the demo must see capture run again, not the last demo's records.
    started = time.monotonic()
    assert (
        first_record_seconds(server.url, server.key, started, timeout=3, since=datetime.now(UTC))
        is None
    )
    earlier = datetime.now(UTC) - timedelta(hours=1)
    assert first_record_seconds(server.url, server.key, started, timeout=30, since=earlier) >= 0
