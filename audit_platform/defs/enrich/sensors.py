"""Per source: a schedule that reports the quarantine (re-enriching orphans is the live
capture run's: audit_platform/capture/live.py)."""

import dagster as dg


def quarantine_schedule(source: str, job) -> dg.ScheduleDefinition:  # job: an asset job
    return dg.ScheduleDefinition(
        name=f"quarantine_{source}_schedule",
        description=f"Reports the quarantine of source {source} (size, oldest entry).",
        job=job,
        cron_schedule="*/5 * * * *",
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )
