"""`source add` and `source remove` on a real database: one that fails each check it can be
made to fail here (each named with its fix, nothing changed), then the same database fixed,
joined and searchable; then removed, with what was recorded kept."""

from __future__ import annotations

import json
import uuid

import psycopg
import yaml
from psycopg.conninfo import make_conninfo
from typer.testing import CliRunner

from audit_platform.capture.gaps import list_gaps
from audit_platform.cli import app
from audit_platform.environment import load_environment
from audit_platform.naming import slot_name
from audit_platform.policy import load_policy
from audit_platform.staging import StagingStore
from audit_platform_tests.capture_support import CaptureSource, capture_enrich_index
from audit_platform_tests.conftest import new_database
from audit_platform_tests.helpers import environment_resources

TABLES = """
CREATE TABLE orders (id int PRIMARY KEY, status text);
CREATE TABLE notes (body text);
"""
ENV_FILE = """# the environment's own words, kept by source add
sources: {}
capture_flush_seconds: 0.5  # a comment on a setting
"""


def _exec(url: str, statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statements)


def _slots(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {r[0] for r in conn.execute("SELECT slot_name FROM pg_replication_slots")}


def test_a_database_joins_in_one_command_once_every_check_passes(
    pg_database, servers, tmp_path, monkeypatch, es, es_prefix
):
    env = es_prefix.replace("-", "_")
    resources = environment_resources(tmp_path, env, ENV_FILE)
    monkeypatch.setenv("AUDIT_RESOURCES_DIR", str(resources))
    monkeypatch.setenv("AUDIT_STAGING_ROOT", str(tmp_path / "staging"))
    _exec(pg_database, TABLES)
    role = f"svc_{uuid.uuid4().hex[:8]}"
    _exec(pg_database, f"CREATE ROLE {role} LOGIN PASSWORD 'svc'")
    runner = CliRunner()
    add = ["source", "add", "billing", "--env", env, "--url-env", "BILLING_DB"]
    tables = ["--tables", "public.orders,public.notes,public.missing"]
    with new_database(servers) as state_url:
        monkeypatch.setenv("AUDIT_PG_URL", state_url)
        # As a role with nothing but LOGIN: every check that can fail here fails.
        monkeypatch.setenv("BILLING_DB", make_conninfo(pg_database, user=role, password="svc"))
        refused = runner.invoke(app, [*add, *tables])
        assert refused.exit_code == 1, refused.output
        out = refused.output
        assert f"ALTER ROLE {role} REPLICATION; (as a superuser)" in out  # may not read slots
        assert f"GRANT CREATE ON DATABASE <this database> TO {role};" in out
        assert "public.orders: is owned by" in out and "only its owner" in out
        assert "public.notes: has no primary key" in out
        assert 'ALTER TABLE "public"."orders" REPLICA IDENTITY FULL;' in out
        assert "public.missing: is in the policy but does not exist" in out
        assert "nothing changed" in out
        # Nothing changed: no policy, no environment entry, no schema, no slot.
        assert not (resources / "sources" / "billing.yaml").exists()
        assert load_environment(resources, env).sources == {}
        with psycopg.connect(pg_database) as conn:
            assert conn.execute("SELECT to_regnamespace('audit')").fetchone() == (None,)
        assert slot_name(env, "billing") not in _slots(pg_database)

        # Fixed: the owner joins the tables it tracks, keyed and with their full images.
        _exec(
            pg_database,
            "DROP TABLE notes; ALTER TABLE orders REPLICA IDENTITY FULL;",
        )
        monkeypatch.setenv("BILLING_DB", pg_database)
        joined = runner.invoke(app, [*add, "--tables", "public.orders"])
        assert joined.exit_code == 0, joined.output
        assert "policy written:" in joined.output
        assert f"slot {slot_name(env, 'billing')}: created at " in joined.output
        assert f"environment {env}: billing added to" in joined.output
        policy = load_policy(resources / "sources" / "billing.yaml")
        assert (policy.source, policy.version, list(policy.tables)) == (
            "billing",
            1,
            ["public.orders"],
        )
        text = (resources / "environments" / f"{env}.yaml").read_text()
        assert "# the environment's own words" in text and "# a comment on a setting" in text
        assert yaml.safe_load(text)["sources"] == {"billing": {"url_env": "BILLING_DB"}}
        again = runner.invoke(app, add)  # idempotent: the file's policy, the same entry
        assert again.exit_code == 0 and "billing already in" in again.output, again.output

        # Searchable: a change after joining goes through the pipeline.
        with psycopg.connect(pg_database) as conn:
            context = {"actor": {"type": "user", "id": "ada"}}
            conn.execute("SELECT audit.set_context(%s)", (json.dumps(context),))
            conn.execute("INSERT INTO orders VALUES (1, 'new')")
        store = StagingStore(str(tmp_path / "staging"), env, "billing")
        # Not caught up: removing it now would drop the insert; refused, nothing changed.
        early = runner.invoke(app, ["source", "remove", "billing", "--env", env])
        assert early.exit_code == 1
        assert "its slot holds changes capture has not read" in early.output
        assert slot_name(env, "billing") in _slots(pg_database)
        assert list(load_environment(resources, env).sources) == ["billing"]
        source = CaptureSource(pg_database, env, policy, store)
        with psycopg.connect(state_url, autocommit=True) as state:
            assert capture_enrich_index(source, state, es) == 1

        removed = runner.invoke(app, ["source", "remove", "billing", "--env", env])
        assert removed.exit_code == 0, removed.output
        assert slot_name(env, "billing") not in _slots(pg_database)
        assert load_environment(resources, env).sources == {}
        assert (resources / "sources" / "billing.yaml").exists()
        assert (
            "# a comment on a setting" in (resources / "environments" / f"{env}.yaml").read_text()
        )
    hits = es.search(index=f"audit-{env}-*", query={"term": {"source.service": "billing"}})
    assert hits["hits"]["total"]["value"] == 1  # what was recorded stays


def test_removing_a_source_with_unread_changes_by_force_records_the_gap(
    pg_database, servers, tmp_path, monkeypatch, es_prefix
):
    env = es_prefix.replace("-", "_")
    resources = environment_resources(tmp_path, env, ENV_FILE)
    monkeypatch.setenv("AUDIT_RESOURCES_DIR", str(resources))
    monkeypatch.setenv("AUDIT_STAGING_ROOT", str(tmp_path / "staging"))
    monkeypatch.setenv("BILLING_DB", pg_database)
    _exec(
        pg_database,
        "CREATE TABLE orders (id int PRIMARY KEY); ALTER TABLE orders REPLICA IDENTITY FULL",
    )
    runner = CliRunner()
    with new_database(servers) as state_url:
        monkeypatch.setenv("AUDIT_PG_URL", state_url)
        add = ["source", "add", "billing", "--env", env, "--url-env", "BILLING_DB"]
        joined = runner.invoke(app, [*add, "--tables", "public.orders", "--no-snapshot"])
        assert joined.exit_code == 0, joined.output
        _exec(pg_database, "INSERT INTO orders VALUES (1)")
        forced = runner.invoke(app, ["source", "remove", "billing", "--env", env, "--force"])
        assert forced.exit_code == 0, forced.output
        assert "gap recorded: changes of source billing committed after" in forced.output
        assert slot_name(env, "billing") not in _slots(pg_database)
        with psycopg.connect(state_url) as state:
            [gap] = list_gaps(state, env, None)
        assert gap.source == "billing" and "--force" in gap.reason
