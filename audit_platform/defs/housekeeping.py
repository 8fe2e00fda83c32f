"""Dagster's own storage stays bounded: old runs are purged on a schedule.

A capture run every few seconds adds thousands of runs a day per source, each with its event
log, and Dagster never deletes them by itself. ``dagster_runs_job`` deletes successful (and
cancelled) runs older than ``dagster_runs_keep_days`` and failed ones older than
``dagster_failed_runs_keep_days``, except a run that holds the latest materialization of some
asset partition: deleting it would make the UI show that hour as never materialized.
"""

from datetime import UTC, datetime, timedelta

import dagster as dg

from audit_platform.environment import EnvironmentConfig

#: Runs deleted per pass at most: one pass stays short, the hourly schedule catches up.
PURGE_BATCH = 5_000

DONE = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.CANCELED]
FAILED = [dg.DagsterRunStatus.FAILURE]


def runs_holding_latest_materializations(instance: dg.DagsterInstance) -> set[str]:
    """Run ids that wrote the latest materialization of at least one asset partition."""
    keep: set[str] = set()
    for key in instance.get_asset_keys():
        latest = instance.get_latest_storage_id_by_partition(
            key, dg.DagsterEventType.ASSET_MATERIALIZATION
        )
        ids = sorted(latest.values())
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            found = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=key, storage_ids=chunk), limit=len(chunk)
            )
            keep.update(record.run_id for record in found.records)
    return keep


def purge_runs(
    instance: dg.DagsterInstance, environment: EnvironmentConfig, now: datetime
) -> dict[str, int]:
    keep = runs_holding_latest_materializations(instance)
    deleted = {"deleted_done": 0, "deleted_failed": 0, "kept_latest": 0}
    for statuses, days, counter in (
        (DONE, environment.dagster_runs_keep_days, "deleted_done"),
        (FAILED, environment.dagster_failed_runs_keep_days, "deleted_failed"),
    ):
        records = instance.get_run_records(
            filters=dg.RunsFilter(statuses=statuses, updated_before=now - timedelta(days=days)),
            limit=PURGE_BATCH,
            ascending=True,
        )
        for record in records:
            run_id = record.dagster_run.run_id
            if run_id in keep:
                deleted["kept_latest"] += 1
                continue
            instance.delete_run(run_id)
            deleted[counter] += 1
    return deleted


def dagster_runs_job(environment: EnvironmentConfig) -> dg.JobDefinition:
    @dg.op(name="purge_runs", description=__doc__.split("\n\n")[1].replace("\n", " "))
    def op(context: dg.OpExecutionContext) -> dg.Output[None]:
        counts = purge_runs(context.instance, environment, datetime.now(UTC))
        context.log.info(f"purged runs: {counts}")
        return dg.Output(None, metadata=counts)

    @dg.job(
        name="dagster_runs_job",
        description="Purge old runs of this deployment.",
        executor_def=dg.in_process_executor,
    )
    def job() -> None:
        op()

    return job


def dagster_runs_schedule(job: dg.JobDefinition) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name="dagster_runs_schedule",
        job=job,
        cron_schedule="17 * * * *",
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )
