"""Per source an hourly reconciliation; per environment a daily retention run.

No ``from __future__ import annotations`` in defs/: Dagster reads config annotations at runtime.
"""

from datetime import UTC, datetime, timedelta

import dagster as dg
from pydantic import Field

from audit_platform.defs.enrich.assets import enrich_hours
from audit_platform.defs.index.assets import count_check, index_batches, transactions_check
from audit_platform.defs.resources import AuditPlatform
from audit_platform.environment import EnvironmentConfig, SourceConfig
from audit_platform.index.reconcile import short_batches
from audit_platform.index.retention import run_for_environment
from audit_platform.naming import class_index_pattern, slot_name

SLOT_TAG = "audit/slot"


class ReconcileConfig(dg.Config):
    lookback_hours: int = Field(default=24, description="How many past hours to compare.")


def reconcile_job(
    env: str, source: str, config: SourceConfig, environment: EnvironmentConfig
) -> dg.JobDefinition:
    @dg.op(
        name=f"reconcile_{source}",
        description=f"Compare staged records with indexed documents per hour for source "
        f"{source}; re-index the batches with missing documents, then check again.",
    )
    def op(
        context: dg.OpExecutionContext, platform: AuditPlatform, config: ReconcileConfig
    ) -> None:
        store = platform.store(source)
        since = (datetime.now(UTC) - timedelta(hours=config.lookback_hours)).replace(
            minute=0, second=0, microsecond=0
        )
        # Staged hours that were never enriched (their enrichment failed for good) come first.
        enriched = set(store.hours("records"))
        unenriched = [h for h in store.hours("changes") if h >= since and h not in enriched]
        if unenriched:
            context.log.info(f"enriching {len(unenriched)} hour(s) that have no records")
            grace = timedelta(minutes=environment.enrich_grace_minutes)
            enrich_hours(platform, source, unenriched, grace)
        hours = [h for h in store.hours("records") if h >= since]
        # The source's records are in its retention class's indices, shared with the class's
        # other sources: counts filter on source.service.
        retention_class = environment.retention_class_of(source)
        indices = class_index_pattern(platform.env, retention_class)
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
                    f"re-indexing {len(files)} batch file(s) of {len(short)} hour(s) with "
                    "missing documents"
                )
                index_batches(platform, source, source_config, files, environment)
                client.indices.refresh(index=indices, allow_no_indices=True)
            for hour in hours:
                context.log_event(count_check(source, client, store, hour, retention_class))
                context.log_event(transactions_check(source, store, hour))

    source_config = config

    @dg.job(
        name=f"reconcile_{source}_job",
        description=f"Hourly reconciliation of source {source}'s index with staged records.",
        tags={SLOT_TAG: slot_name(env, source)},
    )
    def job() -> None:
        op()

    return job


def reconcile_schedule(source: str, job: dg.JobDefinition) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name=f"reconcile_{source}_schedule",
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

    @dg.job(name="retention_job", description="Daily retention of this environment.")
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
