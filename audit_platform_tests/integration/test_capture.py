"""Capture from a real slot: values keep their meaning, and nothing is lost or duplicated."""

from __future__ import annotations

import json
import time

import polars as pl
import psycopg
import pytest

from audit_platform.capture.stream import SlotBusy, SlotStream
from audit_platform.faults import LOCAL_ONLY_POINTS, POINTS, SimulatedCrash, armed
from audit_platform.settings import PROJECT_ROOT
from audit_platform_tests.capture_support import images, make_source
from audit_platform_tests.helpers import ON_BOTH_STORES, ZOO_DDL, ZOO_ROW, policy_for


@pytest.fixture
def zoo(pg_database, staging_root):
    return make_source(pg_database, staging_root, ZOO_DDL, policy_for("zoo", public__zoo={}))


def test_type_zoo_round_trips_in_postgres_text_form(zoo):
    columns = [c for c in ZOO_ROW if c != "id"]
    zoo.execute(
        f"INSERT INTO zoo (id, {', '.join(columns)}) VALUES (1, {', '.join(['%s'] * len(columns))})",
        [ZOO_ROW[c] for c in columns],
    )
    zoo.execute("INSERT INTO zoo (id) VALUES (2)")  # every other column NULL
    result = zoo.capture()
    staged = zoo.staged()
    assert result.changes == 2
    first, second = images(staged, "after")
    assert first == ZOO_ROW
    assert second == {"id": "2", **{c: None for c in columns}}
    # REPLICA IDENTITY FULL flags every column in pgoutput; the key is still the primary key.
    assert json.loads(staged["key_columns"][0]) == ["id"]
    types = json.loads(staged["column_types"][0])
    assert types["num_scaled"] == "numeric"
    # A type of the database's own is named with its schema (the capture session searches only
    # the catalogs), as snapshots and schema changes name it: one name wherever it is read.
    assert (types["m"], types["p"], types["tsr"]) == ("public.mood", "public.positive", "tstzrange")


def test_update_and_delete_carry_before_images_and_null_is_not_absent(zoo):
    zoo.execute("INSERT INTO zoo (id, txt, num) VALUES (1, 'a', 1.50)")
    zoo.execute("UPDATE zoo SET txt = NULL, num = 1.500 WHERE id = 1")
    zoo.execute("DELETE FROM zoo WHERE id = 1")
    zoo.capture()
    staged = zoo.staged()
    assert staged["operation"].to_list() == ["insert", "update", "delete"]
    before, after = images(staged, "before"), images(staged, "after")
    assert (before[1]["txt"], after[1]["txt"]) == ("a", None)
    assert "txt" in after[1]  # NULL is a value, not a missing column
    assert (before[1]["num"], after[1]["num"]) == ("1.50", "1.500")  # scale is kept
    assert before[2]["id"] == "1" and after[2] is None


def test_unchanged_toasted_value_comes_from_the_before_image(pg_database, tmp_path):
    source = make_source(
        pg_database,
        tmp_path,
        "CREATE TABLE docs (id int PRIMARY KEY, body text, title text);"
        "ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;"
        "ALTER TABLE docs REPLICA IDENTITY FULL;",
        policy_for("docs", public__docs={}),
    )
    big = "".join(f"{i:08d}" for i in range(20000))  # 160 kB, stored out of line
    source.execute("INSERT INTO docs VALUES (1, %s, 'draft')", (big,))
    source.execute("UPDATE docs SET title = 'final' WHERE id = 1")
    source.capture()
    staged = source.staged()
    _, update_after = images(staged, "after")
    _, update_before = images(staged, "before")
    assert update_after["body"] == big == update_before["body"]
    assert update_after["title"] == "final"
    assert staged["unchanged_toast"][1] is None


def test_truncate_is_one_event_per_table(pg_database, tmp_path):
    source = make_source(
        pg_database,
        tmp_path,
        "CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY);"
        "ALTER TABLE a REPLICA IDENTITY FULL; ALTER TABLE b REPLICA IDENTITY FULL;",
        policy_for("ab", public__a={}, public__b={}),
    )
    source.execute("INSERT INTO a SELECT generate_series(1, 5); INSERT INTO b VALUES (1)")
    source.execute("TRUNCATE a, b")
    source.capture()
    truncates = source.staged().filter(operation="truncate")
    assert sorted(truncates["table"].to_list()) == ["a", "b"]
    assert truncates["lsn"].n_unique() == 1


def test_columns_added_and_dropped_mid_stream(zoo):
    zoo.execute("INSERT INTO zoo (id, txt) VALUES (1, 'before ddl')")
    zoo.execute("ALTER TABLE zoo ADD COLUMN extra text DEFAULT 'x'")
    zoo.execute("UPDATE zoo SET extra = 'y' WHERE id = 1")
    zoo.execute("ALTER TABLE zoo DROP COLUMN txt")
    zoo.execute("UPDATE zoo SET extra = 'z' WHERE id = 1")
    zoo.capture()
    staged = zoo.staged()
    # Each schema change is a record of its own, between the row changes (capture.schema_changes).
    assert staged["operation"].to_list() == ["insert", "ddl", "update", "ddl", "update"]
    added, dropped = images(staged.filter(operation="ddl"), "after")
    assert added["columns"]["extra"] == "text" and "txt" not in dropped["columns"]
    first, second, third = images(staged.filter(pl.col("operation") != "ddl"), "after")
    assert "extra" not in first and first["txt"] == "before ddl"
    assert second["extra"] == "y" and second["txt"] == "before ddl"
    assert third["extra"] == "z" and "txt" not in third


def test_partitioned_table_is_recorded_under_its_root(pg_database, tmp_path):
    source = make_source(
        pg_database,
        tmp_path,
        "CREATE TABLE events (id int, at date, note text, PRIMARY KEY (id, at))"
        " PARTITION BY RANGE (at);"
        "CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');"
        "CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');"
        "ALTER TABLE events_2025 REPLICA IDENTITY FULL; ALTER TABLE events_2026 REPLICA IDENTITY FULL;",
        policy_for("ev", public__events={}),
    )
    source.execute("INSERT INTO events VALUES (1, '2025-06-01', 'a'), (2, '2026-06-01', 'b')")
    source.execute("UPDATE events SET note = 'c' WHERE id = 2")
    source.capture()
    staged = source.staged()
    assert staged["table"].unique().to_list() == ["events"]
    assert json.loads(staged["key_columns"][0]) == ["id", "at"]
    assert images(staged, "before")[2]["note"] == "b"


def test_policy_excludes_and_masks_before_anything_is_staged(pg_database, tmp_path):
    source = make_source(
        pg_database,
        tmp_path,
        "CREATE TABLE customers (id int PRIMARY KEY, email text, password_hash text);"
        "ALTER TABLE customers REPLICA IDENTITY FULL;",
        policy_for("crm", public__customers={"exclude": ["password_hash"], "mask": ["email"]}),
    )
    source.execute("INSERT INTO customers VALUES (1, 'ada@example.com', 'hunter2-secret')")
    source.execute("UPDATE customers SET email = 'ada@example.org' WHERE id = 1")
    source.execute("UPDATE customers SET password_hash = 'other-secret' WHERE id = 1")
    source.capture()
    insert, update_email, update_password = images(source.staged(), "after")
    assert set(insert) == {"id", "email"}
    assert insert["email"].startswith("masked:") and insert["email"] != update_email["email"]
    assert update_password["email"] == update_email["email"]
    for path in source.store.files("changes"):
        raw = source.store.fs.cat_file(path)
        assert b"secret" not in raw and b"ada@" not in raw


def test_context_messages_are_staged_with_their_transaction(zoo):
    with psycopg.connect(zoo.url) as conn:
        conn.execute(
            "SELECT audit.set_context(%s::jsonb)",
            (json.dumps({"actor": {"type": "user", "id": "7"}, "reason": "fix"}),),
        )
        conn.execute("INSERT INTO zoo (id) VALUES (9)")
    zoo.capture()
    changes, contexts = zoo.staged(), zoo.staged("contexts")
    assert contexts["xid"].to_list() == changes["xid"].to_list()
    assert json.loads(contexts["context"][0])["reason"] == "fix"
    assert contexts["kind"].to_list() == ["context"]


@ON_BOTH_STORES
def test_crash_at_each_point_then_rerun_yields_each_change_once_in_order(zoo):
    zoo.execute("INSERT INTO zoo (id, i8) SELECT g, g FROM generate_series(1, 50) g")
    points = [
        p
        for p in POINTS
        if p.startswith(("capture.", "staging."))
        and (zoo.store.local or p not in LOCAL_ONLY_POINTS)
    ]
    for point in points:
        zoo.execute("UPDATE zoo SET i8 = i8 + 1 WHERE id <= 10")
        with armed(point, nth=2), pytest.raises(SimulatedCrash, match=point):
            zoo.capture(batch_changes=5)
    result = zoo.capture(batch_changes=5)
    staged = zoo.staged()
    assert staged.height == 50 + len(points) * 10
    assert staged.select("lsn", "change_index").is_duplicated().sum() == 0
    assert staged["lsn"].to_list() == sorted(staged["lsn"].to_list())
    assert result.lag_bytes_after < 1024 * 1024
    assert zoo.capture().changes == 0  # nothing new, nothing re-staged


def test_rerun_of_the_same_range_replaces_instead_of_duplicating(zoo, tmp_path):
    zoo.execute("INSERT INTO zoo (id) SELECT generate_series(1, 20)")
    with armed("capture.staged"), pytest.raises(SimulatedCrash):
        zoo.capture(batch_changes=1000)
    first_files = zoo.store.files("changes")
    zoo.capture(batch_changes=1000)
    assert zoo.store.files("changes") == first_files
    assert zoo.staged().height == 20


def test_two_captures_on_one_slot_at_once_are_prevented(zoo):
    zoo.execute("INSERT INTO zoo (id) SELECT generate_series(1, 20)")
    holder = SlotStream(zoo.url, "audit_test_zoo", "audit_test_zoo")
    holder.start()
    try:
        for _ in range(50):  # the walsender registers the slot as active asynchronously
            try:
                zoo.capture()
            except SlotBusy as exc:
                assert "only one capture per slot" in str(exc)
                break
            time.sleep(0.1)
        else:
            pytest.fail("a second capture ran while the slot was held")
    finally:
        holder.close()


@ON_BOTH_STORES
def test_staged_layout_is_env_source_dataset_date_hour(zoo):
    zoo.execute("INSERT INTO zoo (id) VALUES (1)")
    result = zoo.capture()
    [path] = zoo.store.files("changes")
    hour = result.files[0].hour
    assert path.endswith(
        f"/test/zoo/changes/date={hour:%Y-%m-%d}/hour={hour:%H}/"
        f"{result.files[0].first_lsn:016X}-{result.files[0].last_lsn:016X}.parquet"
    )


KILL_SCRIPT = """
import sys
from audit_platform_tests.capture_support import CaptureSource, MASK_KEY
from audit_platform_tests.helpers import policy_for
from audit_platform.staging import StagingStore
url, root = sys.argv[1], sys.argv[2]
policy = policy_for("zoo", public__zoo={})
source = CaptureSource(url, "test", policy, StagingStore(root, "test", "zoo"))
source.capture(batch_changes=200)
"""


@ON_BOTH_STORES
def test_capture_killed_mid_run_then_rerun_stages_each_change_once(zoo):
    """A real SIGKILL, at whatever point the process happens to be."""
    import signal
    import subprocess
    import sys

    zoo.execute(
        "INSERT INTO zoo (id, txt) SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g"
    )
    zoo.execute("UPDATE zoo SET i8 = id WHERE id % 2 = 0")
    process = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, zoo.url, zoo.store.root], cwd=str(PROJECT_ROOT)
    )
    deadline = time.monotonic() + 60
    while not zoo.store.files("changes") and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    staged_when_killed = len(zoo.store.files("changes"))
    zoo.capture(batch_changes=200)
    assert 0 < staged_when_killed < len(zoo.store.files("changes"))  # it died mid-run
    staged = zoo.staged()
    assert staged.height == 30000
    assert staged.select("lsn", "change_index").is_duplicated().sum() == 0


@ON_BOTH_STORES
def test_a_transaction_larger_than_a_batch_is_staged_in_parts_once(zoo):
    zoo.execute("INSERT INTO zoo (id) VALUES (0)")
    zoo.execute("INSERT INTO zoo (id, i8) SELECT g, g FROM generate_series(1, 1000) g")
    zoo.execute("INSERT INTO zoo (id) VALUES (5000)")
    with armed("capture.staged"), pytest.raises(SimulatedCrash):
        zoo.capture(batch_changes=100)
    result = zoo.capture(batch_changes=100)
    staged = zoo.staged()
    assert staged.height == 1002
    assert staged.select("lsn", "change_index").is_duplicated().sum() == 0
    assert staged.filter(pl.col("lsn") == staged["lsn"][1])["change_index"].to_list() == list(
        range(1000)
    )
    parts = [f.path for f in result.files if ".part" in f.path]
    assert len(parts) >= 9
    assert not zoo.store.glob(f"{zoo.store.base}/_inflight/*")


@ON_BOTH_STORES
def test_a_manifest_cut_short_by_a_crash_does_not_wedge_capture(zoo):
    """A kill while the in-flight manifest was written once left an empty file that failed
    every later capture; such a manifest is now read as 'never confirmed' and undone."""
    zoo.execute("INSERT INTO zoo (id) SELECT g FROM generate_series(1, 50) g")
    with armed("capture.staged"), pytest.raises(SimulatedCrash):
        zoo.capture(batch_changes=20)
    manifests = zoo.store.glob(f"{zoo.store.base}/_inflight/*.json")
    assert manifests  # the batch and its parts, staged, never confirmed
    for manifest in manifests:
        zoo.store.fs.pipe_file(manifest, b"")  # what a kill mid-write leaves
    zoo.capture(batch_changes=20)
    staged = zoo.staged()
    assert staged.height == 50
    assert staged.select("lsn", "change_index").is_duplicated().sum() == 0


@ON_BOTH_STORES
@pytest.mark.parametrize("point", ["capture.staged", "capture.confirmed"])
def test_every_staged_batch_is_on_the_pending_ledger_after_any_crash(zoo, point):
    zoo.execute("INSERT INTO zoo (id) SELECT g FROM generate_series(1, 30) g")
    zoo.execute("INSERT INTO zoo (id) SELECT g FROM generate_series(31, 60) g")
    with armed(point), pytest.raises(SimulatedCrash):
        zoo.capture(batch_changes=20)
    zoo.capture(batch_changes=20)
    on_ledger = {p for entry in zoo.store.pending() for p in entry.staged_paths("changes")}
    assert on_ledger == set(zoo.store.files("changes"))
    assert zoo.staged().height == 60
