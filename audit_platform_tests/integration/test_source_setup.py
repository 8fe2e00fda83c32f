"""`source setup|check|teardown` on real databases, including ones made to have each problem."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from typer.testing import CliRunner

from audit_platform.cli import app
from audit_platform.policy import PolicyError, load_policy
from audit_platform.settings import Settings
from audit_platform.sources.check import Level, check_source
from audit_platform.sources.setup import SetupError, setup_source, teardown_source
from audit_platform_dev.stack.postgres import LocalPostgres
from audit_platform_dev.stack.system import free_port
from audit_platform_tests.helpers import environment_resources, policy_for

SQL_DIR = Settings().resources_dir / "sql"
#: An environment of this module's own: slots are named per server, and a `make demo` on the
#: same server holds the `dev` ones.
ENV = f"src_{uuid.uuid4().hex[:8]}"
SLOT = f"audit_{ENV}_shop"

GOOD_TABLES = """
CREATE TABLE orders (id int PRIMARY KEY, status text, updated_at timestamptz);
ALTER TABLE orders REPLICA IDENTITY FULL;
"""


def _exec(url: str, statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statements)


def _by_subject(findings) -> dict[str, list]:
    grouped: dict[str, list] = {}
    for finding in findings:
        grouped.setdefault(finding.subject, []).append(finding)
    return grouped


def test_setup_is_idempotent_and_check_passes(pg_database):
    _exec(pg_database, GOOD_TABLES)
    policy = policy_for("shop", public__orders={})
    first = setup_source(pg_database, ENV, policy, SQL_DIR)
    second = setup_source(pg_database, ENV, policy, SQL_DIR)
    assert first.applied_migrations == [
        "001_audit_schema",
        "002_untrusted_roles",
        "003_schema_history",
        "004_snapshots",
        "005_snapshot_limits",
        "006_snapshot_environment",
        "007_organizations",
    ]
    assert (first.slot, first.slot_created) == (SLOT, True)
    assert second.applied_migrations == []
    assert second.slot_created is False
    findings = check_source(pg_database, ENV, policy, SQL_DIR)
    assert [f for f in findings if f.level is not Level.ok] == []


def test_two_environments_get_separate_slots_and_publications(pg_database):
    _exec(pg_database, GOOD_TABLES)
    policy = policy_for("shop", public__orders={})
    setup_source(pg_database, "staging", policy, SQL_DIR)
    setup_source(pg_database, "prod", policy, SQL_DIR)
    with psycopg.connect(pg_database) as conn:
        slots = {r[0] for r in conn.execute("SELECT slot_name FROM pg_replication_slots")}
        pubs = {r[0] for r in conn.execute("SELECT pubname FROM pg_publication")}
    assert {"audit_staging_shop", "audit_prod_shop"} <= slots
    assert pubs == {"audit_staging_shop", "audit_prod_shop"}


def test_publication_follows_the_policy_when_tables_are_added(pg_database):
    _exec(pg_database, GOOD_TABLES + "CREATE TABLE refunds (id int PRIMARY KEY);")
    setup_source(pg_database, ENV, policy_for("shop", public__orders={}), SQL_DIR)
    wider = policy_for("shop", public__orders={}, public__refunds={})
    setup_source(pg_database, ENV, wider, SQL_DIR)
    with psycopg.connect(pg_database) as conn:
        tables = {
            r[0]
            for r in conn.execute(
                "SELECT tablename FROM pg_publication_tables WHERE pubname = %s", (SLOT,)
            )
        }
    # and the tables late contexts, schema changes and snapshots travel in
    assert tables == {"orders", "refunds", "attached_contexts", "schema_changes", "snapshot_chunks"}


def test_setup_refuses_a_policy_naming_missing_tables(pg_database):
    policy = policy_for("shop", public__orders={}, public__ghosts={})
    _exec(pg_database, GOOD_TABLES)
    with pytest.raises(SetupError, match=r"do not exist: public\.ghosts"):
        setup_source(pg_database, ENV, policy, SQL_DIR)


def test_check_reports_each_table_problem_with_its_fix(pg_database):
    _exec(
        pg_database,
        """
        CREATE TABLE no_pk (note text);
        CREATE TABLE default_identity (id int PRIMARY KEY, v text);
        CREATE TABLE events (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
        CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
        ALTER TABLE no_pk REPLICA IDENTITY FULL;
        """,
    )
    policy = policy_for(
        "shop",
        public__no_pk={},
        public__default_identity={"mask": ["vv"]},
        public__events={},
    )
    setup_source(pg_database, ENV, policy, SQL_DIR)
    found = _by_subject(check_source(pg_database, ENV, policy, SQL_DIR))
    [no_pk] = found["public.no_pk"]
    assert (no_pk.level, "no primary key" in no_pk.message) == (Level.error, True)
    identity, typo = sorted(found["public.default_identity"], key=lambda f: f.level.value)
    assert identity.level is Level.error
    assert identity.fix == 'ALTER TABLE "public"."default_identity" REPLICA IDENTITY FULL;'
    assert (typo.level, "['vv']" in typo.message) == (Level.warning, True)
    [events] = found["public.events"]
    assert events.fix == 'ALTER TABLE "public"."events_2026" REPLICA IDENTITY FULL;'


def test_check_reports_a_role_that_cannot_replicate(pg_database):
    _exec(pg_database, GOOD_TABLES)
    policy = policy_for("shop", public__orders={})
    setup_source(pg_database, ENV, policy, SQL_DIR)
    _exec(pg_database, "DROP ROLE IF EXISTS t_reader; CREATE ROLE t_reader LOGIN PASSWORD 'pw'")
    try:
        url = psycopg.conninfo.make_conninfo(pg_database, user="t_reader", password="pw")
        [role] = _by_subject(check_source(url, ENV, policy, SQL_DIR))["role"]
        assert role.level is Level.error
        assert role.fix == 'ALTER ROLE "t_reader" REPLICATION;'
    finally:
        _exec(pg_database, "DROP ROLE t_reader")


def test_check_reports_missing_schema_publication_and_slot(pg_database):
    _exec(pg_database, GOOD_TABLES)
    found = _by_subject(
        check_source(pg_database, ENV, policy_for("shop", public__orders={}), SQL_DIR)
    )
    assert found["audit schema"][0].level is Level.error
    assert "audit.set_context is not installed" in found["audit schema"][0].message
    assert found["publication"][0].level is Level.error
    assert found["slot"][0].message == f"{SLOT} does not exist"


def test_check_warns_when_the_slot_falls_behind(pg_database):
    _exec(pg_database, GOOD_TABLES)
    policy = policy_for("shop", public__orders={})
    setup_source(pg_database, ENV, policy, SQL_DIR)
    _exec(pg_database, "INSERT INTO orders SELECT g, 'x' FROM generate_series(1, 2000) g")
    found = _by_subject(check_source(pg_database, ENV, policy, SQL_DIR, lag_warn_bytes=1024))
    [slot] = found["slot"]
    assert slot.level is Level.warning
    assert "bytes behind" in slot.message


@pytest.mark.slow
def test_check_reports_wal_level_and_unbounded_wal_on_a_server_without_logical(tmp_path):
    server = LocalPostgres(
        tmp_path / "stack",
        free_port(),
        overrides={"wal_level": "replica", "max_slot_wal_keep_size": "-1"},
    )
    record, _ = server.up()
    try:
        _exec(record.url, GOOD_TABLES)
        policy = policy_for("shop", public__orders={})
        with pytest.raises(SetupError, match="wal_level is 'replica'"):
            setup_source(record.url, ENV, policy, SQL_DIR)
        found = _by_subject(check_source(record.url, ENV, policy, SQL_DIR))
        assert found["wal_level"][0].level is Level.error
        assert found["wal_level"][0].fix.startswith("ALTER SYSTEM SET wal_level = logical")
        assert found["max_slot_wal_keep_size"][0].level is Level.warning
    finally:
        server.down()


def test_teardown_drops_this_environment_only_and_all_removes_the_schema(pg_database):
    _exec(pg_database, GOOD_TABLES)
    policy = policy_for("shop", public__orders={})
    setup_source(pg_database, ENV, policy, SQL_DIR)
    setup_source(pg_database, "uat", policy, SQL_DIR)
    with pytest.raises(SetupError, match="audit_uat_shop"):
        teardown_source(pg_database, ENV, "shop", SQL_DIR, everything=True)
    assert teardown_source(pg_database, "uat", "shop", SQL_DIR, everything=False) == [
        "slot audit_uat_shop",
        "publication audit_uat_shop",
    ]
    assert teardown_source(pg_database, ENV, "shop", SQL_DIR, everything=True) == ["schema audit"]
    with psycopg.connect(pg_database) as conn:
        assert conn.execute("SELECT to_regnamespace('audit')").fetchone()[0] is None


def test_cli_setup_and_check_against_the_demo_policy(pg_database, monkeypatch, tmp_path):
    _exec(
        pg_database,
        """
        CREATE TABLE customers (id int PRIMARY KEY, email text, phone text, password_hash text,
                                updated_at timestamptz);
        CREATE TABLE orders (id int PRIMARY KEY, updated_at timestamptz);
        CREATE TABLE order_lines (id int PRIMARY KEY);
        CREATE TABLE payments (id int PRIMARY KEY, card_last4 text);
        """,
    )
    monkeypatch.setenv("AUDIT_SOURCE_SHOP_URL", pg_database)
    monkeypatch.setenv("AUDIT_RESOURCES_DIR", str(environment_resources(tmp_path, ENV)))
    runner = CliRunner()
    setup = runner.invoke(app, ["source", "setup", "--env", ENV, "--source", "shop"])
    assert setup.exit_code == 0, setup.output
    assert f"slot {SLOT}: created" in setup.output
    check = runner.invoke(app, ["source", "check", "--env", ENV, "--source", "shop"])
    assert check.exit_code == 1
    assert 'ALTER TABLE "public"."customers" REPLICA IDENTITY FULL;' in check.output
    for table in ("customers", "orders", "order_lines", "payments"):
        _exec(pg_database, f"ALTER TABLE {table} REPLICA IDENTITY FULL")
    check = runner.invoke(app, ["source", "check", "--env", ENV, "--source", "shop"])
    assert check.exit_code == 0, check.output


def test_policy_errors_name_the_file_the_key_and_the_problem(tmp_path):
    path = tmp_path / "shop.yaml"
    path.write_text(
        "source: shop\nversion: 1\ntables:\n  public.customers:\n"
        "    include: [id]\n    exclude: [email]\n  orders: {}\n"
    )
    with pytest.raises(PolicyError) as error:
        load_policy(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ")
    assert "tables.public.customers: Value error, use either include or exclude" in message
    path.write_text("source: shop\nversion: 1\ntables:\n  orders: {}\n")
    with pytest.raises(PolicyError, match=r"table 'orders' must be written schema\.table"):
        load_policy(path)
    path.write_text("source: shop\nversion: 0\ntables:\n  public.orders: {colour: red}\n")
    with pytest.raises(
        PolicyError,
        match=r"version: Input should be greater than or equal to 1.*tables\.public\.orders\.colour: Extra inputs",
    ):
        load_policy(path)


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ("{organization: org, exclude: [org]}", "organization column 'org' is not captured"),
        ("{organization: org, include: [id]}", "organization column 'org' is not captured"),
        ("{organization: org, mask: [org]}", "organization column 'org' is masked"),
    ],
)
def test_an_organization_column_must_be_captured_as_it_is(tmp_path, table, problem):
    path = tmp_path / "shop.yaml"
    path.write_text(f"source: shop\nversion: 1\ntables:\n  public.accounts: {table}\n")
    with pytest.raises(PolicyError, match=f"tables.public.accounts: Value error, {problem}"):
        load_policy(path)
    path.write_text("source: shop\nversion: 1\ntables:\n  public.accounts: {organization: org}\n")
    assert load_policy(path).tables["public.accounts"].organization == "org"


def test_demo_policy_loads_and_carries_its_version():
    policy = load_policy(Settings().resources_dir / "sources" / "shop.yaml")
    assert policy.policy_version.startswith("1:")
    assert not policy.tables["public.customers"].keeps("password_hash")
