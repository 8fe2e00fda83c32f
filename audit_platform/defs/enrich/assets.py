"""Per source: enriched records by hour, the orphan-rate check, and the quarantine asset.

No ``from __future__ import annotations`` in defs/: Dagster reads config annotations at runtime.
"""

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import dagster as dg

from audit_platform.defs.capture.assets import staged_key
from audit_platform.defs.partitions import hour_key
from audit_platform.defs.resources import AuditPlatform
from audit_platform.enrich import quarantine
from audit_platform.enrich.batch import HourResult, enrich_hour
from audit_platform.naming import slot_name
from audit_platform.staging.lock import ledger_lock

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
    # The live capture run writes this source's records too: one writer at a time.
    with platform.state() as state, ledger_lock(state, platform.settings.env, source):
        return [
            enrich_hour(store, state, policy, hour, now=now, grace=grace) for hour in sorted(hours)
        ]


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


def quarantine_metadata(current: quarantine.QuarantineStats) -> dict:
    oldest = current.oldest_waiting
    return {
        "waiting": current.waiting,
        "released_unattributed": current.released,
        "oldest_waiting": oldest.isoformat() if oldest else "none",
        "oldest_waiting_age_seconds": (datetime.now(UTC) - oldest).total_seconds()
        if oldest
        else 0.0,
    }


def quarantine_asset(source: str) -> dg.AssetsDefinition:
    @dg.asset(
        key=quarantine_key(source),
        description=f"Changes of source {source} still waiting for their context, in the "
        "platform database. Its materialization reports size and oldest entry: the live "
        "capture run reports it while it changes or is not empty.",
        deps=[enriched_key(source)],
        group_name="enrich",
        kinds={"postgres"},
        owners=["team:platform"],
    )
    def asset(platform: AuditPlatform) -> dg.MaterializeResult:
        with platform.state() as state:
            current = quarantine.stats(state, platform.settings.env, source)
        return dg.MaterializeResult(metadata=quarantine_metadata(current))

    return asset
