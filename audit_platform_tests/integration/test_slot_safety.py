"""A lost slot is never a silent hole: capture stops loudly, and its replacement records a gap.

PostgreSQL invalidates a slot that holds back more WAL than ``max_slot_wal_keep_size``; someone
may also drop one by hand. Both are made to happen here, on a server of this test's own (its
keep size is tiny, and invalidating slots must not touch the shared test server).
"""

from __future__ import annotations

import time
import uuid

import dagster as dg
import psycopg
import pytest
from typer.testing import CliRunner

from audit_platform import platform_db
from audit_platform.capture.gaps import list_gaps
from audit_platform.capture.slot import SlotLost, SlotMissing, peek, slot_state
from audit_platform.cli import app
from audit_platform.defs.health import source_checks
from audit_platform.environment import EnvironmentConfig, SourceConfig
from audit_platform.naming import publication_name, slot_name
from audit_platform.policy import load_policy
from audit_platform.settings import Settings
from audit_platform_dev.stack.postgres import LocalPostgres
from audit_platform_dev.stack.system import free_port
from audit_platform_tests.capture_support import make_source
from audit_platform_tests.helpers import SHOP_DDL, environment_resources

ENV = f"gap_{uuid.uuid4().hex[:8]}"


def _invalidate(url: str, slot: str) -> None:
    """Write and switch WAL segments past the 1 MB keep size, then checkpoint."""
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(30):
            conn.execute("CREATE TABLE IF NOT EXISTS filler (note text)")
            conn.execute("INSERT INTO filler SELECT repeat('x', 500) FROM generate_series(1, 3000)")
            conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")
            if slot_state(conn, slot).lost:
                return
            time.sleep(0.2)
    raise AssertionError(f"slot {slot} was not invalidated")


def _order(url: str, order_id: int) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("""SELECT audit.set_context('{"actor": {"type": "user", "id": "7"}}')""")
        conn.execute("INSERT INTO orders (id, status) VALUES (%s, 'new')", (order_id,))


@pytest.mark.slow
def test_lost_and_dropped_slots_stop_capture_and_their_replacements_record_gaps(
    tmp_path, monkeypatch
):
    server = LocalPostgres(
        tmp_path / "stack", free_port(), overrides={"max_slot_wal_keep_size": "'1MB'"}
    )
    record, _ = server.up()
    try:
        url = record.url
        policy = load_policy(Settings().resources_dir / "sources" / "shop.yaml")
        source = make_source(url, tmp_path, SHOP_DDL, policy, env=ENV)
        for key, value in {
            "AUDIT_ENV": ENV,
            "AUDIT_PG_URL": url,
            "AUDIT_STAGING_ROOT": str(tmp_path / "staging"),
            "AUDIT_RESOURCES_DIR": str(environment_resources(tmp_path, ENV)),
        }.items():
            monkeypatch.setenv(key, value)
        slot = slot_name(ENV, "shop")
        monkeypatch.setenv("AUDIT_SOURCE_SHOP_URL", url)
        [slot_lag_check, _] = source_checks(
            ENV, "shop", SourceConfig(url_env="AUDIT_SOURCE_SHOP_URL"), EnvironmentConfig()
        )
        assert slot_lag_check().passed
        _order(url, 1)
        first = source.capture()
        assert first.changes == 1

        _order(url, 2)  # committed, never captured: the slot loses it
        _invalidate(url, slot)
        with pytest.raises(SlotLost, match="--replace-lost-slot"):
            source.capture()
        with pytest.raises(SlotLost):  # the sensor's peek fails its tick the same way
            peek(url, slot, publication_name(ENV, "shop"))
        lost_check = slot_lag_check()
        assert (lost_check.passed, lost_check.severity) == (False, dg.AssetCheckSeverity.ERROR)
        assert "invalidated" in lost_check.description

        cli = CliRunner()
        refused = cli.invoke(app, ["source", "setup", "--source", "shop", "--url", url])
        assert refused.exit_code == 1
        assert "invalidated" in refused.output and "--replace-lost-slot" in refused.output
        replaced = cli.invoke(
            app, ["source", "setup", "--source", "shop", "--url", url, "--replace-lost-slot"]
        )
        assert replaced.exit_code == 0, replaced.output
        assert f"slot {slot}: replaced" in replaced.output
        assert "gap recorded" in replaced.output
        assert "no snapshot has re-baselined it yet: audit-platform source snapshot" in (
            replaced.output
        )

        _order(url, 3)
        after = source.capture()
        assert after.changes == 1
        staged = source.staged()
        assert sorted(staged["after"].str.json_path_match("$.id").to_list()) == ["1", "3"]

        with psycopg.connect(url, autocommit=True) as conn:
            [gap] = list_gaps(conn, ENV, None)
            assert gap.from_lsn == first.confirmed_lsn
            assert first.confirmed_lsn <= gap.to_lsn < after.confirmed_lsn
            assert "invalidated" in gap.reason
            assert gap.last_captured_at == staged["commit_time"].min()

            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        with pytest.raises(SlotMissing):
            source.capture()
        assert "does not exist" in slot_lag_check().description
        _order(url, 4)  # after the drop, before the new slot: not captured either
        recreated = cli.invoke(app, ["source", "setup", "--source", "shop", "--url", url])
        assert recreated.exit_code == 0, recreated.output
        with psycopg.connect(url, autocommit=True) as conn:
            gaps = list_gaps(conn, ENV, None)
            assert gaps[0] == gap
            # Without the slot, the last staged batch is the last position known captured.
            assert first.confirmed_lsn < gaps[1].from_lsn <= after.confirmed_lsn
            assert "dropped" in gaps[1].reason
            assert list_gaps(conn, ENV, frozenset({"billing"})) == []
        _order(url, 5)
        assert source.capture().changes == 1

        # A whole snapshot re-establishes every row's state: both gaps name it.
        rebased = cli.invoke(
            app, ["source", "snapshot", "--source", "shop", "--url", url, "--id", "rebase"]
        )
        assert rebased.exit_code == 0, rebased.output
        assert rebased.output.count("gap re-baselined") == 2
        with psycopg.connect(url, autocommit=True) as conn:
            assert {g.rebaselined_by for g in list_gaps(conn, ENV, None)} == {"rebase"}
            orders = {str(r[0]) for r in conn.execute("SELECT id FROM orders")}
        source.capture()
        snapshot = source.staged().filter(operation="snapshot", table="orders")
        assert set(snapshot["after"].str.json_path_match("$.id").to_list()) == orders
        assert orders >= {"2", "4"}  # rows whose inserts fell into the gaps have a record now
    finally:
        server.down()


def test_gaps_table_is_installed_with_the_platform_schema(pg_database):
    with psycopg.connect(pg_database, autocommit=True) as conn:
        assert "003_capture_gaps" in platform_db.install(conn, Settings().resources_dir / "sql")
        assert list_gaps(conn, ENV, None) == []
