"""Per source: enriched records by hour, the orphan-rate check, and the quarantine asset.

No ``from __future__ import annotations`` in defs/: Dagster reads config annotations at runtime.
"""

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from functools import cache

import dagster as dg
import psycopg

from audit_platform import platform_db, quarantine
from audit_platform.clients import pg_url_from_settings
from audit_platform.defs.capture.assets import staged_key
from audit_platform.defs.partitions import hour_key, hourly_partitions_def, parse_hour_key
from audit_platform.defs.retries import transient_retry_policy
from audit_platform.enrich_hour import HourResult, enrich_hour
from audit_platform.naming import slot_name
from audit_platform.policy import load_policy, policy_path
from audit_platform.settings import Settings
from audit_platform.staging import StagingStore

#: More orphans than this share of an hour's changes fails the check (as a warning).
ORPHAN_RATE_WARN = 0.05


def enriched_key(source: str) -> dg.AssetKey:
    return dg.AssetKey([source, "enriched"])


def quarantine_key(source: str) -> dg.AssetKey:
    return dg.AssetKey([source, "quarantine"])


@cache
def _installed(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        platform_db.install(conn, Settings().resources_dir / "sql")
    return True


def state_connection() -> psycopg.Connection:
    """The platform's own database (AUDIT_PG_URL), its tables installed on first use."""
    url = pg_url_from_settings(Settings())
    _installed(url)
    return psycopg.connect(url, autocommit=True)


def enrich_hours(source: str, hours: Iterable[datetime], grace: timedelta) -> list[HourResult]:
    settings = Settings()
    policy = load_policy(policy_path(settings.resources_dir, source))
    store = StagingStore(settings.staging_root, settings.env, source)
    now = datetime.now(UTC)
    with state_connection() as state:
        return [
            enrich_hour(store, state, policy, hour, now=now, grace=grace) for hour in sorted(hours)
        ]


def hour_events(source: str, result: HourResult) -> list:
    """What an enrichment of one hour reports: its materialization and its orphan-rate check."""
    metadata = result.metadata
    partition = hour_key(result.hour)
    return [
        dg.AssetMaterialization(
            asset_key=enriched_key(source), partition=partition, metadata=metadata
        ),
        dg.AssetCheckEvaluation(
            asset_key=enriched_key(source),
            check_name="orphan_rate",
            passed=metadata["orphan_rate"] <= ORPHAN_RATE_WARN,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "partition": partition,
                "orphan_rate": metadata["orphan_rate"],
                "threshold": ORPHAN_RATE_WARN,
            },
        ),
    ]


def enrich_op(source: str, grace: timedelta) -> dg.OpDefinition:
    @dg.op(
        name=f"enrich_{source}",
        description=f"Enrich the hours of source {source} that the capture just touched.",
        retry_policy=transient_retry_policy,
    )
    def op(context: dg.OpExecutionContext, hours: list[str]) -> list[str]:
        parsed = [parse_hour_key(h) for h in hours]
        for result in enrich_hours(source, parsed, grace):
            for event in hour_events(source, result):
                context.log_event(event)
        return hours

    return op


def enriched_asset(source: str, grace: timedelta) -> dg.AssetsDefinition:
    slot = slot_name(Settings().env, source)

    @dg.asset(
        key=enriched_key(source),
        description=f"Audit records of source {source}: each staged change joined with its "
        "transaction's context, by commit hour. Rebuilt whole from staged data on every "
        "materialization, so a backfill reproduces the original.",
        partitions_def=hourly_partitions_def,
        deps=[staged_key(source, "changes"), staged_key(source, "contexts")],
        group_name="enrich",
        kinds={"polars", "parquet"},
        owners=["team:platform"],
        pool=slot,
        check_specs=[dg.AssetCheckSpec("orphan_rate", asset=enriched_key(source))],
        retry_policy=transient_retry_policy,
    )
    def asset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        hour = context.partition_time_window.start.astimezone(UTC)
        [result] = enrich_hours(source, [hour], grace)
        _, check = hour_events(source, result)
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
    def asset() -> dg.MaterializeResult:
        settings = Settings()
        with state_connection() as state:
            current = quarantine.stats(state, settings.env, source)
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
