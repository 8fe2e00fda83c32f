"""The Audit API against real Elasticsearch and PostgreSQL, with records from a real capture.

One shop database is captured into two environments (A and B). Environment A's API is asked
every question an investigator asks; the security tests try to read B's records and records
outside a key's scope through every endpoint.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from audit_platform.api.main import create_app
from audit_platform.api.refusals import LOGGED_PER_MINUTE
from audit_platform.api_keys import create_key
from audit_platform.capture.gaps import Gap, record_gap
from audit_platform.naming import read_alias
from audit_platform.settings import ApiSettings, Settings
from audit_platform_tests.capture_support import capture_enrich_index, make_source
from audit_platform_tests.conftest import new_database
from audit_platform_tests.helpers import environment_resources, policy_for
from audit_platform_tests.shop_data import (
    ADA,
    CHECKOUT_ORDERS,
    DDL,
    POLICY,
    Shop,
    shop_environments,
    write,
)


@pytest.fixture(scope="module")
def shop(servers, es, tmp_path_factory) -> Iterator[Shop]:
    with shop_environments(servers, es, tmp_path_factory.mktemp("api")) as found:
        yield found


def _client(env: str, **settings) -> TestClient:
    return TestClient(
        create_app(Settings(env=env, api=ApiSettings(key_cache_seconds=0), **settings))
    )


@pytest.fixture(scope="module")
def api_a(shop):
    with _client(shop.env) as client:
        yield client


@pytest.fixture(scope="module")
def api_b(shop):
    with _client(shop.other_env) as client:
        yield client


def get(client: TestClient, path: str, key: str | None, **params):
    headers = {"X-API-Key": key} if key else {}
    return client.get(path, params=params, headers=headers)


def events(client, key, **params) -> list[dict]:
    response = get(client, "/v1/events", key, limit=500, **params)
    assert response.status_code == 200, response.text
    return response.json()["events"]


# --- search and filters --------------------------------------------------------------------


def test_every_filter_narrows_the_search_to_what_it_names(shop, api_a):
    key = shop.keys["a"]

    def count(**params) -> int:
        return len(events(api_a, key, **params))

    assert count() == 51
    assert count(source="shop") == 51 and count(source="other") == 0
    assert count(table="customers") == 2 and count(table="public.order_lines") == 1
    assert count(table=["customers", "order_lines"]) == 3
    assert count(table="other_schema.orders") == 0
    assert count(operation="delete") == 1
    assert count(operation=["insert", "delete"]) == 44
    assert count(column="status", table="orders", operation="update") == 6
    assert count(column="email") == 2
    assert count(object_id="1", table="orders") == 2
    assert count(actor_id="ada") == 4
    assert count(actor_type="job") == 5
    assert count(actor_type="service") == CHECKOUT_ORDERS + 1
    assert count(request_id="req-ada-1") == 3
    assert count(job="nightly-close") == 5 and count(job="run-7") == 5
    assert count(xid=shop.xid_signup) == 3
    assert count(attribution="unattributed") == 1
    assert count(attribution=["attributed", "unattributed"]) == 51
    assert count(q="fragile glass") == 2  # the insert and the update of order 1
    assert count(q="fragile plastic") == 0  # all words must match
    assert count(since=shop.written["checkout"].isoformat()) == 8
    assert count(until=shop.written["signup"].isoformat()) == 3


def test_results_are_audit_records_in_time_order_either_way(shop, api_a):
    newest_first = events(api_a, shop.keys["a"])
    oldest_first = events(api_a, shop.keys["a"], order="asc")
    assert [e["id"] for e in newest_first] == [e["id"] for e in reversed(oldest_first)]
    first = oldest_first[0]
    assert first["id"].startswith(f"{shop.env}:shop:")
    assert first["context"]["actor"]["id"] == "ada" and first["user"]["id"] == "ada"
    assert first["@timestamp"] <= oldest_first[-1]["@timestamp"]
    assert [e["operation"] for e in oldest_first[-1:]] == ["delete"]


def test_pagination_walks_every_record_once_in_order(shop, api_a):
    everything = [e["id"] for e in events(api_a, shop.keys["a"], order="asc")]
    for order, expected in (("asc", everything), ("desc", everything[::-1])):
        seen, cursor, pages = [], None, 0
        while True:
            params = {"limit": 7, "order": order, **({"cursor": cursor} if cursor else {})}
            page = get(api_a, "/v1/events", shop.keys["a"], **params).json()
            seen += [e["id"] for e in page["events"]]
            pages += 1
            assert page["total"] == {"value": 51, "exact": True}
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == expected  # no gap, no repeat, same order
        assert pages == 8  # 51 records in pages of 7; the last page says it is the last


# --- one event, one transaction ------------------------------------------------------------


def test_one_event_and_one_transaction_with_its_context(shop, api_a):
    key = shop.keys["a"]
    [insert] = events(api_a, key, table="order_lines")
    response = get(api_a, f"/v1/events/{insert['id']}", key)
    assert response.status_code == 200 and response.json() == insert
    assert get(api_a, f"/v1/events/{shop.env}:shop:0000000000000000:0", key).status_code == 404

    tx = get(api_a, f"/v1/transactions/shop/{shop.xid_signup}", key).json()
    assert [c["table"]["name"] for c in tx["changes"]] == ["customers", "orders", "order_lines"]
    assert [c["transaction"]["change_index"] for c in tx["changes"]] == [0, 1, 2]
    assert tx["context"]["reason"] == "new customer signup"
    assert tx["attribution"]["status"] == "attributed"
    admin = get(api_a, f"/v1/transactions/shop/{shop.xid_admin}", key).json()
    assert admin["context"] is None and admin["attribution"]["status"] == "unattributed"
    assert get(api_a, "/v1/transactions/shop/1", key).status_code == 404


# --- objects -------------------------------------------------------------------------------


def test_object_history_has_every_change_with_its_column_diff(shop, api_a):
    history = get(api_a, "/v1/objects/shop/orders/1/history", shop.keys["a"]).json()
    changes = history["changes"]
    assert [c["event"]["operation"] for c in changes] == ["insert", "update"]
    update = changes[1]
    assert update["diff"] == [{"column": "status", "before": "new", "after": "paid"}]
    assert update["event"]["context"]["actor"]["id"] == "billing"
    composite = get(api_a, "/v1/objects/shop/public.order_lines/1,1/history", shop.keys["a"])
    assert [c["event"]["after"]["sku"] for c in composite.json()["changes"]] == ["VASE-1"]


def test_object_state_at_a_moment(shop, api_a):
    key = shop.keys["a"]
    path = "/v1/objects/shop/orders/1/state"
    then = get(api_a, path, key, at=shop.written["signup"].isoformat()).json()
    assert then["status"] == "present" and then["row"]["status"] == "new"
    assert then["row"]["total"] == "19.99"  # numeric keeps its precision as text
    now = get(api_a, path, key).json()
    assert now["status"] == "present" and now["row"]["status"] == "paid"
    gone = get(api_a, f"/v1/objects/shop/orders/{CHECKOUT_ORDERS + 1}/state", key).json()
    assert gone["status"] == "deleted" and gone["row"] is None
    assert gone["as_of"]["operation"] == "delete"
    before = (shop.written["signup"] - timedelta(hours=1)).isoformat()
    unknown = get(api_a, path, key, at=before).json()
    assert unknown["status"] == "unknown" and unknown["row"] is None
    assert "are kept from" in unknown["explanation"]
    assert unknown["earliest_retained"] is not None
    # A moment in whole seconds is that instant, not the whole second: Elasticsearch reads a
    # missing fraction under "lte" as .999999999, which once showed a row changed later.
    created = get(api_a, "/v1/objects/shop/orders/1/history", key).json()["changes"][0]
    first = datetime.fromisoformat(created["event"]["@timestamp"])
    whole = first.replace(microsecond=0).isoformat()
    assert first.microsecond > 0 and get(api_a, path, key, at=whole).json()["status"] == "unknown"


def test_object_state_says_unknown_when_retention_removed_the_records_it_needs(
    es, servers, tmp_path
):
    """An object's first record is removed (as retention removes old indices); its state at a
    moment that only that record covered is then unknown, never guessed."""
    env = f"api_{uuid.uuid4().hex[:8]}"
    with new_database(servers) as url:
        source = make_source(url, tmp_path, DDL, POLICY, env=env)
        write(url, [("INSERT INTO orders VALUES (7, 1, 'new', NULL, 1)", ())], ADA)
        write(url, [("UPDATE orders SET status = 'late' WHERE id = 7", ())], ADA)
        with psycopg.connect(servers.pg_url, autocommit=True) as state:
            capture_enrich_index(source, state, es)
            key = create_key(state, env, "retention test").secret
        with _client(env) as api:
            first, second = get(api, "/v1/objects/shop/orders/7/history", key).json()["changes"]
            at = first["event"]["@timestamp"]
            assert (
                get(api, "/v1/objects/shop/orders/7/state", key, at=at).json()["row"]["status"]
                == "new"
            )
            es.delete(index=read_alias(env), id=first["event"]["id"], refresh=True)
            answer = get(api, "/v1/objects/shop/orders/7/state", key, at=at).json()
            assert answer["status"] == "unknown" and answer["row"] is None
            assert "retention has removed the record" in answer["explanation"]
            assert answer["earliest_retained"] == second["event"]["@timestamp"]
            assert (
                get(api, "/v1/objects/shop/orders/7/state", key).json()["row"]["status"] == "late"
            )
    for index in es.indices.get(index=f"audit-{env}-*", expand_wildcards="all"):
        es.indices.delete(index=index)
    es.indices.delete_index_template(name=f"audit-{env}")


# --- activity and statistics ---------------------------------------------------------------


def test_statistics_count_by_table_operation_actor_and_time(shop, api_a):
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    since, until = (hour - timedelta(hours=23)).isoformat(), (hour + timedelta(hours=1)).isoformat()
    stats = get(api_a, "/v1/stats", shop.keys["a"], since=since, until=until).json()
    assert stats["total"] == 51
    by = {
        name: {b["key"]: b["count"] for b in stats[name]}
        for name in ("by_table", "by_operation", "by_actor", "by_attribution")
    }
    assert by["by_table"] == {"public.orders": 48, "public.customers": 2, "public.order_lines": 1}
    assert by["by_operation"] == {"insert": 43, "update": 7, "delete": 1}
    assert by["by_actor"]["checkout"] == CHECKOUT_ORDERS and by["by_actor"]["(none)"] == 1
    assert by["by_attribution"] == {"attributed": 50, "unattributed": 1}
    assert sum(b["count"] for b in stats["over_time"]) == 51
    assert len(stats["over_time"]) == 24  # every hour of the range, the empty ones too


def test_an_actors_activity(shop, api_a):
    activity = get(api_a, "/v1/actors/ada/activity", shop.keys["a"]).json()
    assert activity["stats"]["total"] == 4
    assert activity["recent"][0]["context"]["request_id"] == "req-ada-2"
    assert activity["first_seen"] <= activity["last_seen"]
    assert {b["key"] for b in activity["stats"]["by_table"]} == {
        "public.customers",
        "public.orders",
        "public.order_lines",
    }


# --- export --------------------------------------------------------------------------------


def test_export_as_ndjson_and_csv_holds_exactly_the_search_result(shop, api_a):
    key = shop.keys["a"]
    expected = [e["id"] for e in events(api_a, key, order="asc", table="orders")]
    ndjson = get(api_a, "/v1/export", key, table="orders")
    assert ndjson.headers["content-type"] == "application/x-ndjson"
    assert "attachment" in ndjson.headers["content-disposition"]
    assert [json.loads(line)["id"] for line in ndjson.text.splitlines()] == expected
    text = get(api_a, "/v1/export", key, table="orders", format="csv").text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["id"] for r in rows] == expected
    assert rows[0]["context.actor.id"] == "ada" and json.loads(rows[0]["after"])["status"] == "new"


# --- security ------------------------------------------------------------------------------

PATHS = [
    "/v1/events",
    "/v1/stats",
    "/v1/export",
    "/v1/actors/ada/activity",
    "/v1/objects/shop/orders/1/history",
    "/v1/objects/shop/orders/1/state",
]


def test_every_endpoint_but_health_needs_a_valid_key_of_this_environment(shop, api_a, api_b):
    malformed = "not-a-key"
    wrong_secret = shop.keys["a"][:-4] + "AAAA"
    for path in [*PATHS, f"/v1/transactions/shop/{shop.xid_signup}"]:
        for key in (None, malformed, wrong_secret, shop.keys["b"], shop.keys["revoked"]):
            response = get(api_a, path, key)
            assert response.status_code == 401, (path, key, response.text)
            assert "API key" in response.json()["detail"]
        assert get(api_b, path, shop.keys["a"]).status_code == 401
    assert get(api_a, "/healthz", None).status_code == 200
    assert get(api_a, "/readyz", None).json()["ready"] is True


def test_bearer_authorization_works_like_the_header(shop, api_a):
    response = api_a.get("/v1/events", headers={"Authorization": f"Bearer {shop.keys['a']}"})
    assert response.status_code == 200 and len(response.json()["events"]) == 50


def test_a_key_never_sees_another_environments_records(shop, api_a, api_b):
    a_ids = {e["id"] for e in events(api_a, shop.keys["a"])}
    b_ids = {e["id"] for e in events(api_b, shop.keys["b"])}
    assert len(a_ids) == len(b_ids) == 51 and not a_ids & b_ids  # same changes, two envs
    for b_id in list(b_ids)[:5]:
        assert get(api_a, f"/v1/events/{b_id}", shop.keys["a"]).status_code == 404
    assert all(e["env"] == shop.env for e in events(api_a, shop.keys["a"], source="shop"))


def test_a_scoped_key_gets_nothing_outside_its_scope(shop, api_a):
    key = shop.keys["orders"]
    found = events(api_a, key)
    assert len(found) == 48 and {e["table"]["name"] for e in found} == {"orders"}
    assert events(api_a, key, table="customers") == []
    assert (
        events(api_a, key, table=["customers", "orders"], operation="delete")[0]["table"]["name"]
        == "orders"
    )
    customer_event = events(api_a, shop.keys["a"], table="customers")[0]["id"]
    assert get(api_a, f"/v1/events/{customer_event}", key).status_code == 404
    tx = get(api_a, f"/v1/transactions/shop/{shop.xid_signup}", key).json()
    assert [c["table"]["name"] for c in tx["changes"]] == ["orders"]
    assert get(api_a, "/v1/objects/shop/customers/1/history", key).json()["changes"] == []
    assert get(api_a, "/v1/objects/shop/customers/1/state", key).json()["status"] == "unknown"
    assert get(api_a, "/v1/stats", key).json()["total"] == 48
    assert get(api_a, "/v1/actors/ada/activity", key).json()["stats"]["total"] == 1
    exported = list(csv.DictReader(io.StringIO(get(api_a, "/v1/export", key, format="csv").text)))
    assert {(r["table.schema"], r["table.name"]) for r in exported} == {("public", "orders")}
    assert len(exported) == 48
    assert events(api_a, shop.keys["other_source"]) == []  # a source this env does not have


def test_a_table_scoped_key_learns_no_count_of_the_tables_outside_its_scope(shop, api_a):
    """The signup transaction changed customers, orders and order_lines: a key of orders alone
    must not learn how many changes the transaction held, nor how many wait in the quarantine."""
    whole = get(api_a, f"/v1/transactions/shop/{shop.xid_signup}", shop.keys["a"]).json()
    assert {c["transaction"]["changes"] for c in whole["changes"]} == {3}
    assert whole["completeness"]["waiting"] == 0
    path = f"/v1/transactions/shop/{shop.xid_signup}"
    scoped = get(api_a, path, shop.keys["orders"]).json()
    assert scoped["completeness"] == {
        "captured": None,
        "ignored": None,
        "indexed": 1,
        "waiting": None,
        "missing": None,
        "complete": None,
        "explanation": scoped["completeness"]["explanation"],
    }
    key = shop.keys["orders"]
    records = [*scoped["changes"], *events(api_a, key, xid=shop.xid_signup)]
    records.append(get(api_a, f"/v1/events/{scoped['changes'][0]['id']}", key).json())
    records += get(api_a, "/v1/requests/req-ada-1", key).json()["transactions"][0]["changes"]
    exported = get(api_a, "/v1/export", key, xid=shop.xid_signup).text.splitlines()
    records += [json.loads(line) for line in exported]
    assert len(records) == 5
    for found in records:
        assert found["transaction"].get("changes") is None, found
        assert found["transaction"].get("ignored") is None, found
    csv_export = get(api_a, "/v1/export", key, xid=shop.xid_signup, format="csv").text
    [row] = csv.DictReader(io.StringIO(csv_export))
    assert not row.get("transaction.changes") and not row.get("transaction.ignored")


def test_masked_columns_stay_masked_in_every_answer(shop, api_a):
    key = shop.keys["a"]
    customer = events(api_a, key, table="customers", order="asc")
    emails = [e["after"]["email"] for e in customer]
    assert "ada@example.com" not in emails and "ada@new.example" not in emails
    assert customer[1]["changed_columns"] == ["email"]  # the change is still recorded
    assert events(api_a, key, q="ada@example.com") == []
    exported = get(api_a, "/v1/export", key).text
    assert "ada@example.com" not in exported and "ada@new.example" not in exported


def test_each_request_is_logged_with_its_key_id_and_never_the_key(shop, api_a, caplog):
    with caplog.at_level(logging.INFO, logger="audit_platform.api.access"):
        get(api_a, "/v1/objects/shop/customers/1/history", shop.keys["a"])
    _, key_id, secret = shop.keys["a"].split("_", 2)  # the secret may itself hold "_"
    [line] = [r.getMessage() for r in caplog.records if r.name == "audit_platform.api.access"]
    assert f"key={key_id}" in line and "200" in line
    assert shop.keys["a"] not in line and secret not in line
    assert "/customers/1/" not in line  # the route's template, not the values in the path


def _read_log(servers, env: str) -> list[tuple]:
    with psycopg.connect(servers.pg_url) as conn:
        return conn.execute(
            "SELECT id, key_id, route, params FROM audit_platform.read_log WHERE env = %s"
            " ORDER BY id",
            (env,),
        ).fetchall()


def test_a_failed_authentication_is_no_read_and_a_flood_of_them_logs_a_bounded_few_lines(
    shop, servers, caplog
):
    """A made-up request, even one naming a real key id, never reaches the signed read log; a
    flood of them is counted exactly at /metrics but logs at most a few lines a minute."""
    _, real_id, _ = shop.keys["a"].split("_", 2)
    forged = f"ak_{real_id}_{'A' * 43}"  # a real key id with a guessed secret
    flood = 100
    with _client(shop.env) as api:  # its own process-wide allowance of log lines
        before = _read_log(servers, shop.env)
        with caplog.at_level(logging.DEBUG, logger="audit_platform"):
            for i in range(flood):
                for key in (None, "not-a-key", forged):
                    response = get(api, "/v1/events", key, q=f"made up {i}")
                    assert response.status_code == 401, response.text
        assert _read_log(servers, shop.env) == before
        problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert 1 <= len(problems) <= LOGGED_PER_MINUTE
        assert all(r.name == "audit_platform.api.auth" for r in problems)
        assert any(real_id in r.getMessage() for r in problems)  # someone tries this key
        assert all(forged not in r.getMessage() for r in problems)  # never the secret
        counted = {
            s.labels["reason"]: s.value
            for family in text_string_to_metric_families(get(api, "/metrics", None).text)
            for s in family.samples
            if s.name == "audit_api_failed_authentications_total"
        }
        assert counted == {"missing": flood, "malformed": flood, "unknown": flood}
        # The key itself still leaves its row, attributed to it.
        assert get(api, "/v1/events", shop.keys["a"], q="genuine").status_code == 200
        [(_, key_id, route, params)] = _read_log(servers, shop.env)[len(before) :]
        assert (key_id, route, params) == (real_id, "/v1/events", {"q": "genuine"})


# --- errors and limits ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"operation": "drop"}, "operation"),
        ({"since": "yesterday"}, "since"),
        ({"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "since"),
        ({"since": "2020-01-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "since"),
        ({"cursor": "bm90IGEgY3Vyc29y"}, "cursor"),
        ({"tabel": "orders"}, "tabel"),
        ({"xid": -1}, "xid"),
    ],
)
def test_bad_parameters_get_422_naming_the_field(shop, api_a, params, field):
    response = get(api_a, "/v1/events", shop.keys["a"], **params)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert field in error["loc"] and error["msg"]


def test_a_cursor_only_works_for_its_own_order(shop, api_a):
    page = get(api_a, "/v1/events", shop.keys["a"], limit=5).json()
    response = get(api_a, "/v1/events", shop.keys["a"], cursor=page["next_cursor"], order="asc")
    assert response.status_code == 422 and "order" in response.json()["detail"][0]["msg"]


def test_query_text_is_data_not_query_syntax(shop, api_a):
    for text in ("status:paid OR *", '"unbalanced', "a AND (b", "\\", "*:*", "{}", "new"):
        assert get(api_a, "/v1/events", shop.keys["a"], q=text).status_code == 200
    assert events(api_a, shop.keys["a"], q="*:*") == []


def test_elasticsearch_unavailable_is_503_with_a_retry_hint(shop, servers):
    """The API pointed at a port where no Elasticsearch listens: a real refused connection."""
    with _client(shop.env, es_url="https://127.0.0.1:9") as api:
        response = get(api, "/v1/events", shop.keys["a"])
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert "Elasticsearch is unavailable" in response.json()["detail"]
        assert "Traceback" not in response.text
        ready = get(api, "/readyz", None)
        assert ready.status_code == 503
        assert ready.json()["checks"]["elasticsearch"].startswith("unavailable")
        assert get(api, "/healthz", None).status_code == 200


def test_the_first_request_after_the_database_dropped_every_connection_succeeds(shop, servers):
    """What a PostgreSQL restart does to the pool: every pooled connection dies server-side."""
    with _client(shop.env) as api:
        assert get(api, "/v1/stats", shop.keys["a"]).status_code == 200
        with psycopg.connect(servers.pg_url, autocommit=True) as admin:
            ended = admin.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = %s",
                (f"audit-api-{shop.env}",),
            ).fetchone()[0]
        assert ended >= 1
        response = get(api, "/v1/stats", shop.keys["a"])
        assert response.status_code == 200, response.text


def test_gaps_are_served_to_keys_that_may_read_their_source(shop, api_a, servers):
    gap = Gap(
        env=shop.env,
        source="shop",
        from_lsn=100,
        to_lsn=200,
        last_captured_at=None,
        reason="the slot was invalidated by PostgreSQL (wal_status = lost) and replaced",
    )
    with psycopg.connect(servers.pg_url, autocommit=True) as conn:
        record_gap(conn, gap)
        record_gap(conn, gap.model_copy(update={"env": shop.other_env}))
    response = get(api_a, "/v1/gaps", shop.keys["a"])
    assert response.status_code == 200, response.text
    [served] = response.json()["gaps"]
    assert (served["source"], served["from_lsn"], served["to_lsn"]) == ("shop", 100, 200)
    assert get(api_a, "/v1/gaps", shop.keys["other_source"]).json()["gaps"] == []


def test_a_key_limited_to_tables_gets_the_gaps_of_the_sources_holding_them(servers, tmp_path):
    """A gap covers every table of its source; a key of tables (any source) is told of the
    sources whose policy captures one of its tables, and never of the others."""
    env = f"gaps_{uuid.uuid4().hex[:8]}"  # its own gaps, whatever other tests record
    resources = environment_resources(
        tmp_path,
        env,
        "sources:\n  shop:\n    url_env: AUDIT_SOURCE_SHOP_URL\n"
        "  billing:\n    url_env: AUDIT_SOURCE_BILLING_URL\n",
    )
    (resources / "sources" / "shop.yaml").write_text(
        "source: shop\nversion: 1\ntables:\n  public.customers: {}\n  public.orders: {}\n"
    )
    (resources / "sources" / "billing.yaml").write_text(
        "source: billing\nversion: 1\ntables:\n  public.invoices: {}\n"
    )
    with psycopg.connect(servers.pg_url, autocommit=True) as conn:
        for source in ("shop", "billing", "retired"):
            record_gap(
                conn,
                Gap(
                    env=env,
                    source=source,
                    from_lsn=300,
                    to_lsn=400,
                    last_captured_at=None,
                    reason="dropped",
                ),
            )
        keys = {
            tables: create_key(conn, env, "t", tables=[tables]).secret
            for tables in ("public.orders", "public.invoices", "public.nowhere")
        }
        keys["all"] = create_key(conn, env, "all").secret
    with _client(env, resources_dir=resources) as api:

        def sources(key: str) -> set[str]:
            response = get(api, "/v1/gaps", key)
            assert response.status_code == 200, response.text
            return {gap["source"] for gap in response.json()["gaps"]}

        assert sources(keys["public.orders"]) == {"shop"}
        assert sources(keys["public.invoices"]) == {"billing"}
        assert sources(keys["public.nowhere"]) == set()
        assert sources(keys["all"]) == {"shop", "billing", "retired"}


# --- value filters and the query language ---------------------------------------------------


def test_value_filters_before_after_and_a_transition(shop, api_a):
    key = shop.keys["a"]
    paid = events(api_a, key, **{"after.status": "paid"})
    assert [(e["object_id"], e["before"]["status"]) for e in paid] == [("1", "new")]
    assert events(api_a, key, after=["status:paid"]) == paid  # the list spelling
    closed = events(api_a, key, before=["status:new"], after=["status:closed"])
    assert sorted(int(e["object_id"]) for e in closed) == [2, 3, 4, 5, 6]
    assert events(api_a, key, before=["status:paid"], after=["status:closed"]) == []
    # A masked column is filtered by its masked value: equal values stay comparable.
    [changed] = events(api_a, key, table="customers", operation="update")
    masked = changed["after"]["email"]
    assert masked != "ada@new.example"
    assert [e["id"] for e in events(api_a, key, **{"after.email": masked})] == [changed["id"]]
    stats = get(api_a, "/v1/stats", key, **{"after.status": "closed"}).json()
    assert stats["total"] == 5


def test_the_query_language_on_search_stats_and_export(shop, api_a):
    key = shop.keys["a"]
    found = events(
        api_a,
        key,
        query="actor:nightly-close op:update table:orders before.status:new after.status:closed",
    )
    assert sorted(int(e["object_id"]) for e in found) == [2, 3, 4, 5, 6]
    either = events(api_a, key, query="op:update,delete table:public.orders")
    assert {e["operation"] for e in either} == {"update", "delete"}
    not_checkout = events(api_a, key, query="table:orders -actor:checkout")
    assert not_checkout and all(
        e["context"] is None or e["context"]["actor"]["id"] != "checkout" for e in not_checkout
    )
    vase = events(api_a, key, query='"fragile glass"')
    assert {(e["object_id"], e["operation"]) for e in vase} == {("1", "insert"), ("1", "update")}
    assert [e["object_id"] for e in events(api_a, key, query="job:run-7 object:4")] == ["4"]
    recent = events(api_a, key, query="table:orders since:-1h")
    assert len(recent) == len(events(api_a, key, table="orders"))
    stats = get(api_a, "/v1/stats", key, query="actor:checkout").json()
    assert stats["total"] == CHECKOUT_ORDERS
    exported = get(api_a, "/v1/export", key, query="request:req-ada-2")
    assert [json.loads(line)["table"]["name"] for line in exported.text.splitlines()] == [
        "customers"
    ]


@pytest.mark.parametrize(
    ("params", "field", "message"),
    [
        ({"query": "actor:ada acter:bob"}, "query", "term 2 `acter:bob`: unknown field"),
        ({"query": "op:upsert"}, "query", "'upsert' is not one of"),
        ({"query": "since:-1h", "since": "2026-01-01T00:00:00Z"}, "query", "given both"),
        ({"after": "status"}, "after", "pattern"),
    ],
)
def test_a_bad_query_is_a_422_that_points_at_the_term(shop, api_a, params, field, message):
    response = get(api_a, "/v1/events", shop.keys["a"], **params)
    assert response.status_code == 422, response.text
    assert message in response.text


def test_an_excluded_column_cannot_be_filtered_by_value(shop, tmp_path):
    resources = environment_resources(
        tmp_path, shop.env, "sources:\n  shop:\n    url_env: AUDIT_SOURCE_SHOP_URL\n"
    )
    (resources / "sources" / "shop.yaml").write_text(
        "source: shop\nversion: 1\ntables:\n  public.customers:\n    exclude: [name]\n"
        "  public.orders: {}\n"
    )
    with _client(shop.env, resources_dir=resources) as api:
        refused = get(api, "/v1/events", shop.keys["a"], **{"after.name": "Ada"})
        assert refused.status_code == 422
        [problem] = refused.json()["detail"]
        assert problem["loc"] == ["query", "after.name"]
        assert "excluded by its policy" in problem["msg"]
        refused = get(api, "/v1/stats", shop.keys["a"], query="before.name:Ada")
        assert refused.status_code == 422
        # orders excludes nothing: a column of that name there may be filtered.
        assert (
            get(
                api, "/v1/events", shop.keys["a"], table="orders", **{"after.name": "x"}
            ).status_code
            == 200
        )
        # A key that cannot read the shop source, or its customers, is told nothing about them.
        for other in ("other_source", "orders"):
            answer = get(api, "/v1/events", shop.keys[other], **{"after.name": "Ada"})
            assert answer.status_code == 200, answer.text


def test_correlation_filters_trace_service_and_client_ip(shop, api_a):
    key = shop.keys["a"]
    assert len(events(api_a, key, service="shop-api")) == 4  # Ada's two requests
    assert events(api_a, key, trace_id="no-such-trace") == []
    assert events(api_a, key, client_ip="10.0.0.0/8") == []
    assert get(api_a, "/v1/events", key, client_ip="nope").status_code == 422


# --- correlation ----------------------------------------------------------------------------


def test_a_request_and_a_job_run_grouped_by_transaction_within_the_keys_scope(shop, api_a):
    key = shop.keys["a"]
    request = get(api_a, "/v1/requests/req-ada-1", key).json()
    assert (request["kind"], request["key"], request["sources"]) == (
        "request",
        {"request_id": "req-ada-1"},
        ["shop"],
    )
    [signup] = request["transactions"]
    assert signup["xid"] == shop.xid_signup and signup["context"]["request_id"] == "req-ada-1"
    assert [c["table"]["name"] for c in signup["changes"]] == ["customers", "orders", "order_lines"]
    scoped = get(api_a, "/v1/requests/req-ada-1", shop.keys["orders"]).json()
    assert [c["table"]["name"] for t in scoped["transactions"] for c in t["changes"]] == ["orders"]
    hidden = get(api_a, "/v1/requests/req-ada-1", shop.keys["other_source"]).json()
    assert hidden["transactions"] == [] and hidden["sources"] == []

    pages, cursor = [], None
    while True:
        page = get(
            api_a,
            "/v1/jobs/nightly-close/runs/run-7",
            key,
            limit=2,
            **({"cursor": cursor} if cursor else {}),
        ).json()
        pages.append([c["object_id"] for t in page["transactions"] for c in t["changes"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == [["2", "3"], ["4", "5"], ["6"]]
    assert get(api_a, "/v1/traces/no-such-trace", key).json()["transactions"] == []


TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def test_a_request_spanning_two_sources_in_commit_order(servers, es, tmp_path):
    env = f"corr_{uuid.uuid4().hex[:8]}"
    ddl = (
        "CREATE TABLE orders (id int PRIMARY KEY, status text);"
        "ALTER TABLE orders REPLICA IDENTITY FULL;"
    )
    context = {"actor": {"type": "user", "id": "ada"}, "request_id": "req-x", "trace_id": TRACE}
    with new_database(servers) as shop_db, new_database(servers) as billing_db:
        shop_src = make_source(
            shop_db, tmp_path / "s", ddl, policy_for("shop", public__orders={}), env=env
        )
        billing = make_source(
            billing_db, tmp_path / "b", ddl, policy_for("billing", public__orders={}), env=env
        )
        xids = [
            write(shop_db, [("INSERT INTO orders VALUES (1, 'new')", ())], context),
            write(billing_db, [("INSERT INTO orders VALUES (7, 'invoiced')", ())], context),
            write(shop_db, [("UPDATE orders SET status = 'paid' WHERE id = 1", ())], context),
        ]
        with psycopg.connect(servers.pg_url, autocommit=True) as state:
            for each in (shop_src, billing):
                capture_enrich_index(each, state, es, grace=timedelta(0))
            key = create_key(state, env, "all").secret
        try:
            with _client(env) as api:
                found = get(api, "/v1/requests/req-x", key).json()
                assert [(t["source"], t["xid"]) for t in found["transactions"]] == list(
                    zip(["shop", "billing", "shop"], xids, strict=True)
                )
                assert found["sources"] == ["billing", "shop"]
                trace = get(api, f"/v1/traces/{TRACE}", key).json()
                assert trace["transactions"] == found["transactions"]
                assert len(events(api, key, trace_id=TRACE)) == 3
        finally:
            for index in es.indices.get(index=f"audit-{env}-*", expand_wildcards="all"):
                es.indices.delete(index=index)
            es.indices.delete_index_template(name=f"audit-{env}")


# --- complete transactions ------------------------------------------------------------------


def test_a_transaction_says_how_many_changes_were_captured_ignored_indexed_and_missing(
    servers, es, tmp_path
):
    env = f"txn_{uuid.uuid4().hex[:8]}"
    ddl = (
        "CREATE TABLE orders (id int PRIMARY KEY, status text, updated_at int);"
        "ALTER TABLE orders REPLICA IDENTITY FULL;"
    )
    policy = policy_for("shop", public__orders={"ignore_changes_to": ["updated_at"]})
    with new_database(servers) as db:
        source = make_source(db, tmp_path, ddl, policy, env=env)
        write(
            db, [("INSERT INTO orders VALUES (1, 'new', 0), (2, 'new', 0), (3, 'new', 0)", ())], ADA
        )
        xid = write(
            db,
            [
                ("UPDATE orders SET updated_at = 1 WHERE id = 1", ()),  # ignored
                ("UPDATE orders SET status = 'paid' WHERE id IN (2, 3)", ()),
            ],
            ADA,
        )
        with psycopg.connect(servers.pg_url, autocommit=True) as state:
            capture_enrich_index(source, state, es, grace=timedelta(0))
            keys = {
                "all": create_key(state, env, "all").secret,
                "orders": create_key(state, env, "t", tables=["public.orders"]).secret,
            }
        try:
            with _client(env) as api:

                def completeness(key: str = "all") -> dict:
                    reply = get(api, f"/v1/transactions/shop/{xid}", keys[key])
                    assert reply.status_code == 200, reply.text
                    return reply.json()["completeness"]

                assert completeness() == {
                    "captured": 3,
                    "ignored": 1,
                    "indexed": 2,
                    "waiting": 0,
                    "missing": 0,
                    "complete": True,
                    "explanation": "every change capture staged is indexed or ignored by policy",
                }
                # A document lost from the index (a dead letter, a deleted document).
                lost = events(api, keys["all"], xid=xid)[0]["id"]
                es.delete(index=_index_of(es, env, lost), id=lost, refresh=True)
                found = completeness()
                assert (found["indexed"], found["missing"], found["complete"]) == (1, 1, False)
                assert "1 of 3 neither indexed nor waiting" in found["explanation"]
                assert completeness("orders")["captured"] is None  # a table-scoped key
        finally:
            for index in es.indices.get(index=f"audit-{env}-*", expand_wildcards="all"):
                es.indices.delete(index=index)
            es.indices.delete_index_template(name=f"audit-{env}")


def _index_of(es, env: str, doc_id: str) -> str:
    hit = es.search(index=f"audit-{env}", query={"ids": {"values": [doc_id]}})["hits"]["hits"][0]
    return hit["_index"]


def test_each_answer_says_how_long_it_spent_in_elasticsearch(shop, api_a):
    timing = get(api_a, "/v1/events", shop.keys["a"]).headers["server-timing"]
    es_part, total_part = timing.split(", ")
    assert es_part.startswith("es;dur=") and 'desc="Elasticsearch (1 calls)"' in es_part
    es_ms = float(es_part.split(";")[1].removeprefix("dur="))
    total_ms = float(total_part.removeprefix("total;dur="))
    assert 0 < es_ms <= total_ms
    assert 'desc="Elasticsearch (0 calls)"' in get(api_a, "/healthz", None).headers["server-timing"]


def test_prometheus_metrics_count_requests_latency_and_records_by_route_template(shop):
    with _client(shop.env) as client:
        key = shop.keys["a"]
        first = events(client, key, table="orders", operation="update")
        events(client, key, actor_id="ada")
        assert get(client, "/v1/events", None).status_code == 401
        assert get(client, "/v1/events/no-such-id", key).status_code == 404
        answer = client.get("/metrics")  # no key: aggregates only, no personal data
        assert answer.status_code == 200
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(answer.text)
            for s in family.samples
        }

        def value(name: str, **labels: str) -> float:
            return samples.get((name, tuple(sorted(labels.items()))), 0.0)

        route = {"route": "/v1/events"}
        assert value("audit_api_requests_total", method="GET", status="200", **route) == 2
        assert value("audit_api_requests_total", method="GET", status="401", **route) == 1
        one = {"route": "/v1/events/{event_id}"}  # the template, never the id asked for
        assert value("audit_api_requests_total", method="GET", status="404", **one) == 1
        assert value("audit_api_request_duration_seconds_count", **route) == 3
        assert value("audit_api_elasticsearch_duration_seconds_sum", **route) > 0
        assert value("audit_api_records_returned_total", **route) == len(first) + 4
        assert not any("no-such-id" in str(labels) for _, labels in samples)
