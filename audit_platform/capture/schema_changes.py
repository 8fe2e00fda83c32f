"""Schema changes as records: the rows source migration 003's event triggers write, as capture
reads them from the slot (docs/design.md, "Schema history").

A row of ``audit.schema_changes`` holds a table's shape before and after one DDL command
(``before`` is null for a table created, ``after`` for one dropped). It becomes a record with
operation ``ddl`` whose images are those shapes: its changed columns are the columns added,
dropped, retyped or renamed, so ``column:email op:ddl`` finds what happened to a column. Only
shapes of tables the policy tracks (by the name before or after) are recorded.

A schema change can stop the policy from matching a tracked table. A rename to a name the policy
does not know would make every later change of the table untracked, silently: capture stops at
it instead (:class:`SchemaBroken`), and the slot keeps the rename and what follows until the
policy names the table again. Losing the replica identity or the key degrades records (no
before-image, no object id) without losing them: :attr:`SchemaChange.problem` says so and how to
fix it, and the source's status shows it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from audit_platform.capture.slot import Queries
from audit_platform.policy import SourcePolicy

#: The table the event triggers write (source migration 003); published with the policy's.
SCHEMA_CHANGES_TABLE = ("audit", "schema_changes")


class SchemaBroken(RuntimeError):
    """A schema change that would make capture lose a tracked table's changes."""


@dataclass(frozen=True)
class SchemaChange:
    """One tracked table's schema change, as the record holds it."""

    schema: str
    table: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    #: What the change broke and how to fix it (None: nothing; a later change may fix it).
    problem: str | None

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"


def _shape(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    value = json.loads(text)
    if not isinstance(value, dict) or not {"schema", "table"} <= value.keys():
        raise ValueError("a schema change's shape must name its schema and table")
    return value


def _name(shape: dict[str, Any] | None) -> str | None:
    return None if shape is None else f"{shape['schema']}.{shape['table']}"


def schema_change(
    row: dict[str, str | None], policy: SourcePolicy, source: str
) -> SchemaChange | None:
    """The record of one ``audit.schema_changes`` row; None when the policy tracks neither the
    table's old name nor its new one. Raises :class:`SchemaBroken` for a published table
    renamed to a name the policy does not track (a table nobody publishes, say one a role
    created under a name the policy names, loses nothing by a rename, and must not be able to
    stop capture)."""
    before, after = _shape(row.get("before")), _shape(row.get("after"))
    old, new = _name(before), _name(after)
    if not any(name in policy.tables for name in (old, new) if name):
        return None
    published = row.get("published") == "t"
    if old and new and old != new and new not in policy.tables and published:
        raise SchemaBroken(
            f"tracked table {old} of source {source!r} was renamed to {new}: its changes would "
            f"no longer match the policy, so capture stops at the rename and the slot keeps "
            f"everything from there. Fix: add {new} to the policy's tables (keep {old}, which "
            f"changes before the rename carry), and capture resumes from the rename; remove "
            f"{old} once the source's capture_live check passes again"
        )
    shape = after or before
    assert shape is not None  # the trigger writes at least one of them
    problem = None if after is None else _problem(after, policy)
    return SchemaChange(shape["schema"], shape["table"], before, after, problem)


def current_problems(conn: Queries, policy: SourcePolicy) -> dict[str, str]:
    """The tracked tables' problems as the catalog has them now. A capture run starts from
    them, so a problem outlives the run that read its schema change (and a fix made while no
    run was reading is seen at once); the changes it then reads update them as they come."""
    quoted = [
        _quoted(dict(zip(("schema", "table"), name.split(".", 1), strict=True)))
        for name in sorted(policy.tables)
    ]
    rows = conn.execute(
        "SELECT audit.table_shape(to_regclass(name))::text FROM unnest(%s::text[]) AS name",
        (quoted,),
    ).fetchall()
    found = {}
    for (text,) in rows:
        shape = _shape(text)
        problem = None if shape is None else _problem(shape, policy)
        if shape is not None and problem is not None:
            found[f"{shape['schema']}.{shape['table']}"] = problem
    return found


def _quoted(shape: dict[str, Any]) -> str:
    """The table's name as SQL reads it, whatever characters it holds."""
    return ".".join('"' + str(shape[part]).replace('"', '""') + '"' for part in ("schema", "table"))


def _problem(shape: dict[str, Any], policy: SourcePolicy) -> str | None:
    name = _name(shape)
    table_policy = policy.tables.get(name or "")
    if table_policy is None:
        return None
    sql_name = _quoted(shape)
    found = []
    if shape.get("logged") is False:
        found.append(
            f"{name} is UNLOGGED, so its changes are not written to the WAL and none is "
            f"captured; fix: ALTER TABLE {sql_name} SET LOGGED"
        )
    if shape.get("replica_identity") != "full":
        found.append(
            f"{name} has REPLICA IDENTITY {str(shape.get('replica_identity')).upper()}, so its "
            f"updates and deletes arrive without their before-image; fix: ALTER TABLE "
            f"{sql_name} REPLICA IDENTITY FULL"
        )
    if not shape.get("primary_key") and not table_policy.key:
        found.append(
            f"{name} has no primary key, so its records cannot say which object changed; fix: "
            f"add a primary key, or set key: [columns] for {name} in the policy"
        )
    return "; ".join(found) or None
