"""The servers every other test relies on are real, configured for capture, and secured."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from elasticsearch import AuthenticationException, Elasticsearch, SSLError
from pydantic import SecretStr

from audit_platform.clients import elasticsearch_client


def test_postgres_has_logical_decoding_and_room_for_slots(servers):
    with psycopg.connect(servers.pg_url) as conn:
        assert conn.execute("SHOW wal_level").fetchone()[0] == "logical"
        assert int(conn.execute("SHOW max_replication_slots").fetchone()[0]) >= 10
        assert conn.info.server_version >= 140000


def test_logical_slot_yields_decoded_insert(pg_database):
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, email text)")
        conn.execute("SELECT pg_create_logical_replication_slot('t_decoding', 'test_decoding')")
        conn.execute("INSERT INTO accounts VALUES (7, 'ada@example.com')")
        changes = [
            row[0]
            for row in conn.execute(
                "SELECT data FROM pg_logical_slot_get_changes('t_decoding', NULL, NULL)"
            )
        ]
    inserts = [c for c in changes if c.startswith("table public.accounts: INSERT")]
    assert inserts == ["table public.accounts: INSERT: id[integer]:7 email[text]:'ada@example.com'"]


def test_pgoutput_slot_streams_the_committed_insert(pg_database):
    """pgoutput (built in, what capture uses) emits Begin, Relation, Insert and Commit."""
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        conn.execute("CREATE PUBLICATION t_pub FOR TABLE notes")
        conn.execute("SELECT pg_create_logical_replication_slot('t_pgoutput', 'pgoutput')")
        conn.execute("INSERT INTO notes VALUES (1, 'hello from the slot')")
        messages = [
            bytes(row[0])
            for row in conn.execute(
                "SELECT data FROM pg_logical_slot_peek_binary_changes('t_pgoutput', NULL, NULL,"
                " 'proto_version', '1', 'publication_names', 't_pub')"
            )
        ]
    assert [m[:1] for m in messages] == [b"B", b"R", b"I", b"C"]
    assert b"hello from the slot" in messages[2]


def test_document_indexed_is_found_by_search(es, es_prefix):
    index = f"{es_prefix}-events"
    es.index(index=index, id="1", document={"table": "orders", "note": "refund approved"})
    es.indices.refresh(index=index)
    hits = es.search(index=index, query={"match": {"note": "refund"}})["hits"]["hits"]
    assert [(h["_id"], h["_source"]["table"]) for h in hits] == [("1", "orders")]


def test_elasticsearch_security_rejects_a_wrong_password(servers):
    conn = servers.settings.elasticsearch
    if conn is None or conn.username is None:
        pytest.fail("this test needs a cluster with security on; AUDIT_ES_USERNAME is unset")
    wrong = conn.model_copy(update={"password": SecretStr("not-" + uuid.uuid4().hex)})
    client = elasticsearch_client(wrong, request_timeout=10)
    with pytest.raises(AuthenticationException):
        client.cluster.health()
    assert servers.es_client().cluster.health()["status"] in {"yellow", "green"}


def test_elasticsearch_tls_is_verified_against_the_configured_ca(servers):
    conn = servers.settings.elasticsearch
    if conn is None or not conn.url.startswith("https://"):
        pytest.fail("this test needs a cluster served over TLS; AUDIT_ES_URL is not https")
    # Without our CA, the system trust store must refuse the local cluster's certificate.
    client = Elasticsearch(
        conn.url,
        basic_auth=(conn.username, conn.password.get_secret_value()),
        max_retries=0,
        request_timeout=10,
    )
    with pytest.raises(SSLError) as refused:
        client.cluster.health()
    assert "CERTIFICATE_VERIFY_FAILED" in repr(refused.value)
