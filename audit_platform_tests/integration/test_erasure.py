"""Erasure against real PostgreSQL and Elasticsearch, held to an independent ground truth.

A shop's customers and orders go through the real pipeline, with a trigger-based audit table
beside them that the platform never reads. After erasing one customer, every record must be
the trigger's row with exactly that customer's personal values replaced by the erasure's text:
every other fact, and every other customer, untouched; no value of theirs left in
Elasticsearch, staging or the API's answers (searched for by value); ``verify`` passing, and
naming each way an erasure can be forged or left undone.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import fsspec
import polars as pl
import psycopg
import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from audit_platform import platform_db
from audit_platform.api.main import create_app
from audit_platform.api_keys import create_key
from audit_platform.cli import app
from audit_platform.environment import StreamSettings
from audit_platform.erasure import requests as erasure
from audit_platform.erasure.run import carry_out
from audit_platform.faults import ERASURE_POINTS, SimulatedCrash, armed
from audit_platform.holds import create_hold, release_hold
from audit_platform.index.template import install_template
from audit_platform.naming import read_alias
from audit_platform.policy import ContextPersonalData
from audit_platform.settings import ApiSettings, Settings
from audit_platform.signing import new_private_key, private_key, public_text
from audit_platform.streams.definitions import create_stream
from audit_platform.streams.delivery import Deliverer
from audit_platform.streams.destinations import verify_object
from audit_platform.trust import erasures
from audit_platform.trust.commitments import all_keys, marker
from audit_platform.trust.leaves import canonical
from audit_platform.trust.log import TrustLog
from audit_platform.trust.merkle import leaf_hash, verify_inclusion
from audit_platform_tests.capture_support import Trail, make_source
from audit_platform_tests.helpers import (
    ground_truth,
    ground_truth_ddl,
    offline,
    policy_for,
    record_tuple,
)
from audit_platform_tests.shop_data import write

DDL = (
    # Customers belong to an organization (a tenant): their leaves commit it too.
    "CREATE TABLE customers (id int PRIMARY KEY, email text, name text, tier text, org text);"
    "ALTER TABLE customers REPLICA IDENTITY FULL;"
    "CREATE TABLE orders (id int PRIMARY KEY, customer_id int, address text, total int);"
    "ALTER TABLE orders REPLICA IDENTITY FULL;"
    + ground_truth_ddl("customers")
    + "CREATE TRIGGER orders_truth AFTER INSERT OR UPDATE OR DELETE ON orders"
    " FOR EACH ROW EXECUTE FUNCTION record_truth();"
)
POLICY = policy_for(
    "shop",
    public__customers={
        "personal": {"subject": "id", "columns": ["email", "name"]},
        "ignore_changes_to": ["tier"],
        "organization": "org",
    },
    public__orders={
        "personal": {"subject": "customer_id", "of": "public.customers", "columns": ["address"]}
    },
)
#: Customer 1's personal values: none of them may be anywhere after the erasure.
ADA = ("ada.secret@example.com", "ada.new.secret@example.com", "Ada Secretname", "1 Ada Lane")
BOB = ("bob@example.com", "Bob Keepname", "2 Bob Road")
CONTEXT = {"actor": {"type": "user", "id": "support-7"}, "reason": "shop traffic"}


class Shop(Trail):
    """The shop's trail, verified with its persons' keys."""

    def verify(self, **kwargs):
        return super().verify(keys=all_keys(self.state, self.env), **kwargs)

    def request(self, subject: str = "public.customers:1", waiting=timedelta(0), by="dpo-anna"):
        return erasure.request_erasure(
            self.state,
            self.es,
            self.env,
            erasure.Subject.parse(subject),
            reason="GDPR art. 17, ticket 812",
            requested_by=by,
            waiting=waiting,
        )

    def erase(self, request: int):
        sources = {"shop": (self.source.store, self.source.policy)}
        return carry_out(
            self.state,
            self.es,
            self.env,
            request,
            sources=sources,
            now=datetime.now(UTC),
            signer=self.key,
        )

    def staged_text(self) -> str:
        """Every staged Parquet file's rows as text (the files are compressed: search the
        values, not the bytes)."""
        store = self.source.store
        parts = []
        paths = [p for dataset in ("changes", "records", "contexts") for p in store.files(dataset)]
        assert paths
        for path in paths:
            with store.fs.open(path, "rb") as f:
                parts.append(pl.read_parquet(f).write_ndjson())
        return "\n".join(parts)


@pytest.fixture
def shop(pg_database, es, tmp_path):
    env = f"erase_{uuid.uuid4().hex[:8]}"
    source = make_source(pg_database, tmp_path, DDL, POLICY, env)
    install_template(es, Settings().resources_dir, env, replicas=0)
    url = source.url
    write(
        url,
        [
            ("INSERT INTO customers VALUES (1, %s, %s, 'gold', 'acme')", (ADA[0], ADA[2])),
            ("INSERT INTO customers VALUES (2, %s, %s, 'basic', 'acme')", (BOB[0], BOB[1])),
            ("INSERT INTO orders VALUES (10, 1, %s, 30), (11, 1, %s, 40)", (ADA[3], ADA[3])),
            ("INSERT INTO orders VALUES (20, 2, %s, 50)", (BOB[2],)),
        ],
        CONTEXT,
    )
    write(url, [("UPDATE customers SET email = %s WHERE id = 1", (ADA[1],))], CONTEXT)
    # Ignored by the policy: no record, but its staged images hold Ada's values all the same.
    write(url, [("UPDATE customers SET tier = 'platinum' WHERE id = 1", ())], CONTEXT)
    # An order moved from Ada to Bob: its before image is Ada's, its after image Bob's.
    write(url, [("UPDATE orders SET customer_id = 2, address = %s WHERE id = 11", (BOB[2],))])
    write(url, [("UPDATE orders SET total = 31 WHERE id = 10", ())], CONTEXT)
    write(url, [("DELETE FROM orders WHERE id = 10", ())], CONTEXT)
    with _running(source, pg_database, es) as found:
        yield found


@contextmanager
def _running(source, pg_database: str, es, runs: int = 1) -> Iterator[Shop]:
    """The shop's trail after ``runs`` capture runs; its indices removed afterwards."""
    with psycopg.connect(pg_database, autocommit=True) as state:
        platform_db.install(state, Settings().resources_dir / "sql")
        found = Shop(source, state, es, private_key(new_private_key()), source.env)
        for _ in range(runs):
            found.run()
        try:
            yield found
        finally:
            for index in es.indices.get(index=f"audit-{source.env}-*", expand_wildcards="all"):
                es.indices.delete(index=index)
            es.indices.delete_index_template(name=f"audit-{source.env}")


def _recorded(truth) -> list:
    """The ground truth less the updates the policy ignores (only ``tier`` changed)."""

    def ignored(op: str, before: str, after: str) -> bool:
        if op != "update":
            return False
        old, new = json.loads(before), json.loads(after)
        return "tier" in old and {c for c in old if old[c] != new[c]} == {"tier"}

    return [t for t in truth if not ignored(*t[1:])]


def _expected(truth, text: str) -> list:
    """The ground truth with customer 1's personal values as the erasure leaves them."""
    personal = {"customers": ("id", ("email", "name")), "orders": ("customer_id", ("address",))}
    expected = []
    for xid, op, before, after in _recorded(truth):
        images = []
        for image in (json.loads(before), json.loads(after)):
            if image is not None:
                table = "customers" if "email" in image else "orders"
                subject, columns = personal[table]
                if image[subject] == "1":
                    image = {
                        c: text if c in columns and v is not None else v for c, v in image.items()
                    }
            images.append(json.dumps(image, sort_keys=True))
        expected.append((xid, op, *images))
    return sorted(expected)


def test_an_erased_person_is_gone_by_value_and_every_other_fact_stays(shop):
    truth = ground_truth(shop.source.url)
    assert sorted(record_tuple(d["_source"]) for d in shop.hits()) == sorted(_recorded(truth))
    assert shop.verify().ok
    request = shop.request()
    erasure.approve(shop.state, shop.env, request.id, "legal-ben")
    outcome = shop.erase(request.id)
    # Her two customer changes; her orders inserted, moved away, updated and deleted.
    assert (outcome.records, outcome.sources[0].values) == (7, 12)
    text = f"erased on {outcome_day(shop, request.id)} under request {request.id}"
    docs = shop.hits()
    # Against the trigger's table: exactly Ada's personal values replaced, nothing else.
    assert sorted(record_tuple(d["_source"]) for d in docs) == _expected(truth, text)
    # Searched for by value, everywhere the platform keeps them.
    dumped = json.dumps(docs)
    staged = shop.staged_text()
    for value in ADA:
        assert value not in dumped and value not in staged, value
    for value in BOB:
        assert value in dumped and value in staged, value
    assert shop.es.count(index=read_alias(shop.env), q='"Ada Secretname"')["count"] == 0
    # The person's key is destroyed; Bob's is not.
    keys = all_keys(shop.state, shop.env)
    assert "public.customers:1" not in keys and "public.customers:2" in keys
    report = shop.verify()
    assert report.ok, report.problems
    assert report.documents == len(_recorded(truth))


def outcome_day(shop: Shop, request: int) -> str:
    found = erasure.get_request(shop.state, shop.env, request)
    assert found.started_at is not None and found.state == "done"
    return f"{found.started_at:%Y-%m-%d}"


def _resources(shop: Shop, tmp_path: Path) -> Path:
    """The resources of the test's environment: an environment file naming the source, with
    its policy."""
    resources = tmp_path / "resources"
    shutil.copytree(Settings().resources_dir, resources)
    (resources / "environments" / f"{shop.env}.yaml").write_text(
        "sources:\n  shop: {url_env: AUDIT_SOURCE_SHOP_URL}\n"
    )
    policy = POLICY.model_dump(mode="json", exclude_none=True)
    (resources / "sources" / "shop.yaml").write_text(yaml.safe_dump(policy))
    return resources


def _api(shop: Shop, tmp_path: Path) -> TestClient:
    """The API over the test's environment: its database, staging and resources."""
    settings = Settings(
        env=shop.env,
        pg_url=shop.source.url,  # the platform's tables are in the test's database
        staging_root=shop.source.store.root,
        resources_dir=_resources(shop, tmp_path),
        api=ApiSettings(key_cache_seconds=0),
    )
    return TestClient(create_app(settings))


def test_admins_request_and_approve_erasures_through_the_api_never_alone(shop, tmp_path):
    keys = {
        name: {"X-API-Key": create_key(shop.state, shop.env, name, **kw).secret}
        for name, kw in (
            ("dpo", {"role": "admin"}),
            ("legal", {"role": "admin"}),
            ("shop-admin", {"role": "admin", "sources": ["shop"]}),
            ("auditor", {"role": "auditor"}),
        )
    }
    body = {"subject": "customers:1", "reason": "GDPR art. 17, ticket 812"}
    with _api(shop, tmp_path) as api:
        assert api.post("/v1/erasures", json=body, headers=keys["auditor"]).status_code == 403
        assert api.post("/v1/erasures", json=body, headers=keys["shop-admin"]).status_code == 403
        bad = api.post("/v1/erasures", json={**body, "subject": "42"}, headers=keys["dpo"])
        assert bad.status_code == 422 and "TABLE:ID" in bad.text
        # A table no policy declares persons of: refused, not done with nothing erased.
        other = {**body, "subject": "public.orders:10"}
        bad = api.post("/v1/erasures", json=other, headers=keys["dpo"])
        assert bad.status_code == 422 and "declared: public.customers" in bad.text
        made = api.post("/v1/erasures", json=body, headers=keys["dpo"])
        assert made.status_code == 201, made.text
        request = made.json()
        assert request["state"] == "waiting" and request["subject"] == "public.customers:1"
        # The environment's waiting period (72 hours by default) before it runs unapproved.
        waited = datetime.fromisoformat(request["runs_from"]) - datetime.fromisoformat(
            request["requested_at"]
        )
        assert waited == timedelta(hours=72)
        path = f"/v1/erasures/{request['id']}/approve"
        alone = api.post(path, headers=keys["dpo"])
        assert alone.status_code == 409 and "another admin" in alone.text
        approved = api.post(path, headers=keys["legal"])
        assert approved.status_code == 200 and approved.json()["state"] == "approved"
        listed = api.get("/v1/erasures", headers=keys["legal"]).json()
        assert [r["id"] for r in listed] == [request["id"]]
        create_hold(shop.state, shop.env, "shop", reason="case 7", created_by="counsel")
        held = api.post("/v1/erasures", json=body, headers=keys["dpo"])
        assert held.status_code == 409 and "legal hold" in held.text


def test_the_api_shows_the_erasure_and_an_erased_records_proof_verifies_offline(shop, tmp_path):
    request = shop.request()
    erasure.approve(shop.state, shop.env, request.id, "legal-ben")
    shop.erase(request.id)
    shop.run()  # a checkpoint covering the erasure leaf
    text = f"erased on {outcome_day(shop, request.id)} under request {request.id}"
    secret = create_key(shop.state, shop.env, "auditor", role="auditor").secret
    with _api(shop, tmp_path) as api:
        headers = {"X-API-Key": secret}
        events = api.get("/v1/events", params={"limit": 100}, headers=headers).json()["events"]
        assert not any(value in json.dumps(events) for value in ADA)
        found = api.get("/v1/events", params={"query": "Secretname"}, headers=headers)
        assert found.json()["events"] == []
        ada = next(e for e in events if (e["after"] or {}).get("id") == "1")
        assert ada["after"]["email"] == text and ada["after"]["tier"] == "gold"
        proof = api.get(f"/v1/events/{ada['id']}/proof", headers=headers)
        assert proof.status_code == 200, proof.text
        # Every record verifies offline with docs/verify_record.py: Bob's personal values
        # against their commitments (the proof gives their images' salts), Ada's erased ones
        # by the commitments their leaf kept.
        public = public_text(shop.key.public_key())
        for event in events:
            answer = api.get(f"/v1/events/{event['id']}/proof", headers=headers).json()
            checked = offline(answer, tmp_path, public)
            assert checked.returncode == 0, checked.stdout + checked.stderr
            erased = text in json.dumps([event["before"], event["after"]])
            assert ("not checked" in checked.stdout) == erased, checked.stdout
            if (event["after"] or {}).get("email") == BOB[0]:
                bob = answer
    body = proof.json()
    assert not body["salts"]  # Ada's images: erased, their salts gone with her key
    # Bob's email changed in the record, the proof untouched: it does not verify.
    bob["record"]["after"]["email"] = "bob.changed@example.com"
    checked = offline(bob, tmp_path, public)
    assert checked.returncode == 1 and "NOT in the log" in checked.stdout
    [change] = [leaf for leaf in body["leaves"] if leaf["kind"] == "change"]
    # The leaf holds commitments where the values were, and hashes to the logged leaf.
    assert change["leaf"]["after"]["email"].startswith("c1:")
    assert text not in json.dumps(change["leaf"])
    hashed = leaf_hash(canonical(change["leaf"]))
    assert hashed.hex() == change["leaf_hash"]
    root = bytes.fromhex(body["checkpoint"]["checkpoint"]["root"])
    path = [bytes.fromhex(h) for h in change["audit_path"]]
    assert verify_inclusion(hashed, change["leaf_index"], body["tree_size"], path, root)


def test_verify_names_an_erasure_without_its_leaf_a_leaf_without_its_erasure_and_forgeries(shop):
    request = shop.request()
    erasure.approve(shop.state, shop.env, request.id, "legal-ben")
    shop.erase(request.id)
    docs = {d["_id"]: d for d in shop.hits()}
    ada = next(d for d in docs.values() if (d["_source"]["after"] or {}).get("id") == "1")
    bob = next(
        d
        for d in docs.values()
        if (d["_source"]["after"] or {}).get("id") == "2" and d["_source"]["operation"] == "insert"
    )
    es = shop.es
    # 1. Bob's email replaced by an erasure's text, with no erasure of Bob.
    forged = {
        **bob["_source"]["after"],
        "email": f"erased on 2026-12-04 under request {request.id}",
    }
    es.update(index=bob["_index"], id=bob["_id"], doc={"after": forged}, refresh=True)
    # 2. Ada's erased email put back: the erasure leaf says it is gone.
    restored = {**ada["_source"]["after"], "email": ADA[1]}
    es.update(index=ada["_index"], id=ada["_id"], doc={"after": restored}, refresh=True)
    report = shop.verify()
    kinds = {(f.kind, f.subject) for f in report.problems}
    assert ("erased_unlogged", bob["_id"]) in kinds
    assert ("not_erased", ada["_id"]) in kinds
    # 3. A non-personal fact of an erased record changed: still tampering.
    es.update(
        index=ada["_index"],
        id=ada["_id"],
        doc={"after": {**ada["_source"]["after"], "tier": "vip"}},
        refresh=True,
    )
    assert ("altered", ada["_id"]) in {(f.kind, f.subject) for f in shop.verify().problems}
    # 4. The erasure leaf's file edited (another reason): the log does not hold it.
    log = TrustLog(shop.source.store)
    path = f"{log.dir}/erasures/{request.id:012d}.json"
    leaf = shop.source.store.read_json(path)
    shop.source.store.write_json(path, {**leaf, "reason": "routine cleanup"})
    kinds = {f.kind for f in shop.verify().problems}
    assert "erasure_forged" in kinds
    # 5. The file removed: the log's erasure leaf has no content any more.
    shop.source.store.fs.rm(path)
    assert "erasure_missing" in {f.kind for f in shop.verify().problems}


def test_a_hold_blocks_erasure_until_released(shop):
    hold = create_hold(
        shop.state,
        shop.env,
        "shop",
        reason="case 2026-114",
        created_by="counsel",
        table="public.orders",
        object_id="10",
    )
    with pytest.raises(erasure.ErasureRefused, match=f"hold {hold.id}"):
        shop.request()
    # A hold on other records does not cover Ada.
    assert shop.request("public.customers:2").state == "waiting"
    release_hold(shop.state, shop.env, hold.id, "counsel")
    request = shop.request()
    # A hold placed after the request, before it runs, still stops it.
    late = create_hold(shop.state, shop.env, "shop", reason="case 2026-115", created_by="counsel")
    with pytest.raises(erasure.ErasureRefused):
        shop.erase(request.id)
    assert ADA[2] in json.dumps(shop.hits())
    release_hold(shop.state, shop.env, late.id, "counsel")
    assert shop.erase(request.id).records == 7


def test_an_erasure_waits_for_a_second_admin_or_its_period(shop):
    request = shop.request(waiting=timedelta(hours=72))
    with pytest.raises(erasure.ErasureError, match="is waiting"):
        shop.erase(request.id)
    with pytest.raises(erasure.ErasureError, match="another admin must approve"):
        erasure.approve(shop.state, shop.env, request.id, "dpo-anna")
    erasure.approve(shop.state, shop.env, request.id, "legal-ben")
    shop.erase(request.id)
    with pytest.raises(erasure.ErasureError, match="done already"):
        shop.erase(request.id)
    # Without approval, once its period has passed.
    other = shop.request("public.customers:2", waiting=timedelta(0))
    assert other.due(datetime.now(UTC))
    cancelled = shop.request("public.customers:2", waiting=timedelta(hours=1))
    assert erasure.cancel(shop.state, shop.env, cancelled.id, "dpo-anna").state == "cancelled"
    with pytest.raises(erasure.ErasureError, match="cancelled"):
        shop.erase(cancelled.id)
    # A cancel that lands after the run read the request, before it starts: it does not start.
    with pytest.raises(erasure.ErasureError, match="cancelled or is done"):
        erasure.start(shop.state, cancelled.id)
    with pytest.raises(erasure.ErasureError, match="TABLE:ID"):
        erasure.Subject.parse("customers")


@pytest.mark.parametrize("point", list(ERASURE_POINTS))
def test_a_crash_at_each_point_of_an_erasure_and_a_rerun_erase_once(shop, point):
    truth = ground_truth(shop.source.url)
    request = shop.request()
    erasure.approve(shop.state, shop.env, request.id, "legal-ben")
    with armed(point), pytest.raises(SimulatedCrash):
        shop.erase(request.id)
    # The key is retired with the plans final: before that, a rerun plans again.
    retired = point != "erasure.planned"
    assert ("public.customers:1" in all_keys(shop.state, shop.env)) != retired
    outcome = shop.erase(request.id)
    assert outcome.records == 7
    log = TrustLog(shop.source.store)
    in_log = erasures.logged_hashes(log.leaves(), log.state().size)
    assert list(in_log) == [request.id]  # one leaf
    text = f"erased on {outcome_day(shop, request.id)} under request {request.id}"
    assert sorted(record_tuple(d["_source"]) for d in shop.hits()) == _expected(truth, text)
    staged = shop.staged_text()
    assert not any(value in staged for value in ADA)
    report = shop.verify()
    assert report.ok, report.problems
    # The pipeline goes on: a later change of the same person gets a new key and verifies.
    write(shop.source.url, [("UPDATE customers SET name = 'Ada Again' WHERE id = 1", ())])
    shop.run()
    assert "public.customers:1" in all_keys(shop.state, shop.env)
    assert shop.verify().ok


def test_an_erasure_leaf_changed_beside_the_log_is_refused_not_acted_on(shop):
    request = shop.request()
    erasure.approve(shop.state, shop.env, request.id, "legal-ben")
    with armed("erasure.retired"), pytest.raises(SimulatedCrash):
        shop.erase(request.id)
    # Someone with write access to staging empties the plan before it is logged.
    log = TrustLog(shop.source.store)
    path = f"{log.dir}/erasures/{request.id:012d}.json"
    leaf = shop.source.store.read_json(path)
    shop.source.store.write_json(path, {**leaf, "records": {}})
    with pytest.raises(erasure.ErasureError, match="not the one planned"):
        shop.erase(request.id)
    assert erasures.logged_hashes(log.leaves(), log.state().size) == {}
    shop.source.store.write_json(path, leaf)  # restored from a backup: the erasure finishes
    assert shop.erase(request.id).records == 7
    assert shop.verify().ok


def test_the_command_line_requests_approves_runs_and_lists_erasures(shop, tmp_path):
    cli = CliRunner()
    env = {
        "AUDIT_RESOURCES_DIR": str(_resources(shop, tmp_path)),
        "AUDIT_ENV": shop.env,
        "AUDIT_PG_URL": shop.source.url,  # the platform's tables are in the test's database
        "AUDIT_STAGING_ROOT": shop.source.store.root,
    }

    def run(*args: str):
        return cli.invoke(app, ["erase", *args], env=env)

    made = run("--subject", "customers:1", "--reason", "GDPR art. 17", "--by", "dpo-anna")
    assert made.exit_code == 0, made.output
    assert "erasure request 1: public.customers:1" in made.output
    assert "no erasure request is due" in run("run").output  # 72 hours, or another admin
    alone = run("approve", "1", "--by", "dpo-anna")
    assert alone.exit_code == 1 and "another admin must approve" in alone.output
    assert run("approve", "1", "--by", "legal-ben").exit_code == 0
    done = run("run")
    assert done.exit_code == 0, done.output
    assert "erasure request 1 done" in done.output and "shop: 7 records" in done.output
    listed = run("list").output
    assert "public.customers:1\tdone" in listed and "approved by legal-ben, 7 records" in listed
    missing = run("--subject", "customers:1", "--reason", "again")
    assert missing.exit_code == 1 and "--by" in missing.output
    assert shop.verify().ok


TICKETS_DDL = (
    "CREATE TABLE tickets (id int PRIMARY KEY, requester text, body text);"
    "ALTER TABLE tickets REPLICA IDENTITY FULL;" + ground_truth_ddl("tickets")
)
TICKETS = policy_for(
    "shop",
    public__tickets={
        "personal": {"subject": "requester", "of": "public.requesters", "columns": ["body"]}
    },
)
#: Requester ids a writer chose, each with a body only that requester's tickets hold.
HOSTILE = {
    "x" * 10_000: "long-id-secret",  # past what a btree entry holds
    'q"uo\\te,\n:ünï ': "quoted-id-secret",  # quotes, a line break, a colon, a trailing space
    '{"of":"public.customers","before":"1"}': "json-id-secret",  # reads like a declaration
}


def test_what_a_writer_with_connect_and_insert_chooses_neither_stops_capture_nor_fools_verify(
    pg_database, es, tmp_path
):
    env = f"erase_{uuid.uuid4().hex[:8]}"
    source = make_source(pg_database, tmp_path, TICKETS_DDL, TICKETS, env)
    install_template(es, Settings().resources_dir, env, replicas=0)
    writer = f"writer_{urlsplit(pg_database).path.lstrip('/')}"
    with psycopg.connect(pg_database, autocommit=True) as admin:
        admin.execute("ALTER FUNCTION record_truth() SECURITY DEFINER")
        admin.execute(f"CREATE ROLE {writer} LOGIN PASSWORD 'pw'")
        admin.execute(f"GRANT SELECT, INSERT, UPDATE ON tickets TO {writer}")
        platform_db.install(admin, Settings().resources_dir / "sql")
    parts = urlsplit(pg_database)
    as_writer = urlunsplit(parts._replace(netloc=f"{writer}:pw@{parts.hostname}:{parts.port}"))
    rows = [(i, requester, body) for i, (requester, body) in enumerate(HOSTILE.items())]
    # The erasure's own text as a value, a ticket of nobody, and one moved between requesters.
    rows += [(10, "ok", "erased on 2026-12-04 under request 99"), (11, None, "nobody-secret")]
    write(as_writer, [("INSERT INTO tickets VALUES (%s, %s, %s)", row) for row in rows], CONTEXT)
    write(as_writer, [("UPDATE tickets SET requester = %s WHERE id = 10", ("x" * 10_000,))])
    try:
        with psycopg.connect(pg_database, autocommit=True) as state:
            shop = Shop(source, state, es, private_key(new_private_key()), env)
            shop.run()
            truth = ground_truth(source.url)
            assert sorted(record_tuple(d["_source"]) for d in shop.hits()) == sorted(truth)
            assert shop.verify().ok  # the erasure text written as a value is just a value
            for requester in list(HOSTILE)[:2]:
                request = shop.request(f"public.requesters:{requester}")
                erasure.approve(state, env, request.id, "legal-ben")
                shop.erase(request.id)
            shop.es.indices.refresh(index=read_alias(env))
            dumped, staged = json.dumps(shop.hits()), shop.staged_text()
            for gone in ("long-id-secret", "quoted-id-secret"):
                assert gone not in dumped and gone not in staged, gone
            for kept in (
                "json-id-secret",
                "nobody-secret",
                "erased on 2026-12-04 under request 99",
            ):
                assert kept in dumped and kept in staged, kept
            report = shop.verify()
            assert report.ok, report.problems
    finally:
        for index in es.indices.get(index=f"audit-{env}-*", expand_wildcards="all"):
            es.indices.delete(index=index)
        es.indices.delete_index_template(name=f"audit-{env}")
        with psycopg.connect(pg_database, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {writer}")
            admin.execute(f"DROP ROLE {writer}")


# --- the actor's personal fields in contexts ----------------------------------------------

#: The shop's policy, and its contexts' actor name and client address declared personal: the
#: actor of a ``user`` context is a customer (a customer acting on their own account).
ACTING = POLICY.model_copy(
    update={"context_personal": ContextPersonalData.model_validate({"of": "public.customers"})}
)
#: Ada acting: her name and address may be nowhere after her erasure.
ADA_ACTS = {
    "actor": {"type": "user", "id": "1", "name": "Ada Actorname"},
    "client_addr": "198.51.100.77",
    "reason": "changed her own address",
}
#: Bob acting, and a service with a name: both stay.
BOB_ACTS = {
    "actor": {"type": "user", "id": "2", "name": "Bob Actorname"},
    "client_addr": "192.0.2.55",
}
SERVICE = {"actor": {"type": "service", "id": "billing", "name": "Billing Robot"}}


@pytest.fixture
def acting(pg_database, es, tmp_path):
    env = f"erase_{uuid.uuid4().hex[:8]}"
    source = make_source(pg_database, tmp_path, DDL, ACTING, env)
    install_template(es, Settings().resources_dir, env, replicas=0)
    url = source.url
    write(url, [("INSERT INTO customers VALUES (1, %s, %s, 'gold', 'acme')", ADA[::2])], ADA_ACTS)
    write(url, [("INSERT INTO customers VALUES (2, %s, %s, 'basic', 'acme')", BOB[:2])], BOB_ACTS)
    # Ada acting on Bob's order (her values are in the context only), and a service.
    write(url, [("INSERT INTO orders VALUES (20, 2, %s, 50)", (BOB[2],))], ADA_ACTS)
    write(url, [("UPDATE orders SET total = 51 WHERE id = 20", ())], SERVICE)
    # A transaction without a context, attributed to Ada later (audit.attach_context).
    late = write(url, [("UPDATE orders SET total = 52 WHERE id = 20", ())])
    with psycopg.connect(url) as conn:
        conn.execute(
            "SELECT audit.attach_context(%s::xid8, %s::jsonb)", (str(late), json.dumps(ADA_ACTS))
        )
    # The second run: the late context re-attributes its change.
    with _running(source, pg_database, es, runs=2) as found:
        yield found


def _late_contexts(shop: Shop) -> str:
    rows = shop.state.execute(
        "SELECT context FROM audit_platform.late_contexts WHERE env = %s", (shop.env,)
    ).fetchall()
    assert rows
    return json.dumps(rows)


def test_an_actors_name_and_address_in_contexts_are_erased_and_the_trail_still_verifies(
    acting, tmp_path
):
    shop = acting
    truth = ground_truth(shop.source.url)
    docs = shop.hits()
    assert sorted(record_tuple(d["_source"]) for d in docs) == sorted(truth)
    statuses = sorted(d["_source"]["attribution"]["status"] for d in docs)
    assert statuses == ["attributed"] * 4 + ["late"]
    ada_acted = [d for d in docs if (d["_source"]["context_personal"] or {}).get("subject") == "1"]
    assert len(ada_acted) == 3 and all(
        d["_source"]["user"]["name"] == ADA_ACTS["actor"]["name"] for d in ada_acted
    )
    # The context leaves commit the actor's fields, never the values.
    assert "Ada Actorname" in _late_contexts(shop)
    assert shop.verify().ok
    request = shop.request()
    erasure.approve(shop.state, shop.env, request.id, "legal-ben")
    outcome = shop.erase(request.id)
    # Her own context, the one she acted on Bob's order in, and the attachment.
    assert outcome.sources[0].contexts == 3
    text = f"erased on {outcome_day(shop, request.id)} under request {request.id}"
    docs = shop.hits()
    dumped, staged, late = json.dumps(docs), shop.staged_text(), _late_contexts(shop)
    for value in ("Ada Actorname", "198.51.100.77", *ADA[::2]):
        assert value not in dumped and value not in staged and value not in late, value
    for value in ("Bob Actorname", "192.0.2.55", "Billing Robot"):
        assert value in dumped and value in staged, value
    for doc in docs:
        source = doc["_source"]
        if (source["context_personal"] or {}).get("subject") == "1":
            # Who acted (the actor's id and type), why and when stay; the name and address
            # read as erased, in the context and in the fields derived from it.
            assert source["context"]["actor"] == {"type": "user", "id": "1", "name": text}
            assert source["context"]["reason"] == ADA_ACTS["reason"]
            assert source["context"]["client_addr"] == source["client"]["ip"] == text
            assert source["user"] == {"id": "1", "name": text}
    # Every other fact of every record is the trigger table's.
    assert sorted(record_tuple(d["_source"])[:2] for d in docs) == sorted(t[:2] for t in truth)
    assert shop.es.count(index=read_alias(shop.env), q='"Ada Actorname"')["count"] == 0
    report = shop.verify()
    assert report.ok, report.problems
    # Proofs of every record verify offline: Bob's context against its commitments (the
    # proof gives its salt), Ada's erased fields by the commitments her erasure leaf kept.
    shop.run()
    secret = create_key(shop.state, shop.env, "auditor", role="auditor").secret
    public = public_text(shop.key.public_key())
    with _api(shop, tmp_path) as api:
        headers = {"X-API-Key": secret}
        events = api.get("/v1/events", params={"limit": 100}, headers=headers).json()["events"]
        assert not any(v in json.dumps(events) for v in ("Ada Actorname", "198.51.100.77"))
        for event in events:
            answer = api.get(f"/v1/events/{event['id']}/proof", headers=headers).json()
            checked = offline(answer, tmp_path, public)
            assert checked.returncode == 0, checked.stdout + checked.stderr
            erased = text in json.dumps(event["context"])
            assert ("context.actor.name" in checked.stdout) == erased, checked.stdout
            if (event["context"] or {}).get("client_addr") == BOB_ACTS["client_addr"]:
                assert "context" in answer["salts"]
                # Its leaf holds commitments where the actor's name and address are.
                [leaf] = [p["leaf"] for p in answer["leaves"] if p["kind"] == "context"]
                assert leaf["context"]["client_addr"].startswith("c1:")
                assert leaf["context"]["actor"]["name"].startswith("c1:")
                assert leaf["personal"] == {
                    "of": "public.customers",
                    "subject": "2",
                    "fields": ["actor.name", "client_addr"],
                }
                bob = answer
    # Bob's address changed in the record, the proof untouched: it does not verify.
    bob["record"]["context"]["client_addr"] = "192.0.2.56"
    checked = offline(bob, tmp_path, public)
    assert checked.returncode == 1 and "NOT in the log" in checked.stdout


def test_verify_names_an_actors_field_erased_without_an_erasure_or_left_after_one(acting):
    shop = acting
    bob = next(d for d in shop.hits() if d["_source"]["context"]["actor"]["id"] == "2")
    forged = marker(99, datetime.now(UTC))
    context = {**bob["_source"]["context"], "client_addr": forged}
    shop.es.update(
        index=bob["_index"],
        id=bob["_id"],
        doc={"context": context, "client": {"ip": forged}},
        refresh=True,
    )
    report = shop.verify()
    assert {(p.kind, p.subject) for p in report.problems} == {("erased_unlogged", bob["_id"])}
    shop.es.update(
        index=bob["_index"],
        id=bob["_id"],
        doc={"context": bob["_source"]["context"], "client": bob["_source"]["client"]},
        refresh=True,
    )
    request = shop.request()
    erasure.approve(shop.state, shop.env, request.id, "legal-ben")
    shop.erase(request.id)
    # Ada's name put back into one record her erasure names.
    ada = next(d for d in shop.hits() if d["_source"]["attribution"]["status"] == "late")
    restored = {**ada["_source"]["context"], "actor": ADA_ACTS["actor"]}
    shop.es.update(
        index=ada["_index"],
        id=ada["_id"],
        doc={"context": restored, "user": {"name": ADA_ACTS["actor"]["name"]}},
        refresh=True,
    )
    report = shop.verify()
    assert {(p.kind, p.subject) for p in report.problems} == {("not_erased", ada["_id"])}


@pytest.mark.parametrize("point", list(ERASURE_POINTS))
def test_a_crash_at_each_point_and_a_rerun_erase_an_actors_contexts_once(acting, point):
    shop = acting
    request = shop.request()
    erasure.approve(shop.state, shop.env, request.id, "legal-ben")
    with armed(point), pytest.raises(SimulatedCrash):
        shop.erase(request.id)
    outcome = shop.erase(request.id)
    assert outcome.sources[0].contexts == 3
    dumped, staged, late = json.dumps(shop.hits()), shop.staged_text(), _late_contexts(shop)
    for value in ("Ada Actorname", "198.51.100.77"):
        assert value not in dumped and value not in staged and value not in late, value
    report = shop.verify()
    assert report.ok, report.problems
    # Ada acting again later: a new key, her new context verifies.
    write(shop.source.url, [("UPDATE orders SET total = 60 WHERE id = 20", ())], ADA_ACTS)
    shop.run()
    assert "public.customers:1" in all_keys(shop.state, shop.env)
    assert shop.verify().ok


def test_a_rerun_after_the_key_is_retired_leaves_the_persons_later_contexts_alone(acting):
    shop = acting
    request = shop.request()
    erasure.approve(shop.state, shop.env, request.id, "legal-ben")
    with armed("erasure.retired"), pytest.raises(SimulatedCrash):
        shop.erase(request.id)
    # Between the crash and the rerun, capture goes on: Ada acts again, under a new key.
    write(shop.source.url, [("UPDATE orders SET total = 70 WHERE id = 20", ())], ADA_ACTS)
    shop.run()
    outcome = shop.erase(request.id)
    assert outcome.sources[0].contexts == 3  # the plan's, not the later one
    later = [d for d in shop.hits() if (d["_source"]["after"] or {}).get("total") == "70"]
    assert [d["_source"]["user"]["name"] for d in later] == [ADA_ACTS["actor"]["name"]]
    report = shop.verify()
    assert report.ok, report.problems


def _exported(shop: Shop, bucket: str) -> tuple[object, list[str], str]:
    """The bucket's digests, and its objects' text."""
    fs, _ = fsspec.core.url_to_fs(bucket)
    digests = sorted(fs.unstrip_protocol(p) for p in fs.find(f"{bucket}/digests"))
    objects = sorted(fs.unstrip_protocol(p) for p in fs.find(f"{bucket}/records"))
    return fs, digests, "".join(fs.cat_file(o).decode() for o in objects)


@pytest.mark.parametrize("crash", [None, "erasure.indexed", "erasure.exported"])
def test_objects_a_bucket_stream_wrote_are_erased_and_their_digests_signed_again(
    acting, servers, crash
):
    shop = acting
    bucket = f"{servers.settings.s3_url.rstrip('/')}/erase-{uuid.uuid4().hex[:8]}"
    create_stream(shop.state, shop.env, "siem", "bucket", bucket, created_by="t", can_sign=True)
    # After the stream was created: Ada's row changes, Ada acting, Bob acting.
    write(shop.source.url, [("UPDATE customers SET email = %s WHERE id = 1", (ADA[1],))], ADA_ACTS)
    write(shop.source.url, [("UPDATE orders SET total = 53 WHERE id = 20", ())], BOB_ACTS)
    shop.run()
    deliverer = Deliverer(
        shop.env,
        lambda: psycopg.connect(shop.source.url, autocommit=True),
        shop.es,
        lambda _source: shop.source.store,
        signer=shop.key,
        settings=StreamSettings(chunk_records=1),  # one object per record
    )
    assert deliverer.deliver().records == 2
    fs, digests, before = _exported(shop, bucket)
    assert ADA[1] in before and "Ada Actorname" in before and "Bob Actorname" in before
    request = shop.request()
    erasure.approve(shop.state, shop.env, request.id, "legal-ben")
    if crash is not None:
        with armed(crash), pytest.raises(SimulatedCrash):
            shop.erase(request.id)
    outcome = shop.erase(request.id)
    assert outcome.sources[0].objects == (0 if crash == "erasure.exported" else 1)
    fs, digests, after = _exported(shop, bucket)
    for value in (ADA[1], "Ada Actorname", "198.51.100.77"):
        assert value not in after, value
    assert "Bob Actorname" in after and "192.0.2.55" in after
    key = shop.key.public_key()
    assert sum(verify_object(fs, d, key) for d in digests) == 2
    erasures = [json.loads(fs.cat_file(d)).get("erasures") for d in digests]
    assert sorted(erasures, key=str) == sorted([[request.id], None], key=str)
    fs.rm(bucket, recursive=True)


def test_an_erasure_refuses_to_start_without_the_key_that_signs_bucket_digests(acting, servers):
    shop = acting
    bucket = f"{servers.settings.s3_url.rstrip('/')}/erase-{uuid.uuid4().hex[:8]}"
    create_stream(shop.state, shop.env, "siem", "bucket", bucket, created_by="t", can_sign=True)
    request = shop.request()
    erasure.approve(shop.state, shop.env, request.id, "legal-ben")
    sources = {"shop": (shop.source.store, shop.source.policy)}
    with pytest.raises(erasure.ErasureError, match="AUDIT_SIGNING_KEY"):
        carry_out(shop.state, shop.es, shop.env, request.id, sources=sources, now=datetime.now(UTC))
    assert erasure.get_request(shop.state, shop.env, request.id).started_at is None


def test_contexts_a_connect_only_role_records_neither_stop_capture_nor_fool_verify(
    acting, pg_database
):
    """A role with CONNECT only can still call audit.set_context: its transactions write
    nothing, but each context is a fact of the trail, and its actor a person where the policy
    declares actors' fields personal. Actor ids of 4 kB, with quotes, a colon and a line break,
    names that read as an erasure's text or as markup: capture goes on, each is a person with a
    key, verify passes, and one of them can be erased without touching anyone else."""
    shop = acting
    role = f"connect_{urlsplit(pg_database).path.lstrip('/')}"
    hostile = {
        "x" * 4_000: "erased on 2026-12-04 under request 1",
        'q"uo:te\nd': "<script>alert(1)</script>",
        "1": "Not Ada, a writer naming himself with her id",
    }
    with psycopg.connect(pg_database, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    parts = urlsplit(shop.source.url)
    as_role = urlunsplit(parts._replace(netloc=f"{role}:pw@{parts.hostname}:{parts.port}"))
    try:
        for actor, name in hostile.items():
            context = {"actor": {"type": "user", "id": actor, "name": name}, "client_addr": "::1"}
            with psycopg.connect(as_role) as conn:
                conn.execute("SELECT audit.set_context(%s::jsonb)", (json.dumps(context),))
        write(shop.source.url, [("UPDATE orders SET total = 80 WHERE id = 20", ())], BOB_ACTS)
        shop.run()
        assert [
            d["_source"]["after"]["total"]
            for d in shop.hits()
            if d["_source"]["after"] and d["_source"]["after"].get("total") == "80"
        ] == ["80"]
        keys = all_keys(shop.state, shop.env)
        assert {f"public.customers:{a}" for a in hostile} <= set(keys)
        report = shop.verify()
        assert report.ok, report.problems
        request = shop.request(f"public.customers:{'x' * 4_000}")
        erasure.approve(shop.state, shop.env, request.id, "legal-ben")
        shop.erase(request.id)
        assert f"public.customers:{'x' * 4_000}" not in all_keys(shop.state, shop.env)
        # Ada, whose id a writer named himself with, is untouched: nothing was erased of her.
        assert "Ada Actorname" in json.dumps(shop.hits())
        report = shop.verify()
        assert report.ok, report.problems
    finally:
        with psycopg.connect(pg_database, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")
