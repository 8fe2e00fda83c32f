"""The trail's log and checkpoints against tampering, on real servers: a real capture is logged,
signed and indexed, then Elasticsearch, staging and the log are changed the ways an attacker
with write access would, and ``verify`` must name each change exactly, and pass when nothing
was touched."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import polars as pl
import psycopg
import pytest
from fastapi.testclient import TestClient

from audit_platform import platform_db
from audit_platform.api.main import create_app
from audit_platform.api_keys import create_key
from audit_platform.index.documents import documents
from audit_platform.index.template import install_template
from audit_platform.naming import index_name, legacy_index_name, read_alias
from audit_platform.read_log import append_reads, read_rows, read_trail
from audit_platform.record import RECORD_SCHEMA
from audit_platform.settings import ApiSettings, Settings
from audit_platform.signing import new_private_key, private_key, public_text, sign
from audit_platform.staging import StagingStore
from audit_platform.trust.leaves import LEAF_SCHEMA, canonical
from audit_platform.trust.log import TrustLog
from audit_platform.trust.merkle import leaf_hash, root, verify_consistency
from audit_platform.verify import (
    derived_mismatches,
    verify_reads,
)
from audit_platform_tests.capture_support import CaptureSource, Trail, make_source
from audit_platform_tests.helpers import offline, policy_for

DDL = """
CREATE TABLE orders (id int PRIMARY KEY, status text, note text);
ALTER TABLE orders REPLICA IDENTITY FULL;
"""
ALICE = {"actor": {"type": "user", "id": "alice"}, "reason": "refund", "request_id": "r-1"}


@pytest.fixture
def trail(pg_database, es, tmp_path):
    env = f"trust_{uuid.uuid4().hex[:8]}"
    source = make_source(pg_database, tmp_path, DDL, policy_for("shop", public__orders={}), env)
    install_template(es, Settings().resources_dir, env, replicas=0)
    with psycopg.connect(pg_database, autocommit=True) as state:
        platform_db.install(state, Settings().resources_dir / "sql")
        found = Trail(source, state, es, private_key(new_private_key()), env)
        found.write(
            "INSERT INTO orders SELECT i, 'new', 'n' || i FROM generate_series(1, 5) i", ALICE
        )
        found.write("UPDATE orders SET status = 'paid' WHERE id = 2", {**ALICE, "reason": "pay"})
        orphan = found.write("DELETE FROM orders WHERE id = 5")  # no context: unattributed
        found.run()
        with psycopg.connect(pg_database, autocommit=True) as conn:  # later: it becomes late
            conn.execute(
                "SELECT audit.attach_context(%s::text::xid8, %s::jsonb)",
                (orphan, json.dumps({"actor": {"type": "job", "id": "cleanup"}})),
            )
        found.write("UPDATE orders SET note = 'x' WHERE id = 3", ALICE)
        found.run()
        yield found
    for index in es.indices.get(index=f"audit-{env}-*", expand_wildcards="all"):
        es.indices.delete(index=index)
    es.indices.delete_index_template(name=f"audit-{env}")


def kinds(report) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for finding in report.problems:
        found.setdefault(finding.kind, []).append(finding.subject)
    return found


def doc(trail: Trail, op: str, status: str | None = None) -> dict:
    for hit in trail.hits():
        if hit["_source"]["operation"] == op and (
            status is None or hit["_source"]["attribution"]["status"] == status
        ):
            return hit
    raise AssertionError(f"no {op} document")


def test_an_untouched_trail_verifies(trail):
    report = trail.verify()
    assert report.ok, report.problems
    assert report.documents == report.logged_changes == 8
    assert report.staged_changes == 8 and report.checkpoints == 2
    late = doc(trail, "delete")["_source"]
    assert late["attribution"]["status"] == "late"  # the attached context is logged and checked
    assert report.log_size == 8 + 3 + 1  # changes, three own contexts, one attachment


def test_an_altered_document_is_named(trail):
    hit = doc(trail, "update")
    source = hit["_source"]
    source["after"]["status"] = "refunded"
    trail.es.index(index=hit["_index"], id=hit["_id"], document=source, refresh=True)
    report = trail.verify()
    # Its free-text field no longer matches its values either: one record, named twice.
    assert kinds(report) == {"altered": [hit["_id"]], "derived_altered": [hit["_id"]]}


def test_a_document_with_another_actor_is_named(trail):
    hit = doc(trail, "insert")
    source = hit["_source"]
    source["context"]["actor"]["id"] = "mallory"
    source["user"]["id"] = "mallory"  # derived fields made consistent too: the log still knows
    trail.es.index(index=hit["_index"], id=hit["_id"], document=source, refresh=True)
    assert kinds(trail.verify()) == {"context_altered": [hit["_id"]]}


def test_every_document_of_a_transaction_is_held_to_the_logged_context(trail):
    """Verify rebuilds a transaction's context leaf once for the documents that claim the very
    same context: the others, each with another actor, are each named."""
    inserts = [h for h in trail.hits() if h["_source"]["operation"] == "insert"]
    assert len(inserts) == 5
    for hit in inserts[1:]:  # the first, untouched, is checked first
        source = hit["_source"]
        source["context"]["actor"]["id"] = "mallory"
        source["user"]["id"] = "mallory"
        trail.es.index(index=hit["_index"], id=hit["_id"], document=source, refresh=True)
    found = kinds(trail.verify())
    assert sorted(found.pop("context_altered")) == sorted(h["_id"] for h in inserts[1:])
    assert found == {}


def test_a_record_moved_to_another_organization_is_named(pg_database, es, tmp_path):
    """A row's organization (its policy's column) is committed by its change leaf: a document
    moved to another tenant, with its derived field made to agree, is still caught."""
    env = f"trust_{uuid.uuid4().hex[:8]}"
    ddl = "CREATE TABLE accounts (id int PRIMARY KEY, org text, note text);"
    policy = policy_for("shop", public__accounts={"organization": "org"})
    source = make_source(pg_database, tmp_path, ddl, policy, env)
    install_template(es, Settings().resources_dir, env, replicas=0)
    try:
        with psycopg.connect(pg_database, autocommit=True) as state:
            platform_db.install(state, Settings().resources_dir / "sql")
            trail = Trail(source, state, es, private_key(new_private_key()), env)
            trail.write("INSERT INTO accounts VALUES (1, 'acme', 'a'), (2, NULL, 'b')", ALICE)
            trail.run()
            assert trail.verify().ok
            hits = {h["_source"]["object_id"]: h for h in trail.hits()}
            assert hits["1"]["_source"]["row"]["organization"] == "acme"
            assert hits["2"]["_source"]["row"]["organization"] == ""  # a row naming none
            hit = hits["1"]
            moved = hit["_source"]
            moved["row"]["organization"] = moved["organization"]["id"] = "globex"
            es.index(index=hit["_index"], id=hit["_id"], document=moved, refresh=True)
            assert kinds(trail.verify()) == {"altered": [hit["_id"]]}
    finally:
        for index in es.indices.get(index=f"audit-{env}-*", expand_wildcards="all"):
            es.indices.delete(index=index)
        es.indices.delete_index_template(name=f"audit-{env}")


def test_naming_a_tables_organization_column_later_leaves_earlier_changes_as_logged(
    pg_database, es, tmp_path
):
    """The column is staged with each change, so a policy that names it later applies to
    later changes only: verification, which enriches staged changes again, still finds the
    earlier ones as their leaves were logged."""
    env = f"trust_{uuid.uuid4().hex[:8]}"
    ddl = "CREATE TABLE accounts (id int PRIMARY KEY, org text, note text);"
    before = policy_for("shop", public__accounts={})
    source = make_source(pg_database, tmp_path, ddl, before, env)
    install_template(es, Settings().resources_dir, env, replicas=0)
    try:
        with psycopg.connect(pg_database, autocommit=True) as state:
            platform_db.install(state, Settings().resources_dir / "sql")
            trail = Trail(source, state, es, private_key(new_private_key()), env)
            trail.write("INSERT INTO accounts VALUES (1, 'acme', 'a')", ALICE)
            trail.run()
            after = policy_for("shop", public__accounts={"organization": "org"})
            trail.source = CaptureSource(source.url, env, after, source.store)
            trail.write("INSERT INTO accounts VALUES (2, 'acme', 'b')", ALICE)
            trail.run()
            report = trail.verify()
            assert report.ok, report.problems
            assert report.staged_changes == 2
            rows = {h["_source"]["object_id"]: h["_source"]["row"] for h in trail.hits()}
            assert rows["1"]["organization"] is None and rows["2"]["organization"] == "acme"
    finally:
        for index in es.indices.get(index=f"audit-{env}-*", expand_wildcards="all"):
            es.indices.delete(index=index)
        es.indices.delete_index_template(name=f"audit-{env}")


def test_a_derived_field_out_of_step_with_the_facts_is_named(trail):
    hit = doc(trail, "insert")
    source = hit["_source"]
    source["user"]["id"] = "mallory"
    trail.es.index(index=hit["_index"], id=hit["_id"], document=source, refresh=True)
    report = trail.verify()
    assert kinds(report) == {"derived_altered": [hit["_id"]]}
    assert "user" in report.problems[0].detail


def test_a_document_in_another_retention_class_index_is_named(trail):
    """Sources share the indices of their class: a document moved to another class's index
    (where a reader scoped by index, or retention, would treat it by the wrong period) is
    named, as is every document when the source's class says they belong elsewhere."""
    hit = doc(trail, "insert")
    committed = datetime.fromisoformat(hit["_source"]["@timestamp"])
    elsewhere = index_name(trail.env, "long", committed.year, committed.month)
    trail.es.index(index=elsewhere, id=hit["_id"], document=hit["_source"], refresh=True)
    trail.es.delete(index=hit["_index"], id=hit["_id"], refresh=True)
    report = trail.verify()
    assert kinds(report) == {"derived_altered": [hit["_id"]]}
    assert "index" in report.problems[0].detail
    others = {h["_id"] for h in trail.hits()} - {hit["_id"]}
    assert set(kinds(trail.verify(retention_class="long"))["derived_altered"]) == others


def test_a_document_left_in_the_layout_per_source_is_named_with_what_to_do(trail):
    hit = doc(trail, "update")
    committed = datetime.fromisoformat(hit["_source"]["@timestamp"])
    old = legacy_index_name(trail.env, "shop", committed.year, committed.month)
    trail.es.index(index=old, id=hit["_id"], document=hit["_source"], refresh=True)
    trail.es.delete(index=hit["_index"], id=hit["_id"], refresh=True)
    report = trail.verify()
    assert kinds(report) == {"derived_altered": [hit["_id"]]}
    assert "run audit-platform index migrate" in report.problems[0].detail


def test_a_deleted_document_is_named(trail):
    hit = doc(trail, "delete")
    trail.es.delete(index=hit["_index"], id=hit["_id"], refresh=True)
    assert kinds(trail.verify()) == {"removed": [hit["_id"]]}


def test_a_forged_document_is_named(trail):
    hit = doc(trail, "insert")
    forged_id = hit["_id"].rsplit(":", 1)[0] + ":99"
    source = {
        **hit["_source"],
        "transaction": {**hit["_source"]["transaction"], "change_index": 99},
    }
    trail.es.index(index=hit["_index"], id=forged_id, document=source, refresh=True)
    assert kinds(trail.verify()) == {"inserted": [forged_id]}


def test_two_records_swapped_are_both_named(trail):
    first, second = [h for h in trail.hits() if h["_source"]["operation"] == "insert"][:2]
    for hit, other in ((first, second), (second, first)):
        trail.es.index(index=hit["_index"], id=hit["_id"], document=other["_source"])
    trail.es.indices.refresh(index=read_alias(trail.env))
    report = kinds(trail.verify())
    assert sorted(report.pop("altered")) == sorted([first["_id"], second["_id"]])
    assert set(report) <= {"derived_altered"}


def test_an_edited_staged_file_is_named(trail):
    store = trail.source.store
    path = store.files("changes")[0]
    staged = store.read([path]).drop("file")
    edited = staged.with_columns(
        pl.when(pl.col("change_index") == 0)
        .then(pl.col("after").str.replace('"new"', '"void"'))
        .otherwise(pl.col("after"))
        .alias("after")
    )
    store.write_file(path, edited)
    first = staged.sort("lsn", "change_index").row(0, named=True)
    report = trail.verify()
    assert {f.kind for f in report.problems} == {"staged_altered"}
    assert {f.subject for f in report.problems} == {f"{trail.env}:shop:{first['lsn']:016X}:0"}


def test_leaves_reordered_in_the_log_are_named_and_break_the_checkpoint(trail):
    log = TrustLog(trail.source.store)
    path = log.leaf_files()[0]
    leaves = pl.read_parquet(path)
    a, b = leaves.filter(pl.col("kind") == "change")["position"].to_list()[:2]
    swapped = leaves.with_columns(
        pl.when(pl.col("position") == a)
        .then(b)
        .when(pl.col("position") == b)
        .then(a)
        .otherwise(pl.col("position"))
        .alias("position")
    )
    trail.source.store.write_file(path, swapped)
    report = kinds(trail.verify())
    assert report["out_of_order"] and set(report) == {"out_of_order", "checkpoint_root"}


def test_a_dropped_or_forged_checkpoint_is_named(trail):
    log = TrustLog(trail.source.store)
    (first_path, first), (second_path, second) = log.checkpoints()
    trail.source.store.fs.rm(first_path)
    report = kinds(trail.verify())
    assert set(report) == {"checkpoint_missing"} and "checkpoint 0" in report["checkpoint_missing"]
    trail.source.store.write_json(first_path, first)
    forged = {**second, "checkpoint": {**second["checkpoint"], "root": "00" * 32}}
    trail.source.store.write_json(second_path, forged)
    report = kinds(trail.verify())
    assert set(report) == {"checkpoint_forged", "checkpoint_root"}
    # Re-signed with another key: still forged, whatever the root says.
    other = private_key(new_private_key())
    body = second["checkpoint"]
    trail.source.store.write_json(
        second_path, {"checkpoint": body, "signature": sign(other, canonical(body))}
    )
    assert set(kinds(trail.verify())) == {"checkpoint_forged"}


def test_a_leaves_file_removed_from_the_log_is_named(trail):
    log = TrustLog(trail.source.store)
    trail.source.store.fs.rm(log.leaf_files()[-1])
    report = kinds(trail.verify())
    assert report["leaves_missing"] and "inserted" in report


# --- the API's evidence, checked offline ---------------------------------------------------


@pytest.fixture
def api(trail, tmp_path):
    settings = Settings(
        env=trail.env,
        staging_root=trail.source.store.root,
        pg_url=trail.source.url,
        api=ApiSettings(key_cache_seconds=0),
        verify_key=public_text(trail.key.public_key()),
    )
    keys = {
        role: create_key(trail.state, trail.env, role, role=role).secret
        for role in ("reader", "auditor")
    }
    with TestClient(create_app(settings)) as client:
        yield client, keys


def test_a_proof_verifies_offline_and_fails_for_an_altered_record(trail, api, tmp_path):
    client, keys = api
    public = public_text(trail.key.public_key())
    for hit in trail.hits():
        answer = client.get(
            f"/v1/events/{hit['_id']}/proof", headers={"X-API-Key": keys["auditor"]}
        )
        assert answer.status_code == 200, answer.text
        proof = answer.json()
        kinds_proven = sorted(p["kind"] for p in proof["leaves"])
        status = hit["_source"]["attribution"]["status"]
        assert kinds_proven == sorted(
            {"attributed": ["change", "context"], "late": ["change", "attach"]}.get(
                status, ["change"]
            )
        )
        checked = offline(proof, tmp_path, public)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    # The record as someone changed it (the proof itself untouched) does not verify.
    proof["record"]["after" if proof["record"]["after"] else "before"]["note"] = "edited"
    checked = offline(proof, tmp_path, public)
    assert checked.returncode == 1 and "NOT in the log" in checked.stdout
    # Nor does a genuine proof against a checkpoint signed with another key.
    other = public_text(private_key(new_private_key()).public_key())
    assert offline(answer.json(), tmp_path, other).returncode == 1


def test_checkpoints_come_with_consistency_proofs(trail, api):
    client, keys = api
    answer = client.get(
        "/v1/checkpoints", params={"source": "shop"}, headers={"X-API-Key": keys["auditor"]}
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    newer, older = (c["checkpoint"] for c in body["checkpoints"])
    assert body["public_key"] == public_text(trail.key.public_key())
    sizes = {"first": older["tree_size"], "second": newer["tree_size"]}
    proof = client.get(
        "/v1/checkpoints",
        params={"source": "shop", **sizes},
        headers={"X-API-Key": keys["auditor"]},
    ).json()["consistency"]
    assert verify_consistency(
        sizes["first"],
        sizes["second"],
        bytes.fromhex(older["root"]),
        bytes.fromhex(newer["root"]),
        [bytes.fromhex(h) for h in proof["proof"]],
    )


def test_a_reader_cannot_read_the_read_log_or_proofs_and_every_read_is_logged(trail, api):
    client, keys = api
    reader, auditor = ({"X-API-Key": keys[r]} for r in ("reader", "auditor"))
    assert (
        client.get("/v1/events", params={"query": "op:update"}, headers=reader).status_code == 200
    )
    event_id = trail.hits()[0]["_id"]
    for path in ("/v1/reads", f"/v1/events/{event_id}/proof", "/v1/checkpoints?source=shop"):
        refused = client.get(path, headers=reader)
        assert refused.status_code == 403 and "auditor" in refused.json()["detail"], path
    export = client.get("/v1/export", params={"format": "ndjson"}, headers=reader)
    exported = len(export.text.splitlines())
    rows = client.get("/v1/reads", headers=auditor).json()
    reader_id = keys["reader"].split("_")[1]
    mine = [(r["route"], r["status"], r["returned"]) for r in rows if r["key_id"] == reader_id]
    assert ("/v1/events", 200, 2) in mine  # two updates
    assert ("/v1/reads", 403, 0) in mine and ("/v1/export", 200, exported) in mine
    assert exported == 8
    searched = next(r for r in rows if r["route"] == "/v1/events")
    assert searched["params"] == {"query": "op:update"}
    # A NUL in a filter (PostgreSQL text cannot hold one) is still a logged read.
    client.get("/v1/events", params={"q": "a\x00b"}, headers=reader)
    rows = client.get(
        "/v1/reads", params={"key_id": reader_id, "limit": 1000}, headers=auditor
    ).json()
    assert any(r["params"] == {"q": "a\ufffdb"} for r in rows)


def test_checkpoints_proofs_and_the_read_log_stay_within_an_auditors_scope(trail, api):
    """A source's evidence goes to keys that may read all of it; the read log shows a scoped
    auditor the reads of keys that could see nothing it cannot."""
    client, keys = api
    limits = {
        "shop": {"sources": ["shop"]},
        "billing": {"sources": ["billing"]},
        "orders": {"tables": ["public.orders"]},
        "shop_orders": {"sources": ["shop"], "tables": ["public.orders"]},
    }
    made = {
        name: create_key(trail.state, trail.env, name, role="auditor", **limit)
        for name, limit in limits.items()
    }
    names = {new.key.key_id: name for name, new in made.items()}
    names[keys["reader"].split("_")[1]] = "reader"

    def ask(name: str, path: str, **params):
        key = keys[name] if name in keys else made[name].secret
        return client.get(path, params=params, headers={"X-API-Key": key})

    assert ask("shop", "/v1/checkpoints", source="shop").status_code == 200
    for name, source, status in [
        ("billing", "shop", 404),
        ("orders", "shop", 403),
        ("shop", "_reads", 403),
        ("orders", "_reads", 403),
    ]:
        refused = ask(name, "/v1/checkpoints", source=source)
        assert refused.status_code == status, (name, source, refused.text)
        assert "billing" not in refused.text and "orders" not in refused.text
    assert ask("auditor", "/v1/checkpoints", source="_reads").status_code == 200
    event_id = trail.hits()[0]["_id"]
    assert ask("shop", f"/v1/events/{event_id}/proof").status_code == 200
    refused = ask("orders", f"/v1/events/{event_id}/proof")
    assert refused.status_code == 403 and "not limited to tables" in refused.json()["detail"]

    for name in ("reader", "shop_orders", "shop", "orders", "billing"):
        assert ask(name, "/v1/events").status_code == 200

    def readers(name: str) -> set[str]:
        rows = ask(name, "/v1/reads", limit=1000)
        assert rows.status_code == 200, rows.text
        return {names.get(r["key_id"], r["key_id"]) for r in rows.json()}

    assert readers("auditor") >= {"reader", "shop_orders", "shop", "orders", "billing"}
    assert readers("shop") == {"shop", "shop_orders"}
    assert readers("orders") == {"orders", "shop_orders"}
    assert readers("shop_orders") == {"shop_orders"}
    assert readers("billing") == {"billing"}


def test_the_read_log_is_a_verifiable_trail(trail, api):
    client, keys = api
    for _ in range(3):
        client.get("/v1/events", headers={"X-API-Key": keys["reader"]})
    log = read_trail(trail.source.store.root, trail.env)
    assert append_reads(trail.state, log, trail.env) >= 3
    log.checkpoint(trail.key, datetime.now(UTC))
    assert verify_reads(trail.state, log, trail.env, trail.key.public_key()).ok
    first, second = read_rows(trail.state, trail.env, limit=2)
    trail.state.execute(
        "UPDATE audit_platform.read_log SET returned = 0 WHERE id = %s", (first["id"],)
    )
    trail.state.execute("DELETE FROM audit_platform.read_log WHERE id = %s", (second["id"],))
    report = verify_reads(trail.state, log, trail.env, trail.key.public_key())
    assert {(f.kind, f.subject) for f in report.problems} == {
        ("altered", f"read {first['id']}"),
        ("removed", f"read {second['id']}"),
    }


def test_appends_resume_inside_a_transaction_and_never_repeat_a_leaf(tmp_path):
    """A rerun appends nothing twice; a transaction whose leaves come in two appends (a batch
    cut inside it) loses none."""
    log = TrustLog(StagingStore(str(tmp_path), "unit", "shop"))
    now = datetime.now(UTC)

    def leaves(rows):
        return pl.DataFrame(
            {
                "position": [None] * len(rows),
                "kind": [k for k, _, _ in rows],
                "lsn": [lsn for _, lsn, _ in rows],
                "seq": [s for _, _, s in rows],
                "xid": [1] * len(rows),
                "time": [now] * len(rows),
                "record_id": [f"{lsn}:{s}" for _, lsn, s in rows],
                "hash": [leaf_hash(f"{k}{lsn}{s}".encode()) for k, lsn, s in rows],
            },
            schema=LEAF_SCHEMA,
        )

    first = [("context", 10, -1), ("change", 10, 0), ("change", 10, 1)]
    rest = [("change", 10, 2), ("change", 11, 0)]
    assert log.append(leaves(first)) == 3
    assert log.append(leaves(first)) == 0  # the same batch again
    assert log.append(leaves(first[1:] + rest)) == 2  # overlapping: only what is new
    found = log.leaves()
    assert found["position"].to_list() == list(range(5))
    assert [(k, lsn, s) for k, lsn, s in found.select("kind", "lsn", "seq").iter_rows()] == [
        *first,
        *rest,
    ]
    assert log.state().frontier.root() == root(found["hash"].to_list())


def test_verify_derives_fields_as_the_indexing_code_does():
    """derived_mismatches restates, per document, what index.documents derives column-wise:
    the two must agree on awkward values, or an untouched trail would fail verification."""
    now = datetime(2026, 11, 27, 12, 30, 1, 123456, tzinfo=UTC)
    contexts = [
        {
            "actor": {"id": 'ünï "q" \\', "name": None},
            "organization": {"id": "acme", "name": 'Ac"me'},
            "service": "s",
            "trace_id": "t",
        },
        {
            "actor": {"id": 42, "name": True},
            "organization": {"id": 7},
            "client_addr": "10.0.0.1",
            "service": {"a": 1},
        },
        {"reason": "no actor"},
        None,
    ]
    shape = {  # a schema change's image: nested, with an array (capture.schema_changes)
        "schema": "public",
        "table": 't"x',
        "columns": {"id": "bigint not null", "a,b": "character varying(5)", "e": ""},
        "primary_key": ["id", "a,b"],
        "parts": [{"x": "in an array's object"}, ["deeper", {"y": "z"}]],
        "replica_identity": "full",
    }
    images = [{"a": "x", "b": None, "c": ""}, {"é": "line\nbreak", "q": '"quoted"'}, None, shape]
    rows = [
        {
            "id": f"e:shop:{i:016X}:0",
            "commit_time": now,
            "env": "e",
            "source": "shop",
            "schema": "public",
            "table": "t",
            "operation": ("insert", "update", "delete", "ddl")[i % 4],
            "object_id": "1",
            "changed_columns": '["a"]',
            "before": None if images[i % 4] is None else json.dumps(images[i % 4]),
            "after": json.dumps(images[(i + 1) % 4]) if images[(i + 1) % 4] else None,
            "context": None if contexts[i % 4] is None else json.dumps(contexts[i % 4]),
            "attribution_status": "attributed",
            "attribution_lag_seconds": None,
            "xid": 7,
            "lsn": i,
            "change_index": 0,
            "key_columns": '["a"]',
            "column_types": "{}",
            "txn_changes": 1,
            "txn_ignored": 0,
            "policy_version": "1",
            # The row's own organization (its policy's column) on some: it wins over the
            # context's, whose name then is not the row's organization's.
            # "": the table names a column, and this change names no organization.
            "row_organization": ("initech" if i % 3 == 1 else "" if i % 3 == 2 else None),
        }
        for i in range(12)
    ]
    records = pl.DataFrame(rows, schema=RECORD_SCHEMA)
    for index, doc_id, doc in documents(records, database="db", ingested_at=now):
        assert derived_mismatches(index, doc_id, doc) == [], (doc_id, doc)
    index, doc_id, doc = next(documents(records, database="db", ingested_at=now))
    assert derived_mismatches(index, doc_id, {**doc, "values_text": "forged"}) == ["values_text"]
    # A record moved to another organization, or out of its own, is named; a record indexed
    # before records named organizations, from a context naming none, is not.
    assert doc["organization"] == {"id": "acme", "name": 'Ac"me'}
    moved = {**doc, "organization": {"id": "globex", "name": 'Ac"me'}}
    assert derived_mismatches(index, doc_id, moved) == ["organization"]
    unnamed = {k: v for k, v in doc.items() if k != "organization"}
    assert derived_mismatches(index, doc_id, unnamed) == ["organization"]
    by_row = [d for _, _, d in documents(records, database="db", ingested_at=now)][4]
    assert by_row["row"]["organization"] == "initech"
    assert by_row["organization"] == {"id": "initech", "name": None}
    # The table names a column and the change none: the context's organization does not count.
    none_by_row = [d for _, _, d in documents(records, database="db", ingested_at=now)][8]
    assert none_by_row["context"]["organization"]["id"] == "acme"
    assert none_by_row["organization"] == {"id": None, "name": None}
    _, old_id, old_doc = list(documents(records, database="db", ingested_at=now))[2]
    assert old_doc["organization"] == {"id": None, "name": None}
    older = {k: v for k, v in old_doc.items() if k != "organization"}
    assert derived_mismatches(index, old_id, older) == []
    assert derived_mismatches("audit-e-shop-2020.01", doc_id, doc) == ["index"]
    # The index follows from the month and the source's retention class.
    assert index == index_name("e", "standard", 2026, 11)
    assert derived_mismatches(index, doc_id, doc, "long") == ["index"]
    assert derived_mismatches(index_name("e", "long", 2026, 11), doc_id, doc, "long") == []


def test_an_edited_records_file_is_named(trail):
    store = trail.source.store
    path = store.files("records")[0]
    records = store.read([path]).drop("file")
    first = records.row(0, named=True)
    edited = records.with_columns(
        pl.when(pl.col("id") == first["id"])
        .then(pl.lit("[]"))
        .otherwise(pl.col("changed_columns"))
        .alias("changed_columns")
    )
    store.write_file(path, edited)
    report = trail.verify()
    assert [(f.kind, f.subject) for f in report.problems] == [("staged_altered", first["id"])]
    assert "records" in report.problems[0].detail
