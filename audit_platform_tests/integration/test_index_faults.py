"""Elasticsearch stopped in the middle of indexing: the retry ends with every document once."""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from audit_platform.clients import elasticsearch_client
from audit_platform.index.bulk import index_records
from audit_platform.index.template import install_template
from audit_platform.naming import read_alias
from audit_platform.record import RECORD_SCHEMA
from audit_platform.settings import ElasticsearchConnection, Settings
from audit_platform_dev.stack.elasticsearch import LocalElasticsearch
from audit_platform_dev.stack.system import free_port, pid_alive

T0 = datetime(2026, 11, 26, 10, tzinfo=UTC)


def _records(n: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "id": [f"faults:shop:{i:016X}:0" for i in range(n)],
            "commit_time": [T0 + timedelta(seconds=i) for i in range(n)],
            "env": ["faults"] * n,
            "source": ["shop"] * n,
            "schema": ["public"] * n,
            "table": ["orders"] * n,
            "operation": ["insert"] * n,
            "object_id": [str(i) for i in range(n)],
            "changed_columns": ['["id","note"]'] * n,
            "before": [None] * n,
            "after": [f'{{"id":"{i}","note":"{"x" * 200}"}}' for i in range(n)],
            "context": ['{"actor":{"type":"job","id":"load"}}'] * n,
            "attribution_status": ["attributed"] * n,
            "attribution_lag_seconds": [None] * n,
            "xid": list(range(n)),
            "lsn": list(range(n)),
            "change_index": [0] * n,
            "key_columns": ['["id"]'] * n,
            "column_types": ['{"id":"integer","note":"text"}'] * n,
            "txn_changes": [1] * n,
            "txn_ignored": [0] * n,
            "policy_version": ["1:x"] * n,
            "server_version": [150010] * n,
            "row_organization": [None] * n,
            "personal": [None] * n,
            "context_personal": [None] * n,
        },
        schema=RECORD_SCHEMA,
    )


@pytest.mark.slow
def test_elasticsearch_stopped_during_indexing_then_retried_indexes_each_document_once(tmp_path):
    node = LocalElasticsearch(tmp_path / "stack", free_port(), free_port(), "512m")
    records = _records(20_000)
    record, _ = node.up()
    conn = ElasticsearchConnection(
        url=record.url,
        username=record.env["AUDIT_ES_USERNAME"],
        password=record.env["AUDIT_ES_PASSWORD"],
        ca_certs=record.env["AUDIT_ES_CA_CERTS"],
    )
    try:
        client = elasticsearch_client(conn, request_timeout=5)
        install_template(client, Settings().resources_dir, "faults", replicas=0)
        outcome: dict[str, object] = {}

        def index() -> None:
            try:
                outcome["result"] = index_records(
                    client, records, database="shopdb", ingested_at=T0, chunk_size=200
                )
            except Exception as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=index)
        worker.start()
        time.sleep(1.5)
        # In the middle of the bulk requests, at once: a graceful stop lets the node finish
        # what it was sent for seconds, long enough on a fast machine for all of it.
        os.kill(record.pid, signal.SIGKILL)
        while pid_alive(record.pid):
            time.sleep(0.05)
        worker.join(timeout=120)
        assert "error" in outcome, "indexing finished before Elasticsearch stopped; use more"

        node.up()
        client = elasticsearch_client(conn, request_timeout=30)
        client.cluster.health(wait_for_status="green", timeout="60s")
        retried = index_records(client, records, database="shopdb", ingested_at=T0)
        assert (retried.indexed, retried.failed.height) == (20_000, 0)
        client.indices.refresh(index=read_alias("faults"))
        assert client.count(index=read_alias("faults"))["count"] == 20_000
        ids = client.search(
            index=read_alias("faults"),
            size=0,
            aggs={
                "distinct": {"cardinality": {"field": "object_id", "precision_threshold": 40000}}
            },
        )["aggregations"]["distinct"]["value"]
        assert ids == 20_000
    finally:
        node.down()
