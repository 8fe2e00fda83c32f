"""The Dagster code location: wiring only; the work lives in the plain-Python core.

One deployment serves one environment (``AUDIT_ENV``) and only the sources its
``resources/environments/<env>.yaml`` names: another environment's slots, paths and indices
cannot be reached from here.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg

from audit_platform.defs.capture.assets import staged_asset_specs
from audit_platform.defs.capture.live import capture_live_checks, keeper_sensor, live_capture_job
from audit_platform.defs.enrich.assets import enriched_asset, enriched_key, quarantine_asset
from audit_platform.defs.erasures import erasures_job, erasures_schedule
from audit_platform.defs.health import (
    CHECK_CRON,
    source_checks,
    template_check,
)
from audit_platform.defs.housekeeping import dagster_runs_job, dagster_runs_schedule
from audit_platform.defs.index.assets import indexed_asset, indexed_key, template_asset
from audit_platform.defs.index.schedules import (
    reconcile_job,
    reconcile_schedule,
    retention_job,
    retention_schedule,
)
from audit_platform.defs.partitions import hourly_partitions, partitions_start
from audit_platform.defs.resources import AuditPlatform
from audit_platform.defs.retries import transient_retry_policy
from audit_platform.defs.scheduled_checks import scheduled_checks
from audit_platform.defs.snapshots import snapshot_job
from audit_platform.defs.streams import streams_asset_spec, streams_checks
from audit_platform.defs.trust import TRUST_CRON, reads_check, trail_check
from audit_platform.environment import load_environment
from audit_platform.settings import Settings


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    settings = settings or Settings()
    env = settings.env
    environment = load_environment(settings.resources_dir, env)
    assets: list[dg.AssetsDefinition | dg.AssetSpec] = [
        template_asset(environment, settings.resources_dir)
    ]
    jobs: list[dg.JobDefinition | dg.UnresolvedAssetJobDefinition] = []
    sensors: list[dg.SensorDefinition] = []
    schedules: list[dg.ScheduleDefinition] = []
    checks = [template_check(environment), *streams_checks(environment)]
    assets.append(streams_asset_spec())
    live_checks = []
    grace = timedelta(minutes=environment.enrich_grace_minutes)
    retry = transient_retry_policy(environment)
    partitions = hourly_partitions(partitions_start(environment, datetime.now(UTC)))
    for source, config in sorted(environment.sources.items()):
        assets.extend(staged_asset_specs(source, partitions))
        assets.append(enriched_asset(env, source, grace, partitions, retry))
        assets.append(quarantine_asset(source))
        assets.append(indexed_asset(env, source, config, environment, partitions))
        enrich_job = dg.define_asset_job(
            f"enrich_{source}_job",
            selection=[enriched_key(source), indexed_key(source)],
            description=f"Rebuild whole hours of source {source}: enrich, then index (backfills).",
        )
        checks.extend(source_checks(env, source, config, environment))
        live_checks.append(capture_live_checks(env, source, config))
        jobs.append(enrich_job)
    # Per environment, not per source: the number of runs must not grow with the fleet (#25).
    reconcile = reconcile_job(env, environment)
    jobs.append(reconcile)
    schedules.append(reconcile_schedule(reconcile))
    # Capture: one long-lived run per shard of the environment, kept alive by one sensor.
    live = {
        shard: live_capture_job(environment, shard) for shard in range(environment.capture_shards)
    }
    jobs.extend(live.values())
    sensors.append(keeper_sensor(environment, live))
    checked = [
        scheduled_checks(
            "health_checks",
            checks,
            CHECK_CRON,
            "Slot lag, tracked tables, template and stream checks of this environment.",
        )
    ]
    trail = [trail_check(source) for source in sorted(environment.sources)]
    if environment.sources:
        trail.append(reads_check(min(environment.sources)))
        checked.append(
            scheduled_checks(
                "trust",
                trail,
                TRUST_CRON,
                "Sign and verify the trail of every source, and the read log.",
            )
        )
    schedules.extend(checked)
    jobs.extend(schedule.job for schedule in checked)
    retention = retention_job(environment)
    jobs.append(retention)
    schedules.append(retention_schedule(retention))
    jobs.append(snapshot_job(environment))
    runs = dagster_runs_job(environment)
    jobs.append(runs)
    schedules.append(dagster_runs_schedule(runs))
    erasing = erasures_job()
    jobs.append(erasing)
    schedules.append(erasures_schedule(erasing))
    sensors.append(
        dg.AutomationConditionSensorDefinition(
            "automation_sensor",
            target=dg.AssetSelection.all(),
            default_status=dg.DefaultSensorStatus.RUNNING,
            description="Materializes the index template when it is missing or has changed.",
        )
    )
    return dg.Definitions(
        assets=assets,
        asset_checks=[*checks, *live_checks, *trail],
        jobs=jobs,
        sensors=sensors,
        schedules=schedules,
        resources={"platform": AuditPlatform.from_environment()},
    )


defs = build_definitions()
