"""The live capture job and its keeper sensor in Dagster, against a real source database."""

from __future__ import annotations

import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import yaml

from audit_platform import platform_db
from audit_platform.capture.slot import slot_state
from audit_platform.defs import build_definitions
from audit_platform.defs.capture.live import SHARD_TAG
from audit_platform.defs.partitions import hour_key
from audit_platform.policy import load_policy
from audit_platform.settings import Settings
from audit_platform.signing import new_private_key
from audit_platform.sources.setup import setup_source
from audit_platform.staging import StagingStore
from audit_platform.streams.definitions import create_stream
from audit_platform.trust.log import TrustLog
from audit_platform_tests.conftest import new_database
from audit_platform_tests.helpers import ON_BOTH_STORES, SHOP_DDL
from audit_platform_tests.webhook_receiver import receiving


@pytest.fixture
def env(es_prefix, es, tmp_path, monkeypatch):
    """An environment of this test's own: resources with its environment file, and cleanup of
    its indices and template."""
    name = es_prefix.replace("-", "_")
    resources = tmp_path / "resources"
    shutil.copytree(Settings().resources_dir, resources)
    shutil.copy(
        resources / "environments" / "dev.yaml", resources / "environments" / f"{name}.yaml"
    )
    monkeypatch.setenv("AUDIT_RESOURCES_DIR", str(resources))
    monkeypatch.setenv("AUDIT_ENV", name)
    yield name
    for index in es.indices.get(index=f"audit-{name}-*", expand_wildcards="all"):
        es.indices.delete(index=index)
    es.options(ignore_status=404).indices.delete_index_template(name=f"audit-{name}")


@pytest.fixture
def shop(pg_database, staging_root, monkeypatch, env):
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute(SHOP_DDL)
    settings = Settings()
    policy = load_policy(settings.resources_dir / "sources" / "shop.yaml")
    setup_source(pg_database, env, policy, settings.resources_dir / "sql")
    monkeypatch.setenv("AUDIT_SOURCE_SHOP_URL", pg_database)
    monkeypatch.setenv("AUDIT_STAGING_ROOT", staging_root)
    monkeypatch.setenv("AUDIT_MASK_KEY", "test-key")
    monkeypatch.setenv("AUDIT_PG_URL", pg_database)  # the platform's own state, isolated too
    return pg_database


def _write_as_user(url: str, *statements: str) -> None:
    """One transaction of a service: its context, then its writes."""
    with psycopg.connect(url) as conn:
        conn.execute("""SELECT audit.set_context('{"actor": {"type": "user", "id": "7"}}')""")
        for statement in statements:
            conn.execute(statement)


LIVE = "capture_shard_0_job"


def _capture(defs: dg.Definitions, instance: dg.DagsterInstance, **kwargs):
    """A live capture run that stops once it has caught up (what a test can wait for)."""
    config = {"ops": {"capture_live_0": {"config": {"until_caught_up": True}}}}
    return defs.resolve_job_def(LIVE).execute_in_process(
        instance=instance, run_config=config, **kwargs
    )


def _checks(
    defs: dg.Definitions, instance: dg.DagsterInstance, job: str
) -> dict[str, dg.AssetCheckEvaluation]:
    """The check evaluations of one run of ``job``, by check name."""
    run = defs.resolve_job_def(job).execute_in_process(instance=instance, raise_on_error=False)
    return {
        e.event_specific_data.check_name: e.event_specific_data
        for e in run.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }


def _keep(defs: dg.Definitions, instance: dg.DagsterInstance):
    sensor = defs.resolve_sensor_def("capture_keeper_sensor")
    return sensor(dg.build_sensor_context(instance=instance, definitions=defs))


def test_a_live_run_captures_enriches_indexes_and_reports_coalesced(shop, env):
    defs = build_definitions()
    _write_as_user(shop, "INSERT INTO customers (id, email) VALUES (1, 'ada@example.com')")
    with psycopg.connect(shop) as conn:  # an administrator's SQL, without context
        conn.execute("INSERT INTO orders (id, customer_id, status) VALUES (1, 1, 'new')")
    with dg.instance_for_test() as instance:
        run = _capture(defs, instance)
        assert run.success
        assert run.dagster_run.tags[SHARD_TAG] == "0"
        materialized = instance.get_latest_materialization_event(
            dg.AssetKey(["shop", "staged_changes"])
        )
        assert materialized.asset_materialization.metadata["rows"].value == 2
        now = datetime.now(UTC)
        assert materialized.dagster_event.partition in {
            hour_key(now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=h))
            for h in (0, 1)
        }

        enriched = instance.get_latest_materialization_event(dg.AssetKey(["shop", "enriched"]))
        metadata = enriched.asset_materialization.metadata
        assert (metadata["records"].value, metadata["attributed"].value) == (1, 1)
        assert metadata["orphans_waiting"].value == 1  # no context: waiting in the quarantine
        assert metadata["orphan_rate"].value == 0.5
        check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey(["shop", "enriched"]), "orphan_rate")]
        )
        assert check
        # The run reports the quarantine (no schedule per source does any more).
        waiting = instance.get_latest_materialization_event(dg.AssetKey(["shop", "quarantine"]))
        assert waiting.asset_materialization.metadata["waiting"].value == 1

        indexed = instance.get_latest_materialization_event(dg.AssetKey(["shop", "indexed"]))
        assert indexed.asset_materialization.metadata["indexed"].value == 1
        # One materialization per asset and hour for the run, not one per batch.
        staged = [
            e
            for e in run.all_events
            if e.event_type_value == "ASSET_MATERIALIZATION"
            and e.event_specific_data.materialization.asset_key.path[-1] == "staged_changes"
        ]
        assert len(staged) == 1
        [live] = [
            e.event_specific_data
            for e in run.all_events
            if e.event_type_value == "ASSET_CHECK_EVALUATION"
            and e.event_specific_data.check_name == "capture_live"
        ]
        assert live.passed and live.metadata["state"].value == "stopped"


def test_a_live_run_reports_a_failing_source_as_failed(shop, env, monkeypatch):
    defs = build_definitions()
    monkeypatch.setenv("AUDIT_SOURCE_SHOP_URL", shop + "_gone")  # a database that does not exist
    with dg.instance_for_test() as instance:
        run = _capture(defs, instance)
        assert run.success  # the run goes on; the source's check fails
        [live] = [
            e.event_specific_data
            for e in run.all_events
            if e.event_type_value == "ASSET_CHECK_EVALUATION"
            and e.event_specific_data.check_name == "capture_live"
        ]
        assert not live.passed
        assert live.metadata["state"].value == "failed"  # stopped while it was failing
        assert "does not exist" in live.metadata["error"].value


def test_keeper_starts_one_run_per_shard_and_no_more(shop, env):
    environment = Settings().resources_dir / "environments" / f"{env}.yaml"
    environment.write_text(
        environment.read_text().replace("capture_shards: 1", "capture_shards: 2")
    )
    defs = build_definitions()
    with dg.instance_for_test() as instance:
        requests = _keep(defs, instance).run_requests
        assert sorted((r.job_name, r.tags[SHARD_TAG]) for r in requests) == [
            ("capture_shard_0_job", "0"),
            ("capture_shard_1_job", "1"),
        ]
        for request in requests:
            job = defs.resolve_job_def(request.job_name)
            instance.create_run_for_job(
                job_def=job, tags=request.tags, status=dg.DagsterRunStatus.NOT_STARTED
            )
        result = _keep(defs, instance)
        assert not result.run_requests
        assert "every shard has its run" in result.skip_reason.skip_message


def test_keeper_fails_a_started_run_whose_events_stopped_and_starts_another(shop, env):
    """A run left STARTED by a dead worker never holds its shard's sources."""
    environment = Settings().resources_dir / "environments" / f"{env}.yaml"
    environment.write_text(environment.read_text() + "capture_stale_seconds: 10\n")
    defs = build_definitions()
    with dg.instance_for_test() as instance:
        job = defs.resolve_job_def(LIVE)
        dead = instance.create_run_for_job(
            job_def=job, tags={SHARD_TAG: "0"}, status=dg.DagsterRunStatus.STARTED
        )
        instance.report_engine_event("live capture of shard 0: shop: live", dead)
        assert not _keep(defs, instance).run_requests  # it reported moments ago: alive
        time.sleep(11)  # then nothing: its process is gone
        [request] = _keep(defs, instance).run_requests
        assert request.job_name == LIVE and request.tags[SHARD_TAG] == "0"
        assert instance.get_run_by_id(dead.run_id).status == dg.DagsterRunStatus.FAILURE


def _documents(es, env: str) -> dict[str, dict]:
    es.indices.refresh(index=f"audit-{env}")
    found = es.search(index=f"audit-{env}", size=100)["hits"]["hits"]
    return {h["_id"]: {k: v for k, v in h["_source"].items() if k != "ingested_at"} for h in found}


@ON_BOTH_STORES
def test_backfill_of_an_hour_through_dagster_leaves_the_index_identical(shop, es, env):
    defs = build_definitions()
    _write_as_user(
        shop,
        "INSERT INTO orders (id, customer_id, status) VALUES (1, 1, 'new')",
        "UPDATE orders SET status = 'paid' WHERE id = 1",
    )
    with dg.instance_for_test() as instance:
        capture = _capture(defs, instance)
        assert capture.success
        hour = instance.get_latest_materialization_event(
            dg.AssetKey(["shop", "indexed"])
        ).dagster_event.partition
        original = _documents(es, env)
        assert len(original) == 2
        backfill = defs.resolve_job_def("enrich_shop_job").execute_in_process(
            instance=instance, partition_key=hour
        )
        assert backfill.success
        assert _documents(es, env) == original
        [check] = [
            e
            for e in backfill.all_events
            if e.event_type_value == "ASSET_CHECK_EVALUATION"
            and e.event_specific_data.check_name == "staged_vs_indexed"
        ]
        assert check.event_specific_data.passed


def test_code_location_serves_only_its_environments_sources(monkeypatch):
    monkeypatch.setenv("AUDIT_ENV", "ci_only_env")
    defs = build_definitions()
    assert not [j.name for j in defs.jobs if j.name.endswith("_shop_job")]
    monkeypatch.setenv("AUDIT_ENV", "prod")
    prod = build_definitions()
    # One way to capture: the live run of each shard, kept by one sensor; no per-source sensor.
    assert {s.name for s in prod.sensors if s.name.startswith("capture_")} == {
        "capture_keeper_sensor"
    }
    assert {j.name for j in prod.jobs if j.name.startswith("capture_")} == {LIVE}
    assert "reconcile_job" in {j.name for j in prod.jobs}
    dg.Definitions.validate_loadable(prod)


def test_schedules_and_sensors_do_not_grow_with_the_number_of_sources(env, monkeypatch):
    """What starts runs (schedules, sensors) is per environment: 40 sources start as many
    runs as one (#25: a fleet must not fill Dagster's run history), and as many processes:
    a scheduled run runs its steps (a check per source) in its own process."""
    environments = Path(Settings().resources_dir) / "environments"

    def automation(sources: int) -> tuple[list[str], list[str]]:
        names = {f"svc{n:02d}": {"url_env": "AUDIT_SOURCE_SHOP_URL"} for n in range(sources)}
        (environments / f"{env}.yaml").write_text(yaml.safe_dump({"sources": names}))
        defs = build_definitions()
        return (
            sorted(s.name for s in defs.schedules),
            sorted(s.name for s in defs.sensors),
        )

    assert automation(1) == automation(40)
    schedules, _ = automation(40)
    assert "reconcile_schedule" in schedules
    defs = build_definitions()
    for schedule in defs.schedules:
        job = defs.resolve_job_def(schedule.job_name)
        assert job.executor_def is dg.in_process_executor, schedule.job_name


def test_reconciliation_of_an_unknown_source_says_which_sources_exist(shop, env):
    run = (
        build_definitions()
        .resolve_job_def("reconcile_job")
        .execute_in_process(
            run_config={"ops": {"reconcile": {"config": {"sources": ["nope"]}}}},
            raise_on_error=False,
        )
    )
    assert not run.success
    [failure] = [e for e in run.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.event_specific_data.error.message
    assert "no such source in environment" in message
    assert "nope" in message and "it has shop" in message


def test_reconciliation_reindexes_only_the_batch_missing_a_document(shop, es, env):
    defs = build_definitions()
    with dg.instance_for_test() as instance:
        for batch in range(3):  # three capture runs: three batches of two records
            _write_as_user(
                shop,
                f"INSERT INTO orders (id, customer_id, status) VALUES ({batch * 2}, 1, 'new')",
                f"INSERT INTO orders (id, customer_id, status) VALUES ({batch * 2 + 1}, 1, 'new')",
            )
            assert _capture(defs, instance).success
        documents = _documents(es, env)
        assert len(documents) == 6
        lost = sorted(documents)[0]
        [index] = {h["_index"] for h in es.search(index=f"audit-{env}")["hits"]["hits"]}
        es.delete(index=index, id=lost, refresh=True)
        before = _index_ops(es, env)
        run = defs.resolve_job_def("reconcile_job").execute_in_process(instance=instance)
        assert run.success
        assert _documents(es, env) == documents
        assert _index_ops(es, env) - before == 2  # the short batch, not the hour's six
        checks = [
            e.event_specific_data
            for e in run.all_events
            if e.event_type_value == "ASSET_CHECK_EVALUATION"
        ]
        assert [c.passed for c in checks] == [True] * len(checks)
        counts = [c for c in checks if c.check_name == "staged_vs_indexed"]
        assert sum(c.metadata["indexed"].value for c in counts) == 6
        [complete] = {
            c.metadata["incomplete"].value
            for c in checks
            if c.check_name == "complete_transactions"
        }
        assert complete == 0


def _index_ops(es, env: str) -> int:
    """Index operations Elasticsearch itself counted on this environment's indices."""
    found = es.indices.stats(index=f"audit-{env}-*", metric="indexing")
    return found["_all"]["primaries"].get("indexing", {}).get("index_total", 0)


def _run_metadata(run, asset: str) -> list[dict]:
    return [
        {k: v.value for k, v in e.event_specific_data.materialization.metadata.items()}
        for e in run.all_events
        if e.event_type_value == "ASSET_MATERIALIZATION"
        and e.event_specific_data.materialization.asset_key == dg.AssetKey(["shop", asset])
    ]


def test_a_long_hour_is_not_a_slow_hour_each_run_indexes_only_its_own_batch(shop, es, env):
    """8 capture runs into one hour: run k sends its own 5 documents, not 5 * k."""
    defs = build_definitions()
    with dg.instance_for_test() as instance:
        for run_number in range(8):
            before = _index_ops(es, env) if run_number else 0
            _write_as_user(
                shop,
                *(
                    f"INSERT INTO orders (id, customer_id, status) VALUES ({run_number * 5 + i}, 1, 'new')"
                    for i in range(5)
                ),
            )
            run = _capture(defs, instance)
            assert run.success
            assert sum(m["changes"] for m in _run_metadata(run, "enriched")) == 5
            assert sum(m["indexed"] for m in _run_metadata(run, "indexed")) == 5
            assert all(m["docs_per_second"] > 0 for m in _run_metadata(run, "indexed"))
            assert _index_ops(es, env) - before == 5, f"run {run_number + 1}"
        assert len(_documents(es, env)) == 40


@ON_BOTH_STORES
def test_a_late_context_rewrites_and_reindexes_only_its_own_record(shop, es, env):
    defs = build_definitions()
    with dg.instance_for_test() as instance:
        job = _capture
        for batch in range(4):
            _write_as_user(shop, f"INSERT INTO orders (id, status) VALUES ({batch}, 'new')")
            assert job(defs, instance).success
        with psycopg.connect(shop) as conn:  # no context: an orphan, waiting
            conn.execute("INSERT INTO orders (id, status) VALUES (99, 'new')")
            xid = conn.execute("SELECT pg_current_xact_id()::text").fetchone()[0]
        assert job(defs, instance).success
        _write_as_user(shop, "INSERT INTO orders (id, status) VALUES (5, 'new')")
        assert job(defs, instance).success
        store = StagingStore(Settings().staging_root, env, "shop")
        files = {p: store.fs.cat_file(p) for p in store.files("records")}
        assert len(_documents(es, env)) == 5
        before = _index_ops(es, env)

        with psycopg.connect(shop) as conn:
            conn.execute(
                "SELECT audit.attach_context(%s::xid8, %s::jsonb)",
                (xid, '{"actor": {"type": "user", "id": "late-ada"}}'),
            )
        assert job(defs, instance).success
        assert _index_ops(es, env) - before == 1  # the one record, not its hour
        after = {p: store.fs.cat_file(p) for p in store.files("records")}
        assert [p for p in files if after[p] != files[p]] == [
            p for p in files if "99" in store.read([p])["object_id"].to_list()
        ]
        documents = _documents(es, env)
        assert len(documents) == 6
        [late] = [d for d in documents.values() if d["object_id"] == "99"]
        assert late["attribution"]["status"] == "late"
        assert late["user"]["id"] == "late-ada"


def test_a_quiet_source_on_a_busy_server_gets_its_slot_confirmed_by_a_heartbeat(shop, env, servers):
    """Another database on the same server writes; no tracked table changes. The slot must not
    keep that WAL without bound: past the heartbeat threshold the live run confirms it."""
    environment = Settings().resources_dir / "environments" / f"{env}.yaml"
    environment.write_text(environment.read_text() + "slot_heartbeat_bytes: 1048576\n")
    defs = build_definitions()
    slot = f"audit_{env}_shop"
    with dg.instance_for_test() as instance:
        with new_database(servers) as neighbour, psycopg.connect(neighbour) as conn:
            conn.execute("CREATE TABLE busy (id int, note text)")
            conn.execute(
                "INSERT INTO busy SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g"
            )
            conn.commit()
        with psycopg.connect(shop, autocommit=True) as conn:
            before = slot_state(conn, slot)
        assert before.lag_bytes >= 1024**2

        assert _capture(defs, instance).success
        with psycopg.connect(shop, autocommit=True) as conn:
            after = slot_state(conn, slot)
        assert after.confirmed_lsn >= before.current_lsn  # the neighbour's WAL is released
        assert StagingStore(str(Settings().staging_root), env, "shop").files("changes") == []


@ON_BOTH_STORES
def test_the_trust_job_signs_and_verifies_the_trail_and_fails_on_a_deleted_record(
    shop, es, env, monkeypatch
):
    monkeypatch.setenv("AUDIT_SIGNING_KEY", new_private_key())
    defs = build_definitions()
    _write_as_user(
        shop,
        "INSERT INTO orders (id, customer_id, status) VALUES (1, 1, 'new')",
        "INSERT INTO orders (id, customer_id, status) VALUES (2, 1, 'new')",
    )
    with dg.instance_for_test() as instance:
        assert _capture(defs, instance).success
        es.indices.refresh(index=f"audit-{env}")

        def checks() -> dict[str, dg.AssetCheckEvaluation]:
            return _checks(defs, instance, "trust_job")

        found = checks()
        assert found["trail_verified"].passed, found["trail_verified"].metadata
        assert found["read_log_verified"].passed
        assert TrustLog(StagingStore(Settings().staging_root, env, "shop")).checkpoints()
        hit = es.search(index=f"audit-{env}", size=1)["hits"]["hits"][0]
        es.delete(index=hit["_index"], id=hit["_id"], refresh=True)
        failed = checks()["trail_verified"]
        assert not failed.passed
        assert f"removed {hit['_id']}" in failed.metadata["problems"].value[0]


def test_a_live_run_delivers_streams_and_the_health_checks_report_them(shop, env):
    """A webhook stream is delivered by the live run itself (shard 0); its checks say it is
    current, and then that it fails once its receiver refuses."""
    defs = build_definitions()
    with receiving() as receiver, dg.instance_for_test() as instance:
        with psycopg.connect(shop, autocommit=True) as state:
            platform_db.install(state, Settings().resources_dir / "sql")
            receiver.secret = (
                create_stream(state, env, "siem", "webhook", receiver.url, created_by="test").secret
                or ""
            )
        _write_as_user(
            shop,
            "INSERT INTO customers (id, email) VALUES (1, 'ada@example.com')",
            "INSERT INTO orders (id, customer_id, status) VALUES (1, 1, 'new')",
        )
        assert _capture(defs, instance).success
        assert sorted(r["table"]["name"] for r in receiver.records) == ["customers", "orders"]
        assert receiver.duplicates == 0

        def checks() -> dict[str, dg.AssetCheckEvaluation]:
            return _checks(defs, instance, "health_checks_job")

        found = checks()
        assert found["stream_lag"].passed and found["stream_dead_letters"].passed
        assert found["stream_lag"].metadata["streams"].value == 1
        receiver.secret = "whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB"  # it no longer matches
        _write_as_user(shop, "UPDATE customers SET email = 'ada@example.org' WHERE id = 1")
        assert _capture(defs, instance).success
        failing = checks()["stream_lag"]
        assert not failing.passed and failing.metadata["failing"].value == 1
        assert "HTTP 401" in failing.metadata["late"].value
