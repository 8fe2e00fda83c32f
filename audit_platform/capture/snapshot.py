"""Snapshots of existing rows: every row of a tracked table recorded once, in commit order with
the live changes (source migration 004; docs/design.md, "Snapshots").

The source does the reading: each chunk is one statement in one short transaction that locks
the chunk's rows FOR SHARE, writes them (PostgreSQL's text output of each value, what pgoutput
sends) into a row of ``audit.snapshot_chunks``, deletes that row again and moves the snapshot's
progress. Capture reads the chunk from the slot at the transaction's commit and applies the
policy to it like to any change (``capture.pgoutput``), so the rows never leave the source
unmasked, and the chunk's records sit at a position where no change of their rows is missing
before it or duplicated after it. Progress commits with its chunk: a snapshot stopped anywhere
resumes from its last committed chunk, every row recorded exactly once.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from audit_platform.capture.row_filter import ConditionError, as_sql, row_condition
from audit_platform.clients import connect_source
from audit_platform.lsn import parse_lsn
from audit_platform.naming import publication_name, slot_name
from audit_platform.platform_db import one
from audit_platform.policy import SourcePolicy

if TYPE_CHECKING:
    from audit_platform.capture.snapshot_pace import PipelinePace

#: The table chunks travel through (source migration 004); published with the policy's.
SNAPSHOT_CHUNKS_TABLE = ("audit", "snapshot_chunks")
#: What a chunk aims at in stored bytes: big enough that a chunk's fixed cost is small, small
#: enough that capture holds a few of them in memory without noticing.
TARGET_CHUNK_BYTES = 4 * 1024**2
MAX_CHUNK_ROWS = 20_000
#: The first chunk of a table, before its rows' size is known.
FIRST_CHUNK_ROWS = 1000
#: A writer of a chunk's rows waits for the chunk; a chunk waits at most this long for a
#: writer (a long transaction of the service) before it gives way and tries again.
LOCK_TIMEOUT = "500ms"


class SnapshotError(RuntimeError):
    """A snapshot cannot run as asked; the message says why and what to do."""


class SnapshotRefused(SnapshotError):
    """A snapshot refused before it read anything (so there is nothing to resume)."""


@dataclass(frozen=True)
class TableShape:
    name: str  # schema.table
    columns: list[str]
    types: list[str]
    key: list[str]
    key_types: list[str]


@dataclass
class TableProgress:
    table: str
    rows: int
    chunks: int
    done: bool
    #: The WAL position when the snapshot began this table: its chunks all commit later (None:
    #: begun before source migration 005 kept it).
    started_lsn: int | None = 0
    #: The snapshot's ``WHERE`` as it runs (``capture.row_filter``); None: every row.
    condition: str | None = None
    #: The environment whose capture records it (source migration 006); None: every
    #: environment capturing the database (begun before the migration, or without one).
    env: str | None = None


@dataclass(frozen=True)
class Chunk:
    rows: int
    bound: list[str] | None  # the last key it read (None: the table's end)
    final: bool
    bytes: int
    #: A WAL position inside its transaction, before its commit: capture has staged the chunk
    #: once the slot is confirmed past it (``capture.snapshot_pace``).
    written_lsn: int


def new_snapshot_id(now: datetime | None = None) -> str:
    """Sortable by start, unique without coordination."""
    moment = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{moment}-{secrets.token_hex(3)}"


def table_shape(conn: psycopg.Connection, name: str) -> TableShape:
    schema, table = name.split(".", 1)
    columns = conn.execute(
        # The type as capture names it from pgoutput's type oids (no typmod), and as a cast
        # needs it to read a key back exactly (with it: ``character`` alone is one character).
        "SELECT a.attname, format_type(a.atttypid, NULL), format_type(a.atttypid, a.atttypmod)"
        " FROM pg_attribute a"
        " JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped"
        " ORDER BY a.attnum",
        (schema, table),
    ).fetchall()
    if not columns:
        raise SnapshotError(f"table {name} does not exist")
    key = [
        row[0]
        for row in conn.execute(
            "SELECT a.attname FROM pg_constraint con"
            " JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
            " CROSS JOIN LATERAL unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord)"
            " JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum"
            " WHERE n.nspname = %s AND c.relname = %s AND con.contype = 'p' ORDER BY k.ord",
            (schema, table),
        )
    ]
    if not key:
        raise SnapshotError(
            f"table {name} has no primary key: a snapshot reads a table in chunks by its "
            "primary key; add one (its changes need one to name their object too)"
        )
    exact: dict[str, str] = {c: t for c, _, t in columns}
    return TableShape(
        name, [c for c, _, _ in columns], [t for _, t, _ in columns], key, [exact[k] for k in key]
    )


def _key_list(shape: TableShape) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier("t", k) for k in shape.key)


def _key_params(shape: TableShape) -> sql.Composable:
    """The key's columns as parameters, each read back with its type's input function."""
    return sql.SQL(", ").join(sql.SQL("%s::{}").format(sql.SQL(t)) for t in shape.key_types)


def _as_output(column: str) -> sql.Composable:
    """A value as its type's output function prints it, which is what pgoutput sends (a cast
    to text is not always that: ``true::text`` is ``true``, the output is ``t``)."""
    return sql.SQL("CASE WHEN {c} IS NULL THEN NULL ELSE format('%%s', {c}) END").format(
        c=sql.Identifier("t", column)
    )


def _where(shape: TableShape, first: bool, last: bool, condition: str | None) -> sql.Composable:
    """The rows after the previous bound (unless ``first``), up to this one (unless ``last``),
    that meet the snapshot's condition."""
    keys = _key_list(shape)
    where: list[sql.Composable] = []
    if not first:
        where.append(sql.SQL("({}) > ({})").format(keys, _key_params(shape)))
    if not last:
        where.append(sql.SQL("({}) <= ({})").format(keys, _key_params(shape)))
    if condition is not None:
        where.append(as_sql(condition))
    return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL("")


def _bound_statement(shape: TableShape, first: bool, condition: str | None) -> sql.Composed:
    """The last key of the next chunk, read without locks: the chunk is then the rows between
    the previous bound and this one, so a key a writer moves while the chunk is read cannot
    move the bound past rows the chunk did not read. Parameters: the last key (unless
    ``first``), the chunk's rows less one."""
    schema, table = shape.name.split(".", 1)
    return sql.SQL(
        "SELECT ARRAY[{keys}] FROM {table} t{where} ORDER BY {order} OFFSET %s LIMIT 1"
    ).format(
        keys=sql.SQL(", ").join(_as_output(k) for k in shape.key),
        table=sql.Identifier(schema, table),
        where=_where(shape, first, True, condition),
        order=_key_list(shape),
    )


def _chunk_statement(
    shape: TableShape, first: bool, last: bool, condition: str | None
) -> sql.Composed:
    """One chunk: lock the rows after the previous bound and up to this one (unless ``last``)
    that meet the condition, write them for capture, return how many and their size.
    Parameters: the previous bound (unless ``first``), this bound (unless ``last``), then the
    chunk row's snapshot id, environment, table, columns, types and key."""
    schema, table = shape.name.split(".", 1)
    keys = _key_list(shape)
    return sql.SQL(
        "WITH chunk AS ("
        " SELECT row_number() OVER (ORDER BY {keys}) AS n, to_jsonb(ARRAY[{values}]) AS row"
        " FROM (SELECT * FROM {table} t{condition} ORDER BY {keys} FOR SHARE OF t) t),"
        " written AS ("
        " INSERT INTO audit.snapshot_chunks"
        " (snapshot_id, env, table_name, columns, types, key, rows)"
        " SELECT %s, %s, %s, %s, %s, %s, jsonb_agg(row ORDER BY n) FROM chunk"
        " HAVING count(*) > 0"
        " RETURNING id, octet_length(rows::text) AS bytes)"
        " SELECT (SELECT count(*) FROM chunk), (SELECT id FROM written),"
        " (SELECT bytes FROM written)"
    ).format(
        values=sql.SQL(", ").join(_as_output(c) for c in shape.columns),
        table=sql.Identifier(schema, table),
        condition=_where(shape, first, last, condition),
        keys=keys,
    )


def _condition(text: str, shape: TableShape, policy: SourcePolicy) -> str:
    """A snapshot's condition on ``shape``, checked against what the policy shows in clear."""
    table_policy = policy.tables[shape.name]
    hidden = frozenset(
        c for c in shape.columns if not table_policy.keeps(c) or c in table_policy.mask
    )
    try:
        return row_condition(text, dict(zip(shape.columns, shape.types, strict=True)), hidden)
    except ConditionError as exc:
        raise SnapshotRefused(str(exc)) from exc


def _progress(
    conn: psycopg.Connection,
    snapshot_id: str,
    table: str,
    condition: str | None,
    env: str | None,
) -> tuple[list[str] | None, TableProgress]:
    """(last key, progress) of a table in a snapshot, begun if new. A snapshot resumes with
    the condition it began with, and for the environment it began for: asked for another, it
    refuses rather than mix two (one begun for every environment goes on that way)."""
    conn.execute(  # a table new to a snapshot begun before takes the snapshot's environment
        "INSERT INTO audit.snapshot_progress (snapshot_id, table_name, condition, env)"
        " SELECT %s, %s, %s, CASE WHEN EXISTS (SELECT FROM audit.snapshot_progress"
        " WHERE snapshot_id = %s) THEN (SELECT env FROM audit.snapshot_progress"
        " WHERE snapshot_id = %s LIMIT 1) ELSE %s END ON CONFLICT DO NOTHING",
        (snapshot_id, table, condition, snapshot_id, snapshot_id, env),
    )
    last_key, rows, chunks, done, started, kept, kept_env = one(
        conn.execute(
            "SELECT last_key, rows, chunks, done, started_lsn::text, condition, env"
            " FROM audit.snapshot_progress WHERE snapshot_id = %s AND table_name = %s",
            (snapshot_id, table),
        )
    )
    if condition is not None and kept != condition:
        raise SnapshotRefused(
            f"snapshot {snapshot_id} of {table} began "
            + (f"with the condition {kept}" if kept else "without a condition")
            + f", not {condition}: resume it without --where, or start a new snapshot"
        )
    if kept_env is not None and kept_env != env:
        raise SnapshotRefused(
            f"snapshot {snapshot_id} of {table} was begun for environment {kept_env!r}, whose "
            f"capture alone records it: resume it with --env {kept_env}, or start a new snapshot"
        )
    started_lsn = None if started is None else parse_lsn(started)
    return last_key, TableProgress(table, rows, chunks, done, started_lsn, kept, kept_env)


def check_capture(conn: psycopg.Connection, env: str, source: str) -> None:
    """Refuse a snapshot that no capture of ``env`` would read: without the environment's slot,
    or with a publication that does not carry the chunks (set up before snapshots existed), its
    rows would pass through the WAL and be recorded nowhere."""
    slot, publication = slot_name(env, source), publication_name(env, source)
    has_slot, carries = one(
        conn.execute(
            "SELECT EXISTS (SELECT FROM pg_replication_slots WHERE slot_name = %s"
            " AND database = current_database() AND wal_status IS DISTINCT FROM 'lost'),"
            " EXISTS (SELECT FROM pg_publication_tables WHERE pubname = %s"
            " AND schemaname = %s AND tablename = %s)",
            (slot, publication, *SNAPSHOT_CHUNKS_TABLE),
        )
    )
    fix = f"run audit-platform source setup --env {env} --source {source}, then the snapshot"
    if not has_slot:
        raise SnapshotRefused(
            f"this database has no usable slot {slot} (missing, or lost), so no capture of "
            f"environment {env} would read the snapshot's rows; {fix}"
        )
    if not carries:
        raise SnapshotRefused(
            f"publication {publication} does not carry audit.snapshot_chunks (it was set up "
            f"before snapshots existed), so capture would never see the snapshot's rows; {fix}"
        )


def check_schema(conn: psycopg.Connection) -> None:
    """Refuse a snapshot on a database whose audit schema predates source migration 006, which
    names a snapshot's environment: capture must know which environment's it is."""
    (ready,) = one(
        conn.execute(
            "SELECT EXISTS (SELECT FROM pg_attribute WHERE attname = 'env' AND NOT attisdropped"
            " AND attrelid = to_regclass('audit.snapshot_chunks'))"
        )
    )
    if not ready:
        raise SnapshotRefused(
            "this database's audit schema is older than this version's snapshots (they name "
            "their environment, source migration 006): run audit-platform source setup for "
            "each environment capturing it, then the snapshot"
        )


def snapshot_context(snapshot_id: str, reason: str | None, condition: str | None = None) -> dict:
    """Who recorded a snapshot's rows: the platform itself, as a job with the snapshot's id
    (and the condition it was limited to: its records are not every row of the table)."""
    context: dict = {
        "actor": {"type": "system", "id": "audit-platform"},
        "job": {"name": "snapshot", "run_id": snapshot_id},
    }
    if reason:
        context["reason"] = reason
    if condition is not None:
        context["attributes"] = {"snapshot_where": condition}
    return context


@retry(
    retry=retry_if_exception_type(psycopg.errors.LockNotAvailable),
    wait=wait_exponential_jitter(multiplier=0.2, max=5),
    stop=stop_after_attempt(20),
    reraise=True,
)
def _chunk(
    conn: psycopg.Connection,
    shape: TableShape,
    snapshot_id: str,
    last_key: list[str] | None,
    limit: int,
    context: str,
    progress: TableProgress,
) -> Chunk:
    """One chunk in one transaction."""
    condition = progress.condition
    first = last_key is None
    with conn.transaction():
        conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        found = conn.execute(
            _bound_statement(shape, first, condition), [*(last_key or []), limit - 1]
        ).fetchone()
        bound = None if found is None else list(found[0])
        final = bound is None
        conn.execute("SELECT audit.set_context(%s::jsonb)", (context,))
        count, chunk_id, size = one(
            conn.execute(
                _chunk_statement(shape, first, final, condition),
                [
                    *(last_key or []),
                    *(bound or []),
                    snapshot_id,
                    progress.env,
                    shape.name,
                    json.dumps(shape.columns),
                    json.dumps(shape.types),
                    json.dumps(shape.key),
                ],
            )
        )
        if chunk_id is not None:
            conn.execute("DELETE FROM audit.snapshot_chunks WHERE id = %s", (chunk_id,))
        (written,) = one(
            conn.execute(
                "UPDATE audit.snapshot_progress SET last_key = coalesce(%s, last_key),"
                " rows = rows + %s, chunks = chunks + %s, done = %s,"
                " updated_at = clock_timestamp() WHERE snapshot_id = %s AND table_name = %s"
                " RETURNING pg_current_wal_insert_lsn()::text",
                (bound, count, 1 if count else 0, final, snapshot_id, shape.name),
            )
        )
    return Chunk(count, bound, final, size or 0, parse_lsn(written))


def run_snapshot(
    url: str,
    policy: SourcePolicy,
    snapshot_id: str,
    *,
    tables: Iterable[str] = (),
    reason: str | None = None,
    where: str | None = None,
    chunk_rows: int = MAX_CHUNK_ROWS,
    on_chunk: Callable[[TableProgress], None] | None = None,
    env: str | None = None,
    pace: PipelinePace | None = None,
) -> list[TableProgress]:
    """Snapshot ``tables`` (default: every table of the policy), limited to the rows that meet
    ``where`` (one table only), or resume ``snapshot_id`` where its last committed chunk left
    it. Tables are read one after another, each by key, in chunks of at most ``chunk_rows``
    rows, sized to about :data:`TARGET_CHUNK_BYTES`. Given ``env``, it first checks that the
    environment's capture will read what it writes (:func:`check_capture`), and only that
    environment's capture records it (without, every environment's does); given ``pace``,
    each chunk waits until that capture has nearly caught up, and holds at most the pace's
    :meth:`~audit_platform.capture.snapshot_pace.PipelinePace.chunk_limit` rows."""
    names = sorted(tables) or sorted(policy.tables)
    if unknown := [n for n in names if n not in policy.tables]:
        raise SnapshotRefused(
            f"tables not in the policy of source {policy.source!r}: {', '.join(unknown)}; a "
            "snapshot records only tracked tables"
        )
    if where is not None and len(names) != 1:
        raise SnapshotRefused(
            "a snapshot's condition (--where) names one table's columns: name that table "
            "alone (--table schema.table)"
        )
    done: list[TableProgress] = []
    written: int | None = None  # where the last chunk was written, for ``pace``
    with connect_source(url) as conn:
        held = one(
            conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (snapshot_id,))
        )[0]
        if not held:
            raise SnapshotRefused(
                f"snapshot {snapshot_id} is being taken by another process; wait for it, or "
                "stop it and resume with --id"
            )
        check_schema(conn)
        if env is not None:
            check_capture(conn, env, policy.source)
        for name in names:
            shape = table_shape(conn, name)
            condition = None if where is None else _condition(where, shape, policy)
            last_key, progress = _progress(conn, snapshot_id, name, condition, env)
            if progress.condition is not None:  # as it was kept: checked again, as if new
                progress.condition = _condition(progress.condition, shape, policy)
            context = json.dumps(snapshot_context(snapshot_id, reason, progress.condition))
            limit = min(FIRST_CHUNK_ROWS, chunk_rows)
            while not progress.done:
                if pace is not None and written is not None:
                    pace.wait(conn, written)
                if pace is not None:  # a chunk is what the live changes behind it wait for
                    limit = min(limit, pace.chunk_limit())
                try:
                    chunk = _chunk(conn, shape, snapshot_id, last_key, limit, context, progress)
                except psycopg.errors.ProgramLimitExceeded:
                    if limit == 1:
                        raise
                    limit = max(1, limit // 4)  # a chunk of huge values: fewer rows at once
                    continue
                last_key = chunk.bound or last_key
                written = chunk.written_lsn
                progress.rows += chunk.rows
                progress.chunks += 1 if chunk.rows else 0
                progress.done = chunk.final
                if chunk.rows and chunk.bytes:
                    limit = max(
                        1, min(chunk_rows, int(chunk.rows * TARGET_CHUNK_BYTES / chunk.bytes))
                    )
                if on_chunk is not None:
                    on_chunk(progress)
            done.append(progress)
    return done


def baseline_lsn(done: list[TableProgress], policy: SourcePolicy) -> int | None:
    """Where a finished snapshot began, if it recorded every row of every tracked table (so it
    re-baselines the source after a gap, ``capture.gaps.rebaseline_gaps``); None if it was
    limited to some tables or by a condition, or is not finished."""
    if {t.table for t in done if t.done and t.condition is None} != set(policy.tables):
        return None
    begun = [t.started_lsn for t in done]
    return None if None in begun else min(t for t in begun if t is not None)


def snapshot_status(url: str, snapshot_id: str | None = None) -> list[dict]:
    """The snapshots' progress recorded in the source, newest first."""
    with connect_source(url) as conn:
        rows = conn.execute(
            "SELECT snapshot_id, table_name, env, rows, chunks, done, condition, started_at,"
            " updated_at FROM audit.snapshot_progress WHERE %s::text IS NULL OR snapshot_id = %s"
            " ORDER BY started_at DESC, table_name",
            (snapshot_id, snapshot_id),
        ).fetchall()
    keys = (
        "snapshot_id",
        "table",
        "env",
        "rows",
        "chunks",
        "done",
        "where",
        "started_at",
        "updated_at",
    )
    return [dict(zip(keys, row, strict=True)) for row in rows]
