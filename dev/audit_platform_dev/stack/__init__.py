"""Real PostgreSQL, Elasticsearch and S3 for development, tests and the demo, from one place.

Precedence, per server: a URL in the environment (``AUDIT_PG_URL``, ``AUDIT_ES_URL``,
``AUDIT_S3_URL``) is used as is and nothing is started; otherwise the local server of this
checkout is reused if running, or started. ``down`` stops only servers whose PID this
checkout recorded when starting them.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from pydantic import SecretStr

from audit_platform.clients import elasticsearch_client
from audit_platform.index import access
from audit_platform.settings import Settings
from audit_platform_dev.stack import elasticsearch, postgres, s3
from audit_platform_dev.stack.containers import docker_engine_answers, start_containers
from audit_platform_dev.stack.settings import StackSettings
from audit_platform_dev.stack.system import StackError

__all__ = ["LocalStack", "StackError", "StackSettings", "served", "setup_es_accounts"]


@dataclass(frozen=True)
class ServerState:
    name: str
    source: str  # "started", "reused", "external" or "stopped"
    detail: str
    env: dict[str, str]


class LocalStack:
    def __init__(
        self, settings: Settings | None = None, stack: StackSettings | None = None
    ) -> None:
        self.settings = settings or Settings()
        s = self.stack = stack or StackSettings()
        self.postgres = postgres.LocalPostgres(s.dir, s.pg_port)
        self.elasticsearch = elasticsearch.LocalElasticsearch(
            s.dir, s.es_port, s.es_transport_port, s.es_heap
        )
        self.s3 = s3.LocalS3(s.dir, s.s3_port)

    def up(self) -> list[ServerState]:
        states = []
        for server, external, variable in (
            (self.postgres, _secret(self.settings.pg_url), "AUDIT_PG_URL"),
            (self.elasticsearch, self.settings.es_url, "AUDIT_ES_URL"),
            (self.s3, self.settings.s3_url, "AUDIT_S3_URL"),
        ):
            name = server.__module__.rsplit(".", 1)[1]
            if external:
                # Its URL is an export too: callers (the demo) read every URL from one place.
                states.append(
                    ServerState(name, "external", _redacted(external), {variable: external})
                )
                continue
            record, started = server.up()
            detail = f"{_redacted(record.url)} (pid {record.pid}, log {record.log})"
            states.append(ServerState(name, "started" if started else "reused", detail, record.env))
        return states

    def down(self) -> list[ServerState]:
        # Elasticsearch first: it is the slower one and nothing depends on it at shutdown.
        states = []
        for server in (self.elasticsearch, self.s3, self.postgres):
            name = server.__module__.rsplit(".", 1)[1]
            stopped = server.down()
            states.append(ServerState(name, "stopped" if stopped else "not running", "", {}))
        return states

    def status(self) -> list[ServerState]:
        states = []
        pg = _secret(self.settings.pg_url) or ((r := self.postgres.record()) and r.url)
        try:
            detail = postgres.describe(pg) if pg else "not running"
        except Exception as exc:
            detail = f"not answering: {exc}"
        states.append(
            ServerState("postgres", "external" if self.settings.pg_url else "local", detail, {})
        )
        es_conn = self._es_connection()
        try:
            detail = (
                elasticsearch.describe(elasticsearch_client(es_conn, request_timeout=5))
                if es_conn
                else "not running"
            )
        except Exception as exc:
            detail = f"not answering: {exc}"
        states.append(
            ServerState(
                "elasticsearch", "external" if self.settings.es_url else "local", detail, {}
            )
        )
        s3_record = self.s3.record()
        endpoint = (
            os.environ.get("AWS_ENDPOINT_URL_S3")
            if self.settings.s3_url
            else (s3_record and s3_record.url)
        )
        try:
            detail = s3.describe(endpoint) if endpoint else "not running"
        except Exception as exc:
            detail = f"not answering: {exc}"
        origin = "external" if self.settings.s3_url else "local"
        states.append(ServerState("s3", origin, detail, {}))
        return states

    def env(self) -> dict[str, str]:
        """The exports that point every platform process at the running servers."""
        exports: dict[str, str] = {}
        for server in (self.postgres, self.elasticsearch, self.s3):
            if (record := server.record()) is not None:
                exports.update(record.env)
        return exports

    def _es_connection(self):
        if self.settings.elasticsearch is not None:
            return self.settings.elasticsearch
        if self.elasticsearch.record() is None:
            return None
        return self.settings.with_exports(self.env()).elasticsearch


def setup_es_accounts(settings: Settings, env: str) -> tuple[list[access.Account], str]:
    """The environment's writer and reader, and where they were made: in the local stack's file
    realm when the configured cluster is that node (``AUDIT_ES_FILE_REALM``), else through the
    security API."""
    if settings.elasticsearch is not None and settings.es_file_realm is not None:
        accounts = elasticsearch.install_file_realm_accounts(settings, env)
        return accounts, "the local stack's file realm"
    if settings.elasticsearch is None:
        raise StackError(
            "No Elasticsearch: set AUDIT_ES_URL (and a user allowed to manage "
            "security), or start the local stack"
        )
    accounts = access.new_accounts(env)
    access.install_native(elasticsearch_client(settings.elasticsearch), env, accounts)
    return accounts, "the native realm (security API)"


def _redacted(url: str) -> str:
    """A URL for display: the password stays in `stack env`, not in every log line."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


@contextmanager
def served(settings: Settings | None = None) -> Iterator[dict[str, str]]:
    """Servers for the duration of a block: env URLs, containers or the local stack.

    Yields the AUDIT_* exports. Servers this block started are stopped when it ends; servers
    that were already running (or external) are left alone.
    """
    settings = settings or Settings()
    with ExitStack() as cleanup:
        env: dict[str, str] = {}
        need_pg, need_es = not settings.pg_url, not settings.es_url
        backend = StackSettings().backend
        use_docker = backend == "docker" or (
            backend == "auto" and (need_pg or need_es) and docker_engine_answers()
        )
        if use_docker:
            env.update(start_containers(cleanup, need_pg=need_pg, need_es=need_es))
        # What containers serve counts as external; object storage comes from the local stack
        # either way (S3Proxy needs only Java).
        stack = LocalStack(settings.with_exports(env))
        states = stack.up()
        started = {s.name for s in states if s.source == "started"}
        if started:
            cleanup.callback(_stop, stack, started)
        for state in states:
            env.update(state.env)
        yield env


def _stop(stack: LocalStack, names: set[str]) -> None:
    if "elasticsearch" in names:
        stack.elasticsearch.down()
    if "s3" in names:
        stack.s3.down()
    if "postgres" in names:
        stack.postgres.down()


def run_with_stack(command: Sequence[str], settings: Settings | None = None) -> int:
    """Run ``command`` with the servers up and their exports set; stop what was started."""
    with served(settings) as env:
        return subprocess.run(list(command), env={**os.environ, **env}).returncode


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None
