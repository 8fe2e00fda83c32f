"""Per source: enriched records by hour, the orphan-rate check, and the quarantine asset.

No ``from __future__ import annotations`` in defs/: Dagster reads config annotations at runtime.
"""

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import dagster as dg

from audit_platform.defs.capture.assets import SLOT_TAG, staged_key
from audit_platform.defs.partitions import hour_key
from audit_platform.defs.resources import AuditPlatform
from audit_platform.enrich import quarantine
from audit_platform.enrich.batch import (
    HourResult,
    enrich_hour,
    enrich_pending,
    merge_hours,
    resolve_quarantine,
)
from audit_platform.naming import slot_name
from audit_platform.trust.log import TrustLog

#: More orphans than this share of an hour's changes fails the check (as a warning).
ORPHAN_RATE_WARN = 0.05


def enriched_key(source: str) -> dg.AssetKey:
    return dg.AssetKey([source, "enriched"])


def quarantine_key(source: str) -> dg.AssetKey:
    return dg.AssetKey([source, "quarantine"])


def enrich_hours(
    platform: AuditPlatform, source: str, hours: Iterable[datetime], grace: timedelta
) -> list[HourResult]:
    """Rebuild whole hours (backfills, reconciliation)."""
    store, policy, now = platform.store(source), platform.policy(source), datetime.now(UTC)
    with platform.state() as state:
        return [
            enrich_hour(store, state, policy, hour, now=now, grace=grace) for hour in sorted(hours)
        ]


def enrich_increment(
    platform: AuditPlatform, source: str, grace: timedelta, *, batches: bool
) -> list[HourResult]:
    """A run's own work: its pending batches (when ``batches``), then the orphans that are due
    or whose context has arrived. Never whole hours."""
    store, policy, now = platform.store(source), platform.policy(source), datetime.now(UTC)
    environment = platform.environment()
    with platform.state() as state:
        done = (
            enrich_pending(store, state, policy, now=now, grace=grace, trail=environment.trail)
            if batches else []
        )  # fmt: skip
        resolved = resolve_quarantine(store, state, policy, now=now, grace=grace)
    signer = platform.settings.signer()
    if batches and signer is not None and environment.trail:
        every = timedelta(seconds=environment.checkpoint_every_seconds)
        TrustLog(store).checkpoint(signer, now, every)
    return merge_hours([*done, *resolved])


def orphan_check(source: str, result: HourResult) -> dg.AssetCheckEvaluation:
    rate = result.metadata["orphan_rate"]
    return dg.AssetCheckEvaluation(
        asset_key=enriched_key(source),
        check_name="orphan_rate",
        passed=rate <= ORPHAN_RATE_WARN,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "partition": hour_key(result.hour),
            "orphan_rate": rate,
            "threshold": ORPHAN_RATE_WARN,
        },
    )


def hour_events(source: str, result: HourResult) -> list:
    """What an enrichment of one hour reports: its materialization and, where it enriched new
    changes, their orphan rate (of this increment; of the whole hour for a rebuild)."""
    materialization = dg.AssetMaterialization(
        asset_key=enriched_key(source), partition=hour_key(result.hour), metadata=result.metadata
    )
    return [materialization, orphan_check(source, result)] if result.changes else [materialization]


def enrich_op(
    source: str, grace: timedelta, retry: dg.RetryPolicy, *, batches: bool = True
) -> dg.OpDefinition:
    """The enrich step of a capture run (``batches``), or of a quarantine run (orphans only)."""

    @dg.op(
        name=f"enrich_{source}" if batches else f"resolve_{source}",
        description=f"Enrich the batches of source {source} that are staged but not enriched "
        "(this run's and any left by an earlier run), then the orphans that are due or whose "
        "context has arrived."
        if batches
        else f"Re-enrich the orphans of source {source} that are due or whose context has "
        "arrived, and only them.",
        retry_policy=retry,
        ins={"hours": dg.In(list[str], default_value=[])},
    )
    def op(context: dg.OpExecutionContext, platform: AuditPlatform, hours: list[str]) -> list[str]:
        results = enrich_increment(platform, source, grace, batches=batches)
        for result in results:
            for event in hour_events(source, result):
                context.log_event(event)
        return sorted({*hours, *(hour_key(r.hour) for r in results)})

    return op


def resolve_job(
    env: str, source: str, resolve: dg.OpDefinition, index: dg.OpDefinition
) -> dg.JobDefinition:
    """Re-enrich and re-index due orphans, without capturing. It carries the slot's tag, so it
    queues behind a running capture run instead of racing its ledger."""

    @dg.job(
        name=f"resolve_{source}_job",
        description=f"Resolve the quarantine of source {source}: orphans that are due or whose "
        "context has arrived, enriched and indexed on their own.",
        tags={SLOT_TAG: slot_name(env, source)},
        executor_def=dg.in_process_executor,
    )
    def job() -> None:
        index(resolve())

    return job


def enriched_asset(
    env: str,
    source: str,
    grace: timedelta,
    partitions: dg.HourlyPartitionsDefinition,
    retry: dg.RetryPolicy,
) -> dg.AssetsDefinition:
    slot = slot_name(env, source)

    @dg.asset(
        key=enriched_key(source),
        description=f"Audit records of source {source}: each staged change joined with its "
        "transaction's context, by commit hour, one records file per staged batch. Capture "
        "runs add their own batches; materializing an hour (a backfill) rebuilds it whole from "
        "staged data, with the same record ids.",
        partitions_def=partitions,
        deps=[staged_key(source, "changes"), staged_key(source, "contexts")],
        group_name="enrich",
        kinds={"polars", "parquet"},
        owners=["team:platform"],
        pool=slot,
        check_specs=[dg.AssetCheckSpec("orphan_rate", asset=enriched_key(source))],
        retry_policy=retry,
    )
    def asset(context: dg.AssetExecutionContext, platform: AuditPlatform) -> dg.MaterializeResult:
        hour = context.partition_time_window.start.astimezone(UTC)
        [result] = enrich_hours(platform, source, [hour], grace)
        check = orphan_check(source, result)
        return dg.MaterializeResult(
            metadata=result.metadata,
            check_results=[
                dg.AssetCheckResult(
                    check_name="orphan_rate",
                    passed=check.passed,
                    severity=check.severity,
                    metadata=check.metadata,
                )
            ],
        )

    return asset


def quarantine_asset(source: str) -> dg.AssetsDefinition:
    @dg.asset(
        key=quarantine_key(source),
        description=f"Changes of source {source} still waiting for their context, in the "
        "platform database. Its materialization reports size and oldest entry.",
        deps=[enriched_key(source)],
        group_name="enrich",
        kinds={"postgres"},
        owners=["team:platform"],
    )
    def asset(platform: AuditPlatform) -> dg.MaterializeResult:
        with platform.state() as state:
            current = quarantine.stats(state, platform.env, source)
        oldest = current.oldest_waiting
        return dg.MaterializeResult(
            metadata={
                "waiting": current.waiting,
                "released_unattributed": current.released,
                "oldest_waiting": oldest.isoformat() if oldest else "none",
                "oldest_waiting_age_seconds": (datetime.now(UTC) - oldest).total_seconds()
                if oldest
                else 0.0,
            }
        )

    return asset
