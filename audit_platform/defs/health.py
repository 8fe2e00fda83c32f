"""Asset checks an operator looks at first, run every five minutes by ``health_checks_job``.

- ``slot_lag`` (on each source's staged changes): WAL the slot holds back, against the
  environment's threshold; a growing lag means capture is not keeping up or not running, and
  the source database is keeping WAL for us.
- ``tracked_tables`` (same asset): each tracked table exists, has a key and REPLICA IDENTITY FULL
  (without it updates and deletes have no before-image); the failure says the ALTER to run.
- ``template_current`` (on the index template): the installed template is the one in
  ``resources/elasticsearch`` of this code version.

Orphan rate and staged-versus-indexed counts are checked where they are computed, by the
enrich and index steps of every run.
"""

import dagster as dg
import psycopg

from audit_platform.capture.slot import slot_state
from audit_platform.defs.capture.assets import source_url, staged_key
from audit_platform.defs.index.assets import TEMPLATE_KEY
from audit_platform.defs.resources import AuditPlatform
from audit_platform.environment import EnvironmentConfig, SourceConfig
from audit_platform.index.retention import cluster_has_ilm
from audit_platform.index.template import installed_template_hash, render_template
from audit_platform.naming import slot_name, template_name
from audit_platform.sources.check import Level, check_source

CHECK_CRON = "*/5 * * * *"


def source_checks(
    env: str, source: str, config: SourceConfig, environment: EnvironmentConfig
) -> list[dg.AssetChecksDefinition]:
    asset = staged_key(source, "changes")
    threshold = environment.slot_lag_threshold_bytes

    @dg.asset_check(
        asset=asset, name="slot_lag", blocking=False,
        description=f"WAL held by the slot of source {source}, against {threshold:,} bytes.",
    )  # fmt: skip
    def slot_lag() -> dg.AssetCheckResult:
        slot = slot_name(env, source)
        with psycopg.connect(source_url(source, config), autocommit=True,
                             connect_timeout=10) as conn:  # fmt: skip
            state = slot_state(conn, slot)
        return dg.AssetCheckResult(
            passed=state.lag_bytes <= threshold,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={"lag_bytes": state.lag_bytes, "threshold_bytes": threshold,
                      "slot": slot, "consumer_active": state.active_pid is not None},
            description=None if state.lag_bytes <= threshold else
            f"slot {slot} holds {state.lag_bytes:,} bytes of WAL: is the capture sensor running?",
        )  # fmt: skip

    @dg.asset_check(
        asset=asset, name="tracked_tables", blocking=False,
        description=f"Every tracked table of source {source} exists, has a key and REPLICA "
        "IDENTITY FULL.",
    )  # fmt: skip
    def tracked_tables(platform: AuditPlatform) -> dg.AssetCheckResult:
        settings, policy = platform.settings, platform.policy(source)
        findings = check_source(source_url(source, config), settings.env, policy,
                                settings.resources_dir / "sql")  # fmt: skip
        tables = [f for f in findings if f.subject in policy.tables]
        problems = [f for f in tables if f.level == Level.error]
        return dg.AssetCheckResult(
            passed=not problems,
            metadata={"tables": len(policy.tables),
                      "problems": dg.MetadataValue.md(
                          "\n".join(f"- {f}" for f in problems) or "none")},
        )  # fmt: skip

    return [slot_lag, tracked_tables]


def template_check(environment: EnvironmentConfig) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=TEMPLATE_KEY, name="template_current", blocking=False,
        description="The installed index template is the one this code version renders.",
    )  # fmt: skip
    def template_current(platform: AuditPlatform) -> dg.AssetCheckResult:
        settings = platform.settings
        with platform.elasticsearch() as client:
            lifecycle = template_name(settings.env) if cluster_has_ilm(client) else None
            installed = installed_template_hash(client, settings.env)
        expected = render_template(settings.resources_dir, settings.env,
                                   environment.index_replicas, lifecycle)["_meta"]  # fmt: skip
        return dg.AssetCheckResult(
            passed=installed == expected["template_hash"],
            metadata={"installed_hash": installed or "none (not installed)",
                      "expected_hash": expected["template_hash"],
                      "template_version": expected["template_version"]},
            description=None if installed == expected["template_hash"] else
            "materialize elasticsearch/index_template (the automation sensor does this)",
        )  # fmt: skip

    return template_current


def health_checks_job(checks: list[dg.AssetChecksDefinition]):
    return dg.define_asset_job(
        "health_checks_job",
        selection=dg.AssetSelection.checks(*checks),
        description="Slot lag, tracked tables and template checks of this environment.",
    )


def health_checks_schedule(job) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name="health_checks_schedule", job=job, cron_schedule=CHECK_CRON,
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )  # fmt: skip
