"""Real servers for the whole test session, and isolated state for each test.

Servers come from AUDIT_PG_URL / AUDIT_ES_URL when set, else from containers where a Docker
engine answers, else from this checkout's local stack (started here and stopped at the end if
this session started it). A test that needs a server and cannot get one errors with the reason:
nothing here skips.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import fsspec
import psycopg
import pytest
from elasticsearch import Elasticsearch
from psycopg import sql

from audit_platform.clients import elasticsearch_client, pg_url_from_settings
from audit_platform.settings import Settings
from audit_platform_dev.stack import served
from audit_platform_dev.stack.deployment import database_url
from audit_platform_tests.helpers import SUMMARY


@dataclass(frozen=True)
class Servers:
    settings: Settings

    @property
    def pg_url(self) -> str:
        return pg_url_from_settings(self.settings)

    def es_client(self) -> Elasticsearch:
        assert self.settings.elasticsearch is not None
        return elasticsearch_client(self.settings.elasticsearch)


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    """The servers; their AUDIT_* variables are also exported for code that reads Settings()
    itself (Dagster ops in execute_in_process, the CLI)."""
    settings = Settings()
    with served(settings) as env, pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        yield Servers(settings.with_exports(env))


@contextmanager
def new_database(servers: Servers) -> Iterator[str]:
    """A fresh database; its replication slots and it are dropped after."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(servers.pg_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield database_url(servers.pg_url, name)
    finally:
        with psycopg.connect(servers.pg_url, autocommit=True) as admin:
            slots = admin.execute(
                "SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = %s",
                (name,),
            ).fetchall()
            for slot, active_pid in slots:
                if active_pid:
                    admin.execute("SELECT pg_terminate_backend(%s)", (active_pid,))
                admin.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def pg_database(servers: Servers) -> Iterator[str]:
    """A fresh database of this test's own."""
    with new_database(servers) as url:
        yield url


@pytest.fixture
def staging_root(request, servers: Servers, tmp_path) -> Iterator[str]:
    """Where this test stages: a folder of its own, or, for tests marked ``ON_BOTH_STORES``
    and given "s3", a prefix of its own in the stack's bucket, removed after."""
    if getattr(request, "param", "local") == "local":
        yield str(tmp_path / "staging")
        return
    assert servers.settings.s3_url, "no S3 server: the stack exports AUDIT_S3_URL"
    root = f"{servers.settings.s3_url.rstrip('/')}/t-{uuid.uuid4().hex[:12]}"
    yield root
    fs, path = fsspec.core.url_to_fs(root)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture(scope="session")
def es(servers: Servers) -> Iterator[Elasticsearch]:
    client = servers.es_client()
    yield client
    client.close()


@pytest.fixture
def es_prefix(es: Elasticsearch) -> Iterator[str]:
    """An index-name prefix of this test's own; every index and template under it is removed.

    Names are resolved first and deleted explicitly, so cleanup works on clusters that keep
    ``action.destructive_requires_name`` at its safe default.
    """
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    yield prefix
    indices = list(es.indices.get(index=f"{prefix}*", expand_wildcards="all").keys())
    if indices:
        es.indices.delete(index=",".join(indices))
    found = es.options(ignore_status=404).indices.get_index_template(name=f"{prefix}*")
    templates = found.get("index_templates", [])
    for template in templates:
        es.indices.delete_index_template(name=template["name"])


def pytest_terminal_summary(terminalreporter) -> None:
    for title, lines in SUMMARY.items():
        terminalreporter.section(title)
        for line in lines:
            terminalreporter.write_line(line)
