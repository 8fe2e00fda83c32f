"""Streams against real PostgreSQL, Elasticsearch, an HTTP receiver and the stack's S3 server.

The receiver (``webhook_receiver``) is a real HTTP server in the test that checks signatures
itself and records every ``webhook-id``; it can be told to be down, to refuse, or to hold the
wrong secret. Records delivered are compared with the records Elasticsearch holds
(the pipeline's own index is the ground truth of "what is indexed"), and with the source's rows.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import fsspec
import psycopg
import pytest
from fastapi.testclient import TestClient

from audit_platform import platform_db
from audit_platform.api.main import create_app
from audit_platform.api_keys import create_key
from audit_platform.enrich.batch import enrich_pending
from audit_platform.environment import StreamSettings
from audit_platform.faults import SimulatedCrash, armed
from audit_platform.index import feed
from audit_platform.index.batch import index_pending
from audit_platform.naming import read_alias
from audit_platform.settings import ApiSettings, Settings
from audit_platform.signing import new_private_key, private_key
from audit_platform.streams.definitions import StreamError, create_stream, delete_stream
from audit_platform.streams.delivery import Deliverer
from audit_platform.streams.destinations import verify_object
from audit_platform.streams.progress import status
from audit_platform_tests.capture_support import CaptureSource, capture_enrich_index, make_source
from audit_platform_tests.conftest import new_database
from audit_platform_tests.helpers import policy_for
from audit_platform_tests.shop_data import write
from audit_platform_tests.webhook_receiver import Receiver, receiving

DDL = "CREATE TABLE orders (id int PRIMARY KEY, status text); ALTER TABLE orders REPLICA IDENTITY FULL;"
POLICY = policy_for("shop", public__orders={})
LATER = timedelta(days=2)  # a pass "this much later": every backoff is over


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with receiving() as found:
        yield found


@dataclass
class Shop:
    env: str
    source: CaptureSource
    state: psycopg.Connection
    state_url: str
    es: object

    def write(self, n: int, organization: str = "acme") -> None:
        """``n`` transactions of three changes each."""
        for _ in range(n):
            order = uuid.uuid4().int % 1_000_000_000
            write(
                self.source.url,
                [
                    ("INSERT INTO orders VALUES (%s, 'new')", (order,)),
                    ("UPDATE orders SET status = 'paid' WHERE id = %s", (order,)),
                    ("UPDATE orders SET status = 'sent' WHERE id = %s", (order,)),
                ],
                {
                    "actor": {"type": "user", "id": "ada"},
                    "organization": {"id": organization},
                },
            )

    def run(self) -> int:
        return capture_enrich_index(self.source, self.state, self.es, grace=timedelta(0))

    def deliverer(self, **settings) -> Deliverer:
        return Deliverer(
            self.env,
            lambda: psycopg.connect(self.state_url, autocommit=True),
            self.es,
            lambda _source: self.source.store,
            signer=private_key(KEY),
            settings=StreamSettings(**settings),
        )

    def indexed_ids(self, query: dict | None = None) -> list[str]:
        self.es.indices.refresh(index=read_alias(self.env))
        hits = self.es.search(
            index=read_alias(self.env), size=10_000, query=query or {"match_all": {}}
        )["hits"]["hits"]
        return sorted(hit["_id"] for hit in hits)

    def stream(self, target: str, kind: str = "webhook", **kwargs):
        return create_stream(
            self.state, self.env, f"s{uuid.uuid4().hex[:6]}", kind, target, created_by="t", **kwargs
        )


KEY = new_private_key()


@pytest.fixture
def shop(servers, es, tmp_path) -> Iterator[Shop]:
    env = f"st_{uuid.uuid4().hex[:8]}"
    with (
        new_database(servers) as shop_db,
        psycopg.connect(servers.pg_url, autocommit=True) as state,
    ):
        platform_db.install(state, Settings().resources_dir / "sql")
        yield Shop(
            env, make_source(shop_db, tmp_path, DDL, POLICY, env=env), state, servers.pg_url, es
        )
    for index in es.indices.get(index=f"audit-{env}-*", expand_wildcards="all"):
        es.indices.delete(index=index)


def _commit_ordered(records: list[dict]) -> bool:
    keys = [(r["transaction"]["lsn"], r["transaction"]["change_index"]) for r in records]
    return keys == sorted(keys)


def test_a_webhook_gets_every_record_indexed_after_it_was_created_once_in_order(shop, receiver):
    shop.write(2)
    shop.run()
    before = set(shop.indexed_ids())  # indexed before the stream existed: not delivered
    new = shop.stream(receiver.url)
    receiver.secret = new.secret
    shop.write(5)
    shop.run()
    shop.write(4)
    shop.run()
    found = shop.deliverer(chunk_records=4).deliver()
    delivered = sorted(r["id"] for r in receiver.records)
    assert delivered == sorted(set(shop.indexed_ids()) - before)
    assert len(delivered) == 27 and found.records == 27
    assert receiver.duplicates == 0 and receiver.refused == 0
    assert _commit_ordered(receiver.records)
    # Each record is the document a search returns, with its context.
    assert {r["context"]["actor"]["id"] for r in receiver.records} == {"ada"}
    assert shop.deliverer().deliver().messages == 0  # nothing new: nothing sent
    (progress,) = status(shop.state, shop.env)
    assert (progress.delivered, progress.behind, progress.attempts) == (27, 0, 0)


def test_records_just_indexed_are_delivered_though_no_refresh_made_them_searchable(shop, receiver):
    receiver.secret = shop.stream(receiver.url).secret
    shop.write(1)
    shop.run()
    indices = f"audit-{shop.env}-*"
    shop.es.indices.put_settings(index=indices, settings={"refresh_interval": "-1"})
    shop.write(3)
    shop.source.capture()
    now = datetime.now(UTC)
    enrich_pending(shop.source.store, shop.state, POLICY, now=now, grace=timedelta(0))
    index_pending(shop.es, shop.source.store, database="shopdb", now=now, feed=shop.state)
    assert shop.deliverer().deliver().records == 12
    assert sorted(r["id"] for r in receiver.records) == shop.indexed_ids()


def test_a_receiver_down_for_a_while_misses_nothing_and_dead_letters_nothing(shop, receiver):
    receiver.secret = shop.stream(receiver.url).secret
    receiver.down = True
    shop.write(3)
    shop.run()
    deliverer = shop.deliverer(dead_letter_attempts=3)
    first = deliverer.deliver()
    assert first.messages == 0 and first.failures == 1
    (progress,) = status(shop.state, shop.env)
    assert (
        progress.attempts == 1
        and progress.behind == 1
        and "RemoteProtocolError" in (progress.last_error or "")
    )
    assert deliverer.deliver().failures == 0  # within the backoff: not tried again
    for minutes in (1, 2, 3, 4):  # more attempts than the bound: a receiver down is waited for
        assert deliverer.deliver(now=datetime.now(UTC) + timedelta(minutes=minutes)).failures == 1
    shop.write(2)
    shop.run()
    receiver.down = False
    back = deliverer.deliver(now=datetime.now(UTC) + timedelta(minutes=5))
    assert back.dead_lettered == 0 and back.records == 15
    assert sorted(r["id"] for r in receiver.records) == shop.indexed_ids()
    assert _commit_ordered(receiver.records)
    (progress,) = status(shop.state, shop.env)
    assert (progress.attempts, progress.last_error, progress.dead_letters) == (0, None, 0)


def test_a_receiver_with_the_wrong_secret_is_waited_for_and_then_gets_everything(shop, receiver):
    right = shop.stream(receiver.url).secret
    receiver.secret = "whsec_" + base64.b64encode(b"not the stream's secret!").decode()
    shop.write(2)
    shop.run()
    deliverer = shop.deliverer(dead_letter_attempts=2)
    assert deliverer.deliver().failures == 1
    for hours in (1, 2, 3):  # a misconfigured receiver is not a poisoned message
        later = deliverer.deliver(now=datetime.now(UTC) + timedelta(hours=hours))
        assert (later.failures, later.dead_lettered) == (1, 0)
    (progress,) = status(shop.state, shop.env)
    assert (progress.last_error, progress.attempts, progress.behind) == ("HTTP 401", 4, 1)
    receiver.secret = right
    assert deliverer.deliver(now=datetime.now(UTC) + LATER).records == 6
    assert sorted(r["id"] for r in receiver.records) == shop.indexed_ids()


def test_a_message_the_receiver_refuses_as_such_is_dead_lettered_and_the_rest_delivered(
    shop, receiver
):
    receiver.secret = shop.stream(receiver.url).secret
    shop.write(3)
    shop.run()
    poisoned = shop.indexed_ids()[4]
    receiver.refuse = lambda m: 413 if poisoned in {r["id"] for r in m["data"]["records"]} else None
    deliverer = shop.deliverer(dead_letter_attempts=2, chunk_records=3)
    first = deliverer.deliver()
    assert (first.messages, first.failures) == (1, 1)  # the first message, then the refusal
    later = deliverer.deliver(now=datetime.now(UTC) + LATER)
    assert later.dead_lettered == 1 and later.messages == 1
    dead = shop.state.execute(
        "SELECT record_ids, attempts, last_error FROM audit_platform.stream_dead_letters d"
        " JOIN audit_platform.streams s ON s.id = d.stream WHERE s.env = %s",
        (shop.env,),
    ).fetchall()
    assert len(dead) == 1 and poisoned in dead[0][0] and dead[0][1:] == (2, "HTTP 413")
    delivered = {r["id"] for r in receiver.records}
    assert delivered | set(dead[0][0]) == set(shop.indexed_ids())
    assert delivered.isdisjoint(dead[0][0])
    (progress,) = status(shop.state, shop.env)
    assert (progress.behind, progress.dead_letters, progress.attempts) == (0, 1, 0)


def test_messages_stay_within_their_byte_bound_and_a_new_chunk_size_loses_nothing(shop, receiver):
    receiver.secret = shop.stream(receiver.url).secret
    shop.write(6)
    shop.run()
    messages: list[list[dict]] = []
    receiver.on_message = lambda m: messages.append(m["data"]["records"])
    with armed("streams.sent", nth=2), pytest.raises(SimulatedCrash):
        shop.deliverer(chunk_records=4).deliver()
    shop.deliverer(chunk_records=5, max_message_bytes=4096).deliver()
    assert sorted({r["id"] for r in receiver.records}) == shop.indexed_ids()
    after = [r for records in messages[2:] for r in records]
    # The second message again (its cursor had not moved), now cut otherwise, so under new
    # ids: a receiver deduplicating on webhook-id drops none of its records.
    assert [r["id"] for r in after[:4]] == [r["id"] for r in messages[1]]
    assert max(len(records) for records in messages[2:]) < 5  # the byte bound cuts (1 KiB+ each)
    assert _commit_ordered(after) and len(after) == 18 - 4


def test_a_record_elasticsearch_does_not_return_holds_the_stream_up_until_it_does(shop, receiver):
    receiver.secret = shop.stream(receiver.url).secret
    shop.write(2)
    shop.run()
    gone = shop.indexed_ids()[2]
    hit = shop.es.search(index=read_alias(shop.env), query={"ids": {"values": [gone]}})
    document = hit["hits"]["hits"][0]
    shop.es.delete(index=document["_index"], id=gone, refresh=True)
    deliverer = shop.deliverer(chunk_records=2)
    found = deliverer.deliver()
    assert found.records == 2 and "not in Elasticsearch" in found.errors[next(iter(found.errors))]
    (progress,) = status(shop.state, shop.env)
    assert progress.behind == 1 and gone in (progress.last_error or "")
    shop.es.index(index=document["_index"], id=gone, document=document["_source"], refresh=True)
    assert deliverer.deliver(now=datetime.now(UTC) + LATER).records == 4
    assert sorted(r["id"] for r in receiver.records) == shop.indexed_ids()


def test_a_filter_and_organizations_choose_what_a_stream_delivers(shop, receiver):
    with receiving() as nothing:
        nothing.secret = shop.stream(nothing.url, filter="table:nowhere").secret
        receiver.secret = shop.stream(
            receiver.url, organizations=["globex"], filter="op:update"
        ).secret
        shop.write(2, organization="acme")
        shop.write(3, organization="globex")
        shop.run()
        found = shop.deliverer().deliver()
    assert found.failures == 0
    wanted = {
        "bool": {
            "filter": [{"term": {"organization.id": "globex"}}, {"term": {"operation": "update"}}]
        }
    }
    assert sorted(r["id"] for r in receiver.records) == shop.indexed_ids(wanted)
    assert len(receiver.records) == 6 and nothing.seen == []
    assert {r["organization"]["id"] for r in receiver.records} == {"globex"}
    assert {p.behind for p in status(shop.state, shop.env)} == {0}  # both passed every entry


def test_a_stream_deleted_mid_delivery_sends_nothing_more(shop, receiver):
    new = shop.stream(receiver.url)
    receiver.secret = new.secret
    receiver.on_message = lambda _m: delete_stream(
        shop.state, shop.env, new.stream.name, deleted_by="t"
    )
    shop.write(4)
    shop.run()
    shop.deliverer(chunk_records=3).deliver()
    assert len(receiver.seen) == 1 and len(receiver.records) == 3
    shop.write(1)
    shop.run()
    assert shop.deliverer().deliver(now=datetime.now(UTC) + LATER).messages == 0
    with pytest.raises(StreamError, match="no stream named"):
        delete_stream(shop.state, shop.env, new.stream.name, deleted_by="t")


def test_a_delivery_killed_after_sending_sends_that_one_message_again_under_its_id(shop, receiver):
    receiver.secret = shop.stream(receiver.url).secret
    shop.write(5)
    shop.run()
    with armed("streams.sent", nth=2), pytest.raises(SimulatedCrash):
        shop.deliverer(chunk_records=4).deliver()
    assert len(receiver.seen) == 2
    shop.deliverer(chunk_records=4).deliver()
    assert receiver.duplicates == 1  # the second message, bounded by one
    assert sorted(r["id"] for r in receiver.records) == shop.indexed_ids()
    assert len(receiver.records) == 15


def test_a_bucket_stream_writes_objects_each_with_a_digest_that_verifies(shop, servers):
    assert servers.settings.s3_url
    bucket = f"{servers.settings.s3_url.rstrip('/')}/streams-{uuid.uuid4().hex[:8]}"
    shop.stream(bucket, kind="bucket", can_sign=True)
    shop.write(3)
    shop.run()
    assert shop.deliverer(chunk_records=5).deliver().records == 9
    fs, _ = fsspec.core.url_to_fs(bucket)
    digests = sorted(fs.unstrip_protocol(p) for p in fs.find(f"{bucket}/digests"))
    assert len(digests) == 2
    key = private_key(KEY).public_key()
    assert sum(verify_object(fs, d, key) for d in digests) == 9
    objects = sorted(fs.unstrip_protocol(p) for p in fs.find(f"{bucket}/records"))
    lines = [json.loads(line) for o in objects for line in fs.cat_file(o).splitlines()]
    assert sorted(r["id"] for r in lines) == shop.indexed_ids()
    # An object changed after delivery no longer matches its signed digest.
    fs.pipe_file(objects[0], fs.cat_file(objects[0]).replace(b"paid", b"paye"))
    with pytest.raises(ValueError, match="SHA-256"):
        verify_object(fs, digests[0], key)
    with pytest.raises(ValueError, match="signature"):
        verify_object(fs, digests[1], private_key(new_private_key()).public_key())
    fs.rm(bucket, recursive=True)


def test_the_feed_keeps_what_a_stream_has_not_delivered_and_drops_the_rest(shop, receiver):
    receiver.secret = shop.stream(receiver.url).secret
    receiver.down = True
    shop.write(2)
    shop.run()
    shop.deliverer().deliver()  # fails: the stream has not passed the entry
    hours_later = datetime.now(UTC) + timedelta(hours=2)
    assert feed.trim(shop.state, shop.env, hours_later) == 0
    receiver.down = False
    shop.write(1)
    shop.run()
    soon = datetime.now(UTC) + timedelta(minutes=1)  # the backoff is over
    assert shop.deliverer().deliver(now=soon).records == 9
    assert len(feed.entries(shop.state, shop.env, "shop", 0, 10)) == 2  # passed, but young
    assert feed.trim(shop.state, shop.env, hours_later) == 2
    assert feed.entries(shop.state, shop.env, "shop", 0, 10) == []


def test_a_stream_is_refused_with_a_reason(shop):
    cases = {
        "give an https:// URL": dict(target="http://example.com/hook"),
        "give an s3:// URL": dict(target="https://bucket", kind="bucket"),
        "since: and until:": dict(target="https://x.example/h", filter="since:-1h"),
        "filter:": dict(target="https://x.example/h", filter='reason:"open'),
        "organization": dict(target="https://x.example/h", organizations=["a\nb"]),
        "AUDIT_SIGNING_KEY": dict(target="s3://b/p", kind="bucket", can_sign=False),
    }
    for message, args in cases.items():
        with pytest.raises(StreamError, match=message):
            shop.stream(**args)


def test_admins_of_the_whole_environment_manage_streams_through_the_api(shop, receiver):
    keys = {
        name: create_key(shop.state, shop.env, name, role=role, organizations=orgs).secret
        for name, role, orgs in [
            ("admin", "admin", None),
            ("auditor", "auditor", None),
            ("tenant-admin", "admin", ["acme"]),
        ]
    }
    settings = Settings(env=shop.env, api=ApiSettings(key_cache_seconds=0))
    with TestClient(create_app(settings)) as api:

        def call(method: str, key: str, path: str = "/v1/streams", **kwargs):
            return api.request(method, path, headers={"X-API-Key": keys[key]}, **kwargs)

        body = {"name": "siem", "kind": "webhook", "target": "https://siem.example.com/in"}
        assert call("POST", "auditor", json=body).status_code == 403
        refused = call("POST", "tenant-admin", json=body)
        assert refused.status_code == 403 and "whole environment" in refused.text
        for target in ("http://10.0.0.1/hook", receiver.url):  # not even this machine's
            bad = call("POST", "admin", json={**body, "target": target})
            assert bad.status_code == 422 and "https://" in bad.json()["detail"]
        made = call("POST", "admin", json=body)
        assert made.status_code == 201, made.text
        assert made.json()["secret"].startswith("whsec_")
        assert call("POST", "admin", json=body).status_code == 422  # the name is taken
        shop.write(2)
        shop.run()
        (listed,) = call("GET", "admin").json()
        assert "secret" not in listed and listed["created_by"].startswith("key ")
        assert [(s["source"], s["delivered"], s["behind"]) for s in listed["sources"]] == [
            ("shop", 0, 1)
        ]
        assert call("DELETE", "admin", "/v1/streams/siem").status_code == 204
        assert call("DELETE", "admin", "/v1/streams/siem").status_code == 404
        assert call("GET", "admin").json() == []


HOSTILE = '\n{"id": "forged"}\r\n\u2028</script><img src=x onerror=alert(1)>\x1b[2J\\'


def test_hostile_values_from_the_source_stay_data_in_every_stream_output(shop, receiver, servers):
    """A writer's row values and context (any role that can write a row or call
    audit.set_context) hold line breaks, a forged JSON record, markup and terminal escapes:
    each NDJSON line stays one record, each webhook body one JSON document, and the values
    arrive as written."""
    bucket = f"{servers.settings.s3_url.rstrip('/')}/streams-{uuid.uuid4().hex[:8]}"
    shop.stream(bucket, kind="bucket")
    receiver.secret = shop.stream(receiver.url).secret
    write(
        shop.source.url,
        [("INSERT INTO orders VALUES (7, %s)", (HOSTILE,))],
        {"actor": {"type": "user", "id": "mallory"}, "reason": HOSTILE},
    )
    shop.run()
    assert shop.deliverer().deliver().records == 2  # one record, to each stream
    (sent,) = receiver.records
    assert sent["after"]["status"] == HOSTILE and sent["context"]["reason"] == HOSTILE
    fs, _ = fsspec.core.url_to_fs(bucket)
    (obj,) = [fs.unstrip_protocol(p) for p in fs.find(f"{bucket}/records")]
    (digest,) = [fs.unstrip_protocol(p) for p in fs.find(f"{bucket}/digests")]
    assert verify_object(fs, digest, private_key(KEY).public_key()) == 1
    (line,) = fs.cat_file(obj).splitlines()  # bytes.splitlines: \r and \n would both split
    stored = json.loads(line)
    assert stored["id"] == sent["id"] and stored["after"]["status"] == HOSTILE
    fs.rm(bucket, recursive=True)
