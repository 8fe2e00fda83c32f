"""Schema changes of tracked tables through the real pipeline (PostgreSQL's event triggers, the
slot, enrichment, Elasticsearch): each kind of DDL with its transaction's context, a column
dropped and re-added with another type, a table renamed, created and dropped; a rename the
policy does not follow stops capture instead of losing the table's changes; a role with CONNECT
cannot forge or hide a schema change; the state of a row at a moment has the columns its table
had then, and a table's page shows its schema history (docs/design.md, "Schema history")."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import psycopg
import pytest
from fastapi.testclient import TestClient

from audit_platform import platform_db
from audit_platform.api.main import create_app
from audit_platform.api_keys import Scope, create_key
from audit_platform.capture.schema_changes import SchemaBroken
from audit_platform.query.language import parse
from audit_platform.query.reads import object_state
from audit_platform.settings import ApiSettings, Settings
from audit_platform.sources.check import Finding, Level, check_source
from audit_platform.sources.setup import (
    record_schema_changes,
    schema_history_installed,
    setup_source,
)
from audit_platform_tests.capture_support import capture_enrich_index, make_source
from audit_platform_tests.helpers import policy_for

SQL = Settings().resources_dir / "sql"
DDL = """
CREATE TABLE orders (id int PRIMARY KEY, status text);
ALTER TABLE orders REPLICA IDENTITY FULL;
CREATE TABLE other (id int PRIMARY KEY);
"""
MIGRATOR = {"actor": {"type": "job", "id": "migrate"}, "reason": "release 42"}


@pytest.fixture
def shop(pg_database, tmp_path, es_prefix):
    env = es_prefix.replace("-", "_")  # indices of this test's own, removed after it
    source = make_source(pg_database, tmp_path, DDL, policy_for("shop", public__orders={}), env)
    # Tables the migrations below create or rename to (setup wants only tables that exist).
    source.policy = policy_for("shop", public__orders={}, public__orders_v2={}, public__items={})
    source.state = psycopg.connect(pg_database, autocommit=True)
    platform_db.install(source.state, SQL)
    yield source
    source.state.close()


def _migrate(source, statement: str) -> int:
    """One migration step in its own transaction, with its context; returns its xid."""
    with psycopg.connect(source.url) as conn:
        conn.execute("SELECT audit.set_context(%s)", (json.dumps(MIGRATOR),))
        conn.execute(statement)
        xid = conn.execute("SELECT txid_current() % 4294967296").fetchone()[0]
    return xid


def _catalog_columns(source, table: str) -> dict[str, bool]:
    """Each column and whether it may be null, as information_schema says: the test's own view
    of the table, not the event trigger's."""
    with psycopg.connect(source.url) as conn:
        rows = conn.execute(
            "SELECT column_name, is_nullable FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name = %s",
            (table,),
        ).fetchall()
    return {name: nullable == "YES" for name, nullable in rows}


def _ddl_records(es, source) -> list[dict]:
    query = parse("op:ddl", now=datetime.now(UTC))  # the query language, as the API reads it
    hits = es.search(
        index=f"audit-{source.env}-*",
        query={"bool": {"filter": query.clauses()}},
        sort=[{"transaction.lsn": "asc"}, {"transaction.change_index": "asc"}],
        size=100,
    )["hits"]["hits"]
    return [hit["_source"] for hit in hits]


def test_each_kind_of_schema_change_is_a_record_with_its_context(shop, es):
    steps = [
        ("ALTER TABLE orders ADD COLUMN note text", "orders", ["note"]),
        ("ALTER TABLE orders ALTER COLUMN note TYPE varchar(20)", "orders", ["note"]),
        ("ALTER TABLE orders RENAME COLUMN note TO remark", "orders", ["note", "remark"]),
        ("ALTER TABLE orders DROP COLUMN remark", "orders", ["remark"]),
        ("ALTER TABLE orders ADD COLUMN remark integer", "orders", ["remark"]),
        ("ALTER TABLE orders ALTER COLUMN status SET NOT NULL", "orders", ["status"]),
        ("ALTER TABLE orders RENAME TO orders_v2", "orders_v2", []),
        ("ALTER TABLE orders_v2 REPLICA IDENTITY DEFAULT", "orders_v2", []),
        ("CREATE TABLE items (id bigint PRIMARY KEY, name text)", "items", ["id", "name"]),
        ("DROP TABLE items", "items", ["id", "name"]),
    ]
    shapes, xids = [], []
    for statement, table, _ in steps:
        xids.append(_migrate(shop, statement))
        shapes.append(_catalog_columns(shop, table))
    # Neither an untracked table's change, a change that changes no shape, nor a rolled-back
    # one is a record.
    _migrate(shop, "ALTER TABLE other ADD COLUMN x int")
    _migrate(shop, "ALTER TABLE orders_v2 SET (fillfactor = 90)")
    with pytest.raises(psycopg.errors.DivisionByZero), psycopg.connect(shop.url) as conn:
        conn.execute("ALTER TABLE orders_v2 ADD COLUMN never text")
        conn.execute("SELECT 1 / 0")
    _migrate(shop, "INSERT INTO orders_v2 (id, status, remark) VALUES (1, 'new', 7)")

    capture_enrich_index(shop, shop.state, es)

    records = _ddl_records(es, shop)
    assert [r["table"]["name"] for r in records] == [table for _, table, _ in steps]
    assert [r["changed_columns"] for r in records] == [changed for *_, changed in steps]
    assert [r["transaction"]["xid"] for r in records] == xids
    for record, shape in zip(records, shapes, strict=True):
        assert record["context"]["actor"]["id"] == "migrate", record
        assert record["attribution"]["status"] == "attributed"
        assert record["object_id"] is None and record["event"]["type"] == ["change"]
        if record["after"] is not None:  # the catalog's own columns and nullability
            columns = record["after"]["columns"]
            assert {c: not t.endswith(" not null") for c, t in columns.items()} == shape
    by_step = dict(zip([s for s, _, _ in steps], records, strict=True))
    retyped = by_step["ALTER TABLE orders ALTER COLUMN note TYPE varchar(20)"]
    assert retyped["before"]["columns"]["note"] == "text"
    assert retyped["after"]["columns"]["note"] == "character varying(20)"
    readded = by_step["ALTER TABLE orders ADD COLUMN remark integer"]
    assert "remark" not in readded["before"]["columns"]
    assert readded["after"]["columns"]["remark"] == "integer"
    renamed = by_step["ALTER TABLE orders RENAME TO orders_v2"]
    assert (renamed["before"]["table"], renamed["after"]["table"]) == ("orders", "orders_v2")
    identity = by_step["ALTER TABLE orders_v2 REPLICA IDENTITY DEFAULT"]
    assert (identity["before"]["replica_identity"], identity["after"]["replica_identity"]) == (
        "full",
        "default",
    )
    created = by_step["CREATE TABLE items (id bigint PRIMARY KEY, name text)"]
    assert created["before"] is None and created["after"]["primary_key"] == ["id"]
    dropped = by_step["DROP TABLE items"]
    assert dropped["after"] is None and dropped["before"]["columns"]["id"] == "bigint not null"
    # Row changes around them are recorded as ever, after them in commit order.
    rows = es.search(index=f"audit-{shop.env}-*", query={"term": {"operation": "insert"}}, size=10)[
        "hits"
    ]["hits"]
    assert [(h["_source"]["table"]["name"], h["_source"]["after"]) for h in rows] == [
        ("orders_v2", {"id": "1", "status": "new", "remark": "7"})
    ]
    assert rows[0]["_source"]["transaction"]["lsn"] > records[-1]["transaction"]["lsn"]


def test_a_rename_the_policy_does_not_follow_stops_capture_until_it_does(pg_database, tmp_path):
    source = make_source(
        pg_database, tmp_path, DDL, policy_for("shop", public__orders={}), env="rename"
    )
    source.execute("INSERT INTO orders VALUES (1, 'before')")
    _migrate(source, "ALTER TABLE orders RENAME TO orders_v2")
    source.execute("INSERT INTO orders_v2 VALUES (2, 'after')")
    with pytest.raises(SchemaBroken) as caught:
        source.capture()
    message = str(caught.value)
    assert "public.orders of source 'shop' was renamed to public.orders_v2" in message
    assert "add public.orders_v2 to the policy" in message
    # Nothing of it was staged, so nothing is lost: the policy that names both goes on.
    assert source.store.read_all("changes") is None
    source.policy = policy_for("shop", public__orders={}, public__orders_v2={})
    source.capture()
    staged = source.staged()
    assert staged.select("operation", "table").rows() == [
        ("insert", "orders"),
        ("ddl", "orders_v2"),
        ("insert", "orders_v2"),
    ]


def test_a_role_with_connect_cannot_forge_or_hide_a_schema_change(shop):
    role = f"visitor_{shop.url.rsplit('/', 1)[-1]}"[:60]
    shop.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'visitor'")
    with psycopg.connect(shop.url) as conn:
        dbname = conn.info.dbname
    shop.execute(f'GRANT CONNECT ON DATABASE "{dbname}" TO {role}')
    url = psycopg.conninfo.make_conninfo(shop.url, user=role, password="visitor")
    attempts = [
        "INSERT INTO audit.schema_changes (relid, command, after) VALUES (1, 'x', '{}')",
        "DELETE FROM audit.table_shapes",
        "SELECT audit.record_schema_change()",
        "ALTER EVENT TRIGGER audit_schema_changes DISABLE",
        "DROP EVENT TRIGGER audit_table_drops",
    ]
    for statement in attempts:
        with psycopg.connect(url, autocommit=True) as conn, pytest.raises(psycopg.Error):
            conn.execute(statement)
    # What there is to hide is carried by the WAL only: the table is empty after a change.
    _migrate(shop, "ALTER TABLE orders ADD COLUMN visited text")
    with psycopg.connect(shop.url, autocommit=True) as conn:
        assert schema_history_installed(conn)
        assert conn.execute("SELECT count(*) FROM audit.schema_changes").fetchone() == (0,)
    shop.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


def test_without_a_superuser_schema_history_is_reported_as_off(shop):
    with psycopg.connect(shop.url, autocommit=True) as conn:
        conn.execute("DROP EVENT TRIGGER audit_schema_changes")
        assert not schema_history_installed(conn)
    findings = check_source(shop.url, shop.env, shop.policy, SQL)
    [found] = [f for f in findings if f.subject == "schema history"]
    assert found.level is Level.warning and "rds_superuser" in found.fix
    role = f"owner_{shop.url.rsplit('/', 1)[-1]}"[:60]
    shop.execute(
        f"CREATE ROLE {role} LOGIN PASSWORD 'owner'; GRANT USAGE ON SCHEMA audit TO {role}"
    )
    url = psycopg.conninfo.make_conninfo(shop.url, user=role, password="owner")
    with psycopg.connect(url, autocommit=True) as conn:
        assert record_schema_changes(conn) is False
    with psycopg.connect(shop.url, autocommit=True) as conn:
        assert record_schema_changes(conn) is True  # a superuser puts it back
    shop.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")


def test_a_schema_renamed_renames_its_tables_and_stops_capture_like_a_table_rename(
    pg_database, tmp_path
):
    source = make_source(
        pg_database,
        tmp_path,
        "CREATE SCHEMA sales; CREATE TABLE sales.orders (id int PRIMARY KEY, status text);"
        "ALTER TABLE sales.orders REPLICA IDENTITY FULL;",
        policy_for("shop", sales__orders={}),
        env="schemas",
    )
    _migrate(source, "ALTER SCHEMA sales RENAME TO sales_v2")
    _migrate(source, "INSERT INTO sales_v2.orders VALUES (1, 'after')")
    with pytest.raises(
        SchemaBroken, match=r"sales\.orders of source 'shop' was renamed to sales_v2"
    ):
        source.capture()
    source.policy = policy_for("shop", sales__orders={}, sales_v2__orders={})
    source.capture()
    staged = source.staged()
    assert staged.select("operation", "schema", "table").rows() == [
        ("ddl", "sales_v2", "orders"),
        ("insert", "sales_v2", "orders"),
    ]


def test_a_tracked_table_created_again_is_named_by_the_check_until_setup_publishes_it(
    pg_database, tmp_path
):
    source = make_source(
        pg_database, tmp_path, DDL, policy_for("shop", public__orders={}), env="recreate"
    )

    def publication() -> Finding:
        [found] = [
            f
            for f in check_source(source.url, source.env, source.policy, SQL)
            if f.subject == "publication"
        ]
        return found

    assert publication().level is Level.ok
    _migrate(source, "DROP TABLE orders")
    _migrate(source, "CREATE TABLE orders (id int PRIMARY KEY, status text)")
    _migrate(source, "ALTER TABLE orders REPLICA IDENTITY FULL")
    # The name is the policy's, the table is new: the publication (by oid) does not name it.
    found = publication()
    assert found.level is Level.error
    assert "lacks tracked tables: ['public.orders']" in found.message
    assert found.fix.startswith("audit-platform source setup --env recreate --source shop")
    assert found.fix.endswith(
        "audit-platform source snapshot --env recreate --source shop --table public.orders"
    )
    source.capture()
    assert source.staged().select("operation", "table").rows() == [
        ("ddl", "orders"),  # dropped
        ("ddl", "orders"),  # created: the trail shows it happened
        ("ddl", "orders"),  # its replica identity
    ]
    setup_source(source.url, source.env, source.policy, SQL)
    assert publication().level is Level.ok
    source.execute("INSERT INTO orders VALUES (1, 'new')")
    source.capture()
    assert source.staged().select("operation", "table").rows()[-1] == ("insert", "orders")


def _records_of(es, source, table: str) -> list[dict]:
    hits = es.search(
        index=f"audit-{source.env}-*",
        query={"term": {"table.name": table}},
        sort=[{"transaction.lsn": "asc"}, {"transaction.change_index": "asc"}],
        size=100,
    )["hits"]["hits"]
    return [hit["_source"] for hit in hits]


def test_state_at_a_moment_has_the_columns_the_table_had_then(shop, es, servers):
    _migrate(shop, "INSERT INTO orders (id, status) VALUES (1, 'new')")
    _migrate(shop, "ALTER TABLE orders ADD COLUMN note text DEFAULT 'n/a'")
    _migrate(shop, "ALTER TABLE orders DROP COLUMN status")
    _migrate(shop, "INSERT INTO orders (id, note) VALUES (2, 'hi')")
    capture_enrich_index(shop, shop.state, es)
    inserted, added, dropped, second = _records_of(es, shop, "orders")
    assert [r["operation"] for r in (inserted, added, dropped, second)] == [
        "insert",
        "ddl",
        "ddl",
        "insert",
    ]
    scope = Scope(env=shop.env)

    def state(object_id: str, record: dict):
        at = datetime.fromisoformat(record["@timestamp"])
        return object_state(es, scope, "shop", "public.orders", object_id, at)

    # Before any schema change is recorded: the row as its record has it.
    first = state("1", inserted)
    assert (first.row, first.columns, first.not_recorded) == (
        {"id": "1", "status": "new"},
        None,
        [],
    )
    # A column added since the row's record: named, its value not invented.
    then = state("1", added)
    assert then.columns == {"id": "integer not null", "status": "text", "note": "text"}
    assert (then.row, then.not_recorded) == ({"id": "1", "status": "new"}, ["note"])
    assert then.schema_as_of is not None and then.schema_as_of.operation.value == "ddl"
    # A column dropped since: left out, and said so.
    later = state("1", dropped)
    assert later.columns == {"id": "integer not null", "note": "text"}
    assert (later.row, later.not_recorded) == ({"id": "1"}, ["note"])
    assert "columns dropped by then are left out: status" in (later.explanation or "")
    # A row recorded after both changes: every column it has, nothing missing.
    now = state("2", second)
    assert (now.row, now.not_recorded) == ({"id": "2", "note": "hi"}, [])

    with psycopg.connect(servers.pg_url, autocommit=True) as platform:
        platform_db.install(platform, SQL)
        key = create_key(platform, shop.env, "reader").secret
    with TestClient(
        create_app(Settings(env=shop.env, api=ApiSettings(key_cache_seconds=0)))
    ) as api:
        api.headers["X-API-Key"] = key
        served = api.get(
            "/v1/objects/shop/public.orders/1/state", params={"at": dropped["@timestamp"]}
        )
        assert served.status_code == 200, served.text
        assert served.json()["row"] == {"id": "1"} and served.json()["not_recorded"] == ["note"]
        schema = api.get("/v1/tables/shop/public.orders/schema")
        assert schema.status_code == 200, schema.text
        assert [c["changed_columns"] for c in schema.json()["changes"]] == [["status"], ["note"]]
        reply = api.post("/ui/login", data={"key": key, "next": "/ui/"}, follow_redirects=False)
        assert reply.status_code == 303, reply.text
        page = api.get("/ui/tables/shop/public.orders")
        assert page.status_code == 200, page.text
        assert "Schema history, newest first" in page.text and "release 42" in page.text
        assert '<th scope="row">note</th><td>text</td>' in page.text  # as last recorded
        object_page = api.get(
            "/ui/objects/shop/public.orders/1", params={"at": dropped["@timestamp"][:23]}
        )
        assert object_page.status_code == 200, object_page.text
        assert "<em>not recorded</em> (added after this row's record)" in object_page.text

    # The table dropped and created anew under its name: the row is gone, whatever the new
    # table holds, and the new table's columns are not the old row's.
    _migrate(shop, "DROP TABLE orders")
    _migrate(shop, "CREATE TABLE orders (id int PRIMARY KEY, other text)")
    capture_enrich_index(shop, shop.state, es)
    *_, recreated = _records_of(es, shop, "orders")
    gone = state("1", recreated)
    assert (gone.status, gone.row) == ("deleted", None)
    assert "the table was dropped at" in (gone.explanation or "")


HOSTILE_COLUMN = '<img src=x onerror="alert(1)">'


def test_a_hostile_column_name_is_text_on_the_table_page(shop, es, servers):
    """A column's name comes from whoever created the table: the table page and the API show
    it as text, never as markup."""
    quoted = '"' + HOSTILE_COLUMN.replace('"', '""') + '"'
    _migrate(shop, f"CREATE TABLE items (id int PRIMARY KEY, {quoted} text)")
    capture_enrich_index(shop, shop.state, es)
    with psycopg.connect(servers.pg_url, autocommit=True) as platform:
        platform_db.install(platform, SQL)
        key = create_key(platform, shop.env, "reader").secret
    settings = Settings(env=shop.env, api=ApiSettings(key_cache_seconds=0))
    with TestClient(create_app(settings)) as api:
        api.headers["X-API-Key"] = key
        schema = api.get("/v1/tables/shop/public.items/schema")
        assert schema.status_code == 200, schema.text
        [created] = schema.json()["changes"]
        assert HOSTILE_COLUMN in created["after"]["columns"]
        reply = api.post("/ui/login", data={"key": key, "next": "/ui/"}, follow_redirects=False)
        assert reply.status_code == 303, reply.text
        page = api.get("/ui/tables/shop/public.items")
        assert page.status_code == 200, page.text
        assert HOSTILE_COLUMN not in page.text
        assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in page.text
