"""Per source: revisit hours whose orphans are due, or whose late context has arrived."""

from datetime import UTC, datetime

import dagster as dg

from audit_platform import quarantine
from audit_platform.defs.enrich.assets import state_connection
from audit_platform.defs.partitions import hour_key
from audit_platform.settings import Settings


def quarantine_sensor(source: str, job) -> dg.SensorDefinition:  # job: an asset job
    @dg.sensor(
        name=f"quarantine_{source}_sensor",
        description=f"Re-enriches hours of source {source} holding orphans that are due for a "
        "retry or whose context was attached late.",
        job=job,
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        now = datetime.now(UTC)
        with state_connection() as state:
            hours = quarantine.hours_to_revisit(state, Settings().env, source, now)
        if not hours:
            return dg.SkipReason("no orphan is due and no late context has arrived")
        # One request per hour and minute: a retry is not requested twice in the same minute.
        stamp = now.strftime("%Y%m%d%H%M")
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(partition_key=hour_key(h), run_key=f"{hour_key(h)}@{stamp}")
                for h in hours
            ]
        )

    return sensor


def quarantine_schedule(source: str, job) -> dg.ScheduleDefinition:  # job: an asset job
    return dg.ScheduleDefinition(
        name=f"quarantine_{source}_schedule",
        description=f"Reports the quarantine of source {source} (size, oldest entry).",
        job=job,
        cron_schedule="*/5 * * * *",
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )
