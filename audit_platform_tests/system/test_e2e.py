"""End to end, as deployed: the real Dagster webserver and daemon, the real API, real servers.

Traffic from the demo shop (HTTP requests through the SDK middleware, a background job, a batch
job, an administrator's direct SQL) is written to a source database; the capture sensor fires,
runs capture, enrich and index; the API returns every change with its context. Then a backfill
of one hour, launched through Dagster's GraphQL interface (what its UI uses), completes and
leaves the index identical.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from datetime import datetime

import httpx
import psycopg
import pytest
import yaml
from fastapi.testclient import TestClient

from audit_platform.api_keys import create_key
from audit_platform.defs.partitions import hour_key
from audit_platform_dev.demo.run import prepare_shop
from audit_platform_dev.demo.service import create_shop_app
from audit_platform_dev.demo.traffic import Traffic
from audit_platform_dev.stack.deployment import LocalDeployment
from audit_platform_dev.stack.system import free_port
from audit_platform_tests.conftest import new_database
from audit_platform_tests.helpers import environment_resources

TABLES = ("customers", "orders", "order_lines", "payments")

LAUNCH_BACKFILL = """
mutation ($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}"""
BACKFILL_STATUS = """
query ($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { status }
  }
}"""


@pytest.fixture(scope="module")
def deployment(servers, es, tmp_path_factory) -> Iterator[tuple[LocalDeployment, str, str]]:
    env = f"e2e_{uuid.uuid4().hex[:8]}"
    root = tmp_path_factory.mktemp("e2e")
    # This environment captures the shop every 5 seconds, and releases orphans at once.
    resources = environment_resources(
        root,
        env,
        yaml.safe_dump(
            {
                "sources": {"shop": {"url_env": "AUDIT_SOURCE_SHOP_URL"}},
                "capture_report_seconds": 5,
                "enrich_grace_minutes": 0,
                "retention_days": 7,
            }
        ),
    )
    exports = {k: v for k, v in os.environ.items() if k.startswith("AUDIT_")}
    with new_database(servers) as admin_db:
        shop_url = prepare_shop(admin_db, env, resources)
        deployed = LocalDeployment(
            exports,
            env,
            root,
            {"shop": shop_url},
            dagster_port=free_port(),
            api_port=free_port(),
            resources_dir=resources,
        )
        deployed.prepare()
        with psycopg.connect(servers.pg_url, autocommit=True) as conn:
            key = create_key(conn, env, "e2e").secret
        try:
            deployed.start()
            yield deployed, shop_url, key
        finally:
            deployed.stop()
            for index in es.indices.get(index=f"audit-{env}-*", expand_wildcards="all"):
                es.indices.delete(index=index)
            es.options(ignore_status=404).indices.delete_index_template(name=f"audit-{env}")
            with psycopg.connect(servers.pg_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "dagster_{env}" WITH (FORCE)')
                # the shop database is dropped by new_database, with its slot


def _rows(shop_url: str) -> dict[str, set[str]]:
    """Object ids of every row now in the shop's tables, as the records name them."""
    keys = {"order_lines": "order_id::text || ',' || line::text"}
    with psycopg.connect(shop_url, autocommit=True) as conn:
        return {
            t: {r[0] for r in conn.execute(f"SELECT {keys.get(t, 'id::text')} FROM {t}")}
            for t in TABLES
        }


def _export(api: str, key: str, **params) -> list[dict]:
    reply = httpx.get(f"{api}/v1/export", params=params, headers={"X-API-Key": key}, timeout=60)
    reply.raise_for_status()
    return [json.loads(line) for line in reply.text.splitlines()]


def test_traffic_reaches_the_api_with_its_context_and_a_backfill_changes_nothing(deployment):
    deployed, shop_url, key = deployment
    with TestClient(create_shop_app(shop_url)) as shop:
        traffic = Traffic("http://shop", shop_url, http=shop)
        for _ in range(25):
            traffic.user_action()
        traffic.ship_paid_orders()
        traffic.recalculate_tiers()
        traffic.administrator_fix()
    rows = _rows(shop_url)
    assert all(rows.values()), rows  # every table got rows

    # The sensor fires and runs capture, enrich and index; wait until every row is searchable.
    deadline, inserted = time.monotonic() + 240, {}
    while time.monotonic() < deadline:
        records = _export(deployed.api_url, key)
        inserted = {
            t: {
                r["object_id"]
                for r in records
                if r["table"]["name"] == t and r["operation"] == "insert"
            }
            for t in TABLES
        }
        admin = [r for r in records if r["attribution"]["status"] == "unattributed"]
        if inserted == rows and admin:
            break
        time.sleep(2)
    assert inserted == rows, "not every row reached the API in 240 s"

    by_actor = {}
    for record in records:
        by_actor.setdefault(
            record["context"]["actor"]["type"] if record["context"] else None, []
        ).append(record)
    for record in by_actor["user"]:  # requests through the middleware
        context = record["context"]
        assert context["service"] == "shop-api" and context["request_id"]
        assert record["user"]["id"] in {"alice", "bob", "carol", "dave", "erin"}
    shipped = [r for r in by_actor["job"] if r["context"]["job"]["name"] == "ship-paid-orders"]
    for record in shipped:
        assert record["context"]["reason"] == "warehouse pick-up"
        assert record["context"]["job"]["run_id"] and record["after"]["status"] == "shipped"
    [admin] = by_actor[None]
    assert admin["attribution"]["status"] == "unattributed" and admin["table"]["name"] == "orders"
    with psycopg.connect(shop_url, autocommit=True) as conn:
        emails = {r[0] for r in conn.execute("SELECT email FROM customers")}
    assert not emails & {r["after"].get("email") for r in records if r["after"]}  # masked

    # A backfill of one hour through Dagster's own interface leaves the index identical.
    hour = hour_key(
        datetime.fromisoformat(records[0]["@timestamp"]).replace(minute=0, second=0, microsecond=0)
    )
    in_hour = [r for r in records if r["@timestamp"][:13] == records[0]["@timestamp"][:13]]

    def snapshot() -> dict[str, dict]:
        found = _export(deployed.api_url, key)
        return {r["id"]: {k: v for k, v in r.items() if k != "ingested_at"} for r in found}

    before = snapshot()
    launched = deployed.graphql(
        LAUNCH_BACKFILL,
        {
            "params": {
                "partitionNames": [hour],
                "assetSelection": [{"path": ["shop", "enriched"]}, {"path": ["shop", "indexed"]}],
            }
        },
    )["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    deadline, status = time.monotonic() + 300, None
    while time.monotonic() < deadline:
        status = deployed.graphql(BACKFILL_STATUS, {"id": launched["backfillId"]})[
            "partitionBackfillOrError"
        ]["status"]
        if status not in {"REQUESTED", "CANCELING", "FAILING"}:
            break
        time.sleep(2)
    assert status in {"COMPLETED", "COMPLETED_SUCCESS"}, status
    after = snapshot()
    assert after == before and len(in_hour) > 0
    reindexed = [
        r
        for r in _export(deployed.api_url, key)
        if r["@timestamp"][:13] == records[0]["@timestamp"][:13]
    ]
    assert max(r["ingested_at"] for r in reindexed) > max(r["ingested_at"] for r in in_hour)
