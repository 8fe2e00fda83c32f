"""Dagster's storage stays bounded: old runs are purged, but never the one that holds an
hour's latest materialization, and the hourly partitions start where the environment does."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest

from audit_platform.defs.housekeeping import purge_runs
from audit_platform.defs.partitions import hour_key, hourly_partitions, partitions_start
from audit_platform.environment import EnvironmentConfig

START = datetime(2026, 11, 1, tzinfo=UTC)
PARTITIONS = hourly_partitions(START)


@dg.asset(partitions_def=PARTITIONS)
def hourly() -> None:
    return None


@dg.op
def broken() -> None:
    raise RuntimeError("a failed run")


@dg.job
def failing_job() -> None:
    broken()


def test_old_runs_are_purged_except_the_latest_materialization_of_each_partition():
    first, second = hour_key(START), hour_key(START + timedelta(hours=1))
    environment = EnvironmentConfig(dagster_runs_keep_days=7, dagster_failed_runs_keep_days=30)
    with dg.instance_for_test() as instance:

        def materialize(partition: str) -> str:
            return dg.materialize([hourly], instance=instance, partition_key=partition).run_id

        superseded, latest_first, latest_second = (
            materialize(first),
            materialize(first),
            materialize(second),
        )
        failed = failing_job.execute_in_process(instance=instance, raise_on_error=False).run_id
        now = datetime.now(UTC)

        assert purge_runs(instance, environment, now) == {
            "deleted_done": 0,
            "deleted_failed": 0,
            "kept_latest": 0,
        }
        counts = purge_runs(instance, environment, now + timedelta(days=8))
        assert counts == {"deleted_done": 1, "deleted_failed": 0, "kept_latest": 2}
        remaining = {r.run_id for r in instance.get_runs()}
        assert remaining == {latest_first, latest_second, failed}
        assert superseded not in remaining
        assert instance.get_materialized_partitions(hourly.key) == {first, second}

        purge_runs(instance, environment, now + timedelta(days=31))
        assert {r.run_id for r in instance.get_runs()} == {latest_first, latest_second}


def test_partitions_start_where_configured_else_where_retention_still_keeps():
    now = datetime(2026, 11, 27, 15, 42, tzinfo=UTC)
    assert partitions_start(EnvironmentConfig(retention_days=7), now) == datetime(
        2026, 11, 20, tzinfo=UTC
    )
    configured = EnvironmentConfig(partitions_start=datetime(2026, 10, 3, 8, 30, tzinfo=UTC))
    assert partitions_start(configured, now) == datetime(2026, 10, 3, 8, tzinfo=UTC)
    assert hourly_partitions(START).get_first_partition_key() == "2026-11-01-00:00"


def test_a_partitions_start_without_a_time_zone_is_refused():
    with pytest.raises(ValueError, match="timezone"):
        EnvironmentConfig(partitions_start=datetime(2026, 10, 3))
