"""Enrichment of really captured changes, with the quarantine in real PostgreSQL."""

from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta

import polars as pl
import psycopg
import pytest
from polars.testing import assert_frame_equal

from audit_platform import platform_db
from audit_platform.enrich import quarantine
from audit_platform.enrich.batch import (
    Share,
    enrich_hour,
    enrich_pending,
    enrich_pending_together,
    resolve_quarantine,
)
from audit_platform.index.reconcile import HourTransactions, hour_transactions
from audit_platform.record import RECORD_SCHEMA
from audit_platform.settings import Settings
from audit_platform.staging import StagingStore
from audit_platform.staging.store import FILE, file_rows
from audit_platform.trust.log import TrustLog
from audit_platform_tests.capture_support import make_source
from audit_platform_tests.conftest import new_database
from audit_platform_tests.helpers import policy_for

ADA = {"actor": {"type": "user", "id": "ada", "name": "Ada"}, "reason": "refund"}


@pytest.fixture
def shop(pg_database, tmp_path):
    # The platform's tables first: created after setup, each would be a schema change in the
    # slot (not a tracked one, but a transaction the batches below would count).
    state = psycopg.connect(pg_database, autocommit=True)
    platform_db.install(state, Settings().resources_dir / "sql")
    source = make_source(
        pg_database,
        tmp_path,
        "CREATE TABLE orders (id int PRIMARY KEY, status text, secret text);"
        "ALTER TABLE orders REPLICA IDENTITY FULL;",
        policy_for("shop", public__orders={"exclude": ["secret"]}),
    )
    source.state = state
    yield source
    source.state.close()


GRACE = timedelta(minutes=10)


def _enrich(source, now=None, grace=GRACE):
    """Rebuild the one staged hour whole, as a backfill does."""
    [hour] = {f.hour for f in source.store.files_by_hour("changes")} or [None]
    return enrich_hour(
        source.store,
        source.state,
        source.policy,
        hour,
        now=now or datetime.now(UTC),
        grace=grace,
    )


def _run(source, now=None, grace=GRACE) -> pl.DataFrame:
    """What a capture run's enrich step does: its pending batches, then the due orphans.
    Returns every record staged so far."""
    now = now or datetime.now(UTC)
    enrich_pending(source.store, source.state, source.policy, now=now, grace=grace)
    resolve_quarantine(source.store, source.state, source.policy, now=now, grace=grace)
    return source.store.read_all("records")


def _revisit(source, now) -> list[tuple[int, int]]:
    due = quarantine.entries_to_revisit(source.state, "test", "shop", now)
    return due.select("lsn", "change_index").rows()


def _write(source, sql, params=(), context=None) -> int:
    with psycopg.connect(source.url) as conn:
        if context is not None:
            conn.execute("SELECT audit.set_context(%s::jsonb)", (json.dumps(context),))
        conn.execute(sql, params)
        return int(conn.execute("SELECT pg_current_xact_id()::text").fetchone()[0])


def test_changes_carry_their_transactions_context(shop):
    _write(shop, "INSERT INTO orders VALUES (1, 'new', 's3cr3t-value')", context=ADA)
    _write(
        shop,
        "UPDATE orders SET status = 'paid' WHERE id = 1",
        context={"actor": {"type": "service", "id": "billing"}},
    )
    shop.capture()
    records = _run(shop).sort("lsn")
    assert records["attribution_status"].to_list() == ["attributed", "attributed"]
    assert [json.loads(c)["actor"]["id"] for c in records["context"]] == ["ada", "billing"]
    assert json.loads(records["changed_columns"][1]) == ["status"]
    assert records["object_id"].to_list() == ["1", "1"]
    for path in shop.store.fs.glob(f"{shop.store.base}/**/*.parquet"):
        assert b"s3cr3t" not in shop.store.fs.cat_file(path)


def test_records_are_written_per_staged_batch_under_its_name(shop):
    for i in range(3):
        _write(shop, f"INSERT INTO orders VALUES ({10 + i}, 'new', NULL)", context=ADA)
        shop.capture()
        _run(shop)
    names = [p.rsplit("/", 1)[1] for p in shop.store.files("changes")]
    assert len(names) == 3
    assert [p.rsplit("/", 1)[1] for p in shop.store.files("records")] == names
    assert shop.store.pending() and all(e.records for e in shop.store.pending())


def test_batch_left_unenriched_by_a_failed_run_is_enriched_by_the_next(shop):
    _write(shop, "INSERT INTO orders VALUES (20, 'new', NULL)", context=ADA)
    shop.capture()  # its run's enrich step never happened
    _write(shop, "INSERT INTO orders VALUES (21, 'new', NULL)", context=ADA)
    shop.capture()
    records = _run(shop)
    assert sorted(records["object_id"].to_list()) == ["20", "21"]


def test_late_context_is_quarantined_first_then_enriched_as_late_with_its_lag(shop):
    xid = _write(shop, "INSERT INTO orders VALUES (2, 'new', NULL), (12, 'new', NULL)")
    shop.capture()
    assert _run(shop).is_empty()
    assert quarantine.stats(shop.state, "test", "shop").waiting == 2

    with psycopg.connect(shop.url) as conn:
        conn.execute(
            "SELECT audit.attach_context(%s::xid8, %s::jsonb)", (str(xid), json.dumps(ADA))
        )
    shop.capture()
    now = datetime.now(UTC)
    records = _run(shop, now=now)  # the next capture run's enrich step
    status, lag = records.select("attribution_status", "attribution_lag_seconds").row(0)
    assert status == "late" and lag > 0
    # Re-enriched apart from its batch, each still counts its whole transaction.
    assert records["txn_changes"].to_list() == [2, 2]
    assert quarantine.stats(shop.state, "test", "shop").waiting == 0
    assert _revisit(shop, now) == []


def test_a_late_context_rewrites_a_records_file_an_earlier_version_wrote(shop):
    """The records file the orphan's record joins was written before ``server_version`` was
    kept, its columns in another order: the rewrite keeps its record and adds the new one."""
    _write(shop, "INSERT INTO orders VALUES (30, 'new', NULL)", context=ADA)
    xid = _write(shop, "INSERT INTO orders VALUES (31, 'new', NULL)")
    shop.capture()
    assert _run(shop)["object_id"].to_list() == ["30"]
    [path] = shop.store.files("records")
    older = shop.store.read([path]).drop(FILE, "server_version")
    shop.store.write_file(path, older.select(reversed(older.columns)))
    with psycopg.connect(shop.url) as conn:
        conn.execute(
            "SELECT audit.attach_context(%s::xid8, %s::jsonb)", (str(xid), json.dumps(ADA))
        )
    shop.capture()
    records = _run(shop).sort("object_id")
    assert records["object_id"].to_list() == ["30", "31"]
    assert records["attribution_status"].to_list() == ["attributed", "late"]
    assert records["server_version"][0] is None and records["server_version"][1] >= 150000
    assert list(shop.store.read([path]).drop(FILE).columns) == list(RECORD_SCHEMA)


def test_orphan_is_revisited_when_its_context_arrives_in_another_hour(shop):
    xid = _write(shop, "INSERT INTO orders VALUES (5, 'new', NULL)")
    shop.capture()
    now = datetime.now(UTC)
    _run(shop, now=now)
    [orphan_hour] = {f.hour for f in shop.store.files_by_hour("changes")}
    assert _revisit(shop, now) == []  # not due yet
    attached_next_hour = pl.DataFrame(
        {
            "kind": ["attach"],
            "target_xid": [xid % 2**32],
            "lsn": [1],
            "context": [json.dumps(ADA)],
            "commit_time": [orphan_hour + timedelta(hours=1, minutes=5)],
        },
        schema_overrides={"commit_time": pl.Datetime("us", "UTC")},
    )
    quarantine.store_late_contexts(shop.state, "test", "shop", attached_next_hour)
    assert len(_revisit(shop, now)) == 1
    assert _run(shop, now=now)["attribution_status"].to_list() == ["late"]
    assert _revisit(shop, now) == []


def test_due_orphan_is_revisited_with_backoff(shop):
    _write(shop, "INSERT INTO orders VALUES (6, 'new', NULL)")
    shop.capture()
    now = datetime.now(UTC)
    _run(shop, now=now)
    assert _revisit(shop, now) == []
    assert len(_revisit(shop, now + timedelta(seconds=31))) == 1
    assert _run(shop, now=now + timedelta(seconds=31)).is_empty()  # still within grace
    attempts, next_retry = shop.state.execute(
        "SELECT attempts, next_retry_at FROM audit_platform.quarantine"
    ).fetchone()
    assert attempts == 2
    assert (
        timedelta(seconds=30) <= next_retry - (now + timedelta(seconds=31)) <= timedelta(seconds=60)
    )


def test_orphan_past_grace_is_unattributed_then_late_when_context_finally_comes(shop):
    xid = _write(shop, "INSERT INTO orders VALUES (3, 'new', NULL)")
    shop.capture()
    later = datetime.now(UTC) + timedelta(hours=1)
    released = _run(shop, now=later)
    assert released["attribution_status"].to_list() == ["unattributed"]
    assert quarantine.stats(shop.state, "test", "shop").released == 1  # findable if context comes

    with psycopg.connect(shop.url) as conn:
        conn.execute(
            "SELECT audit.attach_context(%s::xid8, %s::jsonb)", (str(xid), json.dumps(ADA))
        )
    shop.capture()
    final = _run(shop, now=later)
    assert final.height == 1  # one record, replaced: not a second one
    assert final["attribution_status"].to_list() == ["late"]
    assert final["id"].to_list() == released["id"].to_list()


def test_orphan_waiting_then_released_after_grace_is_marked_released(shop):
    _write(shop, "INSERT INTO orders VALUES (4, 'new', NULL)")
    shop.capture()
    now = datetime.now(UTC)
    _run(shop, now=now)
    waiting = quarantine.stats(shop.state, "test", "shop")
    assert waiting.waiting == 1 and waiting.oldest_waiting is not None
    assert _run(shop, now=now + timedelta(minutes=11))["attribution_status"].to_list() == [
        "unattributed"
    ]
    after = quarantine.stats(shop.state, "test", "shop")
    assert (after.waiting, after.released) == (0, 1)


def test_rebuilding_an_hour_gives_the_records_the_runs_wrote(shop):
    for i in range(3):
        _write(shop, f"INSERT INTO orders VALUES ({30 + i}, 'new', NULL)", context=ADA)
        shop.capture()
        _run(shop)
    _write(shop, "INSERT INTO orders VALUES (33, 'new', NULL)")  # an orphan
    shop.capture()
    now = datetime.now(UTC)
    _run(shop, now=now)
    before = {p: shop.store.fs.cat_file(p) for p in shop.store.files("records")}
    _enrich(shop, now=now)
    assert {p: shop.store.fs.cat_file(p) for p in shop.store.files("records")} == before


def test_a_transaction_staged_in_parts_joins_its_context(shop):
    with psycopg.connect(shop.url) as conn:
        conn.execute("SELECT audit.set_context(%s::jsonb)", (json.dumps(ADA),))
        conn.execute("INSERT INTO orders SELECT g, 'new', NULL FROM generate_series(1, 450) g")
    result = shop.capture(batch_changes=100)
    assert len([f for f in result.files if ".part" in f.path]) >= 4
    records = _run(shop)
    assert records.height == 450
    assert set(records["attribution_status"]) == {"attributed"}
    assert quarantine.stats(shop.state, "test", "shop").waiting == 0


def test_batches_cut_inside_transactions_keep_every_change_with_its_context(shop):
    """Under load a batch ends inside a transaction after complete ones: the open
    transaction's first part (holding its context) must be enriched with the batch that
    completes it, not with the batch that happened to be confirmed first."""
    with psycopg.connect(shop.url) as conn:
        for txn in range(8):
            conn.execute("SELECT audit.set_context(%s::jsonb)", (json.dumps(ADA),))
            conn.execute(
                "INSERT INTO orders SELECT g, 'new', NULL FROM generate_series(%s::int, %s::int) g",
                (txn * 5, txn * 5 + 4),
            )
            conn.commit()
    result = shop.capture(batch_changes=7)
    assert [f for f in result.files if ".part" in f.path]  # batches were cut mid-transaction
    records = _run(shop)
    assert records.height == 40
    assert set(records["attribution_status"]) == {"attributed"}
    assert quarantine.stats(shop.state, "test", "shop").waiting == 0


def test_an_hour_names_its_transactions_with_fewer_records_than_changes_captured(shop):
    _write(
        shop, "INSERT INTO orders SELECT g, 'new', NULL FROM generate_series(1, 3) g", context=ADA
    )
    shop.capture()
    records = _run(shop)
    [hour] = shop.store.hours("records")
    assert hour_transactions(shop.store, hour) == HourTransactions(hour, 1, [])
    # One change rejected at enrichment: its record is not in the batch's records file.
    [path] = shop.store.hour_files("records", hour)
    shop.store.write_file(path, records.head(2))
    [lsn] = records["lsn"].unique().to_list()
    assert hour_transactions(shop.store, hour).incomplete == [(lsn, 3, 2)]


def test_pending_batches_enriched_together_are_what_one_by_one_makes(shop, servers, tmp_path):
    """A live run enriches a source's waiting batches together (``coalesce``): the records
    files, the trail and the orphans are those of enriching the batches one at a time."""
    _write(shop, "INSERT INTO orders VALUES (1, 'new', 'x')", context=ADA)
    shop.capture()
    _write(shop, "INSERT INTO orders VALUES (2, 'new', 'x')")  # an orphan, waiting
    shop.capture()
    # A transaction staged in parts: its changes files are counted together.
    bulk = "INSERT INTO orders SELECT g, 'bulk', 'x' FROM generate_series(3, 9) g"
    _write(shop, bulk, context=ADA)
    shop.capture(batch_changes=3)
    _write(shop, "UPDATE orders SET status = 'paid' WHERE id = 1", context=ADA)
    shop.capture()
    entries = shop.store.pending()
    assert len(entries) == 4
    assert len(entries[2].staged_paths("changes")) > 1
    copy = tmp_path / "one-by-one"
    shutil.copytree(shop.store.root, copy)
    for ledger in copy.glob("*/*/_pending/*.json"):  # its entries name the copy's files
        ledger.write_text(ledger.read_text().replace(shop.store.root, str(copy)))
    alone = StagingStore(str(copy), shop.store.env, shop.store.source)
    now = datetime.now(UTC)
    together = enrich_pending(shop.store, shop.state, shop.policy, now=now, grace=GRACE)
    with new_database(servers) as url, psycopg.connect(url, autocommit=True) as state:
        platform_db.install(state, Settings().resources_dir / "sql")
        one_by_one = enrich_pending(alone, state, shop.policy, now=now, grace=GRACE, coalesce=1)
        waiting = _revisit(shop, now + GRACE)
        assert (
            waiting
            == quarantine.entries_to_revisit(state, "test", "shop", now + GRACE)
            .select("lsn", "change_index")
            .rows()
        )
    assert len(waiting) == 1
    assert [vars(h) for h in together] == [vars(h) for h in one_by_one]
    for entry, other in zip(shop.store.pending(), alone.pending(), strict=True):
        assert entry.records == tuple(
            sorted(shop.store.derived_path(p, "records") for p in entry.staged_paths("changes"))
        )
        assert [p.removeprefix(alone.root) for p in other.records] == [
            p.removeprefix(shop.store.root) for p in entry.records
        ]
        for mine, theirs in zip(entry.records, other.records, strict=True):
            assert_frame_equal(shop.store.read([mine]).drop(FILE), alone.read([theirs]).drop(FILE))
    mine, theirs = TrustLog(shop.store).state(), TrustLog(alone).state()
    assert mine.size == theirs.size > 10  # ten changes and the contexts
    assert mine.frontier.root() == theirs.frontier.root()


def test_an_entry_repeating_files_of_the_one_before_is_enriched_once_with_whole_counts(shop):
    """After a crash in ``settle``, a transaction staged in parts can have a second ledger
    entry holding some of its files. Taken together, each file is enriched once and counted
    with the whole transaction, in the records and in the trail."""
    bulk = "INSERT INTO orders SELECT g, 'bulk', 'x' FROM generate_series(1, 7) g"
    _write(shop, bulk, context=ADA)
    shop.capture(batch_changes=3)
    [entry] = shop.store.pending()
    changes = entry.staged_paths("changes")
    assert len(changes) == 3
    repeat = {"staged": [changes[0], *entry.staged_paths("contexts")]}
    shop.store.write_json(f"{shop.store.base}/_pending/{entry.name}.part0000.json", repeat)
    hours = enrich_pending(shop.store, shop.state, shop.policy, now=datetime.now(UTC), grace=GRACE)
    records = shop.store.read_all("records")
    assert records["txn_changes"].to_list() == [7] * 7
    assert sum(h.changes for h in hours) == sum(h.records for h in hours) == 7
    log = TrustLog(shop.store)
    assert log.state().size == 8  # seven changes and their transaction's context
    leaves = shop.store.read(shop.store.glob(f"{log.dir}/leaves/*.parquet"))
    assert leaves.filter(pl.col("kind") == "change").height == 7


def test_sources_enriched_together_are_what_each_makes_alone(servers, tmp_path):
    """A live run's turn enriches several sources' batches in one frame
    (``enrich_pending_together``): each source's records files, trail, quarantine and counts
    are those of enriching it alone. Two policies that differ on one column, an orphan, a
    late context and a transaction staged in parts, across three sources. The ledger counts
    each file's rows as its footer does."""
    with ExitStack() as stack:
        sources = {}
        for name, ignore in (("north", ["status"]), ("south", []), ("east", [])):
            url = stack.enter_context(new_database(servers))
            sources[name] = make_source(
                url,
                tmp_path,
                "CREATE TABLE orders (id int PRIMARY KEY, status text);"
                "ALTER TABLE orders REPLICA IDENTITY FULL;",
                policy_for(name, public__orders={"ignore_changes_to": ignore}),
            )
        for source in sources.values():
            _write(source, "INSERT INTO orders VALUES (1, 'new')", context=ADA)
            # Ignored by north's policy, a record of the others'.
            _write(source, "UPDATE orders SET status = 'paid' WHERE id = 1", context=ADA)
            source.capture()
        orphan = _write(sources["south"], "INSERT INTO orders VALUES (2, 'new')")
        sources["south"].capture()
        _write(
            sources["east"],
            "INSERT INTO orders SELECT g, 'bulk' FROM generate_series(3, 9) g",
            context=ADA,
        )
        sources["east"].capture(batch_changes=3)
        with psycopg.connect(sources["south"].url, autocommit=True) as conn:
            conn.execute(
                "SELECT audit.attach_context(%s::xid8, %s::jsonb)", (str(orphan), json.dumps(ADA))
            )
        sources["south"].capture()
        root = sources["north"].store.root
        copy = tmp_path / "alone"
        shutil.copytree(root, copy)
        for ledger in copy.glob("*/*/_pending/*.json"):  # its entries name the copy's files
            ledger.write_text(ledger.read_text().replace(root, str(copy)))
        now = datetime.now(UTC)
        state = stack.enter_context(psycopg.connect(servers.pg_url, autocommit=True))
        platform_db.install(state, Settings().resources_dir / "sql")
        shares = [Share(s.store, s.policy) for s in sources.values()]
        together = enrich_pending_together(state, shares, now=now, grace=GRACE)
        for source in sources.values():  # the ledger counts what the footers do
            for entry in source.store.pending():
                paths = [*entry.staged, *(entry.records or ())]
                assert entry.rows == {p: file_rows(source.store, p) for p in paths}
        other = stack.enter_context(new_database(servers))
        alone_state = stack.enter_context(psycopg.connect(other, autocommit=True))
        platform_db.install(alone_state, Settings().resources_dir / "sql")
        for name, source in sources.items():
            alone = StagingStore(str(copy), source.env, name)
            hours = enrich_pending(alone, alone_state, source.policy, now=now, grace=GRACE)
            assert [vars(h) for h in together[name]] == [vars(h) for h in hours], name
            mine, theirs = source.store.read_all("records"), alone.read_all("records")
            assert mine is not None and theirs is not None
            assert_frame_equal(mine, theirs)
            assert all(entry.records is not None for entry in alone.pending())
            assert [e.records for e in source.store.pending()] == [
                tuple(p.replace(str(copy), root) for p in e.records or ()) for e in alone.pending()
            ]
            assert_frame_equal(
                TrustLog(source.store).leaves().drop(FILE, strict=False),
                TrustLog(alone).leaves().drop(FILE, strict=False),
            )
            for conn in (state, alone_state):
                assert quarantine.stats(conn, source.env, name) == quarantine.stats(
                    alone_state, source.env, name
                )
        ignored = together["north"][0]
        assert ignored.records == 1 and together["south"][0].records >= 2
        assert together["south"][0].late == 1
        # A backfill of east's hour, a file at a time, counts its transaction in parts whole.
        east = sources["east"]
        live = east.store.read_all("records")
        assert live is not None and live["txn_changes"].max() == 7
        for hour in east.store.hours("changes"):
            enrich_hour(east.store, state, east.policy, hour, now=now, grace=GRACE)
        assert_frame_equal(east.store.read_all("records"), live)


def test_a_transaction_in_parts_counts_its_ignored_changes_whatever_else_it_holds(
    pg_database, tmp_path
):
    """A transaction staged across several files is counted over all of them: its records
    say how many changes it had (8) and how many of them the policy ignored (3), whether or
    not they are of a table with ignore_changes_to, and whatever their operation."""
    state = psycopg.connect(pg_database, autocommit=True)
    platform_db.install(state, Settings().resources_dir / "sql")
    source = make_source(
        pg_database,
        tmp_path,
        "CREATE TABLE orders (id int PRIMARY KEY, status text, total int);"
        "CREATE TABLE notes (id int PRIMARY KEY, status text);"
        "ALTER TABLE orders REPLICA IDENTITY FULL; ALTER TABLE notes REPLICA IDENTITY FULL;",
        policy_for("shop", public__orders={"ignore_changes_to": ["status"]}, public__notes={}),
    )
    with psycopg.connect(source.url) as conn:
        conn.execute("SELECT audit.set_context(%s::jsonb)", (json.dumps(ADA),))
        conn.execute("INSERT INTO orders SELECT g, 'new', 1 FROM generate_series(1, 3) g")
        conn.execute("UPDATE orders SET status = 'paid'")  # ignored, three times
        conn.execute("INSERT INTO notes VALUES (1, 'new')")
        conn.execute("UPDATE notes SET status = 'paid'")  # the same column, not ignored here
    source.capture(batch_changes=2)
    assert len(source.store.files("changes")) > 2
    enrich_pending(source.store, state, source.policy, now=datetime.now(UTC), grace=GRACE)
    records = source.store.read_all("records")
    assert records.height == 5
    assert set(records["txn_changes"].to_list()) == {8}
    assert set(records["txn_ignored"].to_list()) == {3}
    state.close()
