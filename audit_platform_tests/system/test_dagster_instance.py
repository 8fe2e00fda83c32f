"""The deployment files load: dagster.yaml on real PostgreSQL storage, and the code location."""

from __future__ import annotations

import shutil

import dagster as dg
import yaml
from dagster._core.instance import DagsterInstance

from audit_platform.settings import PROJECT_ROOT
from audit_platform_dev.stack.deployment import dagster_storage_url


def test_dagster_yaml_runs_on_postgres_storage_with_one_capture_run_per_shard(
    pg_database, tmp_path, monkeypatch
):
    shutil.copy(PROJECT_ROOT / "dagster.yaml", tmp_path / "dagster.yaml")
    monkeypatch.setenv("AUDIT_DAGSTER_PG_URL", dagster_storage_url(pg_database))
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        # Events are written (with a bare postgresql:// URL and SQLAlchemy 2.1 this fails).
        instance.report_runless_asset_event(dg.AssetMaterialization("probe"))
        assert instance.get_latest_materialization_event(dg.AssetKey("probe")) is not None
        limits = instance.run_coordinator.get_run_queue_config().tag_concurrency_limits
        # One live capture run per shard; one reconciliation at a time (they do not wait for
        # each other: the ledger lock orders their writes).
        for key in ("audit/capture-shard", "audit/reconcile"):
            assert {"key": key, "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in limits
        assert instance.run_monitoring_enabled
        assert instance.run_retries_enabled


def test_workspace_points_at_a_loadable_code_location():
    workspace = yaml.safe_load((PROJECT_ROOT / "workspace.yaml").read_text())
    module = workspace["load_from"][0]["python_module"]["module_name"]
    assert module == "audit_platform.defs"
    from audit_platform.defs import defs

    dg.Definitions.validate_loadable(defs)
