"""The Audit API as it runs in production: `audit-platform api serve` in its own process.

Two promises need the real server rather than an in-process client: an export of a result far
larger than a page streams in bounded memory (measured on the server process), and Schemathesis,
generating requests from the OpenAPI document, finds no server error.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest

from audit_platform import platform_db
from audit_platform.api_keys import create_key
from audit_platform.settings import Settings
from audit_platform.stack.system import free_port
from audit_platform_tests.capture_support import capture_enrich_index, make_source
from audit_platform_tests.conftest import new_database
from audit_platform_tests.helpers import policy_for

ROWS = 100_000


@dataclass
class Server:
    url: str
    key: str
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
            url, tmp_path_factory.mktemp("srv"),
            "CREATE TABLE orders (id int PRIMARY KEY, status text, note text);"
            "ALTER TABLE orders REPLICA IDENTITY FULL;",
            policy_for("shop", public__orders={}), env=env,
        )  # fmt: skip
        with psycopg.connect(url) as conn:
            conn.execute("SELECT audit.set_context(%s::jsonb)",
                         ('{"actor": {"type": "job", "id": "import"}}',))  # fmt: skip
            conn.execute(
                "INSERT INTO orders SELECT i, 'new', repeat('x', 200) || i"
                " FROM generate_series(1, %s) AS i", (ROWS,),
            )  # fmt: skip
        with psycopg.connect(servers.pg_url, autocommit=True) as state:
            platform_db.install(state, Settings().resources_dir / "sql")
            assert capture_enrich_index(source, state, es) == ROWS
            key = create_key(state, env, "server tests").secret
        port = free_port()
        command = [str(Path(sys.executable).with_name("audit-platform")), "api", "serve", "--port",
                   str(port)]  # fmt: skip
        # Its log goes to a file: a pipe nobody reads fills up (64 KB of access log lines,
        # a few thousand requests) and then blocks the server in the middle of a request.
        log = tmp_path_factory.mktemp("srv-log") / "api.log"
        with log.open("wb") as out:
            process = subprocess.Popen(command, env={**os.environ, "AUDIT_ENV": env},
                                       stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the API did not start: {log.read_text()[-3000:]}")
                time.sleep(0.3)
            yield Server(base, key, process, log)
        finally:
            process.terminate()
            process.wait(timeout=30)
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
    assert lines == ROWS
    exported_mib = size / 2**20
    # Holding the result would cost several times its size in Python objects; a page of 1,000
    # records costs a few MiB. The bound leaves room for allocator noise, not for the result.
    assert growth < exported_mib / 3, (growth, exported_mib)
    print(f"exported {exported_mib:.0f} MiB; server peak RSS grew {growth:.1f} MiB")


def test_schemathesis_finds_no_server_error(server, tmp_path):
    """Requests generated from the OpenAPI document (valid and invalid ones) never get a 5xx."""
    report = tmp_path / "schemathesis.txt"
    command = [
        str(Path(sys.executable).with_name("schemathesis")), "run", f"{server.url}/openapi.json",
        "--checks", "not_a_server_error", "--header", f"X-API-Key: {server.key}",
        "--max-examples", "25", "--seed", "20261126", "--request-timeout", "30",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    report.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", result.stdout)
    assert generated and generated[1] == generated[2] and int(generated[1]) > 500, result.stdout
    # A failure after the status line (a streamed export) reaches no client as a 5xx: the
    # server's own log must not have one either.
    log = server.log.read_text().splitlines()
    errors = [i for i, line in enumerate(log) if "Exception in ASGI application" in line]
    assert errors == [], "\n".join(line[:300] for line in log[errors[0] : errors[0] + 60])
