"""One environment, several sources: each its own database and slot, all in one live capture
run, and a source that is down or whose slot is gone holds up no other. The load side of the
fleet (ten sources through the real daemon) is ``benchmarks/fleet.py``."""

from __future__ import annotations

import json
import shutil
from contextlib import ExitStack

import dagster as dg
import psycopg
import pytest
import yaml
from psycopg import sql

from audit_platform.defs import build_definitions
from audit_platform.defs.capture.live import SHARD_TAG
from audit_platform.naming import read_alias, slot_name
from audit_platform.policy import load_policy
from audit_platform.settings import Settings
from audit_platform.sources.setup import setup_source
from audit_platform_tests.conftest import new_database

SOURCES = ("north", "south", "east")


@pytest.fixture
def fleet(servers, es, es_prefix, tmp_path, monkeypatch):
    """Three shop databases as three sources of one environment of this test's own."""
    env = es_prefix.replace("-", "_")
    resources = tmp_path / "resources"
    shutil.copytree(Settings().resources_dir, resources)
    shop_policy = (resources / "sources" / "shop.yaml").read_text()
    environment = yaml.safe_load((resources / "environments" / "dev.yaml").read_text())
    environment["sources"] = {s: {"url_env": f"AUDIT_SOURCE_{s.upper()}_URL"} for s in SOURCES}
    (resources / "environments" / f"{env}.yaml").write_text(yaml.safe_dump(environment))
    for source in SOURCES:
        policy = shop_policy.replace("source: shop", f"source: {source}")
        (resources / "sources" / f"{source}.yaml").write_text(policy)
    monkeypatch.setenv("AUDIT_RESOURCES_DIR", str(resources))
    monkeypatch.setenv("AUDIT_ENV", env)
    monkeypatch.setenv("AUDIT_STAGING_ROOT", str(tmp_path / "staging"))
    monkeypatch.setenv("AUDIT_MASK_KEY", "test-key")
    with ExitStack() as stack:
        urls = {}
        for source in SOURCES:
            url = stack.enter_context(new_database(servers))
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute((resources / "demo" / "shop.sql").read_text())
            policy = load_policy(resources / "sources" / f"{source}.yaml")
            setup_source(url, env, policy, resources / "sql")
            monkeypatch.setenv(f"AUDIT_SOURCE_{source.upper()}_URL", url)
            urls[source] = url
        monkeypatch.setenv("AUDIT_PG_URL", urls["north"])  # the platform's own state
        yield env, urls
        for index in es.indices.get(index=f"audit-{env}-*", expand_wildcards="all"):
            es.indices.delete(index=index)
        es.options(ignore_status=404).indices.delete_index_template(name=f"audit-{env}")
        with psycopg.connect(servers.pg_url, autocommit=True) as admin:
            for url in urls.values():  # let the cleanup in, whatever the test did
                name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
                admin.execute(
                    sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(name))
                )


def _customers(url: str, n: int, who: str) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(
            "SELECT audit.set_context(%s::jsonb)",
            (json.dumps({"actor": {"type": "user", "id": who}}),),
        )
        for i in range(n):
            conn.execute(
                "INSERT INTO customers (name, email, password_hash) VALUES (%s, %s, 'x')",
                (f"{who}-{i}", f"{who}-{i}@example.com"),
            )


def _take_down(admin_url: str, url: str) -> None:
    """What an outage looks like from here: the database refuses every connection."""
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(name))
        )
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )


def _capture(defs: dg.Definitions, instance: dg.DagsterInstance):
    config = {"ops": {"capture_live_0": {"config": {"until_caught_up": True}}}}
    job = defs.resolve_job_def("capture_shard_0_job")
    return job.execute_in_process(instance=instance, run_config=config)


def _live_checks(run) -> dict[str, dg.AssetCheckEvaluation]:
    return {
        e.event_specific_data.asset_key.path[0]: e.event_specific_data
        for e in run.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
        and e.event_specific_data.check_name == "capture_live"
    }


def _count(es, env: str, source: str) -> int:
    es.indices.refresh(index=read_alias(env))
    return es.count(index=read_alias(env), query={"term": {"source.service": source}})["count"]


def test_a_source_down_and_a_source_without_its_slot_hold_up_no_other(fleet, es, servers):
    env, urls = fleet
    defs = build_definitions()
    # One live run (one shard) captures every source; no job or sensor per source.
    job = defs.resolve_job_def("capture_shard_0_job")
    assert job.tags[SHARD_TAG] == "0"
    assert not [j.name for j in defs.jobs if j.name in {f"capture_{s}_job" for s in SOURCES}]
    for n, source in enumerate(SOURCES, start=1):
        _customers(urls[source], n, f"user-{source}")

    _take_down(servers.pg_url, urls["east"])
    with psycopg.connect(urls["south"], autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot_name(env, "south"),))

    with dg.instance_for_test() as instance:
        run = _capture(defs, instance)
        assert run.success
        # Two sources fail, loudly, each in its own check, and say why ...
        checks = _live_checks(run)
        assert not checks["south"].passed and not checks["east"].passed
        assert "does not exist" in checks["south"].metadata["error"].value
        assert "not currently accepting connections" in checks["east"].metadata["error"].value
        # ... while the healthy source is captured, all of it.
        assert checks["north"].passed
        assert _count(es, env, "north") == 1
        assert _count(es, env, "east") == _count(es, env, "south") == 0

        # The outage ends: the source's slot kept its changes, and nothing is lost.
        with psycopg.connect(servers.pg_url, autocommit=True) as admin:
            name = psycopg.conninfo.conninfo_to_dict(urls["east"])["dbname"]
            admin.execute(
                sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(name))
            )
        run = _capture(defs, instance)
        assert run.success and _live_checks(run)["east"].passed
        assert _count(es, env, "east") == 3
        assert _count(es, env, "north") == 1
