"""Organizations: a key limited to one sees that organization's records and nothing of any other,
through the API and the Explorer, against real PostgreSQL and Elasticsearch.

Three organizations' transactions (and one naming none) go through the real pipeline; the
records of ``globex`` carry values that appear nowhere else, and every answer given to the
``acme`` key is searched for them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import psycopg
import pytest
from fastapi.testclient import TestClient

from audit_platform import platform_db
from audit_platform.api.main import create_app
from audit_platform.api_keys import ApiKeyError, create_key, key_id_of
from audit_platform.settings import ApiSettings, Settings
from audit_platform_tests.capture_support import capture_enrich_index, make_source
from audit_platform_tests.conftest import new_database
from audit_platform_tests.helpers import policy_for
from audit_platform_tests.shop_data import write

DDL = (
    "CREATE TABLE orders (id int PRIMARY KEY, status text);"
    "ALTER TABLE orders REPLICA IDENTITY FULL;"
    # A multi-tenant table: each row names its organization, whoever changes it.
    "CREATE TABLE accounts (id int PRIMARY KEY, org text NOT NULL, note text);"
    "ALTER TABLE accounts REPLICA IDENTITY FULL;"
)
POLICY = policy_for("shop", public__orders={}, public__accounts={"organization": "org"})
SECRET = "globex-secret-status"


def _context(actor: str, organization: str | None, request_id: str) -> dict:
    context: dict = {"actor": {"type": "user", "id": actor}, "request_id": request_id}
    if organization is not None:
        context["organization"] = {"id": organization, "name": organization.title()}
    return context


@dataclass
class Tenants:
    env: str
    xids: dict[str, int]
    keys: dict[str, str]
    api: TestClient


@pytest.fixture(scope="module")
def tenants(servers, es, tmp_path_factory) -> Iterator[Tenants]:
    env = f"org_{uuid.uuid4().hex[:8]}"
    tmp = tmp_path_factory.mktemp("organizations")
    with new_database(servers) as shop_db:
        source = make_source(shop_db, tmp, DDL, POLICY, env=env)
        xids = {
            "acme": write(
                shop_db,
                [("INSERT INTO orders VALUES (1, 'acme-new')", ())],
                _context("ada", "acme", "req-acme"),
            ),
            "globex": write(
                shop_db,
                [("INSERT INTO orders VALUES (2, %s)", (SECRET,))],
                _context("grace", "globex", "req-globex"),
            ),
            "none": write(
                shop_db,
                [("INSERT INTO orders VALUES (3, 'nobody-new')", ())],
                _context("ops", None, "req-none"),
            ),
            "acme_again": write(
                shop_db,
                [("UPDATE orders SET status = 'acme-paid' WHERE id = 1", ())],
                _context("ada", "acme", "req-acme"),
            ),
            "accounts": write(
                shop_db,
                [("INSERT INTO accounts VALUES (10, 'acme', 'a'), (20, 'globex', %s)", (SECRET,))],
                _context("ops", None, "req-setup"),
            ),
            # The shop's own support touches two tenants' rows in one transaction.
            "support": write(
                shop_db,
                [("UPDATE accounts SET note = note || '+' WHERE id IN (10, 20)", ())],
                _context("alice", None, "req-support"),
            ),
            # A user acting for globex changes acme's row: it is acme's record.
            "crossing": write(
                shop_db,
                [("UPDATE accounts SET note = 'crossed' WHERE id = 10", ())],
                _context("grace", "globex", "req-crossing"),
            ),
            # A row created for acme and moved to globex: the move is neither's.
            "move": write(
                shop_db,
                [
                    ("INSERT INTO accounts VALUES (30, 'acme', 'acme-30')", ()),
                    ("UPDATE accounts SET org = 'globex' WHERE id = 30", ()),
                ],
                _context("alice", None, "req-move"),
            ),
            # A writer claims acme in its context for a row naming no organization: the
            # table names its rows' organization, so the claim does not count.
            "claimed": write(
                shop_db,
                [("INSERT INTO accounts VALUES (40, '', 'claimed')", ())],
                _context("mallory", "acme", "req-claimed"),
            ),
        }
        with psycopg.connect(servers.pg_url, autocommit=True) as state:
            platform_db.install(state, Settings().resources_dir / "sql")
            assert capture_enrich_index(source, state, es, grace=timedelta(0)) == 12
            keys = {
                "whole": create_key(state, env, "whole", role="auditor").secret,
                "acme": create_key(
                    state, env, "acme-admin", role="auditor", organizations=["acme"]
                ).secret,
                "globex": create_key(
                    state, env, "globex-admin", role="auditor", organizations=["globex"]
                ).secret,
                "both": create_key(state, env, "both", organizations=["acme", "globex"]).secret,
            }
        settings = Settings(env=env, api=ApiSettings(key_cache_seconds=0))
        try:
            with TestClient(create_app(settings)) as api:
                yield Tenants(env, xids, keys, api)
        finally:
            for index in es.indices.get(index=f"audit-{env}-*", expand_wildcards="all"):
                es.indices.delete(index=index)
            es.indices.delete_index_template(name=f"audit-{env}")


def _get(t: Tenants, path: str, key: str, **params):
    return t.api.get(path, params=params or None, headers={"X-API-Key": key})


def _leaks(text: str) -> list[str]:
    """What of globex an answer holds: its record's value, or its name (which only its
    records' context carries; its id is in some paths and echoed back)."""
    return [token for token in (SECRET, "Globex") if token in text]


def _events(t: Tenants, key: str, **params) -> list[dict]:
    reply = _get(t, "/v1/events", key, limit=100, **params)
    assert reply.status_code == 200, reply.text
    return reply.json()["events"]


def test_records_name_their_organization_and_are_searchable_by_it(tenants):
    whole = tenants.keys["whole"]
    found = {e["transaction"]["xid"]: e for e in _events(tenants, whole, table="orders")}
    assert len(found) == 4
    assert found[tenants.xids["globex"]]["organization"] == {"id": "globex", "name": "Globex"}
    assert found[tenants.xids["none"]]["organization"] == {"id": None, "name": None}
    by_language = _events(tenants, whole, query="organization:acme table:orders")
    assert {e["transaction"]["xid"] for e in by_language} == {
        tenants.xids["acme"],
        tenants.xids["acme_again"],
    }
    assert _events(tenants, whole, organization_id="globex", table="orders")[0]["object_id"] == "2"
    assert _events(tenants, whole, query="org:initech") == []


def test_an_organization_key_sees_only_its_organizations_records(tenants):
    acme, t = tenants.keys["acme"], tenants
    found = _events(t, acme, table="orders")
    assert sorted(e["transaction"]["xid"] for e in found) == sorted(
        [t.xids["acme"], t.xids["acme_again"]]
    )
    assert {e["organization"]["id"] for e in found} == {"acme"}
    # Asking for another organization, by filter or by name, finds nothing.
    assert _events(t, acme, query="organization:globex") == []
    assert _events(t, acme, q=SECRET) == []
    assert _events(t, acme, xid=t.xids["globex"]) == []
    # A record naming no organization is outside every organization.
    assert _events(t, acme, xid=t.xids["none"]) == []
    # Two organizations: both, and still nothing that names none.
    both = {e["organization"]["id"] for e in _events(t, t.keys["both"])}
    assert both == {"acme", "globex"}


def test_no_endpoint_tells_an_organization_key_anything_of_another(tenants):
    """Every answer to the acme key is searched for globex's values, ids and names; the
    same questions asked with the whole key do find them, so the search can fail."""
    t = tenants
    globex_event = _events(t, t.keys["whole"], xid=t.xids["globex"])[0]["id"]
    paths = [
        ("/v1/events", {"limit": 100}),
        (f"/v1/events/{globex_event}", {}),
        (f"/v1/transactions/shop/{t.xids['globex']}", {}),
        ("/v1/objects/shop/orders/2/history", {}),
        ("/v1/objects/shop/orders/2/state", {}),
        ("/v1/requests/req-globex", {}),
        ("/v1/export", {"format": "ndjson"}),
        ("/v1/export", {"format": "csv"}),
        (f"/v1/transactions/shop/{t.xids['globex']}/revert", {}),
        ("/v1/requests/req-globex/revert", {}),
    ]
    for path, params in paths:
        whole = _get(t, path, t.keys["whole"], **params)
        assert whole.status_code == 200, (path, whole.text)
        assert _leaks(whole.text), (path, whole.text)
        limited = _get(t, path, t.keys["acme"], **params)
        assert limited.status_code in (200, 404), (path, limited.status_code, limited.text)
        assert not _leaks(limited.text), (path, limited.text)
    assert _get(t, "/v1/stats", t.keys["whole"]).json()["total"] == 12
    # acme's: its two orders, its account's insert, support's update and globex's user's, and
    # the insert of the account later moved.
    assert _get(t, "/v1/stats", t.keys["acme"]).json()["total"] == 6
    assert _get(t, "/v1/actors/grace/activity", t.keys["whole"]).json()["stats"]["total"] == 2
    # grace's change of acme's own row is acme's; her globex order is not.
    activity = _get(t, "/v1/actors/grace/activity", t.keys["acme"]).json()
    assert activity["stats"]["total"] == 1


def test_rows_of_a_multi_tenant_table_are_their_organizations_whoever_changed_them(tenants):
    t = tenants
    whole = _events(t, t.keys["whole"], table="accounts")
    # Newest first: the setup's and support's changes, and globex's user's, are the last five.
    assert [(e["object_id"], e["organization"]["id"]) for e in whole][-5:] == [
        ("10", "acme"),
        ("20", "globex"),
        ("10", "acme"),
        ("20", "globex"),
        ("10", "acme"),
    ]
    assert {e["row"]["organization"] for e in whole} == {"acme", "globex", ""}
    acme = _events(t, t.keys["acme"], table="accounts")
    assert sorted(e["object_id"] for e in acme) == ["10", "10", "10", "30"]
    # One transaction, two tenants' rows: each key gets its own part, no count of the rest.
    part = _get(t, f"/v1/transactions/shop/{t.xids['support']}", t.keys["acme"]).json()
    assert [c["object_id"] for c in part["changes"]] == ["10"]
    assert part["completeness"]["captured"] is None and part["completeness"]["complete"] is None
    assert "organization" in part["completeness"]["explanation"]
    other = _get(t, f"/v1/transactions/shop/{t.xids['support']}", t.keys["globex"]).json()
    assert [c["object_id"] for c in other["changes"]] == ["20"]
    # Someone acting for globex changed acme's row: acme sees who, not for which organization.
    [crossed] = _events(t, t.keys["acme"], xid=t.xids["crossing"])
    assert crossed["organization"] == {"id": "acme", "name": None}
    assert crossed["context"]["actor"]["id"] == "grace"
    assert "organization" not in crossed["context"]
    [seen_whole] = _events(t, t.keys["whole"], xid=t.xids["crossing"])
    assert seen_whole["context"]["organization"] == {"id": "globex", "name": "Globex"}
    exported = _get(t, "/v1/export", t.keys["acme"], xid=t.xids["crossing"]).text
    assert "Globex" not in exported and '"grace"' in exported
    history = _get(t, "/v1/objects/shop/accounts/20/history", t.keys["acme"]).json()
    assert history["changes"] == []
    # The moved row: acme has its insert; the move, whose images hold both tenants' values, is
    # only for keys of the whole environment.
    moved = [e["operation"] for e in _events(t, t.keys["whole"], xid=t.xids["move"])]
    assert sorted(moved) == ["insert", "update"]
    assert [e["operation"] for e in _events(t, t.keys["acme"], xid=t.xids["move"])] == ["insert"]
    assert _events(t, t.keys["globex"], xid=t.xids["move"]) == []
    [claimed] = _events(t, t.keys["whole"], xid=t.xids["claimed"])
    assert claimed["organization"]["id"] is None and claimed["row"]["organization"] == ""
    assert _events(t, t.keys["acme"], xid=t.xids["claimed"]) == []


def test_figures_about_whole_sources_are_refused_to_organization_keys(tenants):
    t = tenants
    event = _events(t, t.keys["acme"])[0]["id"]
    for path in (
        "/v1/rejections",
        f"/v1/events/{event}/proof",
        "/v1/checkpoints?source=shop",
        "/v1/checkpoints?source=_reads",
    ):
        refused = _get(t, path, t.keys["acme"])
        assert refused.status_code == 403, (path, refused.text)
        # The whole key is let through (a proof may still wait for the trail: 409).
        assert _get(t, path, t.keys["whole"]).status_code in (200, 409), path
    transaction = _get(t, f"/v1/transactions/shop/{t.xids['acme']}", t.keys["acme"]).json()
    assert transaction["completeness"]["captured"] is None
    assert all(c["transaction"].get("changes") is None for c in transaction["changes"])


def test_the_read_log_shows_an_organization_key_only_reads_within_its_organizations(tenants):
    """A row of the read log is what a key asked and how many records it got: the acme key
    sees the rows of keys limited to acme, never those of a key that may read globex."""
    t = tenants
    ids = {name: key_id_of(key) for name, key in t.keys.items()}
    for name in ("globex", "both", "acme"):
        _events(t, t.keys[name], query="actor:ada")
    whole = {row["key_id"] for row in _get(t, "/v1/reads", t.keys["whole"], limit=1000).json()}
    assert {ids["globex"], ids["both"], ids["acme"]} <= whole
    acme = _get(t, "/v1/reads", t.keys["acme"], limit=1000)
    assert acme.status_code == 200, acme.text
    assert {row["key_id"] for row in acme.json()} == {ids["acme"]}


def test_the_explorer_signed_in_with_an_organization_key_shows_only_it(tenants):
    t = tenants
    pages = ["/ui/", "/ui/search", "/ui/search?q=status", "/ui/objects/shop/orders/2"]
    pages += [f"/ui/transactions/shop/{t.xids['globex']}", "/ui/requests/req-globex"]
    seen = {}
    for name in ("whole", "acme"):
        with TestClient(t.api.app) as browser:
            signed = browser.post(
                "/ui/login", data={"key": t.keys[name], "next": "/ui/"}, follow_redirects=False
            )
            assert signed.status_code == 303, signed.text
            seen[name] = {page: browser.get(page) for page in pages}
    assert "organization acme" in " ".join(seen["acme"]["/ui/"].text.split())
    for page in pages:
        whole, limited = seen["whole"][page], seen["acme"][page]
        assert whole.status_code == 200, (page, whole.text[:300])
        assert limited.status_code in (200, 404), (page, limited.status_code)
        assert SECRET not in limited.text, page
    assert any(SECRET in seen["whole"][page].text for page in pages)


def test_an_organization_id_a_key_cannot_hold_is_refused(servers):
    with psycopg.connect(servers.pg_url, autocommit=True) as state:
        platform_db.install(state, Settings().resources_dir / "sql")
        for bad in ("", "x" * 257, "tab\there"):
            with pytest.raises(ApiKeyError, match="organization"):
                create_key(state, "org_refused", "k", organizations=[bad])
