"""`audit-platform demo` stops everything it started, however it is ended.

The harshest ending a person produces by accident: `make demo | tee demo.log`, then the terminal
closes. The pipe's reader is gone (every print fails) and the demo gets SIGHUP. Afterwards no
process of the demo may remain.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from audit_platform.settings import Settings
from audit_platform_dev.stack import processes
from audit_platform_dev.stack.system import free_port
from audit_platform_tests.helpers import processes_with_environ


def _drop_demo_databases(admin_url: str, env: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as admin:
        for name in (f"shop_{env}", f"dagster_{env}"):
            for (slot,) in admin.execute(
                "SELECT slot_name FROM pg_replication_slots WHERE database = %s", (name,)
            ).fetchall():
                admin.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


#: A leader that starts what Dagster's servers leave behind when the group is signalled and
#: only the leader is waited for: a child that ignores SIGTERM (a busy code server, its
#: multiprocessing workers), a child in a session of its own, and an orphaned grandchild.
TREE = """
import subprocess, sys, time
sleep = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
subprocess.Popen([sys.executable, "-c", sleep])
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.Popen("
                  "[sys.executable, '-c', 'import time; time.sleep(600)'])"])
time.sleep(600)
"""


def test_stopping_a_process_stops_every_process_it_started_at_once(tmp_path):
    marker = f"tree-{uuid.uuid4().hex}"
    tree = processes.start(
        "tree", [sys.executable, "-c", TREE], {**os.environ, "TREE_MARKER": marker}, tmp_path
    )
    try:
        deadline = time.monotonic() + 30
        while len(processes_with_environ(marker)) < 4:  # leader, 2 children, 1 orphan
            assert time.monotonic() < deadline, processes_with_environ(marker)
            time.sleep(0.1)
        started = time.monotonic()
        tree.stop(timeout=2)
        # Nothing is left once stop returns: no grace period for stragglers to go by themselves.
        assert processes_with_environ(marker) == []
        assert time.monotonic() - started < 10
    finally:
        for pid in processes_with_environ(marker):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_closed_output_and_sighup_stop_every_process_the_demo_started(servers, tmp_path):
    env = f"demo_{uuid.uuid4().hex[:8]}"
    resources = tmp_path / "resources"
    shutil.copytree(Settings().resources_dir, resources)
    stack_dir = tmp_path / "stack"
    environ = {
        **os.environ,
        "AUDIT_ENV": env,
        "AUDIT_STACK_DIR": str(stack_dir),
        "AUDIT_RESOURCES_DIR": str(resources),
    }
    ports = [str(free_port()) for _ in range(3)]
    demo = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("audit-platform")),
            "demo",
            "--dagster-port",
            ports[0],
            "--api-port",
            ports[1],
            "--shop-port",
            ports[2],
        ],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    marker = str(stack_dir / "demo" / env)
    try:
        deadline, seen = time.monotonic() + 240, []
        while time.monotonic() < deadline:
            line = demo.stdout.readline().decode()
            seen.append(line)
            if "Waiting for the first audit records" in line or not line:
                break
        assert "Waiting for the first audit records" in "".join(seen), "".join(seen)
        # The Explorer's address, with a link that signs in with the demo's key.
        assert f"http://127.0.0.1:{ports[1]}/ui/login#key=ak_" in "".join(seen)
        started = processes_with_environ(marker)
        assert len(started) >= 4  # shop service, webserver, daemon, API (and code servers)

        demo.stdout.close()  # the reader of the pipe is gone: every later print fails
        demo.send_signal(signal.SIGHUP)
        assert demo.wait(timeout=120) == 0
        # The demo waits for its whole tree before it exits: nothing may be left even a moment
        # after (a code server left to go by itself was still there minutes later).
        assert processes_with_environ(marker) == []
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
        for pid in processes_with_environ(marker):
            os.killpg(pid, signal.SIGKILL)
        _drop_demo_databases(servers.pg_url, env)
