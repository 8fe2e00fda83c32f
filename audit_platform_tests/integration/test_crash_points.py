"""Invariant 1, deterministically: a crash at every crash point of capture, enrichment and
indexing, then a rerun, ends with Elasticsearch holding exactly what an independent trigger-based
audit table saw, value by value, nothing missing, nothing twice.

Each point of :data:`audit_platform.faults.POINTS` is hit on purpose (a random SIGKILL, kept in
test_capture.py, lands wherever it lands). The ground truth is a classic trigger audit table in
the source database, which the platform never reads.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from audit_platform import platform_db
from audit_platform.enrich.batch import enrich_pending
from audit_platform.faults import LOCAL_ONLY_POINTS, POINTS, SimulatedCrash, armed
from audit_platform.index import feed
from audit_platform.index.batch import index_pending
from audit_platform.index.template import install_template
from audit_platform.naming import read_alias
from audit_platform.settings import Settings
from audit_platform.signing import new_private_key, private_key
from audit_platform.trust.log import TrustLog
from audit_platform.verify import Window, verify_source
from audit_platform_tests.capture_support import make_source
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


def _write_round(url: str, n: int) -> None:
    """Transactions of a service, with context: inserts, an update of many rows, a delete."""
    with psycopg.connect(url) as conn:
        for txn in range(4):
            conn.execute(
                "SELECT audit.set_context(%s::jsonb)",
                (json.dumps({"actor": {"type": "user", "id": f"u{n}"}, "reason": f"r{txn}"}),),
            )
            base = n * 1000 + txn * 100
            conn.execute(
                "INSERT INTO orders (id, status, note) SELECT g, 'new', 'ü ' || g"
                " FROM generate_series(%s::int, %s::int) g",
                (base, base + 9),
            )
            conn.commit()
        conn.execute("""SELECT audit.set_context('{"actor": {"type": "job", "id": "nightly"}}')""")
        conn.execute("UPDATE orders SET status = 'paid', note = NULL WHERE id %% 3 = %s", (n % 3,))
        conn.execute("DELETE FROM orders WHERE id = %s", (n * 1000 + 5,))
        conn.commit()


def _indexed(es, env: str) -> list[tuple]:
    es.indices.refresh(index=read_alias(env))
    hits = es.search(index=read_alias(env), size=10_000, query={"match_all": {}})["hits"]
    assert hits["total"]["value"] < 10_000
    return sorted(record_tuple(d["_source"]) for d in hits["hits"])


@pytest.fixture
def pipeline(pg_database, es, staging_root):
    env = f"crash_{uuid.uuid4().hex[:8]}"
    source = make_source(pg_database, staging_root, DDL, policy_for("shop", public__orders={}), env)
    install_template(es, Settings().resources_dir, env, replicas=0)
    with psycopg.connect(pg_database, autocommit=True) as state:
        platform_db.install(state, Settings().resources_dir / "sql")

        key = private_key(new_private_key())

        def run() -> None:
            """One capture run's steps, with small batches so a run has several; signed."""
            source.capture(batch_changes=7)
            now = datetime.now(UTC)
            enrich_pending(source.store, state, source.policy, now=now, grace=timedelta(0))
            index_pending(es, source.store, database="shopdb", now=now, feed=state)
            TrustLog(source.store).checkpoint(key, now)

        def verify():
            es.indices.refresh(index=f"audit-{env}")
            window = Window(datetime.now(UTC), indexing_lag=timedelta(0))
            return verify_source(
                source.store,
                es,
                source.policy,
                key.public_key(),
                since=None,
                until=None,
                window=window,
            )

        yield source, run, env, verify
    for index in es.indices.get(index=f"audit-{env}-*", expand_wildcards="all"):
        es.indices.delete(index=index)
    es.indices.delete_index_template(name=f"audit-{env}")


@ON_BOTH_STORES
def test_a_crash_at_every_point_then_a_rerun_indexes_exactly_the_ground_truth(pipeline, es):
    source, run, env, verify = pipeline
    points = [p for p in POINTS if source.store.local or p not in LOCAL_ONLY_POINTS]
    for n, point in enumerate(points, start=1):
        _write_round(source.url, n)
        with armed(point), pytest.raises(SimulatedCrash, match=point):
            run()
        run()  # the next run heals what the crash left
        truth = ground_truth(source.url)
        assert _indexed(es, env) == truth, f"after a crash at {point}"
        staged = source.store.read_all("changes")
        assert staged.select("lsn", "change_index").is_duplicated().sum() == 0, point
        assert staged.height == len(truth), point
        assert source.store.pending() == [], point
        # The trail holds each change once, in commit order, signed: a crash never forks it.
        report = verify()
        assert report.ok, (point, report.problems[:5])
        assert report.logged_changes == report.documents == len(truth), point
        # Streams read what indexing did from the feed: every record is in it, whatever the
        # crash (a crash after the feed and before the ledger adds no second entry).
        with psycopg.connect(source.url, autocommit=True) as state:
            fed = feed.entries(state, env, "shop", 0, 100_000)
        assert sum(len(entry.records_in(source.store)) for entry in fed) == len(truth), point
    assert len(truth) > 300
