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
from audit_platform.faults import POINTS, SimulatedCrash, armed
from audit_platform.index.batch import index_pending
from audit_platform.index.template import install_template
from audit_platform.naming import read_alias
from audit_platform.settings import Settings
from audit_platform_tests.capture_support import make_source
from audit_platform_tests.helpers import policy_for

DDL = """
CREATE TABLE orders (id int PRIMARY KEY, status text, note text);
ALTER TABLE orders REPLICA IDENTITY FULL;
CREATE TABLE truth (seq bigserial PRIMARY KEY, xid bigint, op text, before jsonb, after jsonb);
CREATE FUNCTION record_truth() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO truth (xid, op, before, after) VALUES (
        txid_current() % 4294967296, lower(TG_OP),
        CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END,
        CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END);
    RETURN NULL;
END $$;
CREATE TRIGGER orders_truth AFTER INSERT OR UPDATE OR DELETE ON orders
    FOR EACH ROW EXECUTE FUNCTION record_truth();
"""


def _text(image: dict | None) -> dict | None:
    return None if image is None else {k: None if v is None else str(v) for k, v in image.items()}


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


def _truth(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT xid, op, before, after FROM truth ORDER BY seq").fetchall()
    return sorted((xid, op, json.dumps(_text(b), sort_keys=True), json.dumps(_text(a),
                   sort_keys=True)) for xid, op, b, a in rows)  # fmt: skip


def _indexed(es, env: str) -> list[tuple]:
    es.indices.refresh(index=read_alias(env))
    hits = es.search(index=read_alias(env), size=10_000, query={"match_all": {}})["hits"]
    assert hits["total"]["value"] < 10_000
    return sorted(
        (d["_source"]["transaction"]["xid"], d["_source"]["operation"],
         json.dumps(_text(d["_source"]["before"]), sort_keys=True),
         json.dumps(_text(d["_source"]["after"]), sort_keys=True))
        for d in hits["hits"]
    )  # fmt: skip


@pytest.fixture
def pipeline(pg_database, es, tmp_path):
    env = f"crash_{uuid.uuid4().hex[:8]}"
    source = make_source(pg_database, tmp_path, DDL, policy_for("shop", public__orders={}), env)
    install_template(es, Settings().resources_dir, env, replicas=0)
    with psycopg.connect(pg_database, autocommit=True) as state:
        platform_db.install(state, Settings().resources_dir / "sql")

        def run() -> None:
            """One capture run's three steps, with small batches so a run has several."""
            source.capture(batch_changes=7)
            now = datetime.now(UTC)
            enrich_pending(source.store, state, source.policy, now=now, grace=timedelta(0))
            index_pending(es, source.store, database="shopdb", now=now)

        yield source, run, env
    for index in es.indices.get(index=f"audit-{env}-*", expand_wildcards="all"):
        es.indices.delete(index=index)
    es.indices.delete_index_template(name=f"audit-{env}")


def test_a_crash_at_every_point_then_a_rerun_indexes_exactly_the_ground_truth(pipeline, es):
    source, run, env = pipeline
    for n, point in enumerate(POINTS, start=1):
        _write_round(source.url, n)
        with armed(point), pytest.raises(SimulatedCrash, match=point):
            run()
        run()  # the next run heals what the crash left
        truth = _truth(source.url)
        assert _indexed(es, env) == truth, f"after a crash at {point}"
        staged = source.store.read_all("changes")
        assert staged.select("lsn", "change_index").is_duplicated().sum() == 0, point
        assert staged.height == len(truth), point
        assert source.store.pending() == [], point
    assert len(truth) > 300
