"""Least privilege, enforced by the real cluster: the pipeline's writer of one environment runs
the index step and reads nothing of another environment; the API's reader reads its
environment's alias and can write nothing. The accounts are made as `audit-platform es setup`
makes them (here in the local stack's file realm, as the demo's are)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from elasticsearch import AuthorizationException

from audit_platform import platform_db
from audit_platform.clients import elasticsearch_client
from audit_platform.environment import EnvironmentConfig
from audit_platform.index import access
from audit_platform.index.migrate import migrate_layout
from audit_platform.index.retention import run_retention
from audit_platform.naming import index_name, legacy_index_name, read_alias
from audit_platform.settings import Settings
from audit_platform_dev.stack import setup_es_accounts
from audit_platform_tests.capture_support import capture_enrich_index, make_source
from audit_platform_tests.helpers import policy_for

#: Fixed names: a rerun updates the same two roles instead of adding more to the cluster.
ENV_A, ENV_B = "acl_a", "acl_b"


@pytest.fixture(scope="module")
def accounts(servers):
    made = {}
    for env in (ENV_A, ENV_B):
        found, _ = setup_es_accounts(servers.settings, env)
        made[env] = {a.kind: a for a in found}
    return made


def _client(servers, account: access.Account):
    return elasticsearch_client(account.connection(servers.settings.elasticsearch))


@pytest.fixture
def clean(es):
    def drop():
        for env in (ENV_A, ENV_B):
            for index in es.indices.get(index=f"audit-{env}-*", expand_wildcards="all"):
                es.indices.delete(index=index)
            es.options(ignore_status=404).indices.delete_index_template(name=f"audit-{env}")

    drop()
    yield
    drop()


def test_the_writer_runs_the_index_step_and_cannot_reach_another_environment(
    servers, accounts, clean, es, pg_database, tmp_path
):
    writer = _client(servers, accounts[ENV_A][access.WRITER])
    source = make_source(
        pg_database,
        tmp_path,
        "CREATE TABLE t (id int PRIMARY KEY, v text);",
        policy_for("shop", public__t={}),
        env=ENV_A,
    )
    source.execute("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 5) g")
    with psycopg.connect(pg_database, autocommit=True) as state:
        platform_db.install(state, Settings().resources_dir / "sql")
        # Template, bulk indexing, refresh and the reconciliation's counts, all as the writer.
        assert capture_enrich_index(source, state, writer, grace=timedelta(0)) == 5
    assert writer.count(index=read_alias(ENV_A))["count"] == 5

    theirs = index_name(ENV_B, "standard", 2026, 11)
    es.indices.create(index=theirs)
    es.index(index=theirs, document={"secret": 1}, refresh=True)
    with pytest.raises(AuthorizationException):
        writer.search(index=read_alias(ENV_B))
    # A wildcard resolves to the indices one may read: none of the other environment's.
    assert es.count(index=f"audit-{ENV_B}-*")["count"] == 1
    assert writer.search(index=f"audit-{ENV_B}-*")["hits"]["total"]["value"] == 0
    with pytest.raises(AuthorizationException):
        writer.index(index=theirs, document={"x": 1})
    with pytest.raises(AuthorizationException):
        writer.indices.delete(index=theirs)

    # Retention, as the writer: its own expired month goes, the other environment's stays.
    expired = index_name(ENV_A, "standard", 2020, 1)
    es.indices.create(index=expired)
    report = run_retention(
        env=ENV_A,
        environment=EnvironmentConfig(retention_days=30),
        client=writer,
        stores=[],
        state=None,
        now=datetime.now(UTC),
        dry_run=False,
    )
    assert expired in report.indices
    assert es.indices.exists(index=theirs)

    # The migration from the layout per source, as the writer: its own old index moves, the
    # other environment's is neither seen nor touched.
    mine, old_theirs = (
        legacy_index_name(ENV_A, "shop", 2026, 1),
        legacy_index_name(ENV_B, "shop", 2026, 1),
    )
    for name in (mine, old_theirs):
        es.index(index=name, id="x", document={"env": name}, refresh=True)
    migrated = migrate_layout(writer, ENV_A, EnvironmentConfig(), dry_run=False)
    assert migrated.ok and [m.legacy for m in migrated.moves] == [mine]
    assert not es.indices.exists(index=mine)
    assert es.count(index=index_name(ENV_A, "standard", 2026, 1))["count"] == 1
    assert es.count(index=old_theirs)["count"] == 1


def test_the_reader_reads_its_alias_only_and_writes_nothing(servers, accounts, clean, es):
    reader = _client(servers, accounts[ENV_A][access.READER])
    own, other = index_name(ENV_A, "standard", 2026, 11), index_name(ENV_B, "standard", 2026, 11)
    es.indices.create(index=own, aliases={read_alias(ENV_A): {}})
    es.indices.create(index=other, aliases={read_alias(ENV_B): {}})
    es.index(index=own, id="1", document={"v": "mine"}, refresh=True)
    es.index(index=other, id="1", document={"v": "theirs"}, refresh=True)

    hits = reader.search(index=read_alias(ENV_A))["hits"]["hits"]
    assert [h["_source"]["v"] for h in hits] == ["mine"]
    assert reader.cluster.health()["status"] in {"green", "yellow"}  # the API's readiness
    for attempt in (
        lambda: reader.index(index=own, document={"v": "forged"}),
        lambda: reader.index(index=read_alias(ENV_A), document={"v": "forged"}),
        lambda: reader.delete(index=own, id="1"),
        lambda: reader.indices.delete(index=own),
        lambda: reader.indices.put_index_template(name=f"audit-{ENV_A}", index_patterns=["x"]),
        lambda: reader.search(index=read_alias(ENV_B)),
        lambda: reader.search(index=other),
    ):
        with pytest.raises(AuthorizationException):
            attempt()
    assert es.count(index=own)["count"] == 1
