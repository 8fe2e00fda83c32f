"""Retention removes exactly what expired, per retention class, and nothing of another
environment nor anything a legal hold covers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import psycopg
import pytest

from audit_platform import platform_db
from audit_platform.environment import EnvironmentConfig
from audit_platform.holds import HoldError, create_hold, list_holds, release_hold
from audit_platform.index.retention import cluster_has_ilm, ilm_policy, run_retention
from audit_platform.naming import index_name, legacy_index_name
from audit_platform.settings import Settings
from audit_platform.staging import StagingStore
from audit_platform_tests.helpers import ON_BOTH_STORES

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
RESOURCES = Settings().resources_dir
#: Standard keeps 30 days, long 400.
CLASSES = EnvironmentConfig(retention_days=30, retention_classes={"long": 400})


@pytest.fixture
def envs(es_prefix, es):
    """Two environment names of this test's own, and their indices: old and current months of
    two classes, and an index of the layout per source not migrated yet."""
    a, b = f"{es_prefix.replace('-', '_')}a", f"{es_prefix.replace('-', '_')}b"
    names = [
        index_name(a, "standard", 2026, 8),
        index_name(a, "standard", 2026, 10),
        index_name(a, "standard", 2026, 11),
        index_name(b, "standard", 2026, 8),
        index_name(a, "long", 2026, 8),
        legacy_index_name(a, "shop", 2026, 8),
    ]
    for name in names:
        es.indices.create(index=name)
    yield a, b
    for name in names:
        es.options(ignore_status=404).indices.delete(index=name)


def _stage(store: StagingStore, hour: datetime) -> None:
    frame = pl.DataFrame({"lsn": [1], "commit_time": [hour]})
    store.write_file(
        f"{store.hour_dir('records', hour)}/0000000000000001-0000000000000001.parquet", frame
    )


@ON_BOTH_STORES
def test_retention_deletes_expired_indices_files_and_entries_of_its_environment_only(
    envs, es, staging_root, pg_database
):
    a, b = envs
    stores = {env: StagingStore(staging_root, env, "shop") for env in (a, b)}
    old, recent = NOW - timedelta(days=40), NOW - timedelta(days=2)
    for store in stores.values():
        _stage(store, old.replace(minute=0))
        _stage(store, recent.replace(minute=0))
    state = psycopg.connect(pg_database, autocommit=True)
    platform_db.install(state, RESOURCES / "sql")
    for env, status, when in [
        (a, "released", old),
        (a, "waiting", old),
        (a, "released", recent),
        (b, "released", old),
    ]:
        state.execute(
            "INSERT INTO audit_platform.quarantine (env, source, commit_lsn, change_index, xid,"
            " commit_time, first_seen, next_retry_at, status) VALUES (%s, 'shop',"
            " (random() * 1e9)::bigint, 0, 1, %s, %s, %s, %s)",
            (env, when, when, when, status),
        )

    dry = run_retention(
        env=a,
        environment=CLASSES,
        client=es,
        stores=[stores[a]],
        state=state,
        now=NOW,
        dry_run=True,
    )
    # October ends inside the 30 days; August of class long inside its 400; the old layout's
    # index of shop (a source of class standard) expires with standard.
    expired = sorted([index_name(a, "standard", 2026, 8), legacy_index_name(a, "shop", 2026, 8)])
    assert dry.indices == expired
    assert len(dry.staged_hours) == 1 and dry.quarantine_entries == 1
    assert all(es.indices.exists(index=name) for name in expired)
    assert len(stores[a].hours("records")) == 2

    done = run_retention(
        env=a,
        environment=CLASSES,
        client=es,
        stores=[stores[a]],
        state=state,
        now=NOW,
        dry_run=False,
    )
    assert done.indices == dry.indices and done.quarantine_entries == 1
    assert not any(es.indices.exists(index=name) for name in expired)
    assert es.indices.exists(index=index_name(a, "standard", 2026, 10))
    assert es.indices.exists(index=index_name(a, "long", 2026, 8))
    assert es.indices.exists(index=index_name(b, "standard", 2026, 8))
    assert stores[a].hours("records") == [recent.replace(minute=0, second=0, microsecond=0)]
    assert len(stores[b].hours("records")) == 2
    remaining = state.execute(
        "SELECT env, status FROM audit_platform.quarantine ORDER BY env, status"
    ).fetchall()
    assert remaining == [(a, "released"), (a, "waiting"), (b, "released")]
    state.close()


def test_retention_refuses_another_environments_staging(tmp_path):
    with pytest.raises(ValueError, match="staging of environment 'other'"):
        run_retention(
            env="mine",
            environment=EnvironmentConfig(retention_days=1),
            client=None,
            stores=[StagingStore(str(tmp_path), "other", "shop")],
            state=None,
            now=NOW,
            dry_run=True,
        )


def test_ilm_policy_body_deletes_at_the_retention_period():
    body = ilm_policy(RESOURCES, 400)
    phases = body["policy"]["phases"]
    assert phases["delete"] == {"min_age": "400d", "actions": {"delete": {}}}
    assert phases["warm"]["min_age"] == "30d"
    assert ilm_policy(RESOURCES, 7)["policy"]["phases"]["warm"]["min_age"] == "1d"


def test_the_test_cluster_has_no_ilm_so_the_retention_job_deletes_indices(es):
    assert cluster_has_ilm(es) is False


def test_a_source_expires_with_its_class_and_a_class_nobody_has_any_more_is_kept(
    es_prefix, es, tmp_path
):
    env = f"{es_prefix.replace('-', '_')}c"
    environment = EnvironmentConfig.model_validate(
        {
            "retention_days": 30,
            "retention_classes": {"long": 400},
            "sources": {
                "shop": {"url_env": "A"},
                "crm": {"url_env": "B", "retention_class": "long"},
            },
        }
    )
    names = [
        index_name(env, "long", 2025, 9),
        index_name(env, "long", 2025, 10),
        index_name(env, "gone", 2020, 1),
        legacy_index_name(env, "crm", 2026, 8),
    ]
    for name in names:
        es.indices.create(index=name)
    stores = {s: StagingStore(str(tmp_path), env, s) for s in ("shop", "crm")}
    for store in stores.values():
        _stage(store, (NOW - timedelta(days=40)).replace(minute=0))
    try:
        report = run_retention(
            env=env,
            environment=environment,
            client=es,
            stores=list(stores.values()),
            state=None,
            now=NOW,
            dry_run=False,
        )
        # September 2025 ended 451 days ago, October 421: both past 400. crm's index of the
        # layout per source is crm's class's, long: inside.
        assert report.indices == [index_name(env, "long", 2025, 9)]
        assert report.unknown_class == [index_name(env, "gone", 2020, 1)]
        assert es.indices.exists(index=index_name(env, "gone", 2020, 1))
        assert es.indices.exists(index=legacy_index_name(env, "crm", 2026, 8))
        assert report.staged_hours and all("/shop/" in h for h in report.staged_hours)
        assert len(stores["crm"].hours("records")) == 1
    finally:
        for name in names:
            es.options(ignore_status=404).indices.delete(index=name)


def test_retention_keeps_what_legal_holds_cover_and_removes_the_rest(
    es_prefix, es, tmp_path, pg_database
):
    """Sources of a class share its monthly indices: a hold keeps the whole index holding a
    record it covers, with the records of everyone else in it (counted in the report), and
    never thins it with a delete-by-query."""
    env = f"{es_prefix.replace('-', '_')}h"
    environment = EnvironmentConfig(retention_days=30)
    july, august = index_name(env, "standard", 2026, 7), index_name(env, "standard", 2026, 8)
    documents = [
        (july, "shop", "42"),
        (july, "billing", "42"),
        (july, "billing", "7"),
        (july, "crm", "42"),
        (august, "billing", "1"),
        (august, "crm", "2"),
    ]
    for number, (name, source, object_id) in enumerate(documents):
        es.index(
            index=name,
            id=str(number),
            document={
                "source": {"service": source},
                "table": {"schema": "public", "name": "orders"},
                "object_id": object_id,
            },
        )
    es.indices.refresh(index=f"{july},{august}")
    stores = [StagingStore(str(tmp_path), env, s) for s in ("shop", "billing", "crm")]
    hour = (NOW - timedelta(days=40)).replace(minute=0)
    for store in stores:
        _stage(store, hour)
    state = psycopg.connect(pg_database, autocommit=True)
    platform_db.install(state, RESOURCES / "sql")
    whole = create_hold(state, env, "shop", reason="case 114", created_by="counsel")
    one = create_hold(
        state,
        env,
        "billing",
        reason="case 115",
        created_by="counsel",
        table="public.orders",
        object_id="42",
    )
    elsewhere = create_hold(
        state, env, "crm", reason="case 116", created_by="counsel", table="public.customers"
    )
    with pytest.raises(HoldError, match="reason"):
        create_hold(state, env, "shop", reason=" ", created_by="x")
    with pytest.raises(HoldError, match="--table"):
        create_hold(state, env, "shop", reason="r", created_by="x", object_id="1")
    holds = list_holds(state, env, active_only=True)
    try:
        dry = run_retention(
            env=env,
            environment=environment,
            client=es,
            stores=stores,
            state=state,
            now=NOW,
            dry_run=True,
            holds=holds,
        )
        assert dry.held[whole.id]["indices"] == [july]
        assert dry.held[one.id]["indices"] == [july]
        assert elsewhere.id not in dry.held or dry.held[elsewhere.id]["indices"] == []
        assert dry.indices == [august]  # its records are neither shop's nor billing's 42
        # July is kept whole: billing's object 7 and crm's record stay with the held ones.
        assert dry.kept_with_holds == {july: 2}
        assert all(len(dry.held[h.id]["staged_hours"]) == 1 for h in (whole, one, elsewhere))
        run_retention(
            env=env,
            environment=environment,
            client=es,
            stores=stores,
            state=state,
            now=NOW,
            dry_run=False,
            holds=holds,
        )
        assert es.count(index=july)["count"] == 4  # nothing deleted from it by query
        assert not es.indices.exists(index=august)
        assert all(len(store.hours("records")) == 1 for store in stores)
        # Released, a hold no longer keeps anything; its record stays. July is still held by
        # the other hold.
        assert release_hold(state, env, whole.id, "counsel")
        assert not release_hold(state, env, whole.id, "counsel")
        holds = list_holds(state, env, active_only=True)
        done = run_retention(
            env=env,
            environment=environment,
            client=es,
            stores=stores,
            state=state,
            now=NOW,
            dry_run=False,
            holds=holds,
        )
        assert done.indices == [] and done.kept_with_holds == {july: 3}
        assert release_hold(state, env, one.id, "counsel")
        holds = list_holds(state, env, active_only=True)
        done = run_retention(
            env=env,
            environment=environment,
            client=es,
            stores=stores,
            state=state,
            now=NOW,
            dry_run=False,
            holds=holds,
        )
        assert done.indices == [july] and not es.indices.exists(index=july)
        released = next(h for h in list_holds(state, env) if h.id == whole.id)
        assert released.released_by == "counsel" and released.released_at is not None
    finally:
        for name in (july, august):
            es.options(ignore_status=404).indices.delete(index=name)
        state.close()
