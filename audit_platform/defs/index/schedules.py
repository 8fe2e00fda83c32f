"""Per environment an hourly reconciliation and a daily retention run.

No ``from __future__ import annotations`` in defs/: Dagster reads config annotations at runtime.
"""

from datetime import UTC, datetime, timedelta

import dagster as dg
from pydantic import Field

from audit_platform.defs.enrich.assets import enrich_hours
from audit_platform.defs.index.assets import count_check, index_batches, transactions_check
from audit_platform.defs.resources import AuditPlatform
from audit_platform.environment import EnvironmentConfig
from audit_platform.index.reconcile import short_batches
from audit_platform.index.retention import run_for_environment
from audit_platform.naming import class_index_pattern


class ReconcileConfig(dg.Config):
    lookback_hours: int = Field(default=24, description="How many past hours to compare.")
    sources: list[str] = Field(
        default=[], description="The sources to reconcile (none named: every source)."
    )


#: dagster.yaml runs one reconciliation at a time (the live run does not wait for it: the
#: source's ledger lock orders their writes).
RECONCILE_TAG = "audit/reconcile"

#: Hours this recent report their checks on every run; older ones only when they fail, so the
#: event log grows with the hours, not with the hours times the runs.
REPORTED_HOURS = 2


def reconcile_job(env: str, environment: EnvironmentConfig) -> dg.JobDefinition:
    """One run for the whole environment, source after source: a run per source each hour would
    be most of a fleet's Dagster runs (#25)."""

    @dg.op(
        name="reconcile",
        description="Per source, compare staged records with indexed documents per hour; "
        "re-index the batches with missing documents, then check again.",
    )
    def op(
        context: dg.OpExecutionContext, platform: AuditPlatform, config: ReconcileConfig
    ) -> None:
        unknown = sorted(set(config.sources) - set(environment.sources))
        if unknown:
            raise dg.Failure(
                f"no such source in environment {env}: {', '.join(unknown)}; "
                f"it has {', '.join(sorted(environment.sources)) or 'none'}"
            )
        since = (datetime.now(UTC) - timedelta(hours=config.lookback_hours)).replace(
            minute=0, second=0, microsecond=0
        )
        recent = datetime.now(UTC) - timedelta(hours=REPORTED_HOURS)
        failed = []
        for source in config.sources or sorted(environment.sources):
            try:
                for hour, check in _reconcile(context, platform, source, since):
                    if check.passed is False or hour >= recent:
                        context.log_event(check)
            except Exception as exc:  # the other sources go on; the run fails at the end
                context.log.exception(f"reconciliation of source {source} failed")
                failed.append(f"{source}: {type(exc).__name__}: {exc}")
        if failed:
            raise dg.Failure("reconciliation failed for " + "; ".join(failed))

    def _reconcile(context, platform: AuditPlatform, source: str, since: datetime) -> list:
        store = platform.store(source)
        # Staged hours that were never enriched (their enrichment failed for good) come first.
        enriched = set(store.hours("records"))
        unenriched = [h for h in store.hours("changes") if h >= since and h not in enriched]
        if unenriched:
            context.log.info(f"{source}: enriching {len(unenriched)} hour(s) that have no records")
            grace = timedelta(minutes=environment.enrich_grace_minutes)
            enrich_hours(platform, source, unenriched, grace)
        hours = [h for h in store.hours("records") if h >= since]
        # The source's records are in its retention class's indices, shared with the class's
        # other sources: counts filter on source.service.
        retention_class = environment.retention_class_of(source)
        indices = class_index_pattern(platform.settings.env, retention_class)
        with platform.elasticsearch() as client:
            client.indices.refresh(index=indices, allow_no_indices=True)
            short = [
                h
                for h in hours
                if count_check(source, client, store, h, retention_class).passed is False
            ]
            # Only the batches that are short go again, not their hours.
            files = [
                path
                for hour in short
                for path in short_batches(client, store, hour, retention_class)
            ]
            if files:
                context.log.info(
                    f"{source}: re-indexing {len(files)} batch file(s) of {len(short)} hour(s) "
                    "with missing documents"
                )
                config = environment.sources[source]
                index_batches(platform, source, config, files, environment)
                client.indices.refresh(index=indices, allow_no_indices=True)
            return [
                (hour, check)
                for hour in hours
                for check in (
                    count_check(source, client, store, hour, retention_class),
                    transactions_check(source, store, hour),
                )
            ]

    @dg.job(
        name="reconcile_job",
        tags={RECONCILE_TAG: env},
        executor_def=dg.in_process_executor,  # one op: no second process to start
        description="Hourly reconciliation of every source's indexed documents with its staged "
        "records (config: `sources` to limit it).",
    )
    def job() -> None:
        op()

    return job


def reconcile_schedule(job: dg.JobDefinition) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name="reconcile_schedule",
        job=job,
        cron_schedule="15 * * * *",
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )


class RetentionConfig(dg.Config):
    dry_run: bool = Field(default=False, description="Only list what would be deleted.")


def retention_job(environment: EnvironmentConfig) -> dg.JobDefinition:
    @dg.op(
        name="retention",
        description="Delete what is older than the environment's retention period: indices "
        "(where the cluster has no ILM), staged hours, settled quarantine entries.",
    )
    def op(
        context: dg.OpExecutionContext, platform: AuditPlatform, config: RetentionConfig
    ) -> dg.Output[None]:
        report = run_for_environment(
            platform.settings, environment, now=datetime.now(UTC), dry_run=config.dry_run
        )
        context.log.info(f"retention: {report.as_metadata()}")
        return dg.Output(None, metadata=report.as_metadata())

    @dg.job(
        name="retention_job",
        description="Daily retention of this environment.",
        executor_def=dg.in_process_executor,
    )
    def job() -> None:
        op()

    return job


def retention_schedule(job: dg.JobDefinition) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name="retention_schedule",
        job=job,
        cron_schedule="30 3 * * *",
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )
