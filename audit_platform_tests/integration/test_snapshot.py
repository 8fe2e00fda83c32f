"""Snapshots of existing rows through the real pipeline (docs/design.md, "Snapshots"): rows
updated, deleted and inserted by a service while a snapshot reads their table end, replayed from
the records, exactly as the table holds them (the table itself is the ground truth, read by the
test); each row gets at most one snapshot record and every untouched one exactly one; a
snapshot stopped half-way resumes with every row recorded once; state at a time and history
begin at the snapshot record for a row never changed since; a snapshot limited by a condition
records exactly the rows that meet it, resumes with it, and refuses one that could run code; a
whole snapshot after a gap is named by the gap."""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections import Counter
from datetime import UTC, datetime

import dagster as dg
import psycopg
import pytest
import yaml

from audit_platform import platform_db
from audit_platform.api_keys import Scope
from audit_platform.capture.gaps import Gap, list_gaps, record_gap
from audit_platform.capture.pgoutput import Masker
from audit_platform.capture.snapshot import SnapshotRefused, run_snapshot, snapshot_status
from audit_platform.capture.snapshot_pace import Backlog, PipelinePace, PipelineStalled
from audit_platform.capture.stream import SlotBusy
from audit_platform.defs.resources import AuditPlatform
from audit_platform.defs.snapshots import snapshot_job
from audit_platform.environment import EnvironmentConfig, SourceConfig
from audit_platform.naming import publication_name, slot_name
from audit_platform.query.reads import object_history, object_state
from audit_platform.settings import Settings
from audit_platform.sources.setup import setup_source
from audit_platform.staging import StagingStore
from audit_platform_tests.capture_support import (
    MASK_KEY,
    CaptureSource,
    capture_enrich_index,
    make_source,
)
from audit_platform_tests.helpers import environment_resources, policy_for

SQL = Settings().resources_dir / "sql"
ROWS = 1500
DDL = f"""
CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance numeric(12, 2), opened date,
                       tags text[], doc text, active boolean, code char(4), ip inet,
                       at timestamptz);
ALTER TABLE accounts REPLICA IDENTITY FULL;
INSERT INTO accounts
SELECT g, 'owner ' || g, g * 1.25, date '2020-01-01' + g, ARRAY['a', 'b "' || g || '"'],
       CASE WHEN g % 100 = 0 THEN (SELECT string_agg(md5(g::text || i), '') FROM
           generate_series(1, 400) i) END,
       g % 2 = 0, 'c' || g % 10, ('10.0.0.' || g % 250)::inet, timestamptz '2026-01-01 00:00+02' + g * interval '1 hour'
FROM generate_series(1, {ROWS}) g;
"""
SERVICE = json.dumps({"actor": {"type": "service", "id": "ledger"}})


@pytest.fixture
def accounts(pg_database, tmp_path, es_prefix):
    policy = policy_for("bank", public__accounts={"mask": ["owner"]})
    source = make_source(pg_database, tmp_path, DDL, policy, es_prefix.replace("-", "_"))
    source.state = psycopg.connect(pg_database, autocommit=True)
    platform_db.install(source.state, SQL)
    yield source
    source.state.close()


NAMES = ("id", "owner", "balance", "opened", "tags", "doc", "active", "code", "ip", "at")


def _table(url: str) -> dict[str, dict]:
    """The table as the test reads it: each value as its type's output function prints it
    (COPY's text form), the owner masked."""
    mask = Masker(MASK_KEY)
    statement = f"COPY accounts ({', '.join(NAMES)}) TO STDOUT"
    with psycopg.connect(url) as conn, conn.cursor() as cursor, cursor.copy(statement) as copy:
        rows = list(copy.rows())
    found = {}
    for row in rows:
        image = dict(zip(NAMES, row, strict=True))
        image["owner"] = None if image["owner"] is None else mask(image["owner"])
        found[image["id"]] = image
    return found


def _records(es, env: str) -> list[dict]:
    hits = es.search(
        index=f"audit-{env}-*",
        query={"term": {"table.name": "accounts"}},
        sort=[{"transaction.lsn": "asc"}, {"transaction.change_index": "asc"}],
        size=10_000,
    )["hits"]["hits"]
    return [hit["_source"] for hit in hits]


def _replay(records: list[dict]) -> dict[str, dict]:
    """Each object's state after the records, in their order. A change's before-image, which
    pgoutput wrote, must be the state the records before it left, a snapshot's included."""
    state: dict[str, dict] = {}
    for record in records:
        # The object a change found: its before-image's key (an update may move the key).
        found = record["before"]["id"] if record["before"] else None
        if found is not None and found in state:
            assert record["before"] == state[found], record
        if record["operation"] == "update" and found != record["object_id"]:
            state.pop(found, None)
        if record["operation"] == "delete":
            state.pop(record["object_id"], None)
        else:
            state[record["object_id"]] = record["after"]
    return state


def _each_row_once(accounts, es) -> list[dict]:
    """Capture, enrich and index what is left; then every row has exactly one snapshot record
    and the records replay to the table. Returns the records."""
    capture_enrich_index(accounts, accounts.state, es)
    records = _records(es, accounts.env)
    snapshots = Counter(r["object_id"] for r in records if r["operation"] == "snapshot")
    assert len(snapshots) == ROWS and set(snapshots.values()) == {1}
    assert _replay(records) == _table(accounts.url)
    return records


def _service(url: str, stop: threading.Event, touched: set[int], seed: int) -> None:
    """Updates, deletes and inserts while the snapshot reads, each in its own transaction,
    mostly of the rows just ahead of the snapshot's last chunk: the rows it is about to read."""
    rng, new_id = random.Random(seed), ROWS + 1 + seed * 10_000
    with psycopg.connect(url, autocommit=True) as conn:
        while not stop.is_set():
            ahead = conn.execute(
                "SELECT coalesce(max(last_key[1]::int), 0) FROM audit.snapshot_progress"
            ).fetchone()[0]
            with conn.transaction():
                conn.execute("SELECT audit.set_context(%s::jsonb)", (SERVICE,))
                target = (
                    min(ROWS, ahead + rng.randint(1, 60))
                    if rng.random() < 0.8
                    else rng.randint(1, ROWS)
                )
                kind = rng.random()
                if kind < 0.6:
                    conn.execute(
                        "UPDATE accounts SET balance = balance + 1, owner = owner || '!'"
                        " WHERE id = %s",
                        (target,),
                    )
                elif kind < 0.75:
                    conn.execute("DELETE FROM accounts WHERE id = %s", (target,))
                elif kind < 0.85:  # a key moved far ahead, past rows the snapshot has not read
                    new_id += 1
                    conn.execute("UPDATE accounts SET id = %s WHERE id = %s", (new_id, target))
                    touched.add(new_id)
                else:
                    new_id += 1
                    conn.execute(
                        "INSERT INTO accounts (id, owner, balance) VALUES (%s, 'new', 0)",
                        (new_id,),
                    )
                    target = new_id
            touched.add(target)


def test_a_snapshot_beside_a_busy_service_ends_in_the_tables_state(accounts, es):
    stop, touched = threading.Event(), set()
    writers = [
        threading.Thread(target=_service, args=(accounts.url, stop, touched, seed))
        for seed in (1, 2)
    ]
    for writer in writers:
        writer.start()
    try:
        [progress] = run_snapshot(accounts.url, accounts.policy, "s1", chunk_rows=40)
    finally:
        stop.set()
        for writer in writers:
            writer.join()
    assert progress.done and progress.chunks > 10
    capture_enrich_index(accounts, accounts.state, es)

    records = _records(es, accounts.env)
    truth = _table(accounts.url)
    assert _replay(records) == truth
    snapshots = Counter(r["object_id"] for r in records if r["operation"] == "snapshot")
    assert max(snapshots.values()) == 1
    untouched = {str(i) for i in range(1, ROWS + 1)} - {str(t) for t in touched}
    assert untouched and untouched <= set(snapshots)
    assert sum(snapshots.values()) == progress.rows
    first = next(r for r in records if r["operation"] == "snapshot")
    assert first["context"]["job"] == {"name": "snapshot", "run_id": "s1"}
    assert first["attribution"]["status"] == "attributed"
    assert first["event"]["type"] == ["info"] and first["before"] is None
    assert first["row"]["types"]["tags"] == "text[]" and first["row"]["key"] == ["id"]
    assert (first["after"]["active"], first["after"]["code"], first["after"]["ip"]) == (
        "f",
        "c1  ",
        "10.0.0.1",
    )
    toasted = next(r for r in records if r["object_id"] == "100" and r["operation"] == "snapshot")
    assert len(toasted["after"]["doc"]) == 400 * 32
    assert toasted["after"]["tags"] == '{a,"b \\"100\\""}'  # PostgreSQL's own text form


def test_a_snapshot_stopped_half_way_resumes_and_records_each_row_once(accounts, es):
    seen = []

    def crash_after_three(progress):
        seen.append(progress.chunks)
        if len(seen) == 3:
            raise KeyboardInterrupt("the snapshot's process is stopped")

    with pytest.raises(KeyboardInterrupt):
        run_snapshot(
            accounts.url, accounts.policy, "s2", chunk_rows=100, on_chunk=crash_after_three
        )
    [half] = snapshot_status(accounts.url, "s2")
    assert (half["rows"], half["chunks"], half["done"]) == (300, 3, False)
    [progress] = run_snapshot(accounts.url, accounts.policy, "s2", chunk_rows=100)
    assert progress.done and progress.rows == ROWS
    records = _each_row_once(accounts, es)
    # Done is done: running it again records nothing more.
    run_snapshot(accounts.url, accounts.policy, "s2")
    capture_enrich_index(accounts, accounts.state, es)
    assert len(_records(es, accounts.env)) == len(records)


def test_state_and_history_of_a_row_never_changed_begin_at_its_snapshot(accounts, es):
    run_snapshot(accounts.url, accounts.policy, "s3")
    capture_enrich_index(accounts, accounts.state, es)
    scope = Scope(env=accounts.env)
    state = object_state(es, scope, "bank", "public.accounts", "7", datetime.now(UTC))
    assert state.status == "present" and state.row is not None
    assert state.row["balance"] == "8.75" and state.as_of is not None
    assert state.as_of.operation.value == "snapshot"
    history = object_history(es, scope, "bank", "public.accounts", "7")
    assert [entry.event.operation.value for entry in history.changes] == ["snapshot"]


def test_a_role_with_connect_cannot_forge_a_snapshot(accounts):
    role = f"visitor_{accounts.env}"[:60]
    accounts.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'visitor'")
    url = psycopg.conninfo.make_conninfo(accounts.url, user=role, password="visitor")
    for statement in (
        "INSERT INTO audit.snapshot_chunks (snapshot_id, table_name, columns, types, key, rows)"
        " VALUES ('x', 'public.accounts', '[\"id\"]', '[\"integer\"]', '[\"id\"]', '[[\"1\"]]')",
        "UPDATE audit.snapshot_progress SET done = true",
    ):
        with psycopg.connect(url, autocommit=True) as conn, pytest.raises(psycopg.Error):
            conn.execute(statement)
    accounts.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


def test_a_composite_key_of_fixed_width_text_is_read_in_chunks_without_a_gap(pg_database, tmp_path):
    """The bound of a chunk is read back with its exact type: a char(2) key read back as
    ``character`` (one character) would skip or repeat rows."""
    source = make_source(
        pg_database,
        tmp_path,
        "CREATE TABLE codes (region char(2), code varchar(10), n int,"
        " PRIMARY KEY (region, code)); ALTER TABLE codes REPLICA IDENTITY FULL;"
        "INSERT INTO codes SELECT chr(65 + g % 5) || chr(65 + g % 3), 'c' || g, g"
        " FROM generate_series(1, 300) g;",
        policy_for("geo", public__codes={}),
        env="codes",
    )
    [progress] = run_snapshot(source.url, source.policy, "k1", chunk_rows=7)
    assert progress.done and progress.rows == 300 and progress.chunks >= 300 // 7
    source.capture()
    staged = source.staged().filter(operation="snapshot")
    keys = [(a["region"], a["code"]) for a in map(json.loads, staged["after"])]
    assert len(keys) == len(set(keys)) == 300
    assert {region for region, _ in keys} == {
        chr(65 + g % 5) + chr(65 + g % 3) for g in range(1, 301)
    }


def test_the_dagster_job_takes_a_snapshot_from_its_config_form(accounts, tmp_path, monkeypatch):
    resources = environment_resources(tmp_path, accounts.env)
    (resources / "sources" / "bank.yaml").write_text(
        yaml.safe_dump(accounts.policy.model_dump(mode="json", exclude_defaults=True))
    )
    monkeypatch.setenv("AUDIT_RESOURCES_DIR", str(resources))
    monkeypatch.setenv("AUDIT_ENV", accounts.env)
    monkeypatch.setenv("BANK_URL", accounts.url)
    job = snapshot_job(EnvironmentConfig(sources={"bank": SourceConfig(url_env="BANK_URL")}))
    with dg.instance_for_test() as instance:
        done = job.execute_in_process(
            run_config={"ops": {"snapshot": {"config": {"source": "bank", "snapshot_id": "d1"}}}},
            resources={"platform": AuditPlatform()},
            instance=instance,
        )
        assert done.success
        [table] = snapshot_status(accounts.url, "d1")
        assert table["done"] and table["rows"] == ROWS
        unknown = job.execute_in_process(
            run_config={"ops": {"snapshot": {"config": {"source": "nope"}}}},
            resources={"platform": AuditPlatform()},
            instance=instance,
            raise_on_error=False,
        )
        assert not unknown.success
        [failure] = [e for e in unknown.all_events if e.is_step_failure]
        assert "source 'nope' is not in this environment's file; its sources: bank" in str(
            failure.event_specific_data.error
        )


WHERE = "active AND balance > 500 AND code LIKE 'c2%'"


def test_a_snapshot_limited_by_a_condition_records_exactly_its_rows(accounts, es):
    with psycopg.connect(accounts.url) as conn:
        expected = {str(r[0]) for r in conn.execute(f"SELECT id FROM accounts WHERE {WHERE}")}
    assert 0 < len(expected) < ROWS
    seen = []

    def crash_after_two(progress):
        seen.append(progress.chunks)
        if len(seen) == 2:
            raise KeyboardInterrupt("the snapshot's process is stopped")

    table = ["public.accounts"]
    with pytest.raises(KeyboardInterrupt):
        run_snapshot(
            accounts.url,
            accounts.policy,
            "w1",
            tables=table,
            where=WHERE,
            chunk_rows=50,
            on_chunk=crash_after_two,
        )
    with pytest.raises(SnapshotRefused, match="began with the condition"):
        run_snapshot(accounts.url, accounts.policy, "w1", tables=table, where="id > 1")
    # Resumed without saying the condition again: it goes on with the one it began with.
    [progress] = run_snapshot(accounts.url, accounts.policy, "w1", chunk_rows=50)
    assert progress.done and progress.rows == len(expected)
    assert progress.condition == ('"active" AND "balance" > 500 AND "code" LIKE \'c2%\'')
    capture_enrich_index(accounts, accounts.state, es)
    records = [r for r in _records(es, accounts.env) if r["operation"] == "snapshot"]
    assert Counter(r["object_id"] for r in records) == Counter(expected)
    assert records[0]["context"]["attributes"] == {"snapshot_where": progress.condition}


@pytest.mark.parametrize(
    ("condition", "refused"),
    [
        ("pg_sleep(5) IS NULL", "PG_SLEEP(5)"),
        ("id IN (SELECT id FROM audit.snapshot_progress)", "Subquery"),
        ("id = 1; UPDATE audit.snapshot_progress SET done = true", "one boolean expression"),
        ("id::public.evil = 1", "not one of the built-in types"),
        ("owner LIKE 'owner 1%'", "which the policy masks or excludes"),
        ("nope = 1", "column 'nope', which the table does not have"),
    ],
)
def test_a_condition_that_could_run_code_or_names_nothing_is_refused_before_a_read(
    accounts, condition, refused
):
    with pytest.raises(SnapshotRefused, match=re.escape(refused)):
        run_snapshot(accounts.url, accounts.policy, "bad", where=condition)
    assert snapshot_status(accounts.url, "bad") == []


def _lsn(url: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT pg_current_wal_lsn() - '0/0'").fetchone()[0]


def test_a_whole_snapshot_after_a_gap_rebaselines_it(accounts, tmp_path, monkeypatch):
    env, now = accounts.env, _lsn(accounts.url)
    before = Gap(
        env=env,
        source="bank",
        from_lsn=now - 4096,
        to_lsn=now,
        last_captured_at=None,
        reason="the slot was invalidated by PostgreSQL (wal_status = lost) and replaced",
    )
    record_gap(accounts.state, before)
    resources = environment_resources(tmp_path, env)
    (resources / "sources" / "bank.yaml").write_text(
        yaml.safe_dump(accounts.policy.model_dump(mode="json", exclude_defaults=True))
    )
    for name, value in (
        ("AUDIT_RESOURCES_DIR", str(resources)),
        ("AUDIT_ENV", env),
        ("AUDIT_PG_URL", accounts.url),
        ("BANK_URL", accounts.url),
    ):
        monkeypatch.setenv(name, value)
    job = snapshot_job(EnvironmentConfig(sources={"bank": SourceConfig(url_env="BANK_URL")}))

    def launch(**config) -> int:
        with dg.instance_for_test() as instance:
            done = job.execute_in_process(
                run_config={"ops": {"snapshot": {"config": {"source": "bank", **config}}}},
                resources={"platform": AuditPlatform()},
                instance=instance,
            )
        assert done.success
        [output] = [e for e in done.all_events if e.is_successful_output]
        return output.event_specific_data.metadata["gaps_rebaselined"].value

    # A snapshot of some rows only vouches for nothing.
    assert launch(snapshot_id="g1", tables=["public.accounts"], where="id <= 10") == 0
    assert [g.rebaselined_by for g in list_gaps(accounts.state, env, None)] == [None]
    assert launch(snapshot_id="g2") == 1
    [gap] = list_gaps(accounts.state, env, None)
    assert (gap.rebaselined_by, gap.rebaselined_at is not None) == ("g2", True)
    assert "re-baselined by snapshot g2" in gap.describe()

    # A gap that ends after a snapshot began (a slot lost while it ran, say) may hold some of
    # its chunks: that snapshot re-baselines nothing, not even an older gap.
    older = before.model_copy(update={"from_lsn": now - 2048})
    during = before.model_copy(update={"from_lsn": now + 2**40, "to_lsn": now + 2**41})
    record_gap(accounts.state, older)
    record_gap(accounts.state, during)
    assert launch(snapshot_id="g3") == 0
    gaps = {g.from_lsn: g for g in list_gaps(accounts.state, env, None)}
    assert gaps[older.from_lsn].rebaselined_by is None
    assert gaps[during.from_lsn].rebaselined_by is None
    assert "no snapshot has re-baselined it yet" in gaps[during.from_lsn].describe()


def test_a_snapshot_no_capture_of_the_environment_would_read_is_refused(accounts):
    with pytest.raises(SnapshotRefused, match="has no usable slot audit_elsewhere_bank"):
        run_snapshot(accounts.url, accounts.policy, "n1", env="elsewhere")
    publication = publication_name(accounts.env, "bank")
    accounts.execute(f"ALTER PUBLICATION {publication} DROP TABLE audit.snapshot_chunks")
    with pytest.raises(SnapshotRefused, match=r"does not carry audit\.snapshot_chunks"):
        run_snapshot(accounts.url, accounts.policy, "n1", env=accounts.env)
    assert snapshot_status(accounts.url, "n1") == []


class Watched(PipelinePace):
    """The real pace, noting the backlog it found each time it let a chunk go."""

    def __init__(self, store, slot: str, **settings) -> None:
        super().__init__(store, slot, **settings)
        self.let_go: list[tuple[int, Backlog]] = []

    def wait(self, conn, written_lsn: int) -> None:
        super().wait(conn, written_lsn)
        # Nothing more is written until it returns: the backlog only shrinks from here.
        self.let_go.append((written_lsn, self.backlog(conn)))


def test_a_snapshot_is_recorded_by_the_environment_it_was_taken_for_alone(accounts, tmp_path):
    # Two environments capture one database: each publication carries the chunks.
    other_env = f"{accounts.env}_b"
    setup_source(accounts.url, other_env, accounts.policy, SQL)
    other = CaptureSource(
        accounts.url,
        other_env,
        accounts.policy,
        StagingStore(str(tmp_path / "other"), other_env, accounts.policy.source),
    )
    run_snapshot(accounts.url, accounts.policy, "mine", env=accounts.env)
    accounts.execute("UPDATE accounts SET active = NOT active WHERE id = 7")
    accounts.capture()
    other.capture()
    assert Counter(accounts.staged()["operation"]) == {"snapshot": ROWS, "update": 1}
    assert other.staged()["operation"].to_list() == ["update"]  # its changes, not the snapshot
    assert [t["env"] for t in snapshot_status(accounts.url, "mine")] == [accounts.env]
    with pytest.raises(SnapshotRefused, match=f"begun for environment '{accounts.env}'"):
        run_snapshot(accounts.url, accounts.policy, "mine", env=other_env)
    # A snapshot taken for no environment (a tool's) is every environment's, as before.
    run_snapshot(accounts.url, accounts.policy, "everyone")
    accounts.capture()
    other.capture()
    assert Counter(accounts.staged()["operation"])["snapshot"] == 2 * ROWS
    assert Counter(other.staged()["operation"])["snapshot"] == ROWS
    # One begun before migration 006 (no environment kept) goes on as it began, every
    # environment's, whichever resumes it.
    accounts.execute(
        "INSERT INTO audit.snapshot_progress (snapshot_id, table_name)"
        " VALUES ('old', 'public.accounts')"
    )
    run_snapshot(accounts.url, accounts.policy, "old", env=other_env)
    accounts.capture()
    other.capture()
    assert Counter(accounts.staged()["operation"])["snapshot"] == 3 * ROWS
    assert Counter(other.staged()["operation"])["snapshot"] == 2 * ROWS


def test_a_paced_snapshot_writes_a_chunk_once_capture_has_staged_the_last(accounts, es):
    slot = slot_name(accounts.env, "bank")
    pace = Watched(
        accounts.store, slot, rows=150, chunk_rows=60, stage_seconds=60, stall_seconds=60
    )
    stop = threading.Event()

    def pipeline() -> None:  # what the live capture run does, again and again
        while not stop.is_set():
            try:
                capture_enrich_index(accounts, accounts.state, es)
            except SlotBusy:
                # The previous run's walsender is still exiting (the server releases the slot
                # after the connection closes): a run started then is retried, as Dagster's
                # retry policy retries it.
                time.sleep(0.1)

    running = threading.Thread(target=pipeline)
    running.start()
    try:
        [progress] = run_snapshot(accounts.url, accounts.policy, "p1", chunk_rows=100, pace=pace)
    finally:
        stop.set()
        running.join()
    assert progress.done and progress.chunks == ROWS // 60  # the pace's chunks, not 100 rows
    assert len(pace.let_go) == progress.chunks  # the first chunk and the closing one go freely
    for written, found in pace.let_go:
        assert found.confirmed_lsn >= written  # staged, not let go by the patience of 60 s
        assert found.rows <= 150
    assert pace.waited < 60
    _each_row_once(accounts, es)


def test_a_paced_snapshot_stops_resumably_when_capture_stops_half_way(accounts, es):
    # Capture staged a backlog and stopped before enriching and indexing it.
    accounts.execute("UPDATE accounts SET balance = balance + 1 WHERE id <= 300")
    assert accounts.capture().changes == 300
    pace = PipelinePace(
        accounts.store,
        slot_name(accounts.env, "bank"),
        rows=100,
        stage_seconds=0.5,
        stall_seconds=1,
    )
    with pytest.raises(PipelineStalled, match="300 staged changes not indexed"):
        run_snapshot(accounts.url, accounts.policy, "p2", chunk_rows=500, pace=pace)
    [half] = snapshot_status(accounts.url, "p2")
    assert (half["chunks"], half["done"]) == (1, False)  # the first went before any wait
    capture_enrich_index(accounts, accounts.state, es)  # capture again: the backlog goes
    [progress] = run_snapshot(accounts.url, accounts.policy, "p2", chunk_rows=500, pace=pace)
    assert progress.done and progress.rows == ROWS
    _each_row_once(accounts, es)
