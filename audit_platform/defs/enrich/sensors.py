"""Per source: re-enrich the orphans that are due, or whose late context has arrived."""

from datetime import UTC, datetime

import dagster as dg

from audit_platform.defs.resources import AuditPlatform
from audit_platform.enrich import quarantine


def quarantine_sensor(source: str, job: dg.JobDefinition) -> dg.SensorDefinition:
    @dg.sensor(
        name=f"quarantine_{source}_sensor",
        description=f"Starts a run that re-enriches the orphans of source {source} that are due "
        "for a retry or whose context was attached late (only those records, not their hours).",
        job=job,
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def sensor(
        context: dg.SensorEvaluationContext, platform: AuditPlatform
    ) -> dg.RunRequest | dg.SkipReason:
        now = datetime.now(UTC)
        with platform.state() as state:
            due = quarantine.revisit_count(state, platform.env, source, now)
        if not due:
            return dg.SkipReason("no orphan is due and no late context has arrived")
        # At most one request per minute: a retry is not requested twice in the same minute.
        return dg.RunRequest(run_key=f"{source}@{now:%Y%m%d%H%M}", tags={"orphans_due": str(due)})

    return sensor


def quarantine_schedule(source: str, job) -> dg.ScheduleDefinition:  # job: an asset job
    return dg.ScheduleDefinition(
        name=f"quarantine_{source}_schedule",
        description=f"Reports the quarantine of source {source} (size, oldest entry).",
        job=job,
        cron_schedule="*/5 * * * *",
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )
