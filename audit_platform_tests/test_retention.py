"""Retention removes exactly what expired, and nothing of another environment."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import psycopg
import pytest

from audit_platform import platform_db
from audit_platform.holds import HoldError, create_hold, list_holds, release_hold
from audit_platform.index.retention import cluster_has_ilm, ilm_policy, run_retention
from audit_platform.settings import Settings
from audit_platform.staging import StagingStore
from audit_platform_tests.helpers import ON_BOTH_STORES

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
RESOURCES = Settings().resources_dir


@pytest.fixture
def envs(es_prefix, es):
    """Two environment names of this test's own, and their indices: old and current months."""
    a, b = f"{es_prefix.replace('-', '_')}a", f"{es_prefix.replace('-', '_')}b"
    names = [f"audit-{a}-shop-2026.08", f"audit-{a}-shop-2026.10", f"audit-{a}-shop-2026.11",
             f"audit-{b}-shop-2026.08"]  # fmt: skip
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
    for env, status, when in [(a, "released", old), (a, "waiting", old), (a, "released", recent),
                              (b, "released", old)]:  # fmt: skip
        state.execute(
            "INSERT INTO audit_platform.quarantine (env, source, commit_lsn, change_index, xid,"
            " commit_time, first_seen, next_retry_at, status) VALUES (%s, 'shop',"
            " (random() * 1e9)::bigint, 0, 1, %s, %s, %s, %s)",
            (env, when, when, when, status),
        )

    dry = run_retention(env=a, retention_days=30, client=es, stores=[stores[a]], state=state,
                        now=NOW, dry_run=True)  # fmt: skip
    assert dry.indices == [f"audit-{a}-shop-2026.08"]  # October ends inside the 30 days
    assert len(dry.staged_hours) == 1 and dry.quarantine_entries == 1
    assert es.indices.exists(index=f"audit-{a}-shop-2026.08")
    assert len(stores[a].hours("records")) == 2

    done = run_retention(env=a, retention_days=30, client=es, stores=[stores[a]], state=state,
                         now=NOW, dry_run=False)  # fmt: skip
    assert done.indices == dry.indices and done.quarantine_entries == 1
    assert not es.indices.exists(index=f"audit-{a}-shop-2026.08")
    assert es.indices.exists(index=f"audit-{a}-shop-2026.10")
    assert es.indices.exists(index=f"audit-{b}-shop-2026.08")
    assert stores[a].hours("records") == [recent.replace(minute=0, second=0, microsecond=0)]
    assert len(stores[b].hours("records")) == 2
    remaining = state.execute(
        "SELECT env, status FROM audit_platform.quarantine ORDER BY env, status"
    ).fetchall()
    assert remaining == [(a, "released"), (a, "waiting"), (b, "released")]
    state.close()


def test_retention_refuses_another_environments_staging(tmp_path):
    with pytest.raises(ValueError, match="staging of environment 'other'"):
        run_retention(env="mine", retention_days=1, client=None,
                      stores=[StagingStore(str(tmp_path), "other", "shop")], state=None,
                      now=NOW, dry_run=True)  # fmt: skip


def test_ilm_policy_body_deletes_at_the_retention_period():
    body = ilm_policy(RESOURCES, 400)
    phases = body["policy"]["phases"]
    assert phases["delete"] == {"min_age": "400d", "actions": {"delete": {}}}
    assert phases["warm"]["min_age"] == "30d"
    assert ilm_policy(RESOURCES, 7)["policy"]["phases"]["warm"]["min_age"] == "1d"


def test_the_test_cluster_has_no_ilm_so_the_retention_job_deletes_indices(es):
    assert cluster_has_ilm(es) is False


def test_retention_keeps_what_legal_holds_cover_and_removes_the_rest(es_prefix, es, tmp_path,
                                                                     pg_database):  # fmt: skip
    env = f"{es_prefix.replace('-', '_')}h"
    old = {s: f"audit-{env}-{s}-2026.08" for s in ("shop", "billing", "crm")}
    for source, name in old.items():
        es.indices.create(index=name)
        es.index(index=name, id="1", refresh=True, document={
            "source": {"service": source}, "table": {"schema": "public", "name": "orders"},
            "object_id": "42"})  # fmt: skip
    stores = [StagingStore(str(tmp_path), env, s) for s in old]
    hour = (NOW - timedelta(days=40)).replace(minute=0)
    for store in stores:
        _stage(store, hour)
    state = psycopg.connect(pg_database, autocommit=True)
    platform_db.install(state, RESOURCES / "sql")
    whole = create_hold(state, env, "shop", reason="case 114", created_by="counsel")
    one = create_hold(state, env, "billing", reason="case 115", created_by="counsel",
                      table="public.orders", object_id="42")  # fmt: skip
    elsewhere = create_hold(state, env, "crm", reason="case 116", created_by="counsel",
                            table="public.customers")  # fmt: skip
    with pytest.raises(HoldError, match="reason"):
        create_hold(state, env, "shop", reason=" ", created_by="x")
    with pytest.raises(HoldError, match="--table"):
        create_hold(state, env, "shop", reason="r", created_by="x", object_id="1")
    holds = list_holds(state, env, active_only=True)
    try:
        dry = run_retention(env=env, retention_days=30, client=es, stores=stores, state=state,
                            now=NOW, dry_run=True, holds=holds)  # fmt: skip
        assert dry.held[whole.id]["indices"] == [old["shop"]]
        assert dry.held[one.id]["indices"] == [old["billing"]]
        assert elsewhere.id not in dry.held or dry.held[elsewhere.id]["indices"] == []
        assert dry.indices == [old["crm"]]  # its hold covers another table: no record held
        assert all(len(dry.held[h.id]["staged_hours"]) == 1 for h in (whole, one, elsewhere))
        run_retention(env=env, retention_days=30, client=es, stores=stores, state=state, now=NOW,
                      dry_run=False, holds=holds)  # fmt: skip
        assert es.indices.exists(index=old["shop"]) and es.indices.exists(index=old["billing"])
        assert not es.indices.exists(index=old["crm"])
        assert all(len(store.hours("records")) == 1 for store in stores)
        # Released, the hold no longer keeps anything; its record stays.
        assert release_hold(state, env, whole.id, "counsel")
        assert not release_hold(state, env, whole.id, "counsel")
        holds = list_holds(state, env, active_only=True)
        done = run_retention(env=env, retention_days=30, client=es, stores=stores, state=state,
                             now=NOW, dry_run=False, holds=holds)  # fmt: skip
        assert done.indices == [old["shop"]] and not es.indices.exists(index=old["shop"])
        released = next(h for h in list_holds(state, env) if h.id == whole.id)
        assert released.released_by == "counsel" and released.released_at is not None
    finally:
        for name in old.values():
            es.options(ignore_status=404).indices.delete(index=name)
        state.close()
