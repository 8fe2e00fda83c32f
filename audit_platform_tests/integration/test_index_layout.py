"""Indices per retention class and month, not per source (issue 25): the shard count, the
environment's retention classes, and the migration from the layout per source, against the real
cluster and through the API."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import polars as pl
import psycopg
import pytest
from elasticsearch import helpers
from fastapi.testclient import TestClient
from pydantic import ValidationError
from typer.testing import CliRunner

from audit_platform import platform_db
from audit_platform.api.main import create_app
from audit_platform.api_keys import create_key
from audit_platform.cli import app
from audit_platform.clients import pg_url_from_settings
from audit_platform.environment import EnvironmentConfig
from audit_platform.index.bulk import index_records
from audit_platform.index.documents import documents
from audit_platform.index.migrate import migrate_layout
from audit_platform.index.template import install_template, render_template
from audit_platform.naming import (
    index_name,
    index_pattern,
    legacy_index_name,
    lifecycle_name,
    read_alias,
    template_name,
)
from audit_platform.record import RECORD_SCHEMA, record_id
from audit_platform.settings import ApiSettings, Settings

RESOURCES = Settings().resources_dir
T0 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
#: The API searches the last 7 days unless asked: the records here are of October and November.
SINCE = "2026-10-01T00:00:00Z"


def _records(
    env: str, source: str, months: list[tuple[int, int]], per_month: int = 1, first_lsn: int = 1
) -> pl.DataFrame:
    """Records of one source, ``per_month`` in each month, as enrichment stages them."""
    rows = []
    lsn = first_lsn
    for year, month in months:
        for _ in range(per_month):
            rows.append(
                {
                    "id": record_id(env, source, lsn, 0),
                    "env": env,
                    "source": source,
                    "commit_time": datetime(year, month, 3, 12, tzinfo=UTC),
                    "schema": "public",
                    "table": "orders",
                    "operation": "insert",
                    "object_id": str(lsn),
                    "changed_columns": '["id"]',
                    "before": None,
                    "after": f'{{"id":"{lsn}"}}',
                    "context": '{"actor":{"type":"user","id":"ada"}}',
                    "attribution_status": "attributed",
                    "attribution_lag_seconds": None,
                    "xid": lsn,
                    "lsn": lsn,
                    "change_index": 0,
                    "policy_version": "1",
                    "key_columns": '["id"]',
                    "column_types": "{}",
                    "txn_changes": 1,
                    "txn_ignored": 0,
                }
            )
            lsn += 1
    return pl.DataFrame(rows, schema=RECORD_SCHEMA)


def _months(count: int) -> list[tuple[int, int]]:
    """The ``count`` months up to November 2026."""
    found, year, month = [], 2026, 11
    for _ in range(count):
        found.append((year, month))
        year, month = (year, month - 1) if month > 1 else (year - 1, 12)
    return sorted(found)


@pytest.fixture
def env_name(es):
    """A fresh environment name; its indices and template are removed afterwards."""
    env = f"layout_{uuid.uuid4().hex[:8]}"
    yield env
    for index in es.indices.get(index=index_pattern(env), expand_wildcards="all"):
        es.indices.delete(index=index)
    es.options(ignore_status=404).indices.delete_index_template(name=template_name(env))


# --- the environment's retention classes ------------------------------------------------------


def test_retention_classes_are_named_periods_a_source_picks():
    environment = EnvironmentConfig.model_validate(
        {
            "retention_days": 30,
            "retention_classes": {"long": 400},
            "sources": {
                "shop": {"url_env": "A", "retention_class": "long"},
                "crm": {"url_env": "B"},
            },
        }
    )
    assert environment.classes == {"long": 400, "standard": 30}
    assert environment.retention_class_of("shop") == "long"
    assert environment.retention_class_of("crm") == "standard"
    assert environment.retention_class_of("gone") == "standard"  # a source no longer listed
    assert environment.retention_days_of("shop") == 400
    assert environment.longest_retention_days == 400
    # Without classes, every source is in standard: the environment's retention_days.
    assert EnvironmentConfig(retention_days=7).classes == {"standard": 7}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {
                "sources": {"shop": {"url_env": "A", "retention_class": "lng"}},
                "retention_classes": {"long": 400},
            },
            r"source 'shop': retention_class 'lng' is not one of the environment's retention "
            r"classes \(long, standard\)",
        ),
        ({"retention_classes": {"Long": 400}}, "retention class name 'Long' is not valid"),
        (
            {"retention_classes": {"long": 0}},
            "retention class 'long': give its period as a whole number of days, at least 1",
        ),
        (
            {"retention_days": 30, "retention_classes": {"standard": 45}},
            r"retention_days \(30\) and retention_classes.standard \(45\) .* disagree",
        ),
    ],
)
def test_retention_classes_are_validated_with_clear_errors(config, message):
    with pytest.raises(ValidationError, match=message):
        EnvironmentConfig.model_validate(config)


# --- shards -----------------------------------------------------------------------------------


def test_indices_and_shards_grow_with_months_and_classes_not_with_sources(es, env_name):
    """200 sources, 13 months kept, two retention classes: 26 indices and 26 primary shards,
    where the layout per source made 2,600 (5,200 shards with a replica, past the default
    cluster.max_shards_per_node of 1,000 on three nodes)."""
    env, months = env_name, _months(13)
    sources = {
        f"s{i:03d}": {"url_env": "X", **({"retention_class": "legal"} if i % 4 == 0 else {})}
        for i in range(200)
    }
    environment = EnvironmentConfig.model_validate(
        {"retention_days": 400, "retention_classes": {"legal": 3650}, "sources": sources}
    )
    install_template(es, RESOURCES, env, replicas=0)
    for number, source in enumerate(sources):
        records = _records(env, source, months, first_lsn=number * 100 + 1)
        result = index_records(
            es,
            records,
            database="db",
            ingested_at=T0,
            retention_class=environment.retention_class_of(source),
        )
        assert result.failed.is_empty(), result.failed
    es.indices.refresh(index=read_alias(env))

    found = es.indices.get_settings(index=index_pattern(env), name="index.number_of_shards")
    primaries = sum(int(s["settings"]["index"]["number_of_shards"]) for s in found.values())
    old_layout = {legacy_index_name(env, s, y, m) for s in sources for y, m in months}
    print(
        f"\n200 sources x 13 months, 2 classes: {len(found)} indices, {primaries} primary "
        f"shards; the layout per source: {len(old_layout)} indices and primary shards"
    )
    assert len(found) == primaries == 13 * len(environment.classes) == 26
    assert sorted(found) == sorted(
        index_name(env, c, y, m) for c in environment.classes for y, m in months
    )
    assert len(old_layout) == 2_600
    # Sources share indices and stay apart by source.service.
    assert es.count(index=read_alias(env))["count"] == 2_600
    one = {"term": {"source.service": "s004"}}
    assert es.count(index=read_alias(env), query=one)["count"] == 13
    legal = index_name(env, "legal", 2026, 11)
    assert es.count(index=legal)["count"] == 50
    assert es.count(index=legal, query=one)["count"] == 1


# --- migration --------------------------------------------------------------------------------


def _old_layout(es, env: str, records: pl.DataFrame) -> list[str]:
    """Index records the way the code before retention classes did: one index a source and
    month, named by the old naming (the template then applied to them too)."""
    actions, names = [], set()
    for _, doc_id, document in documents(records, database="db", ingested_at=T0):
        committed = datetime.fromisoformat(document["@timestamp"])
        name = legacy_index_name(
            env, document["source"]["service"], committed.year, committed.month
        )
        names.add(name)
        actions.append({"_index": name, "_id": doc_id, "_source": document})
    helpers.bulk(es, actions, refresh=True)
    return sorted(names)


def _resources(tmp_path, env: str, yaml_text: str):
    """A resources folder with this environment's file, for the command line."""
    (tmp_path / "environments").mkdir()
    (tmp_path / "environments" / f"{env}.yaml").write_text(yaml_text)
    (tmp_path / "elasticsearch").symlink_to(RESOURCES / "elasticsearch")
    (tmp_path / "sql").symlink_to(RESOURCES / "sql")
    return tmp_path


def _ids(es, index: str) -> set[str]:
    return {h["_id"] for h in helpers.scan(es, index=index, query={"_source": False})}


def test_migrate_moves_the_layout_per_source_into_class_indices_then_the_api_serves_it(
    es, env_name, tmp_path
):
    env = env_name
    resources = _resources(
        tmp_path,
        env,
        "retention_classes: {long: 400}\nsources:\n"
        "  shop: {url_env: A, retention_class: long}\n"
        "  billing: {url_env: B}\n",
    )
    cli, cli_env = CliRunner(), {"AUDIT_RESOURCES_DIR": str(resources), "AUDIT_ENV": env}
    months = [(2026, 10), (2026, 11)]
    shop, billing = _records(env, "shop", months, 3), _records(env, "billing", months, 2)
    install_template(es, RESOURCES, env, replicas=0)
    legacy = _old_layout(es, env, pl.concat([shop, billing]))
    assert legacy == [
        legacy_index_name(env, s, 2026, m) for s in ("billing", "shop") for m in (10, 11)
    ]
    before = {name: _ids(es, name) for name in legacy}
    # After the upgrade, before the migration: shop's newest record went to its class index.
    newer = _records(env, "shop", [(2026, 11)], first_lsn=1000)
    index_records(es, newer, database="db", ingested_at=T0, retention_class="long")

    dry = cli.invoke(app, ["index", "migrate", "--dry-run"], env=cli_env)
    assert dry.exit_code == 0, dry.output
    assert dry.output.count("would move") == 4
    assert (
        f"would move {legacy_index_name(env, 'shop', 2026, 10)} (3 documents, source shop)"
        f" -> {index_name(env, 'long', 2026, 10)}" in dry.output
    )
    assert all(es.indices.exists(index=name) for name in legacy)

    done = cli.invoke(app, ["index", "migrate"], env=cli_env)
    assert done.exit_code == 0, done.output
    assert done.output.count("old index deleted") == 4, done.output
    assert not any(es.indices.exists(index=name) for name in legacy)
    es.indices.refresh(index=read_alias(env))
    for name, ids in before.items():
        source, month = name.split("-")[-2], int(name[-2:])
        retention_class = "long" if source == "shop" else "standard"
        assert ids <= _ids(es, index_name(env, retention_class, 2026, month))
    assert _ids(es, index_name(env, "long", 2026, 11)) == before[legacy[3]] | set(newer["id"])
    assert es.count(index=read_alias(env))["count"] == 10 + 1  # no copy, nothing lost

    again = cli.invoke(app, ["index", "migrate"], env=cli_env)
    assert again.exit_code == 0 and "nothing to migrate" in again.output

    # Through the API: a key limited to one source sees that source only, in shared indices.
    with psycopg.connect(pg_url_from_settings(Settings()), autocommit=True) as state:
        platform_db.install(state, RESOURCES / "sql")
        keys = {
            "all": create_key(state, env, "all").secret,
            "shop": create_key(state, env, "shop only", sources=["shop"]).secret,
            "billing": create_key(state, env, "billing only", sources=["billing"]).secret,
        }
    with TestClient(create_app(Settings(env=env, api=ApiSettings(key_cache_seconds=0)))) as api:

        def events(key: str, **params) -> list[dict]:
            reply = api.get(
                "/v1/events",
                params={"limit": 500, "since": SINCE, **params},
                headers={"X-API-Key": keys[key]},
            )
            assert reply.status_code == 200, reply.text
            return reply.json()["events"]

        assert len(events("all")) == 11
        assert sorted(e["id"] for e in events("shop")) == sorted([*shop["id"], *newer["id"]])
        assert sorted(e["id"] for e in events("billing")) == sorted(billing["id"])
        assert events("shop", source="billing") == []
        billing_event = billing["id"][0]
        assert (
            api.get(f"/v1/events/{billing_event}", headers={"X-API-Key": keys["shop"]}).status_code
            == 404
        )
        stats = api.get("/v1/stats", params={"since": SINCE}, headers={"X-API-Key": keys["shop"]})
        assert stats.json()["total"] == 7


def test_migrate_keeps_an_old_index_whose_documents_did_not_all_arrive(es, env_name):
    """The class index refuses some documents (here: a mapping that cannot take them): the old
    index is kept, whole, and the report says why; nothing is deleted before it is verified."""
    env = env_name
    environment = EnvironmentConfig()
    install_template(es, RESOURCES, env, replicas=0)
    [old] = _old_layout(es, env, _records(env, "shop", [(2026, 10)], 4))
    target = index_name(env, "standard", 2026, 10)
    es.indices.create(index=target, mappings={"properties": {"object_id": {"type": "boolean"}}})

    report = migrate_layout(es, env, environment, dry_run=False, poll_seconds=0.1)
    [move] = report.moves
    assert not report.ok and not move.deleted
    assert "documents were refused" in move.problem or "wrote" in move.problem, move.problem
    assert es.indices.exists(index=old) and es.count(index=old)["count"] == 4
    assert "NOT moved" in report.lines()[0] and "the old index is kept" in report.lines()[0]


def test_where_the_cluster_has_ilm_each_class_has_a_template_naming_its_policy():
    """Tested as data: the test cluster has no ILM. A class's template matches only its
    indices, above the environment's (an index takes one template's settings)."""
    base = render_template(RESOURCES, "prod", 1)
    long = render_template(RESOURCES, "prod", 1, lifecycle_name("prod", "long"), "long")
    assert base["index_patterns"] == [index_pattern("prod")]
    assert "index.lifecycle.name" not in base["template"]["settings"]
    assert long["index_patterns"] == ["audit-prod-class-long-*"]
    assert long["priority"] == base["priority"] + 1
    assert long["template"]["settings"]["index.lifecycle.name"] == "audit-prod-class-long"
    assert long["template"]["mappings"] == base["template"]["mappings"]
