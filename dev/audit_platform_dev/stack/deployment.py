"""One environment's deployment on the local stack: Dagster (webserver and daemon) and the API.

This is what `audit-platform demo` runs, what the end-to-end test starts, and what the freshness
benchmark measures: the same processes a production deployment runs, configured only through
environment variables, with a Dagster instance (storage database and DAGSTER_HOME) of its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
from psycopg import sql

from audit_platform import platform_db
from audit_platform.index import access
from audit_platform.settings import PROJECT_ROOT, Settings
from audit_platform.signing import new_private_key
from audit_platform_dev.stack import processes, setup_es_accounts
from audit_platform_dev.stack.processes import Process
from audit_platform_dev.stack.system import ensure_port_free

LAUNCH_RUN = """
mutation ($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""


def database_url(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` on the same server."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def dagster_storage_url(url: str) -> str:
    """dagster-postgres's SQL needs the psycopg2 driver; SQLAlchemy 2.1 picks psycopg 3 for a
    bare ``postgresql://`` URL, with which every event write fails (``NOTIFY ..., $1``)."""
    scheme, rest = url.split("://", 1)
    return f"postgresql+psycopg2://{rest}" if scheme in {"postgresql", "postgres"} else url


def ensure_database(admin_url: str, name: str) -> str:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not found:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return database_url(admin_url, name)


@dataclass
class LocalDeployment:
    exports: dict[str, str]  # AUDIT_* of the running stack
    env: str
    root: Path  # DAGSTER_HOME, staging and logs live under here
    sources: dict[str, str]  # source name -> libpq URL
    dagster_port: int = 3000
    api_port: int = 8000
    resources_dir: Path | None = None
    mask_key: str = "demo-mask-key-change-me"
    running: list[Process] = field(default_factory=list)
    #: Least-privilege Elasticsearch accounts (``prepare`` makes them): kind -> account.
    es_accounts: dict[str, access.Account] = field(default_factory=dict)

    @property
    def dagster_url(self) -> str:
        return f"http://127.0.0.1:{self.dagster_port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def environ(self) -> dict[str, str]:
        env = {
            **os.environ,
            **self.exports,
            "AUDIT_ENV": self.env,
            "AUDIT_DAGSTER_PG_URL": dagster_storage_url(
                database_url(self.exports["AUDIT_PG_URL"], f"dagster_{self.env}")
            ),
            "AUDIT_STAGING_ROOT": str(self.root / "staging"),
            "AUDIT_MASK_KEY": self.mask_key,
            "AUDIT_SIGNING_KEY": self.signing_key(),
            "AUDIT_API_PORT": str(self.api_port),
            "DAGSTER_HOME": str(self.root / "dagster_home"),
        }
        if self.resources_dir is not None:
            env["AUDIT_RESOURCES_DIR"] = str(self.resources_dir)
        for source, url in self.sources.items():
            env[f"AUDIT_SOURCE_{source.upper()}_URL"] = url
        return env

    def signing_key(self) -> str:
        """This deployment's key for the trail's checkpoints, made once and kept under its
        root (a restarted deployment goes on with the same key, so the chain goes on)."""
        path = self.root / "signing_key"
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(new_private_key())
        return path.read_text().strip()

    def settings(self) -> Settings:
        exports = {k: v for k, v in self.environ().items() if k.startswith("AUDIT_")}
        return Settings(env=self.env).with_exports(exports)

    def prepare(self) -> None:
        """The instance database and DAGSTER_HOME, and the platform's own tables."""
        ensure_database(self.exports["AUDIT_PG_URL"], f"dagster_{self.env}")
        home = self.root / "dagster_home"
        home.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PROJECT_ROOT / "dagster.yaml", home / "dagster.yaml")
        with psycopg.connect(self.exports["AUDIT_PG_URL"], autocommit=True) as conn:
            platform_db.install(conn, self.settings().resources_dir / "sql")
        accounts, _ = setup_es_accounts(self.settings(), self.env)
        self.es_accounts = {account.kind: account for account in accounts}

    def start(self, *, timeout: float = 180) -> None:
        """Webserver, daemon and API; returns when the webserver and the API answer."""
        ensure_port_free(self.dagster_port, what="the Dagster webserver", variable="--dagster-port")
        ensure_port_free(self.api_port, what="the Audit API", variable="--api-port")
        # The instance's tables, made once before the webserver and the daemon start: on an
        # empty database both create them at once otherwise, and the loser exits ("type
        # event_logs already exists"), leaving a deployment without its daemon, so no capture.
        subprocess.run(
            [processes.tool("dagster"), "instance", "migrate"],
            env=self.process_environ("dagster-daemon"),
            check=True,
            capture_output=True,
        )
        for name in self._commands():
            self._spawn(name)
        self.process("dagster-webserver").wait_http(f"{self.dagster_url}/server_info", timeout)
        self.process("audit-api").wait_http(f"{self.api_url}/readyz", timeout)

    def _commands(self) -> dict[str, list[str]]:
        workspace = str(PROJECT_ROOT / "workspace.yaml")
        return {
            "dagster-webserver": [
                processes.tool("dagster-webserver"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.dagster_port),
                "-w",
                workspace,
            ],
            "dagster-daemon": [processes.tool("dagster-daemon"), "run", "-w", workspace],
            "audit-api": [
                processes.tool("audit-platform"),
                "api",
                "serve",
                "--port",
                str(self.api_port),
            ],
        }

    def process_environ(self, name: str) -> dict[str, str]:
        """A process's environment: the API signs in to Elasticsearch as the environment's
        reader, Dagster (webserver, daemon and the runs they launch) as its writer."""
        kind = access.READER if name == "audit-api" else access.WRITER
        account = self.es_accounts.get(kind)
        return {**self.environ(), **(account.exports() if account else {})}

    def _spawn(self, name: str) -> Process:
        process = processes.start(
            name, self._commands()[name], self.process_environ(name), self.logs, PROJECT_ROOT
        )
        self.running.append(process)
        return process

    def process(self, name: str) -> Process:
        return next(p for p in self.running if p.name == name)

    def kill(self, name: str) -> None:
        """SIGKILL a process and everything it started (a crash, for the fault tests)."""
        process = self.process(name)
        process.kill()
        self.running.remove(process)

    def restart(self, name: str) -> Process:
        """Start a process of the deployment again (after :meth:`kill`, or to reload it)."""
        if any(p.name == name for p in self.running):
            process = self.process(name)
            process.stop()
            self.running.remove(process)
        return self._spawn(name)

    def add(self, process: Process) -> None:
        self.running.append(process)

    def stop(self) -> None:
        for process in reversed(self.running):
            process.stop()
        self.running.clear()

    def launch(self, job: str, assets: list[list[str]] | None = None) -> str:
        """Launch a job (or, for ``__ASSET_JOB``, these assets) as the UI's Launch button does;
        returns the run id."""
        selector: dict[str, Any] = {
            "repositoryLocationName": "audit_platform",
            "repositoryName": "__repository__",
            "jobName": job,
        }
        if assets is not None:
            selector["assetSelection"] = [{"path": path} for path in assets]
        result = self.graphql(LAUNCH_RUN, {"params": {"selector": selector}})["launchRun"]
        if result["__typename"] != "LaunchRunSuccess":
            raise RuntimeError(f"Dagster did not launch {job}: {result}")
        return result["run"]["runId"]

    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        """Dagster's own GraphQL interface (what its UI uses)."""
        reply = httpx.post(
            f"{self.dagster_url}/graphql",
            timeout=60,
            json={"query": query, "variables": variables or {}},
        )
        reply.raise_for_status()
        body = reply.json()
        if body.get("errors"):
            raise RuntimeError(f"Dagster GraphQL error: {body['errors']}")
        return body["data"]
