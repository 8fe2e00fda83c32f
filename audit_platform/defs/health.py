"""Asset checks an operator looks at first, run every five minutes by ``health_checks_job``.

- ``slot_lag`` (on each source's staged changes): the slot exists and PostgreSQL has not
  invalidated it; WAL it holds back, against the environment's warning and error thresholds. A
  growing lag means capture is not keeping up or not running, and the source keeps WAL for us.
- ``tracked_tables`` (same asset): each tracked table exists, has a key and REPLICA IDENTITY FULL
  (without it updates and deletes have no before-image), and the source's publication names it
  (a tracked table dropped and created again is a new table the publication does not name); the
  failure says the command to run.
- ``template_current`` (on the index template): the installed template is the one in
  ``resources/elasticsearch`` of this code version.

Orphan rate and staged-versus-indexed counts are checked where they are computed, by the
enrich and index steps of every run.
"""

import dagster as dg

from audit_platform.capture.slot import SlotLost, SlotMissing, usable_slot_state
from audit_platform.clients import connect_source
from audit_platform.defs.capture.assets import source_url, staged_key
from audit_platform.defs.index.assets import TEMPLATE_KEY
from audit_platform.defs.resources import AuditPlatform
from audit_platform.environment import EnvironmentConfig, SourceConfig
from audit_platform.index.template import installed_template_hash, render_template
from audit_platform.naming import slot_name
from audit_platform.sources.check import Level, check_source

#: Every 10 minutes: one run each time for the whole environment. A failing source shows
#: sooner in its capture_live check, which the live run writes within half a minute.
CHECK_CRON = "*/10 * * * *"


def source_checks(
    env: str, source: str, config: SourceConfig, environment: EnvironmentConfig
) -> list[dg.AssetChecksDefinition]:
    asset = staged_key(source, "changes")
    warn, error = environment.slot_lag_warn_bytes, environment.slot_lag_error_bytes

    @dg.asset_check(
        asset=asset,
        name="slot_lag",
        blocking=False,
        description=f"The slot of source {source} exists, is not invalidated, and holds back "
        f"less WAL than {warn:,} bytes (warning) and {error:,} bytes (error).",
    )
    def slot_lag() -> dg.AssetCheckResult:
        slot = slot_name(env, source)
        with connect_source(source_url(source, config)) as conn:
            try:
                state = usable_slot_state(conn, slot)
            except (SlotLost, SlotMissing) as exc:
                return dg.AssetCheckResult(
                    passed=False,
                    severity=dg.AssetCheckSeverity.ERROR,
                    metadata={"slot": slot},
                    description=str(exc),
                )
        lag = state.lag_bytes
        return dg.AssetCheckResult(
            passed=lag < warn,
            severity=dg.AssetCheckSeverity.ERROR if lag >= error else dg.AssetCheckSeverity.WARN,
            metadata={
                "lag_bytes": lag,
                "warn_bytes": warn,
                "error_bytes": error,
                "wal_status": state.wal_status or "unknown",
                "slot": slot,
                "consumer_active": state.active_pid is not None,
            },
            description=None
            if lag < warn
            else f"slot {slot} holds {lag:,} bytes of WAL: is the capture sensor running?",
        )

    @dg.asset_check(
        asset=asset,
        name="tracked_tables",
        blocking=False,
        description=f"Every tracked table of source {source} exists, has a key and REPLICA "
        "IDENTITY FULL, and is in the source's publication.",
    )
    def tracked_tables(platform: AuditPlatform) -> dg.AssetCheckResult:
        settings, policy = platform.settings, platform.policy(source)
        findings = check_source(
            source_url(source, config), settings.env, policy, settings.resources_dir / "sql"
        )
        # The publication too: a tracked table it does not name has its changes go uncaptured.
        tables = [f for f in findings if f.subject in policy.tables or f.subject == "publication"]
        problems = [f for f in tables if f.level == Level.error]
        return dg.AssetCheckResult(
            passed=not problems,
            metadata={
                "tables": len(policy.tables),
                "problems": dg.MetadataValue.md("\n".join(f"- {f}" for f in problems) or "none"),
            },
        )

    return [slot_lag, tracked_tables]


def template_check(environment: EnvironmentConfig) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=TEMPLATE_KEY,
        name="template_current",
        blocking=False,
        description="The installed index template is the one this code version renders.",
    )
    def template_current(platform: AuditPlatform) -> dg.AssetCheckResult:
        settings = platform.settings
        with platform.elasticsearch() as client:
            installed = installed_template_hash(client, settings.env)
        # Lifecycles are named by the templates of the classes; the environment's has none.
        expected = render_template(
            settings.resources_dir, settings.env, environment.index_replicas
        )["_meta"]
        return dg.AssetCheckResult(
            passed=installed == expected["template_hash"],
            metadata={
                "installed_hash": installed or "none (not installed)",
                "expected_hash": expected["template_hash"],
                "template_version": expected["template_version"],
            },
            description=None
            if installed == expected["template_hash"]
            else "materialize elasticsearch/index_template (the automation sensor does this)",
        )

    return template_current
