"""`audit-platform stack`: idempotent start, stop by PID, and failures that say what to do."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from audit_platform.settings import Settings
from audit_platform.staging import StagingStore
from audit_platform_dev.stack import LocalStack, StackError, StackSettings, elasticsearch, postgres
from audit_platform_dev.stack.system import ensure_memory, ensure_port_free, free_port, pid_alive


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and pid_alive(int(proc.name)):
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_second_up_reuses_the_servers_and_down_leaves_no_process(tmp_path):
    settings = Settings(pg_url=None, es_url=None, s3_url=None)
    ports = StackSettings(
        dir=tmp_path / "stack",
        pg_port=free_port(),
        es_port=free_port(),
        es_transport_port=free_port(),
        es_heap="512m",
        s3_port=free_port(),
    )
    stack = LocalStack(settings, ports)
    try:
        first = stack.up()
        assert [(s.name, s.source) for s in first] == [
            ("postgres", "started"),
            ("elasticsearch", "started"),
            ("s3", "started"),
        ]
        records = {
            "pg": stack.postgres.record(),
            "es": stack.elasticsearch.record(),
            "s3": stack.s3.record(),
        }
        pids = {name: record.pid for name, record in records.items()}

        second = LocalStack(settings, ports).up()
        assert [(s.name, s.source) for s in second] == [
            ("postgres", "reused"),
            ("elasticsearch", "reused"),
            ("s3", "reused"),
        ]
        assert {
            "pg": stack.postgres.record().pid,
            "es": stack.elasticsearch.record().pid,
            "s3": stack.s3.record().pid,
        } == pids
        with psycopg.connect(stack.env()["AUDIT_PG_URL"]) as conn:
            assert conn.execute("SHOW port").fetchone()[0] == str(ports.pg_port)
        # Right after `up`, status finds all (it once cached "no Elasticsearch" too early).
        assert [s.detail.split()[0] for s in LocalStack(settings, ports).status()] == [
            "PostgreSQL",
            "Elasticsearch",
            "S3Proxy",
        ]
        # The S3 server is real: a file staged through it reads back.
        with pytest.MonkeyPatch.context() as patch:
            for key, value in stack.env().items():
                patch.setenv(key, value)
            store = StagingStore(stack.env()["AUDIT_S3_URL"] + "/lifecycle", "dev", "shop")
            try:
                store.write_json(f"{store.base}/probe.json", {"ok": 1})
                assert store.read_json(f"{store.base}/probe.json") == {"ok": 1}
            finally:
                # fsspec keeps one S3 client per set of options, with the endpoint it was made
                # for: later tests must not get this short-lived server's.
                type(store.fs).clear_instance_cache()

        # PostgreSQL restarted outside the stack: a new postmaster on the same data directory
        # is still ours, so status reports it and down stops it.
        data = Path(records["pg"].marker)
        restarted = stack.postgres.run_as.run(
            [
                str(postgres.ensure_installed() / "pg_ctl"),
                "-D",
                str(data),
                "-m",
                "immediate",
                "-l",
                str(records["pg"].log),
                "-w",
                "restart",
            ]
        )
        assert restarted.returncode == 0, restarted.stderr
        new_pid = LocalStack(settings, ports).postgres.record().pid
        assert new_pid != pids["pg"]
        assert LocalStack(settings, ports).status()[0].detail.startswith("PostgreSQL")
        pids["pg-restarted"] = new_pid
    finally:
        stopped = stack.down()
    assert [(s.name, s.source) for s in stopped] == [
        ("elasticsearch", "stopped"),
        ("s3", "stopped"),
        ("postgres", "stopped"),
    ]
    assert not any(pid_alive(pid) for pid in pids.values())
    for record in records.values():
        assert _processes_mentioning(str(record.home)) == []
    assert [s.source for s in LocalStack(settings, ports).down()] == ["not running"] * 3


def test_down_never_signals_a_process_it_did_not_start(tmp_path):
    """A stale record whose PID now belongs to someone else is forgotten, not killed."""
    from audit_platform_dev.stack.records import ServerRecord

    ServerRecord(
        name="postgres",
        pid=1,  # init: alive, but not our server (its command line lacks the marker)
        marker=str(tmp_path / "not-our-data-dir"),
        home=tmp_path,
        log=tmp_path / "log",
        url="postgresql://x",
        env={},
    ).save(tmp_path)
    assert postgres.LocalPostgres(tmp_path, free_port()).down() is False
    assert pid_alive(1)
    assert not (tmp_path / "postgres.json").exists()


def test_taken_port_is_reported_with_the_variable_to_change(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(StackError, match=rf"Port {port} .*AUDIT_STACK_PG_PORT"):
            postgres.LocalPostgres(tmp_path, port).up()


def test_default_ports_are_outside_the_ephemeral_range():
    """An outgoing connection may take any port of the kernel's ephemeral range as its own
    end; a server's fixed port inside it is then "taken" with no server listening there."""
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    stack = StackSettings()
    ports = {stack.pg_port, stack.es_port, stack.es_transport_port, stack.s3_port}
    assert [port for port in ports if low <= port <= high] == []


def test_taken_port_names_the_listening_process():
    squatter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, time; s = socket.socket(); "
            "s.bind(('127.0.0.1', 0)); s.listen(); print(s.getsockname()[1], flush=True); "
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(squatter.stdout.readline())
        with pytest.raises(StackError) as raised:
            ensure_port_free(port, what="Elasticsearch HTTP", variable="AUDIT_STACK_ES_PORT")
        message = str(raised.value)
        assert f"pid {squatter.pid} ({sys.executable} -c import socket" in message, message
        assert "listening" in message and "AUDIT_STACK_ES_PORT" in message, message
    finally:
        squatter.kill()
        squatter.wait()


def test_a_port_held_by_an_outgoing_connection_names_it():
    """What refused to restart Elasticsearch: no server listened on its port, but a client's
    connection elsewhere had been given it as its local end."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        listening = server.getsockname()[1]
        with socket.create_connection(server.getsockname()) as client:
            port = client.getsockname()[1]
            with pytest.raises(StackError) as raised:
                ensure_port_free(port, what="S3 (S3Proxy)", variable="AUDIT_STACK_S3_PORT")
    message = str(raised.value)
    assert f"pid {os.getpid()} (" in message, message
    assert f"connected to 127.0.0.1:{listening}" in message, message


def _fake_jdk(root: Path, name: str, version: str) -> Path:
    home = root / name
    (home / "bin").mkdir(parents=True)
    (home / "bin/java").write_text("")
    (home / "release").write_text(f'JAVA_VERSION="{version}"\n')
    return home


def test_newest_jdk_of_at_least_21_is_chosen(tmp_path):
    _fake_jdk(tmp_path, "java-17", "17.0.15")
    _fake_jdk(tmp_path, "jdk-21", "21.0.5")
    newest = _fake_jdk(tmp_path, "temurin-25", "25.0.3")
    assert elasticsearch.find_java_home(env={}, jvm_root=tmp_path) == newest


def test_missing_jdk_says_which_version_and_variable(tmp_path):
    _fake_jdk(tmp_path, "java-17", "17.0.15")
    with pytest.raises(StackError, match=r"No Java 21 or newer found.*ES_JAVA_HOME"):
        elasticsearch.find_java_home(env={}, jvm_root=tmp_path)


def test_es_java_home_pointing_at_an_old_jdk_is_refused_plainly(tmp_path):
    old = _fake_jdk(tmp_path, "java-17", "17.0.15")
    with pytest.raises(StackError, match=r"ES_JAVA_HOME=.* is not a JDK 21 or newer \(found 17\)"):
        elasticsearch.find_java_home(env={"ES_JAVA_HOME": str(old)}, jvm_root=tmp_path)


def test_too_little_memory_is_reported_with_advice():
    with pytest.raises(StackError, match=r"needs about 1536 MiB and 97 MiB is available\. Lower"):
        ensure_memory(
            1536 * 2**20,
            what="Elasticsearch",
            advice="Lower the heap.",
            meminfo="MemTotal: 1000 kB\nMemAvailable:      100000 kB\n",
        )


def test_maven_failure_names_the_artifact(tmp_path, monkeypatch):
    missing = "org.elasticsearch.distribution.integ-test-zip:elasticsearch:0.0.0-missing:zip"
    monkeypatch.setattr(elasticsearch, "ARTIFACT", missing)
    with pytest.raises(StackError, match=r"Maven could not fetch .*0\.0\.0-missing"):
        elasticsearch.fetch_distribution(tmp_path)
