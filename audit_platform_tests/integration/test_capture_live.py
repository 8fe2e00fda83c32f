"""Long-lived capture (audit_platform/live.py) against real servers: each source on its
own, handover between runs, a SIGKILL and every crash point, each compared with a trigger-based
ground truth (nothing lost, nothing twice); and freshness as behaviour, not a benchmark."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import replace
from datetime import timedelta

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from audit_platform import platform_db
from audit_platform.capture.schema_changes import current_problems
from audit_platform.capture.slot import parked_pid
from audit_platform.capture.stream import SlotStream
from audit_platform.clients import connect_source
from audit_platform.faults import LOCAL_ONLY_POINTS, POINTS, SimulatedCrash, armed
from audit_platform.index.template import install_template
from audit_platform.live import (
    Lanes,
    LiveReport,
    LiveSettings,
    LiveSource,
    SourceStatus,
    SourceWorker,
    Supervisor,
    shard_of,
)
from audit_platform.naming import publication_name, read_alias, slot_name
from audit_platform.settings import PROJECT_ROOT, Settings
from audit_platform.signing import new_private_key, private_key
from audit_platform.sources.setup import SetupError, teardown_source
from audit_platform.verify import Window, verify_source
from audit_platform_tests.capture_support import MASK_KEY, CaptureSource, make_source
from audit_platform_tests.conftest import new_database
from audit_platform_tests.helpers import (
    ON_BOTH_STORES,
    ground_truth,
    ground_truth_ddl,
    policy_for,
    record_tuple,
)

DDL = """
CREATE TABLE orders (id int PRIMARY KEY, status text, note text);
ALTER TABLE orders REPLICA IDENTITY FULL;
""" + ground_truth_ddl("orders")

FAST = LiveSettings(
    flush_seconds=0.2,
    batch_changes=50,
    grace=timedelta(0),
    checkpoint_every=timedelta(0),
    resolve_every_seconds=1,
    idle_seconds=0.2,
    backoff_seconds=0.2,
    backoff_max_seconds=1,
)


@pytest.fixture
def env(es):
    name = f"live_{uuid.uuid4().hex[:8]}"
    install_template(es, Settings().resources_dir, name, replicas=0)
    yield name
    for index in es.indices.get(index=f"audit-{name}-*", expand_wildcards="all"):
        es.indices.delete(index=index)
    es.options(ignore_status=404).indices.delete_index_template(name=f"audit-{name}")


@pytest.fixture
def state_url(servers):
    with new_database(servers) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            platform_db.install(conn, Settings().resources_dir / "sql")
        yield url


def _source(url: str, staging_root, name: str, env: str) -> CaptureSource:
    return make_source(url, staging_root, DDL, policy_for(name, public__orders={}), env)


def _worker(
    source: CaptureSource, es, state_url, report=None, settings=FAST, signer=None, lanes=None
):
    live = LiveSource(
        source.policy.source, lambda: source.url, lambda: source.policy, source.store, "shopdb"
    )
    return SourceWorker(
        source.env,
        live,
        state=lambda: psycopg.connect(state_url, autocommit=True),
        elasticsearch=lambda: nullcontext(es),
        mask_key=MASK_KEY,
        signer=signer,
        settings=settings,
        report=report or LiveReport(),
        lanes=lanes,
    )


def _write(url: str, n: int, rows: int = 3) -> None:
    """One transaction of a service, with its context."""
    with psycopg.connect(url) as conn:
        conn.execute(
            "SELECT audit.set_context(%s::jsonb)",
            (json.dumps({"actor": {"type": "user", "id": f"u{n}"}}),),
        )
        conn.execute(
            "INSERT INTO orders (id, status, note) SELECT g, 'new', 'ü' FROM"
            " generate_series(%s::int, %s::int) g",
            (n * 100, n * 100 + rows - 1),
        )
        if n % 3 == 0:
            conn.execute("UPDATE orders SET status = 'paid' WHERE id = %s", (n * 100 - 300,))


def _indexed(es, env: str, source: str) -> list[tuple]:
    if not es.indices.exists_alias(name=read_alias(env)):
        return []  # nothing indexed yet
    es.indices.refresh(index=read_alias(env))
    hits = es.search(
        index=read_alias(env), size=10_000, query={"term": {"source.service": source}}
    )["hits"]
    assert hits["total"]["value"] < 10_000
    return sorted(record_tuple(d["_source"]) for d in hits["hits"])


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.2)


def _exactly_once(es, env: str, source: CaptureSource) -> None:
    truth = ground_truth(source.url)
    assert _indexed(es, env, source.policy.source) == truth
    staged = source.store.read_all("changes")
    assert staged.select("lsn", "change_index").is_duplicated().sum() == 0
    assert staged.height == len(truth)
    assert source.store.pending() == []


@contextmanager
def _running(supervisor: Supervisor):
    thread = threading.Thread(target=supervisor.run)
    thread.start()
    try:
        yield supervisor
    finally:
        supervisor.stop.set()
        thread.join(timeout=60)
        assert not thread.is_alive()


@contextmanager
def _writing(urls: list[str], start: int = 1):
    """A writer per source, one transaction every few milliseconds, until the block ends."""
    stop, threads = threading.Event(), []

    def write(url: str) -> None:
        n = start
        while not stop.is_set():
            _write(url, n)
            n += 1
            time.sleep(0.01)

    for url in urls:
        threads.append(threading.Thread(target=write, args=(url,)))
        threads[-1].start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def test_shards_are_stable_and_spread():
    assert shard_of("shop", 1) == 0
    assert shard_of("shop", 4) == shard_of("shop", 4)
    assert len({shard_of(f"source{i}", 4) for i in range(40)}) == 4


@ON_BOTH_STORES
def test_a_single_change_on_a_quiet_source_is_searchable_within_seconds(
    pg_database, staging_root, env, es, state_url
):
    source = _source(pg_database, staging_root, "shop", env)
    report = LiveReport()
    settings = LiveSettings(grace=timedelta(0), backoff_seconds=0.2)  # default flush interval
    workers = {"shop": _worker(source, es, state_url, report, settings)}
    with _running(Supervisor(lambda: workers, lifetime=timedelta(minutes=5), report=report)):
        _wait_for(
            lambda: report.statuses().get("shop") and report.statuses()["shop"].state == "live",
            30,
            "the worker is live",
        )
        time.sleep(2)  # quiet for a while: the worker waits on its socket
        _write(source.url, 1, rows=1)
        written = time.monotonic()
        # Generous: the default flush interval is half a second.
        _wait_for(lambda: len(_indexed(es, env, "shop")) == 1, 10, "the change is searchable")
        assert time.monotonic() - written < 10
    staged, _, indexed = report.drain()
    assert sum(v["rows"] for (s, d, _), v in staged.items() if d == "changes") == 1
    assert sum(h.indexed for _, h in indexed) == 1
    assert report.statuses()["shop"].state == "stopped"
    _exactly_once(es, env, source)


def test_a_quiet_slot_beside_a_busy_database_wakes_a_few_times_a_second(servers, tmp_path, env):
    """The server sends a quiet slot's reader a keepalive per neighbour commit; with a quiet
    poll the reader looks a few times a second (and still gets its own change), without it
    once per keepalive. Counts reads, not time."""
    with new_database(servers) as quiet_url, new_database(servers) as busy_url:
        quiet = _source(quiet_url, tmp_path / "quiet", "quiet", env)
        with psycopg.connect(busy_url, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id serial PRIMARY KEY, v text)")

        def reads(quiet_poll: float, write: bool) -> tuple[int, int]:
            slot = slot_name(env, "quiet")
            stream = SlotStream(quiet.url, slot, publication_name(env, "quiet"))
            stream.start()
            calls = 0
            read = stream.cursor.read_message

            def counted():
                nonlocal calls
                calls += 1
                return read()

            stream.cursor.read_message = counted
            stop, changes = threading.Event(), 0
            threading.Timer(3.0, stop.set).start()
            if write:
                threading.Timer(1.5, lambda: _write(quiet.url, 1, rows=1)).start()
            with _writing_to(busy_url, stop):
                for batch in stream.live_batches(
                    stop, flush_seconds=0.1, batch_changes=100, quiet_poll_seconds=quiet_poll
                ):
                    changes += batch.changes if batch is not None else 0
            stream.close()
            return calls, changes

        polled, seen = reads(0.25, write=True)
        assert seen == 1  # its own change still arrives
        eager, _ = reads(0.0, write=False)
        assert polled < 60  # a few looks a second for 3 s
        assert eager > 3 * polled, (eager, polled)


def test_a_quiet_source_holds_only_its_slots_stream(pg_database, staging_root, env, es, state_url):
    """An idle source costs its slot's stream: the worker's query connection closes when
    unused, and opens again for the next change."""
    source = _source(pg_database, staging_root, "shop", env)
    report = LiveReport()
    workers = {"shop": _worker(source, es, state_url, report)}
    with _running(Supervisor(lambda: workers, lifetime=timedelta(minutes=5), report=report)):
        _write(source.url, 1, rows=1)
        _wait_for(lambda: len(_indexed(es, env, "shop")) == 1, 30, "the change is searchable")
        _wait_for(
            lambda: _backends(source.url) == {"walsender": 1}, 30, "only the slot's stream is open"
        )
        _write(source.url, 2, rows=1)
        _wait_for(lambda: len(_indexed(es, env, "shop")) == 2, 30, "the next change too")
    _exactly_once(es, env, source)


SQL_DIR = Settings().resources_dir / "sql"
PARKING = replace(
    FAST,
    park_after_seconds=1,
    park_look_seconds=0.2,
    park_most_seconds=600,  # a change must wake it, not the backstop
    heartbeat_bytes=512 * 1024,
)


def _backends(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        return dict(
            conn.execute(
                "SELECT backend_type, count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " GROUP BY backend_type"
            ).fetchall()
        )


def _confirmed(url: str, slot: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots"
            " WHERE slot_name = %s",
            (slot,),
        ).fetchone()[0]


def test_a_quiet_source_parks_and_wakes_for_its_change_and_for_wal_to_confirm(
    servers, pg_database, staging_root, env, es, state_url
):
    """A parked source holds one query connection and no stream (no walsender decoding its
    server's WAL), and setup sees it as capture running; its next change wakes it and is
    searchable within seconds; a busy neighbour's WAL wakes it to confirm that WAL, and it
    parks again. Nothing lost, nothing twice."""
    source = _source(pg_database, staging_root, "shop", env)
    worker = _worker(source, es, state_url, settings=PARKING)
    slot = slot_name(env, "shop")
    with (
        new_database(servers) as busy_url,
        _running(Supervisor(lambda: {"shop": worker}, lifetime=timedelta(minutes=5))),
    ):
        _write(source.url, 1, rows=1)
        _wait_for(lambda: len(_indexed(es, env, "shop")) == 1, 30, "the change is searchable")
        _wait_for(lambda: worker.status.state == "parked", 30, "the quiet source parks")
        _wait_for(lambda: _backends(source.url) == {"client backend": 1}, 10, "no stream")
        with psycopg.connect(source.url, autocommit=True) as conn:
            assert parked_pid(conn, slot) is not None
        with pytest.raises(SetupError, match="stop capture"):
            teardown_source(source.url, env, "shop", SQL_DIR, everything=False)
        attempts = worker.status.attempts
        _write(source.url, 2, rows=2)
        written = time.monotonic()
        _wait_for(lambda: len(_indexed(es, env, "shop")) == 3, 30, "the next change too")
        assert time.monotonic() - written < 15
        assert worker.status.attempts > attempts  # it woke: a new stream read the change
        _wait_for(lambda: worker.status.state == "parked", 30, "it parks again")
        before = _confirmed(source.url, slot)
        with psycopg.connect(busy_url, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id serial PRIMARY KEY, v text)")
            conn.execute("INSERT INTO t (v) SELECT repeat('x', 1000) FROM generate_series(1, 3000)")
        _wait_for(
            lambda: _confirmed(source.url, slot) > before + 256 * 1024,
            30,
            "the neighbour's WAL confirmed",
        )
        _wait_for(lambda: worker.status.state == "parked", 30, "and parked again")
        assert worker.status.failures == 0 and worker.status.error is None, worker.status
    _exactly_once(es, env, source)


def test_a_parked_source_sees_partitions_and_a_lock_cannot_hang_it(
    pg_database, staging_root, env, es, state_url
):
    """The look counts a partitioned table's changes (PostgreSQL counts them on the leaves)
    and takes no table lock: a session holding an exclusive lock on a tracked table, as any
    role that may update it can, neither keeps the source from parking nor hangs it."""
    ddl = (
        "CREATE TABLE events (id int, at date, note text, PRIMARY KEY (id, at))"
        " PARTITION BY RANGE (at);"
        "CREATE TABLE events_2026 PARTITION OF events"
        " FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');"
        "ALTER TABLE events_2026 REPLICA IDENTITY FULL;" + ground_truth_ddl("events")
    )
    source = make_source(pg_database, staging_root, ddl, policy_for("ev", public__events={}), env)
    worker = _worker(source, es, state_url, settings=PARKING)
    with _running(Supervisor(lambda: {"ev": worker}, lifetime=timedelta(minutes=5))):
        _wait_for(lambda: worker.status.state == "live", 30, "the worker is live")
        with psycopg.connect(source.url) as locker:
            locker.execute("LOCK TABLE events_2026 IN ACCESS EXCLUSIVE MODE")
            _wait_for(lambda: worker.status.state == "parked", 30, "parks beside the lock")
            time.sleep(1)  # a few looks while the lock is held
            assert worker.status.state == "parked", worker.status
        source.execute("INSERT INTO events VALUES (1, '2026-06-01', 'a')")
        _wait_for(lambda: len(_indexed(es, env, "ev")) == 1, 30, "the partition's change")
        assert worker.status.failures == 0, worker.status
    _exactly_once(es, env, source)


def test_a_worker_waiting_for_a_lane_keeps_its_stream(
    pg_database, staging_root, env, es, state_url
):
    """A worker that waits for a lane longer than the walsender's timeout still holds its
    stream: it tells the server it is alive while it waits (one attempt, no failure)."""
    source = _source(pg_database, staging_root, "shop", env)
    # This reader's walsender drops it after 7 s without a word (the default is 60 s).
    source.url = make_conninfo(source.url, options="-c wal_sender_timeout=7s")
    lanes = Lanes(1, 1)
    report = LiveReport()
    worker = _worker(source, es, state_url, report, lanes=lanes)
    with _running(Supervisor(lambda: {"shop": worker}, lifetime=timedelta(minutes=5))):
        _wait_for(lambda: worker.status.state == "live", 30, "the worker is live")
        with lanes.staging.held():  # another worker's long batch
            _write(source.url, 1, rows=1)
            time.sleep(16)
        _wait_for(lambda: len(_indexed(es, env, "shop")) == 1, 30, "the change is searchable")
        assert (worker.status.attempts, worker.status.failures) == (1, 0), worker.status
    _exactly_once(es, env, source)


@contextmanager
def _writing_to(url: str, stop: threading.Event):
    """A neighbour committing as fast as one connection can, until ``stop``."""

    def write() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("INSERT INTO t (v) VALUES ('x')")

    thread = threading.Thread(target=write)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def test_each_source_on_its_own_down_dropped_added_while_live(
    servers, tmp_path, env, es, state_url
):
    with ExitStack() as stack:
        urls = {
            n: stack.enter_context(new_database(servers))
            for n in ("north", "south", "east", "west")
        }
        sources = {n: _source(u, tmp_path, n, env) for n, u in urls.items()}
        report = LiveReport()
        # One lane each for staging and downstream, shared as in a run: a source that is down
        # or has lost its slot holds no lane while it waits.
        lanes = Lanes(1, 1)
        live = {
            n: _worker(sources[n], es, state_url, report, lanes=lanes)
            for n in ("north", "south", "east")
        }
        supervisor = Supervisor(
            lambda: dict(live), lifetime=timedelta(minutes=5), refresh_seconds=0.5, report=report
        )
        with _running(supervisor):
            _wait_for(
                lambda: (
                    all(s.state == "live" for s in report.statuses().values())
                    and len(report.statuses()) == 3
                ),
                30,
                "three workers live",
            )
            # east goes down, south's slot is dropped: north goes on.
            name = psycopg.conninfo.conninfo_to_dict(urls["east"])["dbname"]
            with psycopg.connect(servers.pg_url, autocommit=True) as admin:
                admin.execute(
                    sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(
                        sql.Identifier(name)
                    )
                )
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (name,),
                )
            slot = slot_name(env, "south")
            with psycopg.connect(urls["south"], autocommit=True) as conn:
                _write(urls["south"], 1)  # committed before the slot goes: lost with it
                for _ in range(50):
                    conn.execute(
                        "SELECT pg_terminate_backend(active_pid) FROM"
                        " pg_replication_slots WHERE slot_name = %s",
                        (slot,),
                    )
                    try:
                        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                        break
                    except psycopg.errors.ObjectInUse:
                        time.sleep(0.1)
            for n in range(1, 6):
                _write(urls["north"], n)
            _wait_for(
                lambda: len(_indexed(es, env, "north")) == len(ground_truth(urls["north"])),
                30,
                "north is captured while east is down and south has no slot",
            )
            _wait_for(
                lambda: (
                    report.statuses()["east"].state == "retrying"
                    and report.statuses()["south"].state == "retrying"
                ),
                30,
                "east and south report their failures",
            )
            assert "does not exist" in report.statuses()["south"].error
            assert report.statuses()["north"].state == "live"
            # A source added to the environment while the run is live gets a worker.
            live["west"] = _worker(sources["west"], es, state_url, report, lanes=lanes)
            _write(urls["west"], 1)
            _wait_for(lambda: len(_indexed(es, env, "west")) == 3, 30, "west, added, captured")
            # east comes back: its slot kept what was committed before the outage.
            _write(urls["north"], 6)
            with psycopg.connect(servers.pg_url, autocommit=True) as admin:
                admin.execute(
                    sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(name))
                )
            _write(urls["east"], 1)
            _wait_for(lambda: len(_indexed(es, env, "east")) == 3, 30, "east resumes")
            _wait_for(
                lambda: len(_indexed(es, env, "north")) == len(ground_truth(urls["north"])),
                30,
                "north goes on",
            )
            assert report.statuses()["south"].state == "retrying"
        assert report.statuses()["south"].state == "failed"
        for name in ("north", "east", "west"):
            _exactly_once(es, env, sources[name])
        assert _indexed(es, env, "south") == []
        statuses = report.statuses()
        assert statuses["south"].failures >= 1 and statuses["north"].failures == 0


def test_runs_that_reach_their_lifetime_hand_over_nothing_lost_nothing_twice(
    servers, tmp_path, env, es, state_url
):
    with ExitStack() as stack:
        urls = [stack.enter_context(new_database(servers)) for _ in range(2)]
        sources = [_source(u, tmp_path, f"s{i}", env) for i, u in enumerate(urls)]

        def run(lifetime: float) -> None:
            report = LiveReport()
            workers = {s.policy.source: _worker(s, es, state_url, report) for s in sources}
            Supervisor(lambda: workers, lifetime=timedelta(seconds=lifetime), report=report).run()
            assert all(
                s.state == "stopped" and s.error is None for s in report.statuses().values()
            ), report.statuses()

        with _writing(urls):
            for _ in range(4):  # four runs back to back, each ended by its lifetime
                run(2.5)
        run(3)  # the last takes what the writers committed since
        for source in sources:
            assert len(ground_truth(source.url)) > 30
            _exactly_once(es, env, source)


LIVE_SCRIPT = """
import sys, threading
from contextlib import nullcontext
from datetime import timedelta
from psycopg_pool import ConnectionPool
from audit_platform.live import LiveReport, LiveSettings, LiveSource, SourceWorker, Supervisor
from audit_platform.clients import elasticsearch_client
from audit_platform.settings import Settings
from audit_platform.staging import StagingStore
from audit_platform_tests.capture_support import MASK_KEY
from audit_platform_tests.helpers import policy_for
env, root, state_url, *pairs = sys.argv[1:]
es = elasticsearch_client(Settings().elasticsearch)
pool = ConnectionPool(state_url, min_size=1, max_size=4, kwargs={"autocommit": True})  # as a run
settings = LiveSettings(flush_seconds=0.2, batch_changes=50, grace=timedelta(0), idle_seconds=0.2)
workers = {}
for pair in pairs:
    name, url = pair.split("=", 1)
    policy = policy_for(name, public__orders={})
    live = LiveSource(name, (lambda u=url: u), (lambda p=policy: p), StagingStore(root, env, name),
                      "shopdb")
    workers[name] = SourceWorker(env, live, state=pool.connection, elasticsearch=lambda: nullcontext(es),
                                 mask_key=MASK_KEY, signer=None, settings=settings, report=LiveReport())
Supervisor(lambda: workers, lifetime=timedelta(minutes=10)).run()
"""


def test_a_run_killed_mid_batch_is_resumed_by_the_next_nothing_lost_nothing_twice(
    servers, tmp_path, env, es, state_url
):
    with ExitStack() as stack:
        urls = [stack.enter_context(new_database(servers)) for _ in range(3)]
        sources = [_source(u, tmp_path, f"k{i}", env) for i, u in enumerate(urls)]
        root = sources[0].store.root
        pairs = [f"{s.policy.source}={s.url}" for s in sources]
        with _writing(urls):
            process = subprocess.Popen(
                [sys.executable, "-c", LIVE_SCRIPT, env, root, state_url, *pairs],
                cwd=str(PROJECT_ROOT),
            )
            # Every source has staged and indexed batches, and goes on doing so: kill it there.
            _wait_for(
                lambda: all(_indexed(es, env, s.policy.source) for s in sources),
                60,
                "every source is captured by the run",
            )
            time.sleep(1.5)
            process.send_signal(signal.SIGKILL)
            process.wait()
            killed_at = {s.policy.source: len(s.store.files("changes")) for s in sources}
            report = LiveReport()
            workers = {s.policy.source: _worker(s, es, state_url, report) for s in sources}
            # The next run starts while the writers still write (the old walsenders may take a
            # moment to notice: the workers retry), then drains after they stop.
            supervisor = Supervisor(lambda: workers, lifetime=timedelta(minutes=5), report=report)
            stack.enter_context(_running(supervisor))
            time.sleep(2)
        _wait_for(
            lambda: all(_indexed(es, env, s.policy.source) == ground_truth(s.url) for s in sources),
            60,
            "the next run catches up",
        )
        supervisor.stop.set()
        time.sleep(1)
        for source in sources:
            assert killed_at[source.policy.source] > 0
            _exactly_once(es, env, source)


@ON_BOTH_STORES
def test_a_crash_at_every_point_of_the_live_loop_then_the_next_worker_heals_it(
    pg_database, staging_root, env, es, state_url
):
    source = _source(pg_database, staging_root, "shop", env)
    key = private_key(new_private_key())
    points = [p for p in POINTS if source.store.local or p not in LOCAL_ONLY_POINTS]

    def until_done(worker: SourceWorker) -> None:
        """A worker that stops once everything written is indexed."""
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                if _indexed(es, env, "shop") == ground_truth(source.url):
                    stop.set()
                time.sleep(0.2)

        watcher = threading.Thread(target=watch)
        watcher.start()
        timer = threading.Timer(60, stop.set)
        timer.start()
        try:
            worker.attempt(stop)
        finally:
            stop.set()
            timer.cancel()
            watcher.join()

    for n, point in enumerate(points, start=1):
        for txn in range(4):
            _write(source.url, n * 10 + txn, rows=20)
        stop = threading.Event()
        timer = threading.Timer(60, stop.set)  # no crash in 60 s fails the test below
        timer.start()
        with armed(point), pytest.raises(SimulatedCrash, match=point):
            _worker(source, es, state_url, signer=key).attempt(stop)
        timer.cancel()
        _write(source.url, n * 10 + 5)  # committed after the crash, before the next worker
        until_done(_worker(source, es, state_url, signer=key))
        _exactly_once(es, env, source)
    es.indices.refresh(index=f"audit-{env}")
    report = verify_source(
        source.store, es, source.policy, key.public_key(), since=None, until=None, window=_window()
    )
    assert report.ok, report.problems[:5]
    assert report.logged_changes == report.documents == len(ground_truth(source.url))


def test_a_schema_problem_outlives_the_run_that_read_it(
    pg_database, staging_root, env, es, state_url
):
    """A run that starts finds the tracked tables' problems in the catalog: a problem whose
    schema change an earlier run read (and confirmed, so no later run reads it again) is the
    source's problem from the next run's start."""
    source = _source(pg_database, staging_root, "shop", env)
    with connect_source(source.url) as conn:
        assert current_problems(conn, source.policy) == {}
    report = LiveReport()
    workers = {"shop": _worker(source, es, state_url, report)}

    def status() -> SourceStatus | None:
        return report.statuses().get("shop")

    with _running(Supervisor(lambda: workers, lifetime=timedelta(minutes=5), report=report)):
        _wait_for(lambda: status() and status().state == "live", 30, "the worker is live")
        source.execute("ALTER TABLE orders REPLICA IDENTITY DEFAULT")
        _wait_for(lambda: not status().healthy, 20, "the run reads the lost identity")
    with connect_source(source.url) as conn:
        found = current_problems(conn, source.policy)
        assert (
            list(found) == ["public.orders"]
            and "REPLICA IDENTITY DEFAULT" in found["public.orders"]
        )
    report = LiveReport()
    workers = {"shop": _worker(source, es, state_url, report)}
    with _running(Supervisor(lambda: workers, lifetime=timedelta(minutes=5), report=report)):
        _wait_for(lambda: status() and status().state == "live", 30, "the next run is live")
        assert not status().healthy
        assert 'ALTER TABLE "public"."orders" REPLICA IDENTITY FULL' in (status().problem or "")


def _window():
    from datetime import UTC, datetime

    return Window(datetime.now(UTC), indexing_lag=timedelta(0))


def test_schema_changes_while_live_degrade_or_stop_a_source_visibly_and_lose_nothing(
    pg_database, staging_root, env, es, state_url
):
    """docs/design.md, "Schema history": a lost replica identity is the source's problem until
    fixed; a rename the policy does not follow stops the source at the rename until the policy
    names the table, then every change (the trigger table's) is indexed exactly once."""
    source = _source(pg_database, staging_root, "shop", env)
    report = LiveReport()
    workers = {"shop": _worker(source, es, state_url, report)}

    def status():
        return report.statuses().get("shop")

    with _running(Supervisor(lambda: workers, lifetime=timedelta(minutes=5), report=report)):
        _wait_for(lambda: status() and status().state == "live", 30, "the worker is live")
        _write(source.url, 1)
        source.execute("ALTER TABLE orders REPLICA IDENTITY DEFAULT")
        _wait_for(lambda: not status().healthy, 20, "the lost identity is a problem")
        assert 'ALTER TABLE "public"."orders" REPLICA IDENTITY FULL' in (status().problem or "")
        assert status().state == "live"  # capture goes on
        _write(source.url, 2)
        source.execute("ALTER TABLE orders REPLICA IDENTITY FULL")
        _wait_for(lambda: status().healthy, 20, "the fix clears the problem")

        source.execute("ALTER TABLE orders RENAME TO orders_v2")
        source.execute("INSERT INTO orders_v2 (id, status) VALUES (9001, 'renamed')")
        _wait_for(lambda: status().state == "retrying", 20, "capture stops at the rename")
        assert "SchemaBroken" in (status().error or "")
        assert "add public.orders_v2 to the policy" in (status().error or "")
        # The operator's fix; the worker reads the policy at its next attempt.
        source.policy = policy_for("shop", public__orders={}, public__orders_v2={})
        _wait_for(lambda: status().state == "live" and status().healthy, 30, "resumed")
        source.execute("UPDATE orders_v2 SET status = 'after' WHERE id = 9001")
        truth = ground_truth(source.url)
        _wait_for(
            lambda: [r for r in _indexed(es, env, "shop") if r[1] != "ddl"] == truth,
            30,
            "every change indexed",
        )
    ddl = [r for r in _indexed(es, env, "shop") if r[1] == "ddl"]
    assert len(ddl) == 3  # identity lost, identity back, the rename
    staged = source.store.read_all("changes")
    assert staged.select("lsn", "change_index").is_duplicated().sum() == 0
    assert staged.height == len(truth) + 3
