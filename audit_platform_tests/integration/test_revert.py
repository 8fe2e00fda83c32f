"""Revert plans, applied: the SQL the API returns puts a real database back, across the type zoo
and composite keys, and its guards refuse to overwrite a later change."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from fastapi.testclient import TestClient

from audit_platform import platform_db
from audit_platform.api.main import create_app
from audit_platform.api_keys import create_key
from audit_platform.policy import SourcePolicy
from audit_platform.query.revert import plan_revert
from audit_platform.record import AuditRecord
from audit_platform.settings import ApiSettings, Settings
from audit_platform_tests.capture_support import capture_enrich_index, make_source
from audit_platform_tests.helpers import ZOO_DDL, ZOO_ROW, policy_for

LINES_DDL = """
CREATE TABLE lines (order_id int, line int, qty int, note text, PRIMARY KEY (order_id, line));
ALTER TABLE lines REPLICA IDENTITY FULL;
"""
COLUMNS = [c for c in ZOO_ROW if c != "id"]


def _snapshot(url: str) -> dict[str, list[tuple]]:
    """Every row of both tables, each value in its text form."""
    with psycopg.connect(url) as conn:
        zoo_columns = ", ".join(f"{c}::text" for c in ZOO_ROW)
        return {
            "zoo": conn.execute(f"SELECT {zoo_columns} FROM zoo ORDER BY id").fetchall(),
            "lines": conn.execute(
                "SELECT order_id, line, qty, note FROM lines ORDER BY 1, 2"
            ).fetchall(),
        }


def _in_request(url: str, request_id: str, *statements: str) -> None:
    context = {"actor": {"type": "job", "id": "nightly"}, "request_id": request_id}
    with psycopg.connect(url) as conn:
        conn.execute("SELECT audit.set_context(%s::jsonb)", (json.dumps(context),))
        for statement in statements:
            conn.execute(statement)


@pytest.fixture
def shop(servers, pg_database, es, tmp_path):
    env = f"rev_{uuid.uuid4().hex[:8]}"
    policy = policy_for("zoo", public__zoo={}, public__lines={})
    source = make_source(pg_database, tmp_path, ZOO_DDL + LINES_DDL, policy, env=env)
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO zoo (id, {', '.join(COLUMNS)}) VALUES "
            f"(1, {', '.join(['%s'] * len(COLUMNS))})",
            [ZOO_ROW[c] for c in COLUMNS],
        )
        conn.execute("INSERT INTO zoo (id) VALUES (2)")  # every other column NULL
        conn.execute("INSERT INTO zoo (id, txt, jb) VALUES (3, 'three', '[]')")
        conn.execute("INSERT INTO lines VALUES (1, 1, 2, 'a'), (1, 2, 5, NULL)")
    with psycopg.connect(servers.pg_url, autocommit=True) as state:
        platform_db.install(state, Settings().resources_dir / "sql")

        def sync() -> None:
            capture_enrich_index(source, state, es, grace=timedelta(0))

        sync()
        key = create_key(state, env, "revert").secret
        with TestClient(create_app(Settings(env=env, api=ApiSettings(key_cache_seconds=0)))) as api:
            api.headers["X-API-Key"] = key
            yield pg_database, api, sync
    for index in es.indices.get(index=f"audit-{env}-*", expand_wildcards="all"):
        es.indices.delete(index=index)
    es.indices.delete_index_template(name=f"audit-{env}")


BROKEN_JOB = (
    "UPDATE zoo SET num = 1, num_scaled = 2.5, f8 = 0.1, txt = 'broken', bin = '\\xdead',"
    " flag = true, tstz = now(), iv = '1 second', j = '{\"x\": null}', jb = '{}',"
    " arr = '{9}', tarr = '{}', m = 'sad', r = 'empty', tsr = NULL, ip = '10.0.0.1',"
    " bits = '1' WHERE id = 1",
    "DELETE FROM zoo WHERE id = 2",
    "INSERT INTO zoo (id, txt, jb) VALUES (4, 'inserted', '{\"k\": [1]}')",
    "UPDATE lines SET qty = 99, note = 'it''s broken' WHERE order_id = 1 AND line = 1",
    "DELETE FROM lines WHERE order_id = 1 AND line = 2",
    "INSERT INTO lines VALUES (2, 1, 1, 'new')",
)


def test_a_revert_plan_puts_every_row_back_across_the_type_zoo(shop):
    url, api, sync = shop
    before = _snapshot(url)
    _in_request(url, "req-broken", *BROKEN_JOB[:3])
    _in_request(url, "req-broken", *BROKEN_JOB[3:])  # a second transaction, same request
    sync()
    assert _snapshot(url) != before

    reply = api.get("/v1/requests/req-broken/revert")
    assert reply.status_code == 200, reply.text
    plan = reply.json()
    assert plan["changes"] == 6 and plan["conflicts"] == []
    [source] = plan["sources"]
    # Newest first: the second transaction's changes, from its last, then the first's.
    assert [s["action"] for s in source["statements"]] == [
        "delete",
        "insert",
        "update",
        "delete",
        "insert",
        "update",
    ]
    script = api.get("/v1/requests/req-broken/revert", params={"format": "sql"})
    assert script.headers["content-type"].startswith("application/sql")
    assert "attachment" in script.headers["content-disposition"]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(script.text)
    assert _snapshot(url) == before


def test_a_guard_stops_the_whole_plan_when_a_row_changed_later(shop):
    url, api, sync = shop
    _in_request(url, "req-broken", *BROKEN_JOB)
    _in_request(url, "req-fix", "UPDATE zoo SET txt = 'fixed by hand' WHERE id = 1")
    sync()
    plan = api.get("/v1/requests/req-broken/revert").json()
    [conflict] = plan["conflicts"]
    assert conflict["kind"] == "later_change" and "zoo 1" in conflict["detail"]
    current = _snapshot(url)
    script = api.get("/v1/requests/req-broken/revert", params={"format": "sql"}).text
    assert script.startswith("-- conflict (later_change)")
    with (
        psycopg.connect(url, autocommit=True) as conn,
        pytest.raises(psycopg.errors.RaiseException, match=r"revert stopped at 6/6: public.zoo 1"),
    ):
        conn.execute(script)
    assert _snapshot(url) == current  # nothing applied: the plan is one transaction


def test_plans_for_a_transaction_a_job_run_and_an_actor_window(shop):
    url, api, sync = shop
    with psycopg.connect(url) as conn:
        conn.execute("""SELECT audit.set_context('{"actor": {"type": "job", "id": "nightly"},
                        "job": {"name": "nightly", "run_id": "run-1"}}')""")
        conn.execute("UPDATE lines SET qty = 0")
        xid = int(conn.execute("SELECT pg_current_xact_id()::text").fetchone()[0])
    sync()
    by_transaction = api.get(f"/v1/transactions/zoo/{xid}/revert").json()
    by_run = api.get("/v1/jobs/nightly/runs/run-1/revert").json()
    assert [s["statements"] for s in by_transaction["sources"]] == [
        s["statements"] for s in by_run["sources"]
    ]
    assert [s["action"] for s in by_run["sources"][0]["statements"]] == ["update", "update"]
    since = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    by_actor = api.get("/v1/actors/nightly/revert", params={"since": since}).json()
    assert by_actor["changes"] == 2
    assert api.get("/v1/jobs/nightly/runs/run-2/revert").status_code == 404
    assert api.get("/v1/actors/nightly/revert").status_code == 422  # since is required


_TX = {"xid": 1, "commit_lsn": "0/1", "lsn": 1, "change_index": 0}


def _record(operation: str, before: dict | None, after: dict | None, **extra) -> AuditRecord:
    return AuditRecord.model_validate(
        {
            "id": f"dev:shop:{uuid.uuid4().hex[:8]}:0",
            "@timestamp": datetime.now(UTC),
            "env": "dev",
            "source": {"service": "shop", "database": "shop"},
            "table": {"schema": "public", "name": "customers"},
            "operation": operation,
            "event": {"action": operation, "type": ["change"]},
            "object_id": "1",
            "changed_columns": ["email", "name"] if operation == "update" else [],
            "before": before,
            "after": after,
            "values_text": "",
            "context": None,
            "user": {},
            "service": {},
            "trace": {},
            "client": {},
            "attribution": {"status": "unattributed"},
            "transaction": _TX,
            "row": {"key": ["id"], "types": {"id": "integer", "name": "text", "email": "text"}},
            "policy_version": "1",
            "ingested_at": datetime.now(UTC),
            **extra,
        }
    )


def test_masked_excluded_and_truncated_values_are_conflicts_never_guesses():
    policy = SourcePolicy.model_validate(
        {
            "source": "shop",
            "version": 1,
            "tables": {"public.customers": {"mask": ["email"], "exclude": ["password_hash"]}},
        }
    )
    update = _record(
        "update",
        {"id": "1", "name": "Ada", "email": "h1"},
        {"id": "1", "name": "Bob", "email": "h2"},
    )
    delete = _record("delete", {"id": "1", "name": "Ada", "email": "h1"}, None)
    truncate = _record("truncate", None, None, object_id=None)
    shape = {"schema": "public", "table": "customers", "columns": {"id": "integer"}}
    ddl = _record("ddl", shape, {**shape, "columns": {}}, object_id=None)
    plan = plan_revert(
        {"test": "1"},
        [update, delete, truncate, ddl],
        {"shop": policy},
        generated_at=datetime.now(UTC),
    )
    kinds = sorted(c.kind for c in plan.conflicts)
    assert kinds == ["excluded", "masked", "masked", "schema_change", "truncate"]
    assert ddl.id not in {s.record_id for s in plan.sources[0].statements}
    sql = {s.record_id: s.sql for s in plan.sources[0].statements}
    assert "email" not in sql[update.id].split("WHERE")[0]  # the hash is never written back
    assert "\"name\" = 'Ada'::text" in sql[update.id]
    assert '"email"' not in sql[delete.id].split("SELECT")[0]
    assert truncate.id not in sql


def test_a_snapshot_that_read_the_change_s_row_is_no_later_change_but_any_other_is():
    policy = SourcePolicy.model_validate(
        {"source": "shop", "version": 1, "tables": {"public.customers": {}}}
    )
    row = {"id": "1", "name": "Bob", "email": "b@example.com"}
    update = _record("update", {**row, "name": "Ada"}, row)
    later = {
        "snapshot": _record("snapshot", None, row, transaction={**_TX, "lsn": 2}),
        # A snapshot that read something else: a change the trail does not have (a gap).
        "snapshot of another row": _record(
            "snapshot", None, {**row, "name": "Di"}, transaction={**_TX, "lsn": 2}
        ),
        "update": _record("update", row, {**row, "name": "Cy"}, transaction={**_TX, "lsn": 3}),
    }
    for kind, change in later.items():
        plan = plan_revert(
            {"test": "1"}, [update], {"shop": policy}, [change], generated_at=datetime.now(UTC)
        )
        assert [c.later_record_id for c in plan.conflicts] == (
            [] if kind == "snapshot" else [change.id]
        ), kind


def test_a_literal_is_data_and_an_identifier_is_quoted():
    odd = _record(
        "update",
        {"id": "1", "name": "O'Brien $revert$ %s", "email": None},
        {"id": "1", "name": "x", "email": None},
        row={"key": ["id"], "types": {"id": "integer", "name": "text", "email": "text"}},
    )
    plan = plan_revert({"test": "1"}, [odd], {}, generated_at=datetime.now(UTC))
    script = plan.sources[0].script
    assert "'O''Brien $revert$ %s'::text" in script
    assert "DO $revert$" not in script  # the tag changes when a value holds it
