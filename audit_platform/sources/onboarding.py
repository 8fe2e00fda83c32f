"""A service joins, or leaves, in one command (``audit-platform source add`` / ``remove``).

Joining checks first and changes nothing unless every check passes: the server (``preflight``),
each table (``check.table_findings``: it exists, has a key and REPLICA IDENTITY FULL) and that
the role owns it (a publication may name only tables its creator owns). Then it writes the
policy (unless the source has one), sets the database up as ``source setup`` does (schema,
publication, slot), and names the source in the environment's file last, so that no capture run
ever looks for a slot that does not exist yet. The environment's file is edited in place, its
comments and order kept (ruamel.yaml's round trip).

Leaving drops this environment's slot and publication and takes the source out of the
environment's file; its policy and everything recorded stay (the trail, the index, the staged
files), as a retention period or a legal hold expects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import yaml
from ruamel.yaml import YAML

from audit_platform.clients import connect_source
from audit_platform.environment import EnvironmentConfig, environment_path, load_environment
from audit_platform.lsn import parse_lsn
from audit_platform.naming import publication_name, slot_name
from audit_platform.platform_db import one
from audit_platform.policy import SourcePolicy, TablePolicy, load_policy, policy_path
from audit_platform.sources.check import Finding, Level, table_findings
from audit_platform.sources.preflight import judge, server_facts


class OnboardingError(RuntimeError):
    """The source cannot join or leave as asked; the message says why and what to do."""


@dataclass
class Preflight:
    findings: list[Finding] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not any(f.level is Level.error for f in self.findings)


def _ownership(conn: psycopg.Connection, schema: str, table: str) -> Finding | None:
    row = conn.execute(
        "SELECT pg_get_userbyid(c.relowner), pg_has_role(current_user, c.relowner, 'USAGE')"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s",
        (schema, table),
    ).fetchone()
    if row is None or row[1]:
        return None  # a missing table is table_findings' to report
    return Finding(
        Level.error,
        f"{schema}.{table}",
        f"is owned by {row[0]}, and only its owner (or a superuser) may publish it",
        f"run source add as {row[0]}, or GRANT {row[0]} TO <this role>;",
    )


def preflight(url: str, env: str, policy: SourcePolicy) -> Preflight:
    """Every check, against the database as it is; nothing is changed."""
    with connect_source(url) as conn:
        findings = judge(server_facts(conn, env, policy.source))
        for name, table_policy in sorted(policy.tables.items()):
            schema, table = name.split(".", 1)
            findings.extend(table_findings(conn, schema, table, table_policy))
            if (owner := _ownership(conn, schema, table)) is not None:
                findings.append(owner)
    return Preflight(findings)


def policy_to_join(
    resources_dir: Path, source: str, tables: list[str]
) -> tuple[SourcePolicy, bool]:
    """The source's policy, and whether it is new: the file's, if there is one (``tables``,
    when given, must be its tables), else a first version tracking ``tables`` whole."""
    path = policy_path(resources_dir, source)
    if path.exists():
        policy = load_policy(path)
        if tables and sorted(tables) != sorted(policy.tables):
            raise OnboardingError(
                f"{path} already tracks {', '.join(sorted(policy.tables))}; edit the policy "
                "file to change its tables, and run source add without --tables"
            )
        return policy, False
    if not tables:
        raise OnboardingError(
            f"source {source!r} has no policy ({path}): name its tables with --tables "
            "schema.table,..."
        )
    try:
        policy = SourcePolicy(
            source=source, version=1, tables={name: TablePolicy() for name in tables}
        )
    except ValueError as exc:
        raise OnboardingError(f"--tables: {exc}") from exc
    return policy, True


def write_policy(resources_dir: Path, policy: SourcePolicy) -> Path:
    path = policy_path(resources_dir, policy.source)
    tables: dict[str, dict] = {name: {} for name in sorted(policy.tables)}
    header = (
        f"# Tracking policy of source {policy.source}, written by `audit-platform source add`.\n"
        "# Per table: include or exclude columns, mask them (a keyed hash), ignore_changes_to,\n"
        "# key where the table has no primary key; bump version on every change (README,\n"
        '# "Sources").\n'
    )
    body = yaml.safe_dump(
        {"source": policy.source, "version": policy.version, "tables": tables}, sort_keys=False
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + body)
    load_policy(path)  # what was written reads back as the same policy
    return path


def _replace(path: Path, data) -> None:
    """Write the environment's file whole, or not at all: to a file beside it, checked to load
    as the deployment will load it, then renamed over it (a reader never sees half a file)."""
    document = _round_trip()
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with partial.open("w") as out:
            document.dump(data, out)
            out.flush()
            os.fsync(out.fileno())
        try:
            EnvironmentConfig.model_validate(yaml.safe_load(partial.read_text()) or {})
        except (ValueError, yaml.YAMLError) as exc:
            raise OnboardingError(f"{path} would not load after the change: {exc}") from exc
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _round_trip() -> YAML:
    document = YAML()
    document.preserve_quotes = True
    document.indent(mapping=2, sequence=4, offset=2)
    return document


def name_in_environment(resources_dir: Path, env: str, source: str, url_env: str) -> bool:
    """Add the source to the environment's file; False if it was there already, as asked."""
    path = environment_path(resources_dir, env)
    current = load_environment(resources_dir, env).sources.get(source)
    if current is not None:
        if current.url_env != url_env:
            raise OnboardingError(
                f"{path} names source {source!r} with url_env {current.url_env}, not {url_env}; "
                "edit the file if the variable changed"
            )
        return False
    document = _round_trip()
    data = document.load(path.read_text()) if path.exists() else None
    if data is None:
        data = {}
    sources = data.get("sources")
    if sources is None:
        data["sources"] = sources = {}
    sources[source] = {"url_env": url_env}
    _replace(path, data)
    return True


def remove_from_environment(resources_dir: Path, env: str, source: str) -> bool:
    """Take the source out of the environment's file; False if it was not in it."""
    path = environment_path(resources_dir, env)
    if source not in load_environment(resources_dir, env).sources:
        return False
    data = _round_trip().load(path.read_text())
    del data["sources"][source]
    _replace(path, data)
    return True


@dataclass(frozen=True)
class Unread:
    """Where the slot's reader stopped, and where the server is: what dropping it would lose."""

    confirmed_lsn: int
    current_lsn: int


def unread_changes(url: str, env: str, source: str) -> Unread | None:
    """Whether the source's slot still holds a change capture has not read (None: nothing, or
    no slot). Peeks at most one change, so it costs a decode up to the first one it finds; a
    slot in use cannot be peeked and is ``teardown_source``'s to refuse."""
    slot, publication = slot_name(env, source), publication_name(env, source)
    with connect_source(url) as conn:
        row = conn.execute(
            "SELECT confirmed_flush_lsn::text, pg_current_wal_lsn()::text, active_pid"
            " FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        ).fetchone()
        if row is None or row[2] is not None:
            return None
        found = one(
            conn.execute(
                "SELECT count(*) FROM pg_logical_slot_peek_binary_changes(%s, NULL, 1,"
                " 'proto_version', '1', 'publication_names', %s)",
                (slot, publication),
            )
        )[0]
    return Unread(parse_lsn(row[0]), parse_lsn(row[1])) if found else None
