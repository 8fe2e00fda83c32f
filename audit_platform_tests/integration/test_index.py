"""Indexing into real Elasticsearch: template, deterministic ids, per-document failures."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import polars as pl
import psycopg
import pytest

from audit_platform import platform_db
from audit_platform.enrich.batch import enrich_hour, enrich_pending
from audit_platform.index import bulk
from audit_platform.index.batch import index_pending
from audit_platform.index.bulk import index_records
from audit_platform.index.documents import documents, validate_document
from audit_platform.index.template import install_template, render_template
from audit_platform.naming import read_alias, template_name
from audit_platform.settings import Settings
from audit_platform_tests.capture_support import make_source
from audit_platform_tests.helpers import policy_for

RESOURCES = Settings().resources_dir


@pytest.fixture
def env(es_prefix):
    """An environment name of this test's own, so its template and indices are its own."""
    return es_prefix.replace("-", "_")


@pytest.fixture
def captured(pg_database, tmp_path, es, env):
    source = make_source(
        pg_database,
        tmp_path,
        "CREATE TABLE orders (id int PRIMARY KEY, status text, note text);"
        "ALTER TABLE orders REPLICA IDENTITY FULL;",
        policy_for("shop", public__orders={}),
        env=env,
    )
    ctx = {
        "actor": {"type": "user", "id": "u-9", "name": "Grace"},
        "reason": "refund",
        "request_id": "req-1",
        "client_addr": "203.0.113.9",
    }
    with psycopg.connect(pg_database) as conn:
        conn.execute("SELECT audit.set_context(%s::jsonb)", (json.dumps(ctx),))
        conn.execute("INSERT INTO orders VALUES (1, 'new', 'first order')")
        conn.execute("UPDATE orders SET status = 'refunded' WHERE id = 1")
    result = source.capture()
    with psycopg.connect(pg_database, autocommit=True) as state:
        platform_db.install(state, RESOURCES / "sql")
        [hour] = result.hours
        enrich_hour(
            source.store,
            state,
            source.policy,
            hour,
            now=datetime.now(UTC),
            grace=timedelta(minutes=10),
        )
    yield source.store.read_all("records")
    for name in es.indices.get(index=f"audit-{env}-*", expand_wildcards="all"):
        es.indices.delete(index=name)
    es.options(ignore_status=404).indices.delete_index_template(name=f"audit-{env}")


def test_template_install_is_idempotent_and_reports_changes(es, env):
    first = install_template(es, RESOURCES, env, replicas=0)
    second = install_template(es, RESOURCES, env, replicas=0)
    third = install_template(es, RESOURCES, env, replicas=1)
    assert (first.changed, second.changed, third.changed) == (True, False, True)
    es.indices.delete_index_template(name=first.name)


def test_an_index_made_under_an_older_template_takes_the_new_fields(es, env, captured, tmp_path):
    """Indices are strict and monthly: without a mapping update, the month in progress would
    refuse every document carrying a field the new template adds."""
    # The template as a code version without ``row`` installed it.
    older = render_template(RESOURCES, env, replicas=0)
    del older["template"]["mappings"]["properties"]["row"]
    older["_meta"].update(template_version=2, template_hash="older")
    es.indices.put_index_template(name=template_name(env), **older)
    # A document as the previous code version wrote it, creating the month's index.
    [(index, doc_id, document)] = documents(
        captured.head(1), database="shopdb", ingested_at=datetime.now(UTC)
    )
    del document["row"]
    es.index(index=index, id=doc_id, document=document)
    assert "row" not in es.indices.get_mapping(index=index)[index]["mappings"]["properties"]

    assert install_template(es, RESOURCES, env, replicas=0).changed
    mapping = es.indices.get_mapping(index=index)[index]["mappings"]["properties"]
    assert mapping["row"]["properties"]["key"] == {"type": "keyword"}
    result = index_records(es, captured, database="shopdb", ingested_at=datetime.now(UTC))
    assert (result.indexed, result.failed.height) == (2, 0)
    es.indices.refresh(index=index)
    hit = es.search(index=index, query={"term": {"row.key": "id"}})["hits"]["hits"][0]
    assert hit["_source"]["row"]["types"] == {"id": "integer", "status": "text", "note": "text"}


def test_records_from_a_real_capture_are_searchable_by_every_filter(es, env, captured):
    install_template(es, RESOURCES, env, replicas=0)
    result = index_records(es, captured, database="shopdb", ingested_at=datetime.now(UTC))
    assert (result.indexed, result.failed.height) == (2, 0)
    es.indices.refresh(index=read_alias(env))
    alias = read_alias(env)

    def hits(query: dict) -> list[str]:
        found = es.search(index=alias, query=query, sort=[{"transaction.change_index": "asc"}])
        return [h["_source"]["operation"] for h in found["hits"]["hits"]]

    assert hits({"term": {"user.id": "u-9"}}) == ["insert", "update"]
    assert hits({"term": {"table.name": "orders"}}) == ["insert", "update"]
    assert hits({"term": {"changed_columns": "status"}}) == ["insert", "update"]
    assert hits({"term": {"changed_columns": "note"}}) == ["insert"]
    assert hits({"term": {"object_id": "1"}}) == ["insert", "update"]
    assert hits({"term": {"after.status": "refunded"}}) == ["update"]
    assert hits({"term": {"before.status": "new"}}) == ["update"]
    assert hits({"term": {"context.request_id": "req-1"}}) == ["insert", "update"]
    assert hits({"match": {"context.reason": "refund"}}) == ["insert", "update"]
    assert hits({"match": {"values_text": "first"}}) == ["insert", "update"]
    assert hits({"term": {"client.ip": "203.0.113.9"}}) == ["insert", "update"]
    assert hits({"term": {"attribution.status": "attributed"}}) == ["insert", "update"]
    assert hits({"range": {"@timestamp": {"gte": "now-1h"}}}) == ["insert", "update"]
    for index, doc_id, document in documents(
        captured, database="shopdb", ingested_at=datetime.now(UTC)
    ):
        validate_document(doc_id, document)
        assert index.startswith(f"audit-{env}-class-standard-")


def test_indexing_the_same_hour_twice_leaves_one_copy(es, env, captured):
    install_template(es, RESOURCES, env, replicas=0)
    for _ in range(2):
        index_records(es, captured, database="shopdb", ingested_at=datetime.now(UTC))
    es.indices.refresh(index=read_alias(env))
    assert es.count(index=read_alias(env))["count"] == 2


def test_a_document_elasticsearch_refuses_is_set_aside_and_the_rest_indexed(es, env, captured):
    install_template(es, RESOURCES, env, replicas=0)
    broken = captured.with_columns(
        pl.when(pl.col("change_index") == 1)
        .then(pl.lit('{"not": "a list of columns"}'))
        .otherwise(pl.col("changed_columns"))
        .alias("changed_columns")
    )
    result = index_records(es, broken, database="shopdb", ingested_at=datetime.now(UTC))
    assert result.indexed == 1
    [failure] = result.failed.to_dicts()
    assert failure["id"] == captured["id"][1]
    assert failure["status"] == 400
    assert failure["reason"].startswith("document_parsing_exception")


def test_a_client_address_elasticsearch_cannot_read_still_indexes_its_record(es, env, captured):
    # What audit.set_context accepts as a client address (anything inet reads, CIDR included)
    # is more than an ip field takes; the record must not be refused for it.
    install_template(es, RESOURCES, env, replicas=0)
    odd = json.dumps({"actor": {"type": "user", "id": "x"}, "client_addr": "10.1.2.3/24"})
    records = captured.with_columns(pl.lit(odd).alias("context"))
    result = index_records(es, records, database="shopdb", ingested_at=datetime.now(UTC))
    assert (result.indexed, result.failed.height) == (2, 0)
    es.indices.refresh(index=read_alias(env))
    hit = es.search(index=read_alias(env), query={"term": {"user.id": "x"}})["hits"]["hits"][0]
    assert hit["_source"]["context"]["client_addr"] == "10.1.2.3/24"


def test_requests_close_by_bytes_and_a_document_too_large_is_set_aside(
    es, env, captured, monkeypatch
):
    # Rows are as large as a source makes them: a request of many large documents, or one
    # document past http.max_content_length, would be refused whole (413), run after run.
    install_template(es, RESOURCES, env, replicas=0)
    big = captured.with_columns(
        pl.when(pl.col("change_index") == 0)
        .then(pl.lit(json.dumps({"id": "1", "note": "x" * 300_000})))
        .otherwise(pl.col("after"))
        .alias("after")
    )
    monkeypatch.setattr(bulk, "MAX_DOCUMENT_BYTES", 200_000)
    sent: list[int] = []
    real = es.bulk
    monkeypatch.setattr(
        es, "bulk", lambda operations: sent.append(len(operations)) or real(operations=operations)
    )
    result = index_records(
        es, big, database="shopdb", ingested_at=datetime.now(UTC), chunk_bytes=1_000
    )
    assert result.indexed == 1
    [failure] = result.failed.to_dicts()
    assert failure["id"] == captured["id"][0] and failure["status"] == 413
    assert failure["reason"].startswith("document_too_large")
    assert len(sent) == 1  # the one document left, in a request of its own

    lines = pl.DataFrame({"line": ["a" * 10] * 5, "bytes": [10] * 5})
    assert [len(c) for c in bulk._chunks(lines, 1000, 25)] == [2, 2, 1]
    assert [len(c) for c in bulk._chunks(lines, 3, 10**6)] == [3, 2]


def test_waiting_batches_are_indexed_together_and_a_reindex_alone(pg_database, tmp_path, es, env):
    """``index_pending`` sends up to ``coalesce`` waiting batches in one go (``between`` is
    called after each group) and an entry re-indexing some records on its own, after them."""
    source = make_source(
        pg_database,
        tmp_path,
        "CREATE TABLE orders (id int PRIMARY KEY, status text);"
        "ALTER TABLE orders REPLICA IDENTITY FULL;",
        policy_for("shop", public__orders={}),
        env=env,
    )
    for order in range(3):
        source.execute("INSERT INTO orders VALUES (%s, 'new')", (order,))
        source.capture()
    now = datetime.now(UTC)
    with psycopg.connect(pg_database, autocommit=True) as state:
        platform_db.install(state, RESOURCES / "sql")
        enrich_pending(source.store, state, source.policy, now=now, grace=timedelta(0))
    first = source.store.pending()[0].records[0]
    source.store.add_reindex({first: source.store.read([first])["id"].to_list()})
    install_template(es, RESOURCES, env, replicas=0)
    calls = []
    hours = index_pending(
        es, source.store, database="shopdb", now=now, coalesce=2, between=lambda: calls.append(1)
    )
    assert len(calls) == 3  # two batches, the third, then the re-index
    assert sum(h.indexed for h in hours) == 4  # three records, one of them twice
    assert source.store.pending() == []
    es.indices.refresh(index=read_alias(env))
    assert es.count(index=read_alias(env))["count"] == 3
