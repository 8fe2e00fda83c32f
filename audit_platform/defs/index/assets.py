"""The index template asset, per source the indexed hourly asset, and the index op.

No ``from __future__ import annotations`` in defs/: Dagster reads config annotations at runtime.
"""

import hashlib
from datetime import UTC, datetime

import dagster as dg
import psycopg

from audit_platform.clients import es_from_settings
from audit_platform.defs.capture.assets import source_url
from audit_platform.defs.enrich.assets import enriched_key
from audit_platform.defs.partitions import hour_key, hourly_partitions_def
from audit_platform.defs.retries import transient_retry_policy
from audit_platform.environment import EnvironmentConfig, SourceConfig
from audit_platform.index.batch import HourIndexed, index_hour, index_pending
from audit_platform.index.reconcile import hour_counts
from audit_platform.index.retention import cluster_has_ilm, ilm_policy
from audit_platform.index.template import install_template
from audit_platform.naming import slot_name, template_name
from audit_platform.settings import Settings
from audit_platform.staging import StagingStore

TEMPLATE_KEY = dg.AssetKey(["elasticsearch", "index_template"])


def indexed_key(source: str) -> dg.AssetKey:
    return dg.AssetKey([source, "indexed"])


def _template_code_version() -> str:
    path = Settings().resources_dir / "elasticsearch" / "index-template.json"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def template_asset(environment: EnvironmentConfig) -> dg.AssetsDefinition:
    @dg.asset(
        key=TEMPLATE_KEY,
        description="The environment's index template (mappings, settings, read alias). "
        "Materialized when missing and whenever resources/elasticsearch changes; a changed "
        "template applies to indices created after it.",
        group_name="index",
        kinds={"elasticsearch"},
        owners=["team:platform"],
        code_version=_template_code_version(),
        automation_condition=dg.AutomationCondition.on_missing()
        | dg.AutomationCondition.code_version_changed(),
    )
    def asset() -> dg.MaterializeResult:
        settings = Settings()
        lifecycle = None
        with es_from_settings(settings) as client:
            if cluster_has_ilm(client):
                lifecycle = template_name(settings.env)
                client.ilm.put_lifecycle(
                    name=lifecycle,
                    **ilm_policy(settings.resources_dir, environment.retention_days),
                )
            installed = install_template(
                client, settings.resources_dir, settings.env, environment.index_replicas, lifecycle
            )
        return dg.MaterializeResult(
            metadata={
                "lifecycle": lifecycle or "none: this cluster has no ILM; retention_job deletes",
                "template": installed.name,
                "template_hash": installed.template_hash,
                "previous_hash": installed.previous_hash or "none",
                "changed": installed.changed,
            }
        )

    return asset


def database_of(url: str) -> str:
    return psycopg.conninfo.conninfo_to_dict(url).get("dbname") or "postgres"


def _index_with(source: str, config: SourceConfig, environment: EnvironmentConfig, work):
    settings = Settings()
    store = StagingStore(settings.staging_root, settings.env, source)
    database = database_of(source_url(source, config))
    with es_from_settings(settings) as client:
        # An index must never be created before its template exists (it would get dynamic
        # mappings); the template asset keeps it current, this only covers a first run.
        if not client.indices.exists_index_template(name=template_name(settings.env)):
            install_template(
                client, settings.resources_dir, settings.env, environment.index_replicas
            )
        return work(client, store, database, datetime.now(UTC))


def index_hours(
    source: str, config: SourceConfig, hours: list[datetime], environment: EnvironmentConfig
) -> list[HourIndexed]:
    """Index whole hours again (backfills, reconciliation)."""
    return _index_with(
        source,
        config,
        environment,
        lambda client, store, database, now: [
            index_hour(client, store, hour, database=database, now=now) for hour in sorted(hours)
        ],
    )


def index_increment(
    source: str, config: SourceConfig, environment: EnvironmentConfig
) -> list[HourIndexed]:
    """A run's own work: every enriched batch or resolution on the pending ledger."""
    return _index_with(
        source,
        config,
        environment,
        lambda client, store, database, now: index_pending(
            client, store, database=database, now=now
        ),
    )


def count_check(
    source: str, client, store: StagingStore, hour: datetime
) -> dg.AssetCheckEvaluation:
    counts = hour_counts(client, store, hour)
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


def index_op(source: str, config: SourceConfig, environment: EnvironmentConfig) -> dg.OpDefinition:
    @dg.op(
        name=f"index_{source}",
        description=f"Index what was just enriched for source {source} (and anything an "
        "earlier run enriched but could not index), never whole hours.",
        retry_policy=transient_retry_policy,
    )
    def op(context: dg.OpExecutionContext, hours: list[str]) -> list[str]:
        for indexed in index_increment(source, config, environment):
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
    source: str, config: SourceConfig, environment: EnvironmentConfig
) -> dg.AssetsDefinition:
    slot = slot_name(Settings().env, source)

    @dg.asset(
        key=indexed_key(source),
        description=f"Records of source {source} indexed into Elasticsearch, by commit hour. "
        "Deterministic document ids: re-indexing an hour replaces, never duplicates.",
        partitions_def=hourly_partitions_def,
        deps=[enriched_key(source), TEMPLATE_KEY],
        group_name="index",
        kinds={"elasticsearch"},
        owners=["team:platform"],
        pool=slot,
        check_specs=[dg.AssetCheckSpec("staged_vs_indexed", asset=indexed_key(source))],
        retry_policy=transient_retry_policy,
    )
    def asset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        hour = context.partition_time_window.start.astimezone(UTC)
        [indexed] = index_hours(source, config, [hour], environment)
        settings = Settings()
        store = StagingStore(settings.staging_root, settings.env, source)
        with es_from_settings(settings) as client:
            client.indices.refresh(index=f"audit-{settings.env}-{source}-*", allow_no_indices=True)
            check = count_check(source, client, store, hour)
        return dg.MaterializeResult(
            metadata=indexed.metadata,
            check_results=[
                dg.AssetCheckResult(
                    check_name="staged_vs_indexed", passed=check.passed, metadata=check.metadata
                )
            ],
        )

    return asset
