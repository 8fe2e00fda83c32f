"""A real PostgreSQL server from Debian's packages, with logical decoding, on loopback.

The data directory belongs to this checkout (see ``server_home``), the server listens only on
127.0.0.1 with password authentication, and Unix sockets are off so nothing outside the
configured port can reach it.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from urllib.parse import quote

import psycopg

from audit_platform_dev.stack.records import LocalServer, ServerRecord, stack_secret
from audit_platform_dev.stack.system import (
    RunAs,
    StackError,
    ensure_debian_packages,
    ensure_port_free,
    log_tail,
    pid_matches,
    server_home,
    wait_until,
)

NAME = "postgres"
MIN_MAJOR = 14

SERVER_CONF = """\
# Written by audit-platform's local stack; edits are overwritten on `stack up`.
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = ''
wal_level = logical
# Room for benchmarks/idle_sources.py's 200 sources (a slot, a walsender and two connections
# each) next to the tests; an idle slot costs the server a few kilobytes of shared memory.
max_replication_slots = 256
max_wal_senders = 256
max_connections = 600
# Capture must never be the reason a source fills its disk; production sets its own value.
max_slot_wal_keep_size = '2GB'
timezone = 'UTC'
log_timezone = 'UTC'
"""


def find_bindir() -> Path | None:
    """The newest installed server's bin folder (Debian lays them out per major version)."""
    root = Path("/usr/lib/postgresql")
    majors = sorted(
        (int(p.name) for p in root.glob("*") if p.name.isdigit() and (p / "bin/postgres").exists()),
        reverse=True,
    )
    majors = [m for m in majors if m >= MIN_MAJOR]
    return root / str(majors[0]) / "bin" if majors else None


def ensure_installed() -> Path:
    bindir = find_bindir()
    if bindir is None:
        ensure_debian_packages(
            ["postgresql", "postgresql-contrib"], why=f"PostgreSQL {MIN_MAJOR} or newer"
        )
        bindir = find_bindir()
    if bindir is None:
        raise StackError(
            "PostgreSQL packages were installed but no server binary was found under "
            "/usr/lib/postgresql/*/bin/postgres; check `dpkg -L postgresql-15`"
        )
    return bindir


class LocalPostgres(LocalServer):
    """Start, reuse and stop one PostgreSQL server for this checkout."""

    NAME = NAME
    # SIGINT is PostgreSQL's "fast" shutdown: roll back sessions, checkpoint, exit cleanly.
    STOP_SIGNAL = signal.SIGINT

    def __init__(self, stack_dir: Path, port: int, overrides: dict[str, str] | None = None) -> None:
        self.stack_dir = stack_dir
        self.port = port
        #: Extra server settings, e.g. a test that needs a server without logical decoding.
        self.overrides = overrides or {}
        self.run_as = RunAs.service("postgres")

    def record(self) -> ServerRecord | None:
        record = ServerRecord.load(self.stack_dir, NAME)
        if record is None or pid_matches(record.pid, record.marker):
            return record
        # Restarted outside the stack (pg_ctl restart, a crash and a service manager): the
        # same data directory under a new postmaster is still this checkout's server.
        if (pid := _postmaster_pid(Path(record.marker))) and pid_matches(pid, record.marker):
            record = record.model_copy(update={"pid": pid})
            record.save(self.stack_dir)
            return record
        record.forget(self.stack_dir)
        return None

    def up(self) -> tuple[ServerRecord, bool]:
        """Return the running server's record, and whether this call started it."""
        if (record := self.record()) is not None:
            return record, False
        ensure_port_free(self.port, what="PostgreSQL", variable="AUDIT_STACK_PG_PORT")
        bindir = ensure_installed()
        home = server_home(self.stack_dir, NAME, self.run_as)
        data, log = home / "data", home / "postgres.log"
        password = self._password()
        if not (data / "PG_VERSION").exists():
            self._initdb(bindir, home, data, password)
        conf = SERVER_CONF.format(port=self.port)
        conf += "".join(f"{key} = {value}\n" for key, value in self.overrides.items())
        (data / "audit_platform.conf").write_text(conf)
        self.run_as.chown_tree(data)
        started = self.run_as.run(
            [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "120", "start"]
        )
        if started.returncode != 0:
            raise StackError(
                f"PostgreSQL did not start (pg_ctl exit {started.returncode}): "
                f"{started.stdout.strip()} {started.stderr.strip()}\nLog tail ({log}):\n"
                f"{log_tail(log)}"
            )
        pid = _postmaster_pid(data)
        assert pid is not None, "pg_ctl -w returned before postmaster.pid was written"
        url = f"postgresql://postgres:{quote(password, safe='')}@127.0.0.1:{self.port}/postgres"
        wait_until(lambda: _answers(url), timeout=60, what="PostgreSQL to answer SQL")
        record = ServerRecord(
            name=NAME,
            pid=pid,
            marker=str(data),
            home=home,
            log=log,
            url=url,
            env={"AUDIT_PG_URL": url},
        )
        record.save(self.stack_dir)
        return record, True

    def _password(self) -> str:
        return stack_secret(self.stack_dir, "postgres.secret")

    def _initdb(self, bindir: Path, home: Path, data: Path, password: str) -> None:
        pwfile = home / "initdb.pw"
        pwfile.write_text(password)
        os.chmod(pwfile, 0o600)
        self.run_as.chown_tree(home)
        try:
            done = self.run_as.run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ]
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            raise StackError(f"initdb failed (exit {done.returncode}): {done.stderr.strip()}")
        conf = data / "postgresql.conf"
        conf.write_text(conf.read_text() + "\ninclude_if_exists = 'audit_platform.conf'\n")


def _postmaster_pid(data: Path) -> int | None:
    try:
        return int((data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


def describe(url: str) -> str:
    """One line for `stack status`: version and whether logical decoding is on."""
    with psycopg.connect(url, connect_timeout=5) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        level = conn.execute("SHOW wal_level").fetchone()
    assert version is not None and level is not None  # SHOW always answers with one row
    return f"PostgreSQL {version[0]}, wal_level={level[0]}"
