"""A job that runs some asset checks, and the schedule that runs it (on by default): how the
health checks and the trail's hourly duties are operated."""

from __future__ import annotations

import dagster as dg


def scheduled_checks(
    name: str, checks: list[dg.AssetChecksDefinition], cron: str, description: str
) -> dg.ScheduleDefinition:
    """``<name>_schedule``, running at ``cron`` the job ``<name>_job`` (its ``job``), which runs
    ``checks``."""
    # In the run's own process: the default executor starts a process per check (an import of
    # Dagster and this code each, about 2 s of CPU), which at 50 sources kept a core busy for
    # minutes every ten (benchmarks/results/fleet-issue25.md). The checks are small queries.
    job = dg.define_asset_job(
        f"{name}_job",
        selection=dg.AssetSelection.checks(*checks),
        description=description,
        executor_def=dg.in_process_executor,
    )
    schedule = dg.ScheduleDefinition(
        name=f"{name}_schedule",
        job=job,
        cron_schedule=cron,
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )
    return schedule
