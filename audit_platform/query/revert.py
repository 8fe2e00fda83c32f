"""Revert plans: the SQL that would undo a set of changes, guarded, for a person to review.

The platform never runs it. Per source, in reverse commit order: a DELETE for an insert, an
INSERT for a delete, an UPDATE back to the before-values for an update, each literal cast to the
column's captured type and each row found by its key. Every statement is guarded by the values
the change left, and the whole plan is one PL/pgSQL block in one transaction that stops at the
first guard that does not hold: a later change is never overwritten silently, and a plan never
applies halfway.

What cannot be restored is listed as a conflict instead of being guessed: masked columns (the
trail keeps a keyed hash, not the value), excluded columns (never captured), truncates (no row
images), records without a key, and later changes to the same rows (from the audit trail).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from audit_platform.policy import SourcePolicy
from audit_platform.record import AuditRecord, Operation

ConflictKind = Literal[
    "later_change",
    "masked",
    "excluded",
    "truncate",
    "schema_change",
    "snapshot",
    "no_key",
    "no_types",
]


class RevertStatement(BaseModel):
    record_id: str = Field(description="The change this statement undoes.")
    table: str
    object_id: str | None
    action: Literal["delete", "insert", "update"]
    sql: str


class RevertConflict(BaseModel):
    record_id: str
    kind: ConflictKind
    detail: str
    later_record_id: str | None = None


class SourcePlan(BaseModel):
    source: str
    statements: list[RevertStatement]
    script: str = Field(
        description="The statements as one guarded transaction to run on the "
        "source database, or review and edit first."
    )


class RevertPlan(BaseModel):
    of: dict[str, str] = Field(description="What is reverted: a transaction, a request, ...")
    changes: int = Field(description="Changes the plan covers.")
    sources: list[SourcePlan]
    conflicts: list[RevertConflict]

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "of": {"request_id": "req-42"},
                    "changes": 1,
                    "sources": [
                        {
                            "source": "shop",
                            "statements": [
                                {
                                    "record_id": "prod:shop:00000000016B3A28:1",
                                    "table": "public.orders",
                                    "object_id": "42",
                                    "action": "update",
                                    "sql": 'UPDATE "public"."orders" SET "status" = \'paid\'::text '
                                    'WHERE "id" = \'42\'::bigint AND ("status" IS NOT NULL '
                                    "AND format('%s', \"status\") = 'refunded')",
                                }
                            ],
                            "script": "BEGIN;\n...\nCOMMIT;\n",
                        }
                    ],
                    "conflicts": [
                        {
                            "record_id": "prod:shop:00000000016B3A28:1",
                            "kind": "later_change",
                            "later_record_id": "prod:shop:00000000016C0010:0",
                            "detail": "public.orders 42 was changed again later (update at ...)",
                        }
                    ],
                }
            ]
        }
    )

    def sql_file(self) -> str:
        """The plan as one file to review and run: its conflicts as comments first, then one
        script per source (each runs on that source's own database)."""
        header = [
            _comment(f"conflict ({c.kind}) {_quoted(c.record_id)}: {c.detail}")
            for c in self.conflicts
        ]
        scripts = [
            _comment(f"==== source {_quoted(p.source)}: run on its database ====") + "\n" + p.script
            for p in self.sources
        ]
        return "\n".join([*header, *scripts]) + "\n"

    def file_name(self) -> str:
        return "revert-" + "-".join(self.of.values()).replace("/", "_")[:80] + ".sql"


def _order(record: AuditRecord) -> tuple[str, int, int]:
    """Commit order within a source: its LSN, exact where commit timestamps may not be. Plans
    are per source, so no order across sources is needed."""
    return record.source.service, record.transaction.lsn, record.transaction.change_index


def _row(record: AuditRecord) -> tuple[str, str, str | None]:
    """Which row a change is to: source, schema.table, object id."""
    return record.source.service, f"{record.table.schema_}.{record.table.name}", record.object_id


def plan_revert(
    of: dict[str, str],
    records: Iterable[AuditRecord],
    policies: Mapping[str, SourcePolicy],
    later: Iterable[AuditRecord] = (),
    *,
    generated_at: datetime,
) -> RevertPlan:
    """A plan undoing ``records``; ``later`` are changes to the same objects committed after
    them (whatever they are, a plan conflicts with the ones it would not itself undo)."""
    chosen = sorted(records, key=_order, reverse=True)
    ids = {r.id for r in chosen}
    conflicts: list[RevertConflict] = []
    statements: dict[str, list[RevertStatement]] = {}
    last_of: dict[tuple[str, str, str | None], AuditRecord] = {}
    for record in chosen:
        last_of.setdefault(_row(record), record)  # reverse order: the first seen is the last change
        statement = _undo(record, policies.get(record.source.service), conflicts)
        if statement is not None:
            statements.setdefault(record.source.service, []).append(statement)
    for change in sorted(later, key=_order):
        key = _row(change)
        last = last_of.get(key)
        if change.id in ids or last is None or _order(change) <= _order(last):
            continue
        if change.operation is Operation.snapshot and change.after == last.after:
            continue  # a reading of the row as the change left it: the guard still holds
        conflicts.append(
            RevertConflict(
                record_id=last.id,
                kind="later_change",
                later_record_id=change.id,
                detail=f"{key[1]} {key[2]} was changed again later ({change.operation.value} at "
                f"{change.timestamp.isoformat()}): its guard will stop the plan unless that change "
                "is reverted first or the statement is edited",
            )
        )
    sources = [
        SourcePlan(source=source, statements=found, script=_script(of, source, found, generated_at))
        for source, found in sorted(statements.items())
    ]
    return RevertPlan(of=of, changes=len(chosen), sources=sources, conflicts=conflicts)


#: Records a plan of row changes does not undo, and why.
_NOT_REVERTED: dict[Operation, tuple[ConflictKind, str]] = {
    Operation.truncate: (
        "truncate",
        "a truncate of {table} cannot be reverted: the trail has no images of the rows it removed",
    ),
    Operation.snapshot: (
        "snapshot",
        "a snapshot record of {table} changed nothing: there is nothing to revert",
    ),
    Operation.ddl: (
        "schema_change",
        "a schema change of {table} is not reverted by a plan of row changes: write the "
        "reverse migration in the service's own migrations",
    ),
}


def _undo(
    record: AuditRecord, policy: SourcePolicy | None, conflicts: list[RevertConflict]
) -> RevertStatement | None:
    table = f"{record.table.schema_}.{record.table.name}"
    refused = _NOT_REVERTED.get(record.operation)
    if refused is not None:
        kind, detail = refused
        conflicts.append(
            RevertConflict(record_id=record.id, kind=kind, detail=detail.format(table=table))
        )
        return None
    if record.row is None or not record.row.types:
        conflicts.append(
            RevertConflict(
                record_id=record.id,
                kind="no_types",
                detail=(
                    f"the record of {table} {record.object_id} was indexed before column types "
                    "were kept; rebuild its hour (a backfill) to plan its revert"
                ),
            )
        )
        return None
    if not record.row.key:
        conflicts.append(
            RevertConflict(
                record_id=record.id,
                kind="no_key",
                detail=(f"{table} has no key in its records: a row cannot be found to revert"),
            )
        )
        return None
    rules = policy.tables.get(table) if policy is not None else None
    masked = set(rules.mask) if rules else set()
    excluded = set(rules.exclude) if rules else set()
    if rules is not None and rules.include is not None:
        excluded |= set(record.row.types) - set(rules.include)  # not captured either
    types = record.row.types
    # An insert is undone by a DELETE, which needs no old values; a delete or an update needs
    # the old values of the columns it restores, which a masked column does not have.
    restores = {
        Operation.insert: [],
        Operation.delete: list(record.before or {}),
        Operation.update: record.changed_columns,
    }[record.operation]
    lost = [c for c in restores if c in masked]
    for column in lost:
        conflicts.append(
            RevertConflict(
                record_id=record.id,
                kind="masked",
                detail=(
                    f"{table} {record.object_id}: column {column} is masked by policy; its old "
                    "value is not in the trail and is left as it is"
                ),
            )
        )
    if record.operation is Operation.delete and excluded:
        conflicts.append(
            RevertConflict(
                record_id=record.id,
                kind="excluded",
                detail=(
                    f"{table} {record.object_id}: columns {sorted(excluded)} are excluded by "
                    "policy; the row is inserted again without them (their defaults)"
                ),
            )
        )
    name = _table_name(record.table.schema_, record.table.name)
    if record.operation is Operation.insert:
        after = record.after or {}
        guard = [c for c in after if c not in masked]
        sql = f"DELETE FROM {name} WHERE {_where(after, record.row.key, guard, types)}"
        action = "delete"
    elif record.operation is Operation.delete:
        before = record.before or {}
        columns = [c for c in before if c not in masked]
        key = _where(before, record.row.key, [], types)
        sql = (
            f"INSERT INTO {name} ({', '.join(_ident(c) for c in columns)}) SELECT "
            f"{', '.join(_literal(before[c], types.get(c)) for c in columns)} WHERE NOT "
            f"EXISTS (SELECT 1 FROM {name} WHERE {key})"
        )
        action = "insert"
    else:
        before, after = record.before or {}, record.after or {}
        changed = [c for c in record.changed_columns if c not in masked and c in before]
        if not changed:
            return None  # only masked columns changed: nothing to set, the conflict says why
        sets = ", ".join(f"{_ident(c)} = {_literal(before[c], types.get(c))}" for c in changed)
        sql = f"UPDATE {name} SET {sets} WHERE {_where(after, record.row.key, changed, types)}"
        action = "update"
    return RevertStatement(
        record_id=record.id, table=table, object_id=record.object_id, action=action, sql=sql
    )


def _where(
    image: Mapping[str, object], key: list[str], guard: Iterable[str], types: Mapping[str, str]
) -> str:
    """The row by its key (typed equality, so the key's index is used), and each guarded
    column compared in the text form records keep: ``format('%s', col)`` prints a value with
    its type's output function, as logical decoding does (``col::text`` does not for every
    type: a boolean casts to 'true' but prints 't', an inet casts with its netmask), and it
    works for types without an equality operator (json, point)."""
    found = [f"{_ident(c)} = {_literal(image.get(c), types.get(c))}" for c in key]
    for column in guard:
        if column in key:
            continue
        value = image.get(column)
        found.append(
            f"{_ident(column)} IS NULL"
            if value is None
            else f"({_ident(column)} IS NOT NULL AND format('%s', {_ident(column)}) = "
            f"{_literal(value, None)})"
        )
    return " AND ".join(found)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _table_name(schema: str, table: str) -> str:
    return f"{_ident(schema)}.{_ident(table)}"


def _literal(value: object, type_name: str | None) -> str:
    """A value in the text form records keep, cast to the column's type (``text`` if unknown).

    Standard SQL quoting (quotes doubled) is exact with ``standard_conforming_strings`` on, the
    default since PostgreSQL 9.1; the script sets it to be sure.
    """
    cast = f"::{type_name}" if type_name else ""
    if value is None:
        return f"NULL{cast}"
    return "'" + str(value).replace("'", "''") + "'" + cast


def _quoted(value: object) -> str:
    """A value from the trail as a comment shows it: a JSON string, so quotes, backslashes and
    control characters are escaped and where the value ends is plain."""
    return json.dumps(str(value), ensure_ascii=False)


def _comment(text: str) -> str:
    """``text`` as one ``--`` comment line, whatever it holds.

    The trail's values come from the audited service (a request id from an HTTP header) and
    from the source's names and rows. A line break in one would end the comment, and psql runs
    what follows, before BEGIN and outside every guard (``\\! command`` runs a shell command on
    the operator's machine). PostgreSQL and psql end a ``--`` comment only at a line feed or
    a carriage return, but an editor may also break a line at U+2028, U+0085 and the like, and
    show a reviewer a line psql does not see: every character that is not printable (control,
    format and separator characters other than the space) is written as an escape instead.
    """
    return "-- " + "".join(c if c.isprintable() else json.dumps(c)[1:-1] for c in text)


def _script(
    of: dict[str, str], source: str, found: list[RevertStatement], generated_at: datetime
) -> str:
    what = ", ".join(f"{k} {_quoted(v)}" for k, v in of.items())
    block = []
    for number, statement in enumerate(found, start=1):
        # In RAISE's format string a quote is doubled and % is written %%.
        where = f"{statement.table} {statement.object_id} (change {statement.record_id})"
        where = where.replace("'", "''").replace("%", "%%")
        block += [
            "  " + _comment(f"{number}/{len(found)}: undo {_quoted(statement.record_id)}"),
            f"  {statement.sql};",
            f"  IF NOT FOUND THEN RAISE EXCEPTION 'revert stopped at {number}/{len(found)}: "
            f"{where} no longer holds the values that change left'; END IF;",
        ]
    # The block is one dollar-quoted string: its tag must not occur anywhere in it.
    body = "\n".join(block)
    tag = "revert"
    while f"${tag}$" in body:
        tag = f"revert_{secrets.token_hex(4)}"
    title = f"audit-platform revert plan: {what}; source {_quoted(source)}; {len(found)}"
    lines = [
        _comment(f"{title} statements,"),
        f"-- newest change first; generated {generated_at.isoformat()}. Review before running.",
        "-- Each statement applies only if its row still holds the values the change left;",
        "-- the first that does not stops the block and the transaction rolls back.",
        "BEGIN;",
        "SET LOCAL standard_conforming_strings = on;",
        "-- Values compare in the text form capture saw: the server's defaults print it.",
        "SET LOCAL TimeZone TO DEFAULT;",
        "SET LOCAL DateStyle TO DEFAULT;",
        "SET LOCAL IntervalStyle TO DEFAULT;",
        "SET LOCAL extra_float_digits TO DEFAULT;",
        f"DO ${tag}$",
        "BEGIN",
        *block,
        "END",
        f"${tag}$;",
        "COMMIT;",
        "",
    ]
    return "\n".join(lines)
