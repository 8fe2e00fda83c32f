"""What a row of ``audit.schema_changes`` becomes (capture.schema_changes), and how a schema
change's record reads: its changed columns, its page's rows, its revert plan."""

from __future__ import annotations

import json

import pytest

from audit_platform.api.ui.views import columns
from audit_platform.capture.schema_changes import SchemaBroken, schema_change
from audit_platform.enrich.join import changed_columns
from audit_platform.record import Operation
from audit_platform_tests.helpers import policy_for

POLICY = policy_for("shop", public__orders={}, public__keyed={"key": ["code"]})


def shape(table="orders", identity="full", key=("id",), **columns) -> dict:
    return {
        "schema": "public",
        "table": table,
        "columns": columns or {"id": "integer not null", "status": "text"},
        "primary_key": list(key),
        "replica_identity": identity,
    }


def row(before: dict | None, after: dict | None, published: bool = True) -> dict[str, str | None]:
    """As the decoder reads the row: each column in PostgreSQL's text form."""
    return {
        "id": "1",
        "relid": "16384",
        "command": "ALTER TABLE",
        "published": "t" if published else "f",
        "before": None if before is None else json.dumps(before),
        "after": None if after is None else json.dumps(after),
    }


def test_only_tables_the_policy_tracks_by_either_name_are_recorded():
    assert schema_change(row(None, shape("other")), POLICY, "shop") is None
    assert schema_change(row(shape("a"), shape("b")), POLICY, "shop") is None
    created = schema_change(row(None, shape()), POLICY, "shop")
    assert created is not None and created.qualified == "public.orders"
    assert created.before is None and created.problem is None
    # A table renamed into the policy's names is recorded under its new name.
    renamed_in = schema_change(row(shape("old"), shape()), POLICY, "shop")
    assert renamed_in is not None and renamed_in.table == "orders"
    dropped = schema_change(row(shape(), None), POLICY, "shop")
    assert dropped is not None and dropped.after is None and dropped.problem is None


def test_a_rename_out_of_the_policy_stops_capture_with_the_fix():
    with pytest.raises(SchemaBroken) as caught:
        schema_change(row(shape(), shape("orders_v2")), POLICY, "shop")
    message = str(caught.value)
    assert "public.orders of source 'shop' was renamed to public.orders_v2" in message
    assert "add public.orders_v2 to the policy's tables (keep public.orders" in message
    both = policy_for("shop", public__orders={}, public__orders_v2={})
    assert schema_change(row(shape(), shape("orders_v2")), both, "shop") is not None
    # A table nobody publishes (one a role made under a name the policy names, say) loses
    # nothing by a rename: it is a record, and capture goes on.
    theirs = schema_change(row(shape(), shape("x"), published=False), POLICY, "shop")
    assert theirs is not None and theirs.table == "x"


def test_a_change_that_degrades_capture_says_so_and_how_to_fix_it():
    lost = schema_change(row(shape(), shape(identity="default")), POLICY, "shop")
    assert lost is not None and lost.problem is not None
    assert "REPLICA IDENTITY DEFAULT" in lost.problem
    assert 'ALTER TABLE "public"."orders" REPLICA IDENTITY FULL' in lost.problem
    keyless = schema_change(row(shape(), shape(key=())), POLICY, "shop")
    assert keyless is not None and "has no primary key" in (keyless.problem or "")
    # A key the policy names stands in for the primary key.
    named = schema_change(row(None, shape("keyed", key=())), POLICY, "shop")
    assert named is not None and named.problem is None
    unlogged = schema_change(row(shape(), {**shape(), "logged": False}), POLICY, "shop")
    assert unlogged is not None and 'ALTER TABLE "public"."orders" SET LOGGED' in (
        unlogged.problem or ""
    )
    fixed = schema_change(row(shape(identity="default"), shape()), POLICY, "shop")
    assert fixed is not None and fixed.problem is None


def test_a_schema_changes_changed_columns_are_the_columns_it_touched():
    before = shape(id="integer not null", note="text", gone="text")
    after = shape(id="integer not null", note="character varying(20)", added="integer")
    assert changed_columns(Operation.ddl, before, after, set()) == ["added", "gone", "note"]
    assert changed_columns(Operation.ddl, None, after, set()) == ["added", "id", "note"]
    assert changed_columns(Operation.ddl, before, None, set()) == ["gone", "id", "note"]
    renamed = {**before, "table": "orders_v2"}
    assert changed_columns(Operation.ddl, before, renamed, set()) == []


def test_a_schema_changes_page_rows_are_its_columns_then_the_tables_facts():
    from audit_platform_tests.unit.test_record import record_of

    before = shape(id="integer not null", note="text")
    after = shape("orders_v2", "default", id="bigint not null", note="text")
    record = record_of(
        operation="ddl",
        before=before,
        after=after,
        changed_columns=["id"],
        object_id=None,
    )
    rows = {r.column: (r.before, r.after, r.changed, r.key) for r in columns(record)}
    assert rows["id"] == ("integer not null", "bigint not null", True, True)
    assert rows["note"] == ("text", "text", False, False)
    assert rows["(name)"] == ("public.orders", "public.orders_v2", True, False)
    assert rows["(primary key)"] == ("id", "id", False, False)
    assert rows["(replica identity)"] == ("full", "default", True, False)
