"""The `audit-platform` command line: thin wiring from arguments to the core."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Annotated

import psycopg
import typer
from pydantic import ValidationError

from audit_platform import platform_db
from audit_platform.api_keys import (
    ApiKey,
    ApiKeyError,
    create_key,
    list_keys,
    revoke_key,
)
from audit_platform.capture.gaps import Gap, gap_of_new_slot, rebaseline_gaps, record_gap
from audit_platform.capture.snapshot import (
    SnapshotError,
    SnapshotRefused,
    TableProgress,
    baseline_lsn,
    new_snapshot_id,
    run_snapshot,
)
from audit_platform.capture.snapshot_pace import pipeline_pace
from audit_platform.clients import (
    NotConfigured,
    elasticsearch_client,
    es_from_settings,
    pg_url_from_settings,
)
from audit_platform.environment import environment_path, load_environment
from audit_platform.erasure import requests as erasure_requests
from audit_platform.erasure.run import DuePass, run_due, run_request
from audit_platform.holds import create_hold, list_holds, release_hold
from audit_platform.index import access
from audit_platform.index.migrate import MigrationError, migrate_layout
from audit_platform.index.retention import run_for_environment
from audit_platform.index.template import ensure_template
from audit_platform.lsn import lsn_text
from audit_platform.policy import PolicyError, SourcePolicy, load_policy, policy_path
from audit_platform.settings import Settings
from audit_platform.signing import new_private_key, private_key, public_text
from audit_platform.sources.check import MESSAGES_FIX, MESSAGES_OPEN, Finding, check_source
from audit_platform.sources.onboarding import (
    OnboardingError,
    name_in_environment,
    policy_to_join,
    preflight,
    remove_from_environment,
    unread_changes,
    write_policy,
)
from audit_platform.sources.setup import (
    SCHEMA_HISTORY_FIX,
    SCHEMA_HISTORY_OFF,
    SetupError,
    setup_source,
    teardown_source,
)
from audit_platform.staging import StagingStore
from audit_platform.streams.definitions import (
    Kind,
    StreamError,
    create_stream,
    delete_stream,
    list_streams,
)
from audit_platform.streams.delivery import Deliverer
from audit_platform.streams.progress import status as stream_status
from audit_platform.ui_sessions import person_sessions, revoke_person
from audit_platform.verify import report_json, verify_environment

app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="audit-platform: PostgreSQL changes to a searchable, attributed audit trail.",
    no_args_is_help=True,
)
source_app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="Install, check and remove the platform's objects in a source database.",
    no_args_is_help=True,
)
app.add_typer(source_app, name="source")

EnvOption = Annotated[
    str | None, typer.Option("--env", help="Environment name (default: AUDIT_ENV).")
]
SourceOption = Annotated[
    str, typer.Option("--source", help="Source name, as in resources/sources.")
]
UrlOption = Annotated[
    str | None,
    typer.Option("--url", help="libpq URL of the source (default: AUDIT_SOURCE_<SOURCE>_URL)."),
]


def _settings(env: str | None) -> Settings:
    """The settings every command runs with: ``--env`` over ``AUDIT_ENV``, and an environment
    that exists. An environment without a file captures nothing, so a mistyped name would
    otherwise create keys, holds or an empty verification for nobody."""
    try:
        settings = Settings() if env is None else Settings(env=env)
    except ValidationError as exc:  # a setting refused: its own message, not a traceback
        problems = "; ".join(
            str(error["msg"]).removeprefix("Value error, ") for error in exc.errors()
        )
        raise typer.BadParameter(problems, param_hint="--env / AUDIT_*") from None
    known = sorted(path.stem for path in (settings.resources_dir / "environments").glob("*.yaml"))
    if settings.env not in known:
        raise typer.BadParameter(
            f"unknown environment {settings.env!r}; known: {', '.join(known) or 'none'} "
            f"(each is a file in {settings.resources_dir / 'environments'})",
            param_hint="--env / AUDIT_ENV",
        )
    return settings


def _fail(exc: Exception) -> typer.Exit:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=1)


def _source_target(env: str | None, source: str, url: str | None):
    settings = _settings(env)
    # The variable the environment's file names for the source (source add writes it there),
    # or the convention's.
    try:
        named = load_environment(settings.resources_dir, settings.env).sources.get(source)
    except PolicyError as exc:
        raise _fail(exc) from exc
    variable = named.url_env if named else f"AUDIT_SOURCE_{source.upper()}_URL"
    url = url or os.environ.get(variable)
    if not url:
        raise _fail(ValueError(f"no URL for source {source!r}: pass --url or set {variable}"))
    try:
        policy = load_policy(policy_path(settings.resources_dir, source))
    except PolicyError as exc:
        raise _fail(exc) from exc
    return settings, policy, url


def _set_up(settings: Settings, policy: SourcePolicy, url: str, *, replace_lost_slot: bool) -> None:
    """``source setup``'s work, and what it prints: the platform database first, since a slot
    replaced while its gap cannot be recorded would be exactly the silent hole this prevents."""
    try:
        platform = psycopg.connect(pg_url_from_settings(settings), autocommit=True)
    except (NotConfigured, psycopg.OperationalError) as exc:
        raise _fail(exc) from exc
    with platform:
        platform_db.install(platform, settings.resources_dir / "sql")
        try:
            report = setup_source(
                url,
                settings.env,
                policy,
                settings.resources_dir / "sql",
                replace_lost_slot=replace_lost_slot,
            )
        except SetupError as exc:
            raise _fail(exc) from exc
        store = StagingStore(settings.staging_root, settings.env, policy.source)
        gap = gap_of_new_slot(
            settings.env,
            policy.source,
            store,
            slot_start=report.slot_start,
            replaced_from=report.slot_replaced_from,
        )
        if gap is not None:
            record_gap(platform, gap)
    typer.echo(f"migrations applied: {', '.join(report.applied_migrations) or 'none (current)'}")
    typer.echo(f"publication {report.publication}: {', '.join(report.publication_tables)}")
    state = "replaced" if report.slot_replaced_from is not None else "created"
    where = f" at {lsn_text(report.slot_start)}" if report.slot_start is not None else ""
    typer.echo(f"slot {report.slot}: {state + where if report.slot_created else 'exists'}")
    typer.echo(f"late attribution: GRANT {report.attributor_role} TO <the service's role>")
    if not report.schema_history:
        typer.echo(f"warning: {SCHEMA_HISTORY_OFF}; {SCHEMA_HISTORY_FIX}", err=True)
    if not report.messages_restricted:
        typer.echo(f"warning: {MESSAGES_OPEN}; {MESSAGES_FIX}", err=True)
    if gap is not None:
        typer.secho(f"gap recorded: {gap.describe()}", fg=typer.colors.YELLOW)


@source_app.command("setup")
def source_setup(
    source: SourceOption,
    env: EnvOption = None,
    url: UrlOption = None,
    replace_lost_slot: Annotated[
        bool,
        typer.Option(help="Replace a slot PostgreSQL invalidated; its lost range becomes a gap."),
    ] = False,
) -> None:
    """Install or upgrade the audit schema, and set up this environment's publication and slot.

    A slot created where this source was captured before (it was dropped, or invalidated and
    replaced) records the range it could not capture as a gap in the trail (`GET /v1/gaps`).
    """
    settings, policy, url = _source_target(env, source, url)
    _set_up(settings, policy, url, replace_lost_slot=replace_lost_slot)


def _echo_findings(findings: list[Finding]) -> None:
    color = {"ok": None, "warning": typer.colors.YELLOW, "error": typer.colors.RED}
    for finding in findings:
        typer.secho(str(finding), fg=color[finding.level.value])


@source_app.command("add")
def source_add(
    source: Annotated[str, typer.Argument(help="The source's name (its policy file's).")],
    env: EnvOption = None,
    url_env: Annotated[
        str | None,
        typer.Option(
            "--url-env",
            help="Variable holding the source's libpq URL (default AUDIT_SOURCE_<SOURCE>_URL); "
            "the environment's file names it, never the URL.",
        ),
    ] = None,
    tables: Annotated[
        str | None,
        typer.Option(
            "--tables",
            help="Tables to track, comma-separated schema.table (for a source without a policy "
            "file; one that has a file keeps its own).",
        ),
    ] = None,
    snapshot: Annotated[
        bool,
        typer.Option(help="Record the rows that exist now (an initial snapshot) once joined."),
    ] = True,
) -> None:
    """Join a service's database in one command: check it, then write its policy, set it up
    (schema, publication, slot) and name it in the environment's file. Nothing is changed
    unless every check passes; each failure says its fix."""
    settings = _settings(env)
    variable = url_env or f"AUDIT_SOURCE_{source.upper()}_URL"
    url = os.environ.get(variable)
    if not url:
        raise _fail(ValueError(f"{variable} is not set: export the source's libpq URL in it"))
    names = [t.strip() for t in (tables or "").split(",") if t.strip()]
    try:
        policy, new = policy_to_join(settings.resources_dir, source, names)
        checked = preflight(url, settings.env, policy)
    except (OnboardingError, PolicyError, psycopg.OperationalError) as exc:
        raise _fail(exc) from exc
    _echo_findings(checked.findings)
    if not checked.passed:
        typer.secho("nothing changed: fix the errors above and run source add again", err=True)
        raise typer.Exit(code=1)
    if new:
        typer.echo(f"policy written: {write_policy(settings.resources_dir, policy)}")
    _set_up(settings, policy, url, replace_lost_slot=False)
    try:
        added = name_in_environment(settings.resources_dir, settings.env, source, variable)
    except OnboardingError as exc:
        raise _fail(exc) from exc
    path = environment_path(settings.resources_dir, settings.env)
    typer.echo(
        f"environment {settings.env}: {source} {'added to' if added else 'already in'} {path}"
    )
    typer.echo(
        "capture: the next capture run of the environment picks it up (at the running one's "
        "handover, within capture_run_minutes)"
    )
    if snapshot:
        _snapshot(
            settings,
            url,
            policy,
            new_snapshot_id(),
            tables=[],
            reason="initial snapshot (source add)",
        )
    else:
        typer.echo(
            "no initial snapshot: rows that exist now are recorded at their next change "
            f"(audit-platform source snapshot --env {settings.env} --source {source} records "
            "them now)"
        )


def _snapshot(
    settings: Settings,
    url: str,
    policy: SourcePolicy,
    snapshot_id: str,
    *,
    tables: list[str],
    reason: str | None,
    where: str | None = None,
    chunk_rows: int = 20_000,
    pace: bool = True,
) -> None:
    typer.echo(f"snapshot {snapshot_id}: recording the existing rows of each table")
    paced = pipeline_pace(settings.staging_root, settings.env, policy.source) if pace else None
    if paced is not None:
        paced.report = lambda found, staged: typer.echo(
            f"  waiting for capture of {settings.env}: {paced.describe(found, staged)}"
            " (--no-pace does not wait)"
        )
    started = time.monotonic()
    shown = [started]

    def show(progress: TableProgress) -> None:
        now = time.monotonic()
        if progress.done or now - shown[0] >= 5:
            shown[0] = now
            state = "done" if progress.done else "reading"
            typer.echo(
                f"  {progress.table}: {progress.rows:,} rows in {progress.chunks:,} chunks, "
                f"{state} ({now - started:.0f} s)"
            )

    try:
        done = run_snapshot(
            url,
            policy,
            snapshot_id,
            tables=tables,
            reason=reason,
            where=where,
            chunk_rows=chunk_rows,
            on_chunk=show,
            env=settings.env,
            pace=paced,
        )
    except SnapshotRefused as exc:
        raise _fail(exc) from exc
    except (SnapshotError, psycopg.Error, OSError) as exc:  # OSError: the staging store
        typer.secho(
            f"snapshot {snapshot_id} stopped: {exc}; resume it with source snapshot --id "
            f"{snapshot_id}",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(code=1) from exc
    waited = f", {paced.waited:.0f} s of it waiting for capture" if paced else ""
    typer.echo(
        f"snapshot {snapshot_id}: done in {time.monotonic() - started:.0f} s{waited}; its "
        f"records are searchable once capture has read it (op:snapshot job:{snapshot_id})"
    )
    baseline = baseline_lsn(done, policy)
    if baseline is None:
        return
    try:
        with psycopg.connect(pg_url_from_settings(settings), autocommit=True) as platform:
            platform_db.install(platform, settings.resources_dir / "sql")
            gaps = rebaseline_gaps(platform, settings.env, policy.source, snapshot_id, baseline)
    except (NotConfigured, psycopg.Error) as exc:
        # The snapshot is done and recorded either way; only the gaps' pointer to it waits.
        typer.secho(
            f"warning: the snapshot is done, but its gaps could not be marked ({exc}); run "
            f"the same command with --id {snapshot_id} to mark them",
            fg=typer.colors.YELLOW,
            err=True,
        )
        return
    for gap in gaps:
        typer.echo(f"gap re-baselined: {gap.describe()}")


@source_app.command("snapshot")
def source_snapshot(
    source: SourceOption,
    env: EnvOption = None,
    url: UrlOption = None,
    table: Annotated[
        list[str] | None,
        typer.Option("--table", help="A tracked table (schema.table); repeat; default: all."),
    ] = None,
    snapshot_id: Annotated[
        str | None,
        typer.Option("--id", help="Resume this snapshot from its last committed chunk."),
    ] = None,
    reason: Annotated[
        str | None, typer.Option(help="Why: recorded in the snapshot records' context.")
    ] = None,
    where: Annotated[
        str | None,
        typer.Option(
            help="Only the rows that meet this condition, of the one --table given: its "
            "columns compared with constants, e.g. \"created_at >= '2026-01-01'\"."
        ),
    ] = None,
    chunk_rows: Annotated[
        int,
        typer.Option(
            min=1,
            max=20_000,
            help="The most rows one chunk reads (chunks aim at about 4 MB; paced, half of about "
            "two seconds of the pipeline's indexing, 4,000 at most).",
        ),
    ] = 20_000,
    pace: Annotated[
        bool,
        typer.Option(
            help="Write each chunk once this environment's capture has nearly caught up (its "
            "slot and the staging root of these settings), so the live changes are not held "
            "up behind the snapshot; --no-pace reads as fast as the source can (nothing else "
            "written, or freshness does not matter meanwhile)."
        ),
    ] = True,
) -> None:
    """Record every existing row of the source's tracked tables once, as snapshot records, in
    commit order with the live changes; resumable, without a long transaction
    (docs/design.md, "Snapshots")."""
    settings, policy, url = _source_target(env, source, url)
    _snapshot(
        settings,
        url,
        policy,
        snapshot_id or new_snapshot_id(),
        tables=table or [],
        reason=reason,
        where=where,
        chunk_rows=chunk_rows,
        pace=pace,
    )


@source_app.command("check")
def source_check(source: SourceOption, env: EnvOption = None, url: UrlOption = None) -> None:
    """Say whether capture from this source will work and be complete; exit 1 on any error."""
    settings, policy, url = _source_target(env, source, url)
    findings = check_source(url, settings.env, policy, settings.resources_dir / "sql")
    _echo_findings(findings)
    if any(f.level.value == "error" for f in findings):
        raise typer.Exit(code=1)


@source_app.command("teardown")
def source_teardown(
    source: SourceOption,
    env: EnvOption = None,
    url: UrlOption = None,
    everything: Annotated[
        bool, typer.Option("--all", help="Also drop the audit schema (no other env may remain).")
    ] = False,
) -> None:
    """Drop this environment's slot and publication (and with --all, the audit schema)."""
    settings, _, url = _source_target(env, source, url)
    try:
        removed = teardown_source(
            url, settings.env, source, settings.resources_dir / "sql", everything=everything
        )
    except SetupError as exc:
        raise _fail(exc) from exc
    typer.echo("removed: " + (", ".join(removed) or "nothing (already gone)"))


@source_app.command("remove")
def source_remove(
    source: Annotated[str, typer.Argument(help="The source's name.")],
    env: EnvOption = None,
    url: UrlOption = None,
    force: Annotated[
        bool,
        typer.Option(
            help="Drop the slot even with changes capture has not read (recorded as a gap)."
        ),
    ] = False,
) -> None:
    """Stop capturing a service's database in this environment: drop its slot and publication
    and take it out of the environment's file. Its policy and everything recorded are kept.
    Refused while the slot holds changes capture has not read, or staged batches wait to be
    indexed: dropping them would be a silent hole."""
    settings, _, url = _source_target(env, source, url)
    store = StagingStore(settings.staging_root, settings.env, source)
    try:
        unread = unread_changes(url, settings.env, source)
        waiting = len(store.pending())
    except (psycopg.Error, OSError) as exc:
        raise _fail(exc) from exc
    if (unread is not None or waiting) and not force:
        found = [
            *(["its slot holds changes capture has not read"] if unread is not None else []),
            *([f"{waiting} staged batches are not indexed yet"] if waiting else []),
        ]
        raise _fail(
            ValueError(
                f"source {source!r} is not caught up: {' and '.join(found)}. Let the "
                "environment's capture run finish them (source check shows the slot's lag), "
                "then remove it; or pass --force to drop them, recorded as a gap"
            )
        )
    gap = None
    if unread is not None:
        gap = Gap(
            env=settings.env,
            source=source,
            from_lsn=unread.confirmed_lsn,
            to_lsn=unread.current_lsn,
            last_captured_at=None,
            reason="source removed with --force before capture had read its slot",
        )
        try:
            with psycopg.connect(pg_url_from_settings(settings), autocommit=True) as platform:
                platform_db.install(platform, settings.resources_dir / "sql")
                record_gap(platform, gap)
        except (NotConfigured, psycopg.Error) as exc:
            raise _fail(exc) from exc
    try:
        removed = teardown_source(
            url, settings.env, source, settings.resources_dir / "sql", everything=False
        )
        named = remove_from_environment(settings.resources_dir, settings.env, source)
    except (SetupError, OnboardingError) as exc:
        raise _fail(exc) from exc
    typer.echo("removed: " + (", ".join(removed) or "nothing on the database (already gone)"))
    if gap is not None:
        typer.secho(f"gap recorded: {gap.describe()}", fg=typer.colors.YELLOW)
    path = environment_path(settings.resources_dir, settings.env)
    typer.echo(
        f"environment {settings.env}: {source} {'removed from' if named else 'was not in'} {path}"
    )
    typer.echo(
        f"kept: {policy_path(settings.resources_dir, source)}, and every record, the trail and "
        "the staged files (retention and legal holds apply as before)"
    )


retention_app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="Delete what has outlived the retention period.",
    no_args_is_help=True,
)
app.add_typer(retention_app, name="retention")


@retention_app.command("run")
def retention_run(
    env: EnvOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be deleted; delete nothing.")
    ] = False,
) -> None:
    """Delete this environment's expired indices (where there is no ILM), staged hours and
    settled quarantine entries; never anything inside the period or of another environment."""
    settings = _settings(env)
    environment = load_environment(settings.resources_dir, settings.env)
    try:
        report = run_for_environment(settings, environment, now=datetime.now(UTC), dry_run=dry_run)
    except NotConfigured as exc:
        raise _fail(exc) from exc
    verb = "would delete" if dry_run else "deleted"
    for name, cutoff in report.cutoffs.items():
        days = environment.classes[name]
        typer.echo(f"class {name}: cutoff {cutoff:%Y-%m-%d %H:%M} UTC ({days} days)")
    typer.echo(f"{verb} indices: {', '.join(report.indices) or 'none'}")
    typer.echo(f"{verb} staged hours: {len(report.staged_hours)}")
    typer.echo(f"{verb} quarantine entries: {report.quarantine_entries}")
    for hold_id, kept in sorted(report.held.items()):
        indices = ", ".join(kept["indices"]) or "no index"
        typer.echo(f"kept by hold {hold_id}: {indices}; {len(kept['staged_hours'])} staged hours")
    for name, count in sorted(report.kept_with_holds.items()):
        typer.echo(
            f"{name} is kept whole for its holds: {count} documents no hold covers stay "
            "past their period with it (an index is never thinned by delete-by-query)"
        )
    for name in report.unknown_class:
        typer.echo(f"kept {name}: its retention class is not in the environment's file")


index_app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="The environment's Elasticsearch indices.",
    no_args_is_help=True,
)
app.add_typer(index_app, name="index")


@index_app.command("migrate")
def index_migrate(
    env: EnvOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would move; change nothing.")
    ] = False,
) -> None:
    """Move the indices of the layout per source (audit-<env>-<source>-YYYY.MM) into the
    indices per retention class (audit-<env>-class-<class>-YYYY.MM) with Elasticsearch's
    reindex, same ids; delete each old index only once every id of it is found in its class
    index. Safe to run again."""
    settings = _settings(env)
    environment = load_environment(settings.resources_dir, settings.env)
    try:
        with es_from_settings(settings) as client:
            if not dry_run:
                replicas, classes = environment.index_replicas, environment.classes
                ensure_template(client, settings.resources_dir, settings.env, replicas, classes)
            report = migrate_layout(client, settings.env, environment, dry_run=dry_run)
    except (NotConfigured, MigrationError) as exc:
        raise _fail(exc) from exc
    for line in report.lines():
        typer.echo(line)
    if not report.ok:
        raise typer.Exit(1)


es_app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="Elasticsearch accounts: least privilege per environment.",
    no_args_is_help=True,
)
app.add_typer(es_app, name="es")


@es_app.command("setup")
def es_setup(env: EnvOption = None) -> None:
    """Create (or update) the environment's writer role and user for the pipeline and its reader
    role and user for the API, and print the exports each deployment needs. Run it with an
    account allowed to manage security; give the pipeline and the API only what it prints."""
    settings = _settings(env)
    if settings.elasticsearch is None:
        raise _fail(
            NotConfigured(
                "No Elasticsearch: set AUDIT_ES_URL (and a user allowed to manage security), "
                "or start the local stack"
            )
        )
    if settings.es_file_realm is not None:
        # The local stack's node (AUDIT_ES_FILE_REALM is set by the stack): its native realm
        # cannot store users, so they go to its file realm, through the development package.
        try:
            from audit_platform_dev.stack import StackError, setup_es_accounts
        except ModuleNotFoundError as exc:
            raise _fail(
                ValueError(
                    "AUDIT_ES_FILE_REALM names the local stack's node, which this install "
                    "cannot reach: unset it to create the accounts through the security API"
                )
            ) from exc

        try:
            accounts, where = setup_es_accounts(settings, settings.env)
        except StackError as exc:
            raise _fail(exc) from exc
    else:
        accounts, where = access.new_accounts(settings.env), "the native realm (security API)"
        access.install_native(elasticsearch_client(settings.elasticsearch), settings.env, accounts)
    typer.echo(f"# Elasticsearch accounts of environment {settings.env}, in {where}")
    for account in accounts:
        user = "the pipeline (Dagster)" if account.kind == access.WRITER else "the Audit API"
        typer.echo(f"# {user}: {account.kind}")
        for key, value in account.exports().items():
            typer.echo(f"{key}={shlex.quote(value)}")


keys_app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="API keys of the Audit API (one environment each, optionally narrowed).",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")


def _platform_connection(settings: Settings) -> psycopg.Connection:
    try:
        conn = psycopg.connect(pg_url_from_settings(settings), autocommit=True)
    except (NotConfigured, psycopg.OperationalError) as exc:
        raise _fail(exc) from exc
    platform_db.install(conn, settings.resources_dir / "sql")
    return conn


def _scope_text(key: ApiKey) -> str:
    sources = ",".join(sorted(key.scope.sources)) if key.scope.sources else "all sources"
    tables = ",".join(sorted(key.scope.tables)) if key.scope.tables else "all tables"
    organizations = (
        f"organizations {','.join(sorted(key.scope.organizations))}; "
        if key.scope.organizations
        else ""
    )
    return f"{key.scope.env}: {sources}; {tables}; {organizations}{key.scope.role}"


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="Who uses the key, e.g. support-team.")],
    env: EnvOption = None,
    source: Annotated[
        list[str] | None, typer.Option("--source", help="Limit to this source (repeatable).")
    ] = None,
    table: Annotated[
        list[str] | None,
        typer.Option("--table", help="Limit to this table, as schema.table (repeatable)."),
    ] = None,
    organization: Annotated[
        list[str] | None,
        typer.Option(
            "--organization",
            help="Limit to records of this organization, by the id records carry as "
            "organization.id (repeatable); records naming no organization are then out of reach.",
        ),
    ] = None,
    role: Annotated[
        str,
        typer.Option(
            help="reader (records), auditor (also the read log and proofs), admin "
            "(also legal holds)."
        ),
    ] = "reader",
) -> None:
    """Create a key and print it once; only its digest is stored."""
    settings = _settings(env)
    with _platform_connection(settings) as conn:
        try:
            new = create_key(
                conn,
                settings.env,
                name,
                sources=source,
                tables=table,
                role=role,
                organizations=organization,
            )
        except (ApiKeyError, ValueError) as exc:
            raise _fail(exc) from exc
    typer.echo(f"key id {new.key.key_id} ({_scope_text(new.key)})", err=True)
    typer.echo("The key is shown once; store it in your secret manager:", err=True)
    typer.echo(new.secret)


@keys_app.command("list")
def keys_list(env: EnvOption = None) -> None:
    """The environment's keys (ids, names, scopes; never secrets)."""
    settings = _settings(env)
    with _platform_connection(settings) as conn:
        keys = list_keys(conn, settings.env)
    for key in keys:
        state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
        typer.echo(f"{key.key_id}  {key.name:<20} {state:<24} {_scope_text(key)}")


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key id, as `keys list` shows it.")],
    env: EnvOption = None,
) -> None:
    """Revoke a key; the API refuses it within AUDIT_API_KEY_CACHE_SECONDS."""
    settings = _settings(env)
    with _platform_connection(settings) as conn:
        if not revoke_key(conn, settings.env, key_id):
            raise _fail(ValueError(f"no active key {key_id!r} in environment {settings.env!r}"))
    typer.echo(f"revoked {key_id}")


api_app = typer.Typer(
    pretty_exceptions_show_locals=False, help="The Audit API.", no_args_is_help=True
)
app.add_typer(api_app, name="api")


@api_app.command("serve")
def api_serve(
    host: Annotated[str | None, typer.Option(help="Default: AUDIT_API_HOST.")] = None,
    port: Annotated[int | None, typer.Option(help="Default: AUDIT_API_PORT.")] = None,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 1,
) -> None:
    """Serve the Audit API of AUDIT_ENV (docs at /docs, OpenAPI at /openapi.json, as
    AUDIT_API_DOCS allows)."""
    import uvicorn

    from audit_platform.api.serving import uvicorn_options

    settings = Settings()
    uvicorn.run(
        "audit_platform.api.main:create_app",
        factory=True,
        host=host or settings.api.host,
        port=port or settings.api.port,
        workers=workers,
        log_level="info",
        **uvicorn_options(settings),
    )


try:  # the local stack and the demo, where the development package is installed
    from audit_platform_dev.cli import register
except ModuleNotFoundError as missing:
    if missing.name != "audit_platform_dev":  # installed but broken: say so, do not hide it
        raise
else:
    register(app)


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


trust_app = typer.Typer(
    pretty_exceptions_show_locals=False, help="The trail's signing keys.", no_args_is_help=True
)
app.add_typer(trust_app, name="trust")


@trust_app.command("keygen")
def trust_keygen() -> None:
    """Print a new Ed25519 key pair: AUDIT_SIGNING_KEY for the deployment that writes the
    trail (a secret), AUDIT_VERIFY_KEY for everyone who verifies it (public)."""
    secret = new_private_key()
    typer.echo(f"AUDIT_SIGNING_KEY={secret}")
    typer.echo(f"AUDIT_VERIFY_KEY={public_text(private_key(secret).public_key())}")


def _moment(text: str | None, what: str) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise _fail(
            ValueError(
                f"--{what} {text!r}: write an ISO date or time, e.g. "
                "2026-11-27 or 2026-11-27T14:00Z"
            )
        ) from exc
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


@app.command("verify")
def verify(
    env: EnvOption = None,
    source: Annotated[
        list[str] | None, typer.Option("--source", help="A source (repeat; default: all).")
    ] = None,
    since: Annotated[str | None, typer.Option(help="From this commit time (ISO).")] = None,
    until: Annotated[str | None, typer.Option(help="Until this commit time (ISO).")] = None,
    staging: Annotated[
        bool, typer.Option(help="Also recompute the leaves from the staged files.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON report per source.")] = False,
    limit: Annotated[int, typer.Option(help="Findings listed per source and kind.")] = 20,
) -> None:
    """Check the trail: the log against its signed checkpoints, Elasticsearch and staging
    against the log. Exit status 0 when intact, 1 when something was removed, altered,
    inserted or forged (each named), 2 when it could not be checked."""
    settings = _settings(env)
    try:
        reports = verify_environment(
            settings,
            source or [],
            since=_moment(since, "since"),
            until=_moment(until, "until"),
            now=datetime.now(UTC),
            staging=staging,
        )
    except (NotConfigured, ValueError, psycopg.OperationalError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    for report in reports:
        if as_json:
            typer.echo(json.dumps(report_json(report), sort_keys=True))
            continue
        verdict = "intact" if report.ok else f"{len(report.problems)} problem(s)"
        typer.echo(
            f"{report.env}/{report.source}: {verdict}; log {report.log_size:,} leaves, "
            f"{report.checkpoints:,} checkpoints; {report.documents:,} documents, "
            f"{report.logged_changes:,} logged changes, {report.staged_changes:,} "
            "staged changes checked"
        )
        shown: dict[str, int] = {}
        for finding in report.findings:
            shown[finding.kind] = shown.get(finding.kind, 0) + 1
            if shown[finding.kind] <= limit:
                typer.echo(f"  {finding.kind:<20} {finding.subject}: {finding.detail}")
        for kind, count in sorted(shown.items()):
            if count > limit:
                typer.echo(f"  {kind:<20} ... and {count - limit:,} more")
    if any(f.kind == "unverifiable" for r in reports for f in r.findings):
        raise typer.Exit(2)
    if not all(r.ok for r in reports):
        raise typer.Exit(1)


hold_app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="Legal holds: what retention must keep, whatever its age.",
    no_args_is_help=True,
)
app.add_typer(hold_app, name="hold")
ByOption = Annotated[
    str, typer.Option("--by", help="Who does this (a name or ticket; kept with the hold).")
]


@hold_app.command("create")
def hold_create(
    source: SourceOption,
    reason: Annotated[str, typer.Option(help="Why: a case, a request from counsel.")],
    by: ByOption,
    env: EnvOption = None,
    table: Annotated[str | None, typer.Option(help="Only this table, as schema.table.")] = None,
    object_id: Annotated[
        str | None,
        typer.Option("--object", help="Only this object (its key, as records print it)."),
    ] = None,
) -> None:
    """Hold a source, a table or one object: retention deletes nothing it covers until released."""
    settings = _settings(env)
    with _platform_connection(settings) as conn:
        try:
            hold = create_hold(
                conn,
                settings.env,
                source,
                reason=reason,
                created_by=by,
                table=table,
                object_id=object_id,
            )
        except ValueError as exc:
            raise _fail(exc) from exc
    typer.echo(f"hold {hold.id}: {hold.covers} ({hold.reason})")


@hold_app.command("list")
def hold_list(
    env: EnvOption = None,
    released: Annotated[bool, typer.Option("--all", help="Released holds too.")] = False,
) -> None:
    """The environment's holds: what each covers, why, who placed and released it."""
    settings = _settings(env)
    with _platform_connection(settings) as conn:
        holds = list_holds(conn, settings.env, active_only=not released)
    for hold in holds:
        state = (
            f"released {hold.released_at:%Y-%m-%d %H:%M} by {hold.released_by}"
            if hold.released_at
            else "active"
        )
        typer.echo(
            f"{hold.id}\t{hold.covers}\t{state}\tby {hold.created_by} "
            f"{hold.created_at:%Y-%m-%d %H:%M}\t{hold.reason}"
        )


@hold_app.command("release")
def hold_release(hold_id: int, by: ByOption, env: EnvOption = None) -> None:
    """Release a hold; retention may then delete what it kept (the hold's record stays)."""
    settings = _settings(env)
    with _platform_connection(settings) as conn:
        if not release_hold(conn, settings.env, hold_id, by):
            raise _fail(ValueError(f"no active hold {hold_id} in environment {settings.env}"))
    typer.echo(f"hold {hold_id} released")


erase_app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="Erasure of a person's values from the trail (docs/design.md, 'Erasure').",
    invoke_without_command=True,
)
app.add_typer(erase_app, name="erase")


@erase_app.callback()
def erase(
    ctx: typer.Context,
    env: EnvOption = None,
    subject: Annotated[
        str | None,
        typer.Option(help="The person, as TABLE:ID: their table and id, e.g. customers:42."),
    ] = None,
    reason: Annotated[
        str | None, typer.Option(help="Why: the request it answers, e.g. a ticket.")
    ] = None,
    by: Annotated[str | None, typer.Option("--by", help="Who asks (kept with the request).")] = (
        None
    ),
) -> None:
    """Request an erasure (--subject, --reason, --by): it runs after another admin approves it,
    or after the environment's waiting period; refused while a legal hold covers the person."""
    if ctx.invoked_subcommand is not None:
        return
    if subject is None or reason is None or by is None:
        raise _fail(
            ValueError(
                "give --subject TABLE:ID, --reason and --by to request an erasure, or a command: "
                "list, approve, cancel, run"
            )
        )
    settings = _settings(env)
    environment = load_environment(settings.resources_dir, settings.env)
    with _platform_connection(settings) as conn, es_from_settings(settings) as es:
        try:
            request = erasure_requests.request_erasure(
                conn,
                es,
                settings.env,
                erasure_requests.Subject.parse(subject),
                reason=reason,
                requested_by=by,
                waiting=environment.erasure_waiting,
                declared=erasure_requests.declared_tables(
                    load_policy(policy_path(settings.resources_dir, source))
                    for source in environment.sources
                ),
            )
        except erasure_requests.ErasureError as exc:
            raise _fail(exc) from exc
    typer.echo(
        f"erasure request {request.id}: {request.subject}, runs after another admin approves it "
        f"(audit-platform erase approve {request.id} --by NAME) or from "
        f"{request.not_before:%Y-%m-%d %H:%M %Z} (audit-platform erase run)"
    )


@erase_app.command("list")
def erase_list(env: EnvOption = None) -> None:
    """Every erasure request of the environment and what became of it."""
    settings = _settings(env)
    with _platform_connection(settings) as conn:
        requests = erasure_requests.list_requests(conn, settings.env)
    for r in requests:
        when = r.done_at or r.cancelled_at or r.approved_at or r.not_before
        typer.echo(
            f"{r.id}\t{r.subject}\t{r.state} {when:%Y-%m-%d %H:%M}\tby {r.requested_by}"
            f"{f', approved by {r.approved_by}' if r.approved_by else ''}"
            f"{f', {r.records} records' if r.records is not None else ''}\t{r.reason}"
        )


@erase_app.command("approve")
def erase_approve(request: int, by: ByOption, env: EnvOption = None) -> None:
    """Approve another admin's request: it may run now."""
    settings = _settings(env)
    with _platform_connection(settings) as conn:
        try:
            found = erasure_requests.approve(conn, settings.env, request, by)
        except erasure_requests.ErasureError as exc:
            raise _fail(exc) from exc
    typer.echo(f"erasure request {found.id} approved by {by}; audit-platform erase run runs it")


@erase_app.command("cancel")
def erase_cancel(request: int, by: ByOption, env: EnvOption = None) -> None:
    """Withdraw a request that has not started."""
    settings = _settings(env)
    with _platform_connection(settings) as conn:
        try:
            erasure_requests.cancel(conn, settings.env, request, by)
        except erasure_requests.ErasureError as exc:
            raise _fail(exc) from exc
    typer.echo(f"erasure request {request} cancelled")


@erase_app.command("run")
def erase_run(
    env: EnvOption = None,
    request: Annotated[
        int | None, typer.Argument(help="Only this request (default: every one due).")
    ] = None,
) -> None:
    """Carry out the requests that are approved or have waited their period."""
    settings = _settings(env)
    now = datetime.now(UTC)
    try:
        found = (
            DuePass(done=[run_request(settings, request, now=now)])
            if request is not None
            else run_due(settings, now)
        )
    except erasure_requests.ErasureError as exc:
        raise _fail(exc) from exc
    for outcome in found.done:
        sources = ", ".join(
            f"{s.source}: {s.records} records, {s.values} values, {s.documents} documents, "
            f"{s.staged_files} staged files"
            for s in outcome.sources
        )
        typer.echo(
            f"erasure request {outcome.request} done in {outcome.seconds:.1f} s: "
            f"{outcome.subject} ({sources or 'no source names this table'})"
        )
    for request_id, why in found.not_done.items():
        typer.secho(f"erasure request {request_id} not done: {why}", fg=typer.colors.RED, err=True)
    if not found.done and not found.not_done:
        typer.echo("no erasure request is due")
    if found.not_done:
        raise typer.Exit(1)


streams_app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="Streams: records delivered to a webhook or a bucket as they are indexed.",
    no_args_is_help=True,
)
app.add_typer(streams_app, name="streams")


@streams_app.command("create")
def streams_create(
    name: Annotated[str, typer.Option("--name", help="The stream's name, e.g. siem.")],
    by: ByOption,
    env: EnvOption = None,
    webhook: Annotated[
        str | None,
        typer.Option(help="Deliver to this https:// URL, signed (Standard Webhooks)."),
    ] = None,
    bucket: Annotated[
        str | None,
        typer.Option(
            help="Deliver NDJSON objects, each with a signed digest, under this s3:// URL."
        ),
    ] = None,
    filter_text: Annotated[
        str,
        typer.Option("--filter", help="Only records this query matches (the query language)."),
    ] = "",
    organization: Annotated[
        list[str] | None,
        typer.Option("--organization", help="Only records of this organization (repeatable)."),
    ] = None,
) -> None:
    """Create a stream; it delivers what is indexed from now on. A webhook's signing secret is
    printed once."""
    settings = _settings(env)
    if (webhook is None) == (bucket is None):
        raise _fail(ValueError("give one destination: --webhook URL or --bucket s3://..."))
    kind: Kind = "webhook" if webhook is not None else "bucket"
    with _platform_connection(settings) as conn:
        try:
            new = create_stream(
                conn,
                settings.env,
                name,
                kind,
                webhook or bucket or "",
                created_by=by,
                filter=filter_text,
                organizations=organization,
                can_sign=settings.signer() is not None,
            )
        except StreamError as exc:
            raise _fail(exc) from exc
    typer.echo(f"stream {new.stream.name}: {kind} {new.stream.target}", err=True)
    if new.secret is not None:
        typer.echo("Its signing secret is shown once; give it to the receiver:", err=True)
        typer.echo(new.secret)


@streams_app.command("list")
def streams_list(env: EnvOption = None) -> None:
    """The environment's streams and, per source, what each delivered and how far behind it is."""
    settings = _settings(env)
    with _platform_connection(settings) as conn:
        streams = list_streams(conn, settings.env)
        progress = stream_status(conn, settings.env)
    for stream in streams:
        scope = ",".join(sorted(stream.organizations)) if stream.organizations else "all"
        typer.echo(
            f"{stream.name}\t{stream.kind} {stream.target}\tfilter {stream.filter or '-'}"
            f"\torganizations {scope}\tby {stream.created_by} {stream.created_at:%Y-%m-%d %H:%M}"
        )
        for found in (p for p in progress if p.stream == stream.name):
            failing = f"\tfailing ({found.attempts} attempts): {found.last_error}"
            typer.echo(
                f"  {found.source}\tdelivered {found.delivered}\tbehind {found.behind} batches "
                f"({found.lag_seconds:.1f} s)\tdead letters {found.dead_letters}"
                + (failing if found.attempts else "")
            )


@streams_app.command("delete")
def streams_delete(name: str, by: ByOption, env: EnvOption = None) -> None:
    """Stop a stream: no message is sent after this returns but the one in flight."""
    settings = _settings(env)
    with _platform_connection(settings) as conn:
        try:
            delete_stream(conn, settings.env, name, deleted_by=by)
        except StreamError as exc:
            raise _fail(exc) from exc
    typer.echo(f"stream {name} deleted")


@streams_app.command("deliver")
def streams_deliver(
    env: EnvOption = None,
    once: Annotated[bool, typer.Option(help="One pass, then exit.")] = False,
) -> None:
    """Deliver the environment's streams (a live capture run does this too; run one or the
    other, not both)."""
    settings = _settings(env)
    environment = load_environment(settings.resources_dir, settings.env)
    with _platform_connection(settings):
        pass  # the platform's tables, installed
    try:
        url, es = pg_url_from_settings(settings), es_from_settings(settings)
    except NotConfigured as exc:
        raise _fail(exc) from exc
    deliverer = Deliverer(
        settings.env,
        lambda: psycopg.connect(url, autocommit=True),
        es,
        lambda source: StagingStore(settings.staging_root, settings.env, source),
        signer=settings.signer(),
        settings=environment.streams,
    )
    if once:
        found = deliverer.deliver()
        deliverer.close()
        typer.echo(
            f"{found.messages} messages, {found.records} records; {found.failures} failed, "
            f"{found.dead_lettered} dead-lettered"
        )
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        deliverer.run(stop)
    except KeyboardInterrupt:
        stop.set()


ui_app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="The Audit Explorer's sessions opened by single sign-on.",
    no_args_is_help=True,
)
app.add_typer(ui_app, name="ui")


@ui_app.command("sessions")
def ui_sessions_list(env: EnvOption = None) -> None:
    """Live sessions of people signed in by single sign-on (sessions of keys end with them)."""
    settings = _settings(env)
    with _platform_connection(settings) as conn:
        found = person_sessions(conn, settings.env)
    for principal, name, role, expires_at in found:
        typer.echo(f"{principal}\t{name}\t{role}\tuntil {expires_at:%Y-%m-%d %H:%M}")


@ui_app.command("revoke")
def ui_revoke(
    principal: Annotated[
        str, typer.Argument(help="The person as `ui sessions` shows them, e.g. sso:alice.")
    ],
    env: EnvOption = None,
) -> None:
    """End every Explorer session of a person at once (removed from a group, leaving)."""
    settings = _settings(env)
    if not principal.startswith("sso:"):
        raise _fail(ValueError(f"{principal!r}: name the person as `ui sessions` does, sso:..."))
    with _platform_connection(settings) as conn:
        ended = revoke_person(conn, settings.env, principal)
    typer.echo(f"{ended} sessions of {principal} ended")
