"""Install, upgrade and remove the platform's objects in one source database.

Setup is idempotent and upgradable: SQL migrations under resources/sql/source are applied once
each, in order, under an advisory lock so two setups cannot interleave; the publication is set to
exactly the policy's tables; the slot is created if missing (never recreated: that would lose
whatever it still holds), and an invalidated one is replaced only when asked, so that the range it
lost is recorded as a gap (``audit_platform.capture.gaps``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from audit_platform import migrations
from audit_platform.capture.messages import ATTACHMENTS_TABLE
from audit_platform.capture.schema_changes import SCHEMA_CHANGES_TABLE
from audit_platform.capture.slot import parked_pid
from audit_platform.capture.snapshot import SNAPSHOT_CHUNKS_TABLE
from audit_platform.clients import connect_source
from audit_platform.lsn import parse_lsn
from audit_platform.naming import publication_name, slot_name
from audit_platform.platform_db import one
from audit_platform.policy import SourcePolicy

#: Any 64-bit number; it only has to be the same for every setup of every source.
_SETUP_LOCK = 0x61756469745F7365
#: The platform's own tables every publication carries beside the policy's: late contexts
#: (source migration 002), schema changes (003) and snapshots' rows (004) travel as their
#: inserts.
OWN_TABLES = (ATTACHMENTS_TABLE, SCHEMA_CHANGES_TABLE, SNAPSHOT_CHUNKS_TABLE)
#: The event triggers that write ``audit.schema_changes`` (migration 003): name, event, the
#: commands they fire on, function.
EVENT_TRIGGERS = (
    (
        "audit_schema_changes",
        "ddl_command_end",
        ("CREATE TABLE", "CREATE TABLE AS", "SELECT INTO", "ALTER TABLE", "ALTER SCHEMA"),
        "audit.record_schema_change()",
    ),
    (
        "audit_table_drops",
        "sql_drop",
        ("DROP TABLE", "DROP SCHEMA", "DROP OWNED"),
        "audit.record_table_drop()",
    ),
)
SCHEMA_HISTORY_OFF = (
    "schema changes of tracked tables are not recorded: creating the event triggers that "
    "record them needs a superuser"
)
SCHEMA_HISTORY_FIX = (
    "run `audit-platform source setup` as a superuser (on Amazon RDS and Aurora a member of "
    "rds_superuser, on Cloud SQL of cloudsqlsuperuser, on Azure Database for PostgreSQL of "
    "azure_pg_admin, where event triggers are allowed)"
)


class SetupError(RuntimeError):
    """Setup cannot proceed; the message says what is wrong in the source database."""


@dataclass
class SetupReport:
    applied_migrations: list[str] = field(default_factory=list)
    publication: str = ""
    publication_tables: list[str] = field(default_factory=list)
    slot: str = ""
    slot_created: bool = False
    #: Where a slot created now starts: nothing committed before it will be read.
    slot_start: int | None = None
    #: For an invalidated slot replaced now, the last position it had confirmed.
    slot_replaced_from: int | None = None
    #: Whether PUBLIC may no longer call pg_logical_emit_message (see restrict_messages).
    messages_restricted: bool = False
    #: The role whose members may attach a late context (audit.attach_context) here.
    attributor_role: str = ""
    #: Whether the event triggers that record schema changes are installed (see
    #: record_schema_changes).
    schema_history: bool = False


def apply_migrations(conn: psycopg.Connection, sql_dir: Path) -> list[str]:
    return migrations.apply(conn, "audit", sql_dir / "source", _SETUP_LOCK)


def _missing_tables(conn: psycopg.Connection, tables: list[tuple[str, str]]) -> list[str]:
    missing = []
    for schema, table in tables:
        found = conn.execute(
            "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
            (schema, table),
        ).fetchone()
        if not found:
            missing.append(f"{schema}.{table}")
    return missing


def ensure_publication(conn: psycopg.Connection, name: str, tables: list[tuple[str, str]]) -> None:
    """Exactly the policy's tables and the platform's own (:data:`OWN_TABLES`); partitions are
    published under their root table."""
    published = [*tables, *(own for own in OWN_TABLES if own not in tables)]
    table_list = sql.SQL(", ").join(sql.Identifier(s, t) for s, t in published)
    exists = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (name,)).fetchone()
    with conn.transaction():
        if exists:
            conn.execute(
                sql.SQL("ALTER PUBLICATION {} SET TABLE {}").format(
                    sql.Identifier(name), table_list
                )
            )
        else:
            conn.execute(
                sql.SQL(
                    "CREATE PUBLICATION {} FOR TABLE {} WITH (publish = "
                    "'insert, update, delete, truncate', publish_via_partition_root = true)"
                ).format(sql.Identifier(name), table_list)
            )


def public_may_emit_messages(conn: psycopg.Connection) -> bool:
    """Whether every role may call some form of pg_logical_emit_message in this database."""
    row = one(
        conn.execute(
            "SELECT coalesce(bool_or(a.grantee = 0), false) FROM pg_catalog.pg_proc p,"
            " aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a"
            " WHERE p.proname = 'pg_logical_emit_message' AND a.privilege_type = 'EXECUTE'"
        )
    )
    return bool(row[0])


def restrict_messages(conn: psycopg.Connection) -> bool:
    """Revoke pg_logical_emit_message from PUBLIC; True if PUBLIC no longer has it.

    Capture refuses any message that is not a valid context, but the driver must read a message
    whole before anyone can refuse it, and one can be 1 GB (docs/design.md, invariant 10). Only
    a superuser may change a system function's privileges; for anyone else PostgreSQL only
    warns, and ``source check`` reports the database as still open. A tool that needs to emit
    messages (a CDC heartbeat, say) is granted them by name.
    """
    if public_may_emit_messages(conn):
        for (signature,) in conn.execute(
            "SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc p"
            " WHERE p.proname = 'pg_logical_emit_message'"
        ).fetchall():
            revoke = sql.SQL("REVOKE EXECUTE ON FUNCTION {} FROM PUBLIC")
            conn.execute(revoke.format(sql.SQL(signature)))
    return not public_may_emit_messages(conn)


def schema_history_installed(conn: psycopg.Connection) -> bool:
    """Whether both event triggers of migration 003 exist and fire."""
    row = one(
        conn.execute(
            "SELECT count(*) FROM pg_event_trigger WHERE evtname = ANY(%s) AND evtenabled <> 'D'",
            ([name for name, *_ in EVENT_TRIGGERS],),
        )
    )
    return row[0] == len(EVENT_TRIGGERS)


def record_schema_changes(conn: psycopg.Connection) -> bool:
    """Create the event triggers that record schema changes, once; True if they are in place.

    The tables' shapes are taken first, so the first change of each is told apart from what it
    was. Only a superuser may create an event trigger; for anyone else nothing changes, and
    ``source check`` reports schema changes as not recorded (docs/design.md, "Schema history").
    """
    existing = {
        row[0]
        for row in conn.execute(
            "SELECT evtname FROM pg_event_trigger WHERE evtname = ANY(%s)",
            ([name for name, *_ in EVENT_TRIGGERS],),
        )
    }
    try:
        with conn.transaction():
            conn.execute("SELECT audit.baseline_table_shapes()")
            for name, event, tags, function in EVENT_TRIGGERS:
                if name in existing:
                    continue
                conn.execute(
                    sql.SQL(
                        "CREATE EVENT TRIGGER {} ON {} WHEN TAG IN ({}) EXECUTE FUNCTION {}"
                    ).format(
                        sql.Identifier(name),
                        sql.SQL(event),
                        sql.SQL(", ").join(sql.Literal(tag) for tag in tags),
                        sql.SQL(function),
                    )
                )
    except psycopg.errors.InsufficientPrivilege:
        return False
    return schema_history_installed(conn)


def ensure_slot(
    conn: psycopg.Connection, name: str, report: SetupReport, *, replace_lost: bool = False
) -> None:
    """Create the pgoutput slot if missing; replace it only if invalidated and asked to.

    Fills the report's slot fields: whether it was created, where the new slot starts, and for a
    replaced slot the position its predecessor had confirmed (the gap begins there).
    """
    row = conn.execute(
        "SELECT plugin, database, wal_status, confirmed_flush_lsn::text"
        " FROM pg_replication_slots WHERE slot_name = %s",
        (name,),
    ).fetchone()
    if row is not None:
        plugin, database, wal_status, confirmed = row
        current = conn.info.dbname
        if plugin != "pgoutput" or database != current:
            raise SetupError(
                f"slot {name} exists but uses plugin {plugin!r} on database {database!r}; "
                f"expected pgoutput on {current!r}. Drop it (after checking nobody needs it) "
                f"with SELECT pg_drop_replication_slot('{name}')"
            )
        if wal_status != "lost":
            return
        if not replace_lost:
            raise SetupError(
                f"slot {name} was invalidated by PostgreSQL (wal_status = lost): changes after "
                f"{confirmed} were not captured and cannot be. Run setup again with "
                "--replace-lost-slot to create a new slot; the range is recorded as a gap"
            )
        conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
        report.slot_replaced_from = parse_lsn(confirmed or "0/0")
    created = one(
        conn.execute(
            "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput')", (name,)
        )
    )
    report.slot_created, report.slot_start = True, parse_lsn(created[0])


def setup_source(
    url: str, env: str, policy: SourcePolicy, sql_dir: Path, *, replace_lost_slot: bool = False
) -> SetupReport:
    report = SetupReport()
    with connect_source(url) as conn:
        level = one(conn.execute("SHOW wal_level"))[0]
        if level != "logical":
            raise SetupError(
                f"wal_level is {level!r}; change capture needs 'logical'. Run "
                "ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL"
            )
        tables = policy.table_names()
        if missing := _missing_tables(conn, tables):
            raise SetupError(
                f"tables in the policy of source {policy.source!r} do not exist: "
                f"{', '.join(missing)}. Create them or remove them from the policy."
            )
        report.applied_migrations = apply_migrations(conn, sql_dir)
        report.messages_restricted = restrict_messages(conn)
        report.attributor_role = one(conn.execute("SELECT audit.attributor_role()"))[0]
        report.schema_history = record_schema_changes(conn)
        report.publication = publication_name(env, policy.source)
        ensure_publication(conn, report.publication, tables)
        report.publication_tables = [f"{s}.{t}" for s, t in tables]
        report.slot = slot_name(env, policy.source)
        ensure_slot(conn, report.slot, report, replace_lost=replace_lost_slot)
    return report


def teardown_source(
    url: str, env: str, source: str, sql_dir: Path, *, everything: bool
) -> list[str]:
    """Drop this environment's slot and publication; with ``everything``, the audit schema too.

    The schema is shared by every environment capturing from this database, so it is removed
    only when no other environment's slot remains.
    """
    removed: list[str] = []
    slot, publication = slot_name(env, source), publication_name(env, source)
    with connect_source(url) as conn:
        active = conn.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
        if active is not None:
            watcher = active[0] if active[0] is not None else parked_pid(conn, slot)
            if watcher is not None:
                raise SetupError(
                    f"slot {slot} is in use by process {watcher}; stop capture for "
                    f"environment {env!r} first"
                )
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            removed.append(f"slot {slot}")
        if conn.execute(
            "SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,)
        ).fetchone():
            conn.execute(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(publication)))
            removed.append(f"publication {publication}")
        if everything:
            others = conn.execute(
                "SELECT slot_name FROM pg_replication_slots WHERE database = current_database()"
                " AND slot_name LIKE 'audit\\_%%'"
            ).fetchall()
            if others:
                names = ", ".join(row[0] for row in others)
                raise SetupError(
                    f"other environments still capture from this database ({names}); "
                    "tear them down first, or drop only this environment's objects"
                )
            conn.execute((sql_dir / "source" / "uninstall.sql").read_text())
            removed.append("schema audit")
    return removed
