"""Pure enrichment logic: changed columns, object ids, context merging, orphans and grace."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from audit_platform.enrich.join import changed_columns, enrich, transaction_contexts
from audit_platform.record import Operation, object_id, split_object_id
from audit_platform.staging import DECODED_CHANGES as CHANGES_SCHEMA
from audit_platform.staging import DECODED_CONTEXTS as CONTEXTS_SCHEMA
from audit_platform_tests.helpers import policy_for

T0 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
POLICY = policy_for("shop", public__orders={"ignore_changes_to": ["updated_at"]})


def _changes(rows: list[dict]) -> pl.DataFrame:
    base = {
        "commit_time_us": 0,
        "schema": "public",
        "table": "orders",
        "key_columns": '["id"]',
        "unchanged_toast": None,
        "column_types": "{}",
        "before": None,
        "after": None,
    }
    frame = pl.DataFrame([base | r for r in rows], schema=CHANGES_SCHEMA)
    return frame.drop("commit_time_us").with_columns(
        pl.lit(T0).alias("commit_time"),
        pl.lit("dev").alias("env"),
        pl.lit("shop").alias("source"),
        pl.lit("1:abc").alias("policy_version"),
    )


def _contexts(rows: list[dict]) -> pl.DataFrame:
    base = {"commit_time_us": 0, "kind": "context", "seq": 0}
    frame = pl.DataFrame([base | r for r in rows], schema=CONTEXTS_SCHEMA)
    return frame.drop("commit_time_us").with_columns(
        pl.lit(T0).alias("commit_time"), pl.lit("shop").alias("source")
    )


@pytest.mark.parametrize(
    ("operation", "before", "after", "toast", "expected"),
    [
        (Operation.insert, None, {"id": "1", "note": None, "s": "a"}, set(), ["id", "s"]),
        (Operation.delete, {"id": "1", "s": "a"}, None, set(), ["id", "s"]),
        (
            Operation.update,
            {"id": "1", "s": "a", "n": None},
            {"id": "1", "s": "b", "n": None},
            set(),
            ["s"],
        ),
        (Operation.update, {"id": "1", "s": None}, {"id": "1", "s": "x"}, set(), ["s"]),
        (Operation.update, {"id": "1", "old": "x"}, {"id": "1", "new": "y"}, set(), ["new", "old"]),
        (Operation.update, {"id": "1", "body": "x"}, {"id": "1"}, {"body"}, []),
        (Operation.truncate, None, None, set(), []),
    ],
)
def test_changed_columns(operation, before, after, toast, expected):
    assert changed_columns(operation, before, after, toast) == expected


@pytest.mark.parametrize("values", [["42"], ["a,b", "c\\d", ""], ["2026-01-01", "x\\,y"]])
def test_object_id_is_reversible(values):
    assert split_object_id(object_id(values)) == values


def test_two_set_context_calls_merge_in_order():
    merged = transaction_contexts(
        _contexts(
            [
                {
                    "lsn": 1,
                    "xid": 9,
                    "seq": 0,
                    "target_xid": 9,
                    "context": '{"actor":{"type":"user","id":"1"},"reason":"a","attributes":{"x":1}}',
                },
                {
                    "lsn": 1,
                    "xid": 9,
                    "seq": 1,
                    "target_xid": 9,
                    "context": '{"reason":"b","attributes":{"y":2}}',
                },
            ]
        )
    )
    assert json.loads(merged["context"][0]) == {
        "actor": {"type": "user", "id": "1"},
        "reason": "b",
        "attributes": {"x": 1, "y": 2},
    }


def test_orphan_waits_within_grace_and_is_released_as_unattributed_after():
    changes = _changes(
        [{"lsn": 5, "xid": 3, "change_index": 0, "operation": "insert", "after": '{"id":"1"}'}]
    )
    empty = _contexts([])
    waiting = enrich(
        changes, empty, POLICY, now=T0 + timedelta(minutes=5), grace=timedelta(hours=1)
    )
    assert waiting.records.is_empty() and [o.lsn for o in waiting.orphans] == [5]
    released = enrich(changes, empty, POLICY, now=T0 + timedelta(hours=2), grace=timedelta(hours=1))
    assert released.records["attribution_status"].to_list() == ["unattributed"]
    assert released.orphans == []


def test_late_context_gives_status_late_with_its_lag():
    changes = _changes(
        [{"lsn": 5, "xid": 3, "change_index": 0, "operation": "insert", "after": '{"id":"1"}'}]
    )
    late = pl.DataFrame(
        {
            "source": ["shop"],
            "target_xid": [3],
            "context": ['{"actor":{"type":"user","id":"7"}}'],
            "attached_at": [T0 + timedelta(seconds=90)],
        },
        schema={
            "source": pl.String,
            "target_xid": pl.Int64,
            "context": pl.String,
            "attached_at": pl.Datetime("us", "UTC"),
        },
    )
    result = enrich(
        changes, _contexts([]), POLICY, now=T0, grace=timedelta(hours=1), late_contexts=late
    )
    assert result.records.select("attribution_status", "attribution_lag_seconds").row(0) == (
        "late",
        90.0,
    )


def test_update_touching_only_ignored_columns_is_dropped_and_counted():
    changes = _changes(
        [
            {
                "lsn": 5,
                "xid": 3,
                "change_index": 0,
                "operation": "update",
                "before": '{"id":"1","updated_at":"a"}',
                "after": '{"id":"1","updated_at":"b"}',
            }
        ]
    )
    ctx = _contexts(
        [{"lsn": 5, "xid": 3, "target_xid": 3, "context": '{"actor":{"type":"job","id":"touch"}}'}]
    )
    result = enrich(changes, ctx, POLICY, now=T0, grace=timedelta(hours=1))
    assert (result.records.height, result.ignored) == (0, 1)


def test_a_malformed_change_is_set_aside_with_its_reason_and_the_rest_flow():
    changes = _changes(
        [
            {"lsn": 5, "xid": 3, "change_index": 0, "operation": "insert", "after": '{"id":"1"}'},
            {"lsn": 5, "xid": 3, "change_index": 1, "operation": "insert", "after": "{not json"},
            {
                "lsn": 5,
                "xid": 3,
                "change_index": 2,
                "operation": "insert",
                "after": '{"x":"no key"}',
            },
        ]
    )
    ctx = _contexts(
        [{"lsn": 5, "xid": 3, "target_xid": 3, "context": '{"actor":{"type":"user","id":"1"}}'}]
    )
    result = enrich(changes, ctx, POLICY, now=T0, grace=timedelta(hours=1))
    assert result.records["change_index"].to_list() == [0]
    assert [(i, reason.split(":")[0]) for _, i, reason, _ in result.rejected] == [
        (1, "unreadable change"),
        (2, "key columns ['id'] not in the row image"),
    ]


def test_the_server_version_is_carried_and_null_for_changes_staged_before_it_was_kept():
    rows = [{"lsn": 5, "xid": 3, "change_index": 0, "operation": "insert", "after": '{"id":"1"}'}]
    now, grace = T0 + timedelta(hours=2), timedelta(hours=1)
    staged = _changes(rows).with_columns(pl.lit(150010, pl.Int32).alias("server_version"))
    carried = enrich(staged, _contexts([]), POLICY, now=now, grace=grace).records
    assert carried["server_version"].to_list() == [150010]
    older = enrich(_changes(rows), _contexts([]), POLICY, now=now, grace=grace).records
    assert older["server_version"].to_list() == [None]
    assert older.schema["server_version"] == pl.Int32


def test_a_staged_file_missing_a_column_every_record_needs_is_an_error_not_a_null():
    rows = [{"lsn": 5, "xid": 3, "change_index": 0, "operation": "insert", "after": '{"id":"1"}'}]
    broken = _changes(rows).drop("policy_version")
    with pytest.raises(pl.exceptions.ColumnNotFoundError, match="policy_version"):
        enrich(broken, _contexts([]), POLICY, now=T0 + timedelta(hours=2), grace=timedelta(0))


def test_sources_in_one_frame_keep_their_own_contexts_and_policies():
    """Two sources' rows in one frame (a live run's turn): the same LSN and xid in both (two
    servers' numbers are unrelated), each change meets its own source's context and policy."""
    update = {
        "lsn": 7,
        "xid": 3,
        "operation": "update",
        "before": '{"id":"1","updated_at":"a"}',
        "after": '{"id":"1","updated_at":"b"}',
    }
    changes = pl.concat(
        [
            _changes([{**update, "change_index": 0}]),
            _changes([{**update, "change_index": 0}]).with_columns(pl.lit("mill").alias("source")),
        ]
    )
    contexts = pl.concat(
        [
            _contexts([{"lsn": 7, "xid": 3, "target_xid": 3, "context": '{"reason":"shop"}'}]),
            _contexts(
                [{"lsn": 7, "xid": 3, "target_xid": 3, "context": '{"reason":"mill"}'}]
            ).with_columns(pl.lit("mill").alias("source")),
        ]
    )
    policies = {"shop": POLICY, "mill": policy_for("mill", public__orders={})}
    result = enrich(changes, contexts, policies, now=T0, grace=timedelta(hours=1))
    # The shop ignores updated_at: its update is no record; the mill's is, with its context.
    assert result.ignored_lsns == [("shop", 7)]
    assert result.records.select("source", "context", "txn_changes", "txn_ignored").rows() == [
        ("mill", '{"reason":"mill"}', 1, 0)
    ]
