"""The fault matrix: the deployed pipeline heals itself after each fault, with no person involved.

Through the real deployment (Dagster webserver, daemon and sensors, the Audit API) on servers of
this module's own, so they can be killed, paused and restarted: a writer commits orders at a
steady rate throughout, and a classic trigger-based audit table in the same database records
every row change independently (the platform never reads it). One fault at a time:

- the run worker SIGKILLed while its capture step holds the slot;
- the Dagster daemon SIGKILLed (with its code server), then started again;
- Elasticsearch paused (SIGSTOP) for 20 s, then resumed;
- Elasticsearch stopped for longer than a run's step retries last, then started again;
- PostgreSQL restarted with ``-m immediate`` under the write load.

After each, the test waits until the API returns every change the trigger table holds and
reports how long that took after the fault ended. At the end every record is compared value by
value with the trigger table: nothing missing, nothing twice, nothing altered.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
import yaml

from audit_platform.api_keys import create_key
from audit_platform.naming import slot_name
from audit_platform_dev.demo.run import prepare_shop
from audit_platform_dev.stack import elasticsearch, postgres
from audit_platform_dev.stack.deployment import LocalDeployment
from audit_platform_dev.stack.system import free_port
from audit_platform_tests.helpers import (
    SUMMARY,
    environment_resources,
    ground_truth,
    ground_truth_ddl,
    processes_with_environ,
    record_tuple,
)

pytestmark = pytest.mark.slow

#: What a fault may take to heal before the test fails (run monitoring alone polls every 30 s).
HEAL_TIMEOUT = 300


@dataclass
class Writer:
    """Commits an order (and now and then a status change of an earlier one) ~20 times a
    second, each with its context; a lost connection is retried, as a service would."""

    url: str
    customer: int
    stop: threading.Event = field(default_factory=threading.Event)
    committed: int = 0
    reconnects: int = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with psycopg.connect(self.url, connect_timeout=3) as conn:
                    while not self.stop.is_set():
                        self._transaction(conn)
                        time.sleep(0.05)
            except psycopg.OperationalError:
                self.reconnects += 1
                time.sleep(0.5)

    def _transaction(self, conn: psycopg.Connection) -> None:
        n = self.committed
        conn.execute(
            "SELECT audit.set_context(%s::jsonb)",
            (json.dumps({"actor": {"type": "user", "id": f"u{n % 7}"}, "request_id": f"r{n}"}),),
        )
        conn.execute(
            "INSERT INTO orders (customer_id, total) VALUES (%s, %s)", (self.customer, n % 1000)
        )
        if n % 5 == 0:
            conn.execute(
                "UPDATE orders SET status = 'paid' WHERE id = (SELECT min(id) FROM orders"
                " WHERE status = 'new')"
            )
        conn.commit()
        self.committed += 1


@dataclass
class Matrix:
    deployment: LocalDeployment
    shop_url: str
    key: str
    pg: postgres.LocalPostgres
    es: elasticsearch.LocalElasticsearch
    writer: Writer
    since: str = field(default_factory=lambda: (datetime.now(UTC) - timedelta(hours=2)).isoformat())

    def truth(self) -> list[tuple]:
        return ground_truth(self.shop_url)

    def records(self) -> list[dict]:
        reply = httpx.get(
            f"{self.deployment.api_url}/v1/export",
            params={"table": "orders", "since": self.since},
            headers={"X-API-Key": self.key},
            timeout=60,
        )
        reply.raise_for_status()
        return [json.loads(line) for line in reply.text.splitlines()]

    def indexed(self) -> list[tuple]:
        return sorted(record_tuple(r) for r in self.records())

    def heal(self) -> float:
        """Seconds until the API returns every change committed up to now (the writer goes
        on), compared by xid, operation and values."""
        started = time.monotonic()
        target = self.truth()
        while time.monotonic() - started < HEAL_TIMEOUT:
            try:
                found = set(self.indexed())
                if all(t in found for t in target):
                    return time.monotonic() - started
            except (httpx.HTTPError, psycopg.OperationalError):
                pass
            time.sleep(1)
        raise AssertionError(f"not healed within {HEAL_TIMEOUT} s; logs: {self.deployment.logs}")

    def wait_for_capture_step(self) -> None:
        """Until a capture run holds the slot (its capture step is reading)."""
        slot = slot_name(self.deployment.env, "shop")
        deadline = time.monotonic() + 120
        with psycopg.connect(self.shop_url, autocommit=True) as conn:
            while time.monotonic() < deadline:
                active = conn.execute(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)
                ).fetchone()[0]
                if active is not None:
                    return
                time.sleep(0.01)
        raise AssertionError("no capture run read the slot within 120 s")

    def run_workers(self) -> list[int]:
        home = str(self.deployment.root / "dagster_home")
        return [
            pid
            for pid in processes_with_environ(f"DAGSTER_HOME={home}")
            if b"spawn_main" in _cmdline(pid)
        ]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> Iterator[Matrix]:
    root = tmp_path_factory.mktemp("faults")
    stack_dir = root / "stack"
    stack_dir.mkdir()
    pg = postgres.LocalPostgres(stack_dir, free_port())
    es = elasticsearch.LocalElasticsearch(stack_dir, free_port(), free_port(), "512m")
    pg_record, _ = pg.up()
    try:
        es_record, _ = es.up()
        exports = {**pg_record.env, **es_record.env}
        env = f"faults_{uuid.uuid4().hex[:6]}"
        # The live run reports every 5 s and is presumed dead after 20 s without; step retries
        # (backfill, reconciliation) short enough that a 40 s outage outlasts them.
        resources = environment_resources(
            root,
            env,
            yaml.safe_dump(
                {
                    "sources": {"shop": {"url_env": "AUDIT_SOURCE_SHOP_URL"}},
                    "capture_report_seconds": 5,
                    "capture_stale_seconds": 20,
                    "enrich_grace_minutes": 0,
                    "step_retries": 2,
                    "step_retry_delay_seconds": 2,
                }
            ),
        )
        shop_url = prepare_shop(exports["AUDIT_PG_URL"], env, resources)
        with psycopg.connect(shop_url, autocommit=True) as conn:
            conn.execute(ground_truth_ddl("orders"))
            customer = conn.execute(
                "INSERT INTO customers (name, email, password_hash) VALUES"
                " ('Fault', 'fault@example.com', 'x') RETURNING id"
            ).fetchone()[0]
        deployment = LocalDeployment(
            exports,
            env,
            root / "deployment",
            {"shop": shop_url},
            dagster_port=free_port(),
            api_port=free_port(),
            resources_dir=resources,
        )
        deployment.prepare()
        with psycopg.connect(exports["AUDIT_PG_URL"], autocommit=True) as conn:
            key = create_key(conn, env, "fault matrix").secret
        writer = Writer(shop_url, customer)
        thread = threading.Thread(target=writer.run, daemon=True)
        try:
            deployment.start()
            thread.start()
            yield Matrix(deployment, shop_url, key, pg, es, writer)
        finally:
            writer.stop.set()
            thread.join(timeout=10)
            deployment.stop()
    finally:
        es.down()
        pg.down()


def test_each_fault_heals_by_itself_and_the_trail_matches_the_trigger_table(matrix):
    report = SUMMARY.setdefault("fault matrix (recovery without a person)", [])
    first = matrix.heal()
    report.append(f"steady state: first records searchable after {first:.0f} s")

    def fault(name: str, action) -> None:
        started = time.monotonic()
        action()
        outage = time.monotonic() - started
        healed = matrix.heal()
        report.append(f"{name}: fault lasted {outage:.0f} s, healed {healed:.0f} s after it ended")

    def kill_run_worker() -> None:
        # A run can finish between seeing its slot held and finding its process: try again.
        for _ in range(10):
            matrix.wait_for_capture_step()
            if workers := matrix.run_workers():
                for pid in workers:
                    os.kill(pid, signal.SIGKILL)
                return
        raise AssertionError("capture runs held the slot but no run worker was found")

    def kill_daemon() -> None:
        matrix.deployment.kill("dagster-daemon")
        time.sleep(10)
        matrix.deployment.restart("dagster-daemon")

    def pause_elasticsearch() -> None:
        pid = matrix.es.record().pid
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(20)
        finally:
            os.kill(pid, signal.SIGCONT)

    def stop_elasticsearch() -> None:
        matrix.es.down()
        time.sleep(40)
        matrix.es.up()

    def restart_postgres() -> None:
        record = matrix.pg.record()
        done = matrix.pg.run_as.run(
            [
                str(postgres.ensure_installed() / "pg_ctl"),
                "-D",
                record.marker,
                "-m",
                "immediate",
                "-l",
                str(record.log),
                "-w",
                "restart",
            ]
        )
        assert done.returncode == 0, done.stderr

    fault("run worker SIGKILLed mid-capture", kill_run_worker)
    fault("daemon SIGKILLed, restarted 10 s later", kill_daemon)
    fault("Elasticsearch paused 20 s", pause_elasticsearch)
    fault("Elasticsearch stopped 40 s (longer than step retries)", stop_elasticsearch)
    fault("PostgreSQL restarted -m immediate under load", restart_postgres)

    matrix.writer.stop.set()
    time.sleep(1)
    settled = matrix.heal()
    truth, indexed = matrix.truth(), matrix.indexed()
    ids = [r["id"] for r in matrix.records()]
    report.append(
        f"end: {len(truth)} changes in the trigger table, {len(indexed)} records, "
        f"{len(ids) - len(set(ids))} duplicate ids, writer reconnects "
        f"{matrix.writer.reconnects}, settled {settled:.0f} s after the last write"
    )
    assert len(ids) == len(set(ids))
    assert indexed == truth  # nothing missing, nothing twice, nothing altered
    assert matrix.writer.reconnects >= 1  # the PostgreSQL restart really cut connections
    # The trail came through the faults whole: one log, in commit order, signed and chained.
    verified = subprocess.run(
        [str(Path(sys.executable).with_name("audit-platform")), "verify", "--json"],
        env=matrix.deployment.environ(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    result = json.loads(verified.stdout.splitlines()[0])
    report.append(
        f"verify: {result['counts']}, {result['log_size']} leaves, "
        f"{result['checkpoints']} checkpoints, exit {verified.returncode}"
    )
    assert verified.returncode == 0 and result["ok"], verified.stdout[:2000] + verified.stderr
    assert result["documents"] >= len(truth) and result["checkpoints"] >= 1
