"""The index template asset, per source the indexed hourly asset, and the index op.

No ``from __future__ import annotations`` in defs/: Dagster reads config annotations at runtime.
"""

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import psycopg
from elasticsearch import Elasticsearch

from audit_platform.defs.capture.assets import source_url
from audit_platform.defs.enrich.assets import enriched_key
from audit_platform.defs.partitions import hour_key
from audit_platform.defs.resources import AuditPlatform
from audit_platform.defs.retries import transient_retry_policy
from audit_platform.environment import EnvironmentConfig, SourceConfig
from audit_platform.index.batch import HourIndexed, index_files, index_hour, index_pending
from audit_platform.index.reconcile import hour_counts, hour_transactions
from audit_platform.index.template import ensure_template
from audit_platform.lsn import lsn_text
from audit_platform.naming import class_index_pattern, slot_name
from audit_platform.staging import StagingStore

TEMPLATE_KEY = dg.AssetKey(["elasticsearch", "index_template"])


def indexed_key(source: str) -> dg.AssetKey:
    return dg.AssetKey([source, "indexed"])


def _template_code_version(resources_dir: Path) -> str:
    path = resources_dir / "elasticsearch" / "index-template.json"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def template_asset(environment: EnvironmentConfig, resources_dir: Path) -> dg.AssetsDefinition:
    @dg.asset(
        key=TEMPLATE_KEY,
        description="The environment's index template (mappings, settings, read alias). "
        "Materialized when missing and whenever resources/elasticsearch changes (every indexing "
        "run checks it too); the fields a changed template adds are added to existing indices.",
        group_name="index",
        kinds={"elasticsearch"},
        owners=["team:platform"],
        code_version=_template_code_version(resources_dir),
        automation_condition=dg.AutomationCondition.on_missing()
        | dg.AutomationCondition.code_version_changed(),
    )
    def asset(platform: AuditPlatform) -> dg.MaterializeResult:
        settings = platform.settings
        with platform.elasticsearch() as client:
            installed, lifecycles = ensure_template(
                client,
                settings.resources_dir,
                settings.env,
                environment.index_replicas,
                environment.classes,
            )
        return dg.MaterializeResult(
            metadata={
                "lifecycle": ", ".join(lifecycles)
                or "none: this cluster has no ILM; retention_job deletes",
                "template": installed.name,
                "template_hash": installed.template_hash,
                "previous_hash": installed.previous_hash or "none",
                "changed": installed.changed,
            }
        )

    return asset


def database_of(url: str) -> str:
    # Parsed from a URL, every value is text (the dict's type allows the ints of keywords).
    return str(psycopg.conninfo.conninfo_to_dict(url).get("dbname") or "postgres")


@contextmanager
def _indexing(
    platform: AuditPlatform, source: str, config: SourceConfig, environment: EnvironmentConfig
) -> Iterator[tuple[Elasticsearch, StagingStore, str]]:
    """(client, store, source database name) for indexing; the template is installed first
    where it is missing."""
    with platform.elasticsearch(environment) as client:
        yield client, platform.store(source), database_of(source_url(source, config))


def index_hours(
    platform: AuditPlatform,
    source: str,
    config: SourceConfig,
    hours: list[datetime],
    environment: EnvironmentConfig,
) -> list[HourIndexed]:
    """Index whole hours again (backfills)."""
    now = datetime.now(UTC)
    with _indexing(platform, source, config, environment) as (client, store, database):
        retention_class = environment.retention_class_of(source)
        return [
            index_hour(
                client, store, hour, database=database, now=now, retention_class=retention_class
            )
            for hour in sorted(hours)
        ]


def index_batches(
    platform: AuditPlatform,
    source: str,
    config: SourceConfig,
    records_paths: list[str],
    environment: EnvironmentConfig,
) -> list[HourIndexed]:
    """Index some records files again (reconciliation of short batches)."""
    with _indexing(platform, source, config, environment) as (client, store, database):
        return index_files(
            client,
            store,
            records_paths,
            database=database,
            now=datetime.now(UTC),
            retention_class=environment.retention_class_of(source),
        )


def index_increment(
    platform: AuditPlatform, source: str, config: SourceConfig, environment: EnvironmentConfig
) -> list[HourIndexed]:
    """A run's own work: every enriched batch or resolution on the pending ledger, added to
    the streams' feed as it is indexed."""
    with (
        _indexing(platform, source, config, environment) as (client, store, database),
        platform.state() as state,
    ):
        return index_pending(
            client,
            store,
            database=database,
            now=datetime.now(UTC),
            retention_class=environment.retention_class_of(source),
            feed=state,
        )


def count_check(
    source: str, client, store: StagingStore, hour: datetime, retention_class: str
) -> dg.AssetCheckEvaluation:
    counts = hour_counts(client, store, hour, retention_class)
    return dg.AssetCheckEvaluation(
        asset_key=indexed_key(source),
        check_name="staged_vs_indexed",
        passed=counts.missing == 0,
        metadata={
            "partition": hour_key(hour),
            "staged": counts.staged,
            "indexed": counts.indexed,
            "dead_lettered": counts.dead_lettered,
            "missing": counts.missing,
        },
    )


def transactions_check(source: str, store: StagingStore, hour: datetime) -> dg.AssetCheckEvaluation:
    found = hour_transactions(store, hour)
    return dg.AssetCheckEvaluation(
        asset_key=indexed_key(source),
        check_name="complete_transactions",
        passed=not found.incomplete,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "partition": hour_key(hour),
            "transactions": found.transactions,
            "incomplete": len(found.incomplete),
            "first_incomplete": dg.MetadataValue.md(
                "\n".join(
                    f"- commit LSN {lsn_text(lsn)}: {staged} of {expected} records"
                    for lsn, expected, staged in found.incomplete[:20]
                )
                or "none"
            ),
        },
        description=None
        if not found.incomplete
        else "transactions with fewer records than "
        "changes captured (less those the policy ignores): see the hour's rejected dataset",
    )


def index_op(source: str, config: SourceConfig, environment: EnvironmentConfig) -> dg.OpDefinition:
    @dg.op(
        name=f"index_{source}",
        description=f"Index what was just enriched for source {source} (and anything an "
        "earlier run enriched but could not index), never whole hours.",
        retry_policy=transient_retry_policy(environment),
    )
    def op(context: dg.OpExecutionContext, platform: AuditPlatform, hours: list[str]) -> list[str]:
        for indexed in index_increment(platform, source, config, environment):
            context.log_event(
                dg.AssetMaterialization(
                    asset_key=indexed_key(source),
                    partition=hour_key(indexed.hour),
                    metadata=indexed.metadata,
                )
            )
        return hours

    return op


def indexed_asset(
    env: str,
    source: str,
    config: SourceConfig,
    environment: EnvironmentConfig,
    partitions: dg.HourlyPartitionsDefinition,
) -> dg.AssetsDefinition:
    slot = slot_name(env, source)

    @dg.asset(
        key=indexed_key(source),
        description=f"Records of source {source} indexed into Elasticsearch, by commit hour. "
        "Deterministic document ids: re-indexing an hour replaces, never duplicates.",
        partitions_def=partitions,
        deps=[enriched_key(source), TEMPLATE_KEY],
        group_name="index",
        kinds={"elasticsearch"},
        owners=["team:platform"],
        pool=slot,
        check_specs=[
            dg.AssetCheckSpec("staged_vs_indexed", asset=indexed_key(source)),
            dg.AssetCheckSpec("complete_transactions", asset=indexed_key(source)),
        ],
        retry_policy=transient_retry_policy(environment),
    )
    def asset(context: dg.AssetExecutionContext, platform: AuditPlatform) -> dg.MaterializeResult:
        hour = context.partition_time_window.start.astimezone(UTC)
        [indexed] = index_hours(platform, source, config, [hour], environment)
        retention_class = environment.retention_class_of(source)
        with platform.elasticsearch() as client:
            client.indices.refresh(
                index=class_index_pattern(platform.settings.env, retention_class),
                allow_no_indices=True,
            )
            checks = [
                count_check(source, client, platform.store(source), hour, retention_class),
                transactions_check(source, platform.store(source), hour),
            ]
        return dg.MaterializeResult(
            metadata=indexed.metadata,
            check_results=[
                dg.AssetCheckResult(
                    check_name=c.check_name,
                    passed=c.passed,
                    severity=c.severity,
                    metadata=c.metadata,
                    description=c.description,
                )
                for c in checks
            ],
        )

    return asset
