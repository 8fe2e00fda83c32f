"""Plain-spoken checks of a source database: can capture work, and will it be complete?

Each finding says what is wrong and the exact statement or setting that fixes it. The same
findings feed `audit-platform source check` and the Dagster asset checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import psycopg
from psycopg import sql

from audit_platform.clients import connect_source
from audit_platform.migrations import migrations
from audit_platform.naming import publication_name, slot_name
from audit_platform.platform_db import one
from audit_platform.policy import SourcePolicy, TablePolicy
from audit_platform.sources.setup import (
    OWN_TABLES,
    SCHEMA_HISTORY_FIX,
    SCHEMA_HISTORY_OFF,
    public_may_emit_messages,
    schema_history_installed,
)

#: Warn when a slot holds back more WAL than this (the consumer is behind or stopped).
LAG_WARN_BYTES = 1024**3


class Level(StrEnum):
    ok = "ok"
    warning = "warning"
    error = "error"


@dataclass(frozen=True)
class Finding:
    level: Level
    subject: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        text = f"[{self.level.value}] {self.subject}: {self.message}"
        return f"{text}\n    fix: {self.fix}" if self.fix else text


def _wal_level(conn: psycopg.Connection) -> Finding:
    level = one(conn.execute("SHOW wal_level"))[0]
    if level == "logical":
        return Finding(Level.ok, "wal_level", "logical")
    return Finding(
        Level.error,
        "wal_level",
        f"is {level!r}; logical decoding needs 'logical'",
        "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL",
    )


def _may_replicate(conn: psycopg.Connection) -> Finding:
    user, can = one(
        conn.execute(
            "SELECT rolname, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user"
        )
    )
    if can:
        return Finding(Level.ok, "role", f"{user} may read replication slots")
    return Finding(
        Level.error,
        "role",
        f"{user} has neither REPLICATION nor superuser, so it cannot read the slot",
        f"ALTER ROLE {sql.Identifier(user).as_string(conn)} REPLICATION;",
    )


def _schema(conn: psycopg.Connection, sql_dir) -> Finding:
    latest = max((v for v, _, _ in migrations(sql_dir / "source")), default=0)
    exists = one(conn.execute("SELECT to_regclass('audit.schema_migrations')"))[0]
    installed = (
        one(conn.execute("SELECT coalesce(max(version), 0) FROM audit.schema_migrations"))[0]
        if exists
        else 0
    )
    if installed >= latest:
        return Finding(Level.ok, "audit schema", f"at migration {installed:03d}")
    return Finding(
        Level.error,
        "audit schema",
        f"at migration {installed:03d}, latest is {latest:03d}"
        + ("" if installed else ": audit.set_context is not installed"),
        "audit-platform source setup --env ENV --source SOURCE",
    )


def table_findings(
    conn: psycopg.Connection, schema: str, table: str, policy: TablePolicy
) -> list[Finding]:
    subject = f"{schema}.{table}"
    row = conn.execute(
        "SELECT c.oid, c.relkind, c.relreplident FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
        (schema, table),
    ).fetchone()
    if row is None:
        return [
            Finding(
                Level.error,
                subject,
                "is in the policy but does not exist",
                "create it, or remove it from the source's policy file",
            )
        ]
    oid, relkind, identity = row
    findings: list[Finding] = []
    columns = {
        r[0]
        for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0"
            " AND NOT attisdropped",
            (oid,),
        )
    }
    has_pk = conn.execute(
        "SELECT 1 FROM pg_constraint WHERE conrelid = %s AND contype = 'p'", (oid,)
    ).fetchone()
    if policy.key:
        if unknown := sorted(set(policy.key) - columns):
            findings.append(
                Finding(Level.error, subject, f"policy key columns do not exist: {unknown}")
            )
    elif not has_pk:
        findings.append(
            Finding(
                Level.error,
                subject,
                "has no primary key, so records could not say which object changed",
                f"add a primary key, or set key: [columns] for {subject} in the policy",
            )
        )
    named = set(policy.include or []) | set(policy.exclude) | set(policy.mask)
    if unknown := sorted(named - columns):
        findings.append(
            Finding(
                Level.warning,
                subject,
                f"policy names columns that do not exist: {unknown}",
                "fix the names in the policy file (a typo here could leave a value unmasked)",
            )
        )
    # Before-images come from each leaf table; for a partitioned table, that is every partition
    # (pg_partition_tree lists nothing for a plain table).
    leaves = [(schema, table, identity)]
    if relkind == "p":
        leaves = conn.execute(
            "SELECT n.nspname, c.relname, c.relreplident FROM pg_partition_tree(%s) t"
            " JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE t.isleaf",
            (oid,),
        ).fetchall()
    not_full = [(s, t) for s, t, ident in leaves if ident != "f"]
    if not_full:
        statements = " ".join(
            f"ALTER TABLE {sql.Identifier(s, t).as_string(conn)} REPLICA IDENTITY FULL;"
            for s, t in not_full
        )
        findings.append(
            Finding(
                Level.error,
                subject,
                "does not have REPLICA IDENTITY FULL, so updates and deletes would arrive "
                "without their before-image (old values)"
                + (f" (partitions: {len(not_full)})" if relkind == "p" else ""),
                statements,
            )
        )
    if not findings:
        findings.append(Finding(Level.ok, subject, "tracked, keyed, REPLICA IDENTITY FULL"))
    return findings


def _publication(conn: psycopg.Connection, env: str, policy: SourcePolicy) -> Finding:
    name = publication_name(env, policy.source)
    fix = f"audit-platform source setup --env {env} --source {policy.source}"
    if not conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (name,)).fetchone():
        return Finding(Level.error, "publication", f"{name} does not exist", fix)
    published = {
        f"{s}.{t}"
        for s, t in conn.execute(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", (name,)
        )
    }
    tracked = {f"{s}.{t}" for s, t in policy.table_names()}
    own = {f"{s}.{t}" for s, t in OWN_TABLES}
    # Partitioned roots are listed as their root (publish_via_partition_root), so compare sets.
    if missing := sorted(tracked - published):
        snapshots = "; ".join(
            f"audit-platform source snapshot --env {env} --source {policy.source} --table {t}"
            for t in missing
        )
        return Finding(
            Level.error,
            "publication",
            f"{name} lacks tracked tables: {missing}; their changes are not captured (a "
            "publication names tables, not names: a tracked table dropped and created again, "
            "or another renamed to its name, is not in it)",
            f"{fix} (it sets the publication to the policy's tables); then, as their changes "
            f"until then are not in the trail, a snapshot records their rows as they are: "
            f"{snapshots}",
        )
    if missing := sorted(own - published):
        return Finding(
            Level.error,
            "publication",
            f"{name} lacks the platform's own tables {missing} (set up by an older version): "
            "schema changes, late contexts or snapshots are not captured",
            fix,
        )
    wanted = tracked | own
    return Finding(Level.ok, "publication", f"{name} publishes {len(wanted)} table(s)")


def _slot(conn: psycopg.Connection, name: str, lag_warn_bytes: int) -> list[Finding]:
    row = conn.execute(
        "SELECT plugin, wal_status, pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)"
        " FROM pg_replication_slots WHERE slot_name = %s",
        (name,),
    ).fetchone()
    keep = one(conn.execute("SHOW max_slot_wal_keep_size"))[0]
    findings = []
    if row is None:
        findings.append(
            Finding(Level.error, "slot", f"{name} does not exist", "audit-platform source setup")
        )
    else:
        plugin, wal_status, lag = row
        lag = int(lag or 0)
        if wal_status == "lost":
            findings.append(
                Finding(
                    Level.error,
                    "slot",
                    f"{name} has lost WAL it needed (max_slot_wal_keep_size exceeded): changes "
                    "were lost; re-create the slot and backfill from the source",
                    "audit-platform source teardown, then source setup",
                )
            )
        elif lag > lag_warn_bytes:
            findings.append(
                Finding(
                    Level.warning,
                    "slot",
                    f"{name} is {lag} bytes behind; the source keeps that much WAL for it",
                    "check that the capture sensor is running in this environment",
                )
            )
        else:
            findings.append(
                Finding(Level.ok, "slot", f"{name} ({plugin}) is {lag} bytes behind, {wal_status}")
            )
    if keep == "-1":
        findings.append(
            Finding(
                Level.warning,
                "max_slot_wal_keep_size",
                "is unlimited: a stopped consumer makes the source keep WAL until its disk fills",
                "ALTER SYSTEM SET max_slot_wal_keep_size = '50GB'; SELECT pg_reload_conf(); "
                "(size it to hours of your WAL rate)",
            )
        )
    else:
        findings.append(Finding(Level.ok, "max_slot_wal_keep_size", keep))
    return findings


MESSAGES_OPEN = (
    "every role may call pg_logical_emit_message in this database: capture refuses messages "
    "that are not valid contexts, but reads each whole first, and one may be 1 GB (about 3 GB "
    "of the capture process's memory)"
)
MESSAGES_FIX = (
    "run `audit-platform source setup` as a superuser, or REVOKE EXECUTE ON FUNCTION "
    "pg_logical_emit_message(boolean, text, text), pg_logical_emit_message(boolean, text, "
    "bytea) FROM PUBLIC"
)


def _messages(conn: psycopg.Connection) -> Finding:
    if public_may_emit_messages(conn):
        return Finding(Level.warning, "logical messages", MESSAGES_OPEN, MESSAGES_FIX)
    return Finding(Level.ok, "logical messages", "only roles granted it may emit them")


def _schema_history(conn: psycopg.Connection) -> Finding:
    if conn.execute("SELECT to_regclass('audit.schema_changes')").fetchone() == (None,):
        return Finding(
            Level.warning, "schema history", SCHEMA_HISTORY_OFF, "audit-platform source setup"
        )
    if schema_history_installed(conn):
        return Finding(Level.ok, "schema history", "schema changes of tracked tables recorded")
    return Finding(Level.warning, "schema history", SCHEMA_HISTORY_OFF, SCHEMA_HISTORY_FIX)


def check_source(
    url: str, env: str, policy: SourcePolicy, sql_dir, *, lag_warn_bytes: int = LAG_WARN_BYTES
) -> list[Finding]:
    with connect_source(url) as conn:
        findings = [
            _wal_level(conn),
            _may_replicate(conn),
            _schema(conn, sql_dir),
            _messages(conn),
            _schema_history(conn),
        ]
        for name, table_policy in sorted(policy.tables.items()):
            schema, table = name.split(".", 1)
            findings.extend(table_findings(conn, schema, table, table_policy))
        findings.append(_publication(conn, env, policy))
        findings.extend(_slot(conn, slot_name(env, policy.source), lag_warn_bytes))
    return findings
