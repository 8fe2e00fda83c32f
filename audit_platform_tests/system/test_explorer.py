"""The Audit Explorer in a real browser: Chromium (Debian's package) driven by Playwright, against
the real API server (uvicorn, over HTTP) reading real Elasticsearch and PostgreSQL, with records
from a real capture of the shop in :mod:`audit_platform_tests.shop_data`.

Each test opens a fresh browser context (no cookies) and signs in the way a person does.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import parse_qs, unquote, urlsplit

import psycopg
import pytest
from playwright.sync_api import BrowserContext, Page, expect

from audit_platform.api.main import create_app
from audit_platform.api_keys import create_key, revoke_key
from audit_platform.read_log import read_rows
from audit_platform.settings import ApiSettings, Settings
from audit_platform_dev.stack.system import free_port
from audit_platform_tests.serving import serving
from audit_platform_tests.shop_data import Shop, shop_environments


@dataclass
class Explorer:
    base: str
    shop: Shop
    pg_url: str


@pytest.fixture(scope="module")
def shop(servers, es, tmp_path_factory) -> Iterator[Shop]:
    with shop_environments(servers, es, tmp_path_factory.mktemp("ui")) as found:
        yield found


@pytest.fixture(scope="module")
def explorer(shop, servers) -> Iterator[Explorer]:
    """The API process's application served by uvicorn on a free port, in a thread."""
    app = create_app(Settings(env=shop.env, api=ApiSettings(key_cache_seconds=0)))
    with serving(app, free_port()) as base:
        yield Explorer(base, shop, servers.pg_url)


@pytest.fixture
def context(browser, explorer) -> Iterator[BrowserContext]:
    """A fresh browser context that records every request it sends."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    ctx.requested = []  # type: ignore[attr-defined]
    ctx.on("request", lambda request: ctx.requested.append(request.url))  # type: ignore[attr-defined]
    yield ctx
    ctx.close()


def sign_in(context: BrowserContext, explorer: Explorer, key: str, path: str = "/ui/") -> Page:
    page = context.new_page()
    page.goto(explorer.base + path)
    parts = urlsplit(page.url)
    assert parts.path == "/ui/login" and parse_qs(parts.query)["next"] == [path], page.url
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_load_state()
    return page


def result_ids(page: Page) -> list[str]:
    """The record ids of the results table, in order (each row's time links to its record)."""
    hrefs = page.locator("table.records tbody tr td:first-child a").evaluate_all(
        "links => links.map(a => a.getAttribute('href'))"
    )
    return [unquote(h.removeprefix("/ui/events/")) for h in hrefs]


def search(page: Page, explorer: Explorer, query: str) -> None:
    page.goto(f"{explorer.base}/ui/search")
    page.get_by_label("Search the audit trail").fill(query)
    page.get_by_label("Search the audit trail").press("Enter")
    page.wait_for_load_state()


# --- signing in ---------------------------------------------------------------------------


def test_signing_in_opens_a_session_held_in_a_cookie_without_the_key(context, explorer):
    key = explorer.shop.keys["a"]
    page = sign_in(context, explorer, key)
    expect(page).to_have_url(f"{explorer.base}/ui/")
    expect(page.locator("header .env")).to_contain_text(explorer.shop.env)
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    (cookie,) = context.cookies()
    assert cookie["name"] == f"audit_ui_{explorer.shop.env}"
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
    # The secret is what follows "ak_<id>_"; it may itself hold "_".
    secret = key.split("_", 2)[2]
    assert key not in cookie["value"] and secret not in cookie["value"]
    assert page.evaluate("document.cookie") == "", "a script can read the session cookie"
    # Signing out ends the session on the server: the old cookie opens nothing any more.
    old = cookie["value"]
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(f"{explorer.base}/ui/login")
    context.add_cookies([{**cookie, "value": old}])
    page.goto(f"{explorer.base}/ui/search")
    expect(page).to_have_url(f"{explorer.base}/ui/login?next=%2Fui%2Fsearch")


@pytest.mark.parametrize("which", ["wrong", "revoked", "other environment", "malformed"])
def test_a_key_that_is_not_an_active_key_of_this_environment_is_refused(context, explorer, which):
    keys = explorer.shop.keys
    key = {
        "wrong": keys["a"][:-4] + "AAAA",
        "revoked": keys["revoked"],
        "other environment": keys["b"],
        "malformed": "hunter2",
    }[which]
    page = sign_in(context, explorer, key)
    expect(page).to_have_url(f"{explorer.base}/ui/login")
    expect(page.get_by_role("alert")).to_contain_text("not an active API key")
    assert context.cookies() == []
    page.goto(f"{explorer.base}/ui/")
    expect(page).to_have_url(f"{explorer.base}/ui/login?next=%2Fui%2F")


def test_revoking_a_key_ends_its_open_sessions(context, explorer):
    with psycopg.connect(explorer.pg_url, autocommit=True) as conn:
        new = create_key(conn, explorer.shop.env, "revoked while signed in")
        page = sign_in(context, explorer, new.secret)
        expect(page.get_by_role("heading", name="Overview")).to_be_visible()
        assert revoke_key(conn, explorer.shop.env, new.key.key_id)
    page.goto(f"{explorer.base}/ui/search")
    expect(page).to_have_url(f"{explorer.base}/ui/login?next=%2Fui%2Fsearch")


def test_a_form_posted_from_another_origin_is_refused(explorer):
    import httpx

    answer = httpx.post(
        f"{explorer.base}/ui/login",
        data={"key": explorer.shop.keys["a"]},
        headers={"Origin": "https://evil.example"},
    )
    assert answer.status_code == 403 and "set-cookie" not in answer.headers


def test_sign_in_returns_only_to_a_page_of_the_explorer(context, explorer):
    page = context.new_page()
    page.goto(f"{explorer.base}/ui/login?next=https%3A%2F%2Fevil.example%2F")
    page.get_by_label("API key").fill(explorer.shop.keys["a"])
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{explorer.base}/ui/")


# --- search -------------------------------------------------------------------------------


def test_search_with_the_query_language(context, explorer):
    page = sign_in(context, explorer, explorer.shop.keys["a"])
    search(page, explorer, "actor:ada table:customers")
    expect(page.get_by_role("heading", name="2 changes match")).to_be_visible()
    rows = page.locator("table.records tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text("update")  # newest first: the e-mail change
    expect(rows.nth(1)).to_contain_text("insert")
    # A mistake is explained, with the term, and nothing else is shown.
    search(page, explorer, "actor:ada wat:1")
    expect(page.get_by_role("alert")).to_contain_text("wat")
    expect(page.locator("table.records")).to_have_count(0)


def test_facets_count_and_refine_the_search(context, explorer):
    page = sign_in(context, explorer, explorer.shop.keys["a"])
    search(page, explorer, "op:update")
    tables = page.get_by_role("region", name="Table")
    expect(tables).to_contain_text("public.orders")
    orders = tables.locator("li", has_text="public.orders")
    expect(orders.locator(".num")).to_have_text("6")  # 1 paid + 5 closed
    orders.get_by_role("link").click()
    page.wait_for_load_state()
    assert parse_qs(urlsplit(page.url).query)["q"] == ["op:update table:public.orders"]
    expect(page.locator("table.records tbody tr")).to_have_count(6)
    for text in page.locator("table.records tbody tr td:nth-child(3)").all_inner_texts():
        assert text.endswith("public.orders")


def test_results_page_by_cursor(context, explorer):
    page = sign_in(context, explorer, explorer.shop.keys["a"])
    search(page, explorer, "")
    first = result_ids(page)
    assert len(first) == 50
    page.get_by_role("link", name="Older →").click()
    page.wait_for_load_state()
    second = result_ids(page)
    assert len(second) == 1 and not set(first) & set(second)
    expect(page.get_by_role("link", name="Older →")).to_have_count(0)


def test_a_deep_link_opens_the_same_results_in_a_fresh_browser(browser, context, explorer):
    page = sign_in(context, explorer, explorer.shop.keys["a"])
    search(page, explorer, 'op:update,delete -actor:"nightly-close"')
    expected = result_ids(page)
    assert len(expected) == 3  # paid, the e-mail change, the administrator's delete
    link = page.url.removeprefix(explorer.base)
    fresh = browser.new_context()
    try:
        again = sign_in(fresh, explorer, explorer.shop.keys["a"], link)
        expect(again).to_have_url(explorer.base + link)
        assert result_ids(again) == expected
        expect(again.get_by_label("Search the audit trail")).to_have_value(
            'op:update,delete -actor:"nightly-close"'
        )
    finally:
        fresh.close()


def test_export_downloads_the_rows_of_the_search(context, explorer):
    page = sign_in(context, explorer, explorer.shop.keys["a"])
    search(page, explorer, "table:orders since:-1d")
    shown = result_ids(page)
    assert len(shown) == 48  # 41 inserts, 6 updates, 1 delete
    with page.expect_download() as download:
        page.get_by_role("link", name="CSV").click()
    path = download.value.path()
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["id"] for row in rows] == shown
    assert {row["table.name"] for row in rows} == {"orders"}


# --- records, objects, transactions, requests, actors -------------------------------------


def test_a_record_shows_before_and_after_with_the_changed_column_highlighted(context, explorer):
    page = sign_in(context, explorer, explorer.shop.keys["a"])
    search(page, explorer, "table:orders object:1 op:update")
    page.locator("table.records tbody tr td:first-child a").first.click()
    page.wait_for_load_state()
    changed = page.locator("table.diff tr.changed")
    expect(changed).to_have_count(1)
    expect(changed.locator("th")).to_contain_text("status")
    expect(changed.locator("td.before")).to_have_text("new")
    expect(changed.locator("td.after")).to_have_text("paid")
    # Unchanged columns are folded until asked for.
    folded = page.locator("details.unchanged")
    expect(folded.locator("summary")).to_contain_text("3 unchanged")
    expect(folded.get_by_text("fragile glass vase").first).to_be_hidden()
    folded.locator("summary").click()
    expect(folded.get_by_text("fragile glass vase").first).to_be_visible()
    expect(page.locator("dl.context")).to_contain_text("payment captured")
    expect(page.get_by_role("link", name="Its transaction")).to_be_visible()
    page.get_by_role("link", name="Its object's history").click()
    expect(page.get_by_role("heading", name="Timeline, newest first")).to_be_visible()


def test_an_object_at_a_moment_picked_on_the_page(context, explorer):
    shop = explorer.shop
    page = sign_in(context, explorer, shop.keys["a"], "/ui/objects/shop/public.orders/1")
    state = page.locator("table.state-row")
    expect(state.locator("tr", has_text="status")).to_contain_text("paid")
    expect(page.locator("ol.timeline > li")).to_have_count(2)
    # Halfway between the sign-up and the payment (the timeline's "state then" links hold
    # each change's commit time), the row was still new.
    paid, signup = (
        datetime.fromisoformat(parse_qs(urlsplit(href).query)["at"][0])
        for href in page.get_by_role("link", name="state then").evaluate_all(
            "links => links.map(a => a.href)"
        )
    )
    moment = (signup + (paid - signup) / 2).strftime("%Y-%m-%dT%H:%M:%S.%f")[:23]
    page.get_by_label("Moment (UTC)").fill(moment)
    page.get_by_role("button", name="Show the row then").click()
    page.wait_for_load_state()
    # The browser writes the moment in its shortest form ("12.46" for "12.460"), so compare
    # moments, not strings.
    (picked,) = parse_qs(urlsplit(page.url).query)["at"]
    assert datetime.fromisoformat(picked) == datetime.fromisoformat(moment)
    expect(state.locator("tr", has_text="status")).to_contain_text("new")
    # Before the row existed, there is no state to show.
    before = (signup - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S")
    page.get_by_label("Moment (UTC)").fill(before)
    page.get_by_role("button", name="Show the row then").click()
    expect(page.locator(".state")).to_contain_text("unknown")


def test_a_transaction_with_completeness_and_its_revert_plan(context, explorer):
    shop = explorer.shop
    page = sign_in(context, explorer, shop.keys["a"], f"/ui/transactions/shop/{shop.xid_signup}")
    expect(page.locator("table.records tbody tr")).to_have_count(3)
    complete = page.locator("section.completeness")
    expect(complete).to_have_class("completeness ok")
    expect(complete).to_contain_text("Captured")
    plan = page.locator("#revert-sql")
    expect(plan).to_contain_text("DELETE FROM")
    with page.expect_download() as download:
        page.get_by_role("link", name="Download .sql").click()

    def statements(text: str) -> list[str]:  # the header comment holds the time generated
        return [line for line in text.splitlines() if line and not line.startswith("--")]

    assert statements(download.value.path().read_text()) == statements(plan.inner_text())
    page.get_by_role("link", name="Everything request req-ada-1 changed").click()
    expect(page.get_by_role("heading", name="Request req-ada-1")).to_be_visible()
    expect(page.locator("table.records tbody tr")).to_have_count(3)
    expect(page.locator("section.txn p.completeness")).to_have_class("completeness ok")
    expect(page.locator("section.txn p.completeness")).to_contain_text("captured 3")


def test_an_actor_over_time_and_by_table(context, explorer):
    page = sign_in(context, explorer, explorer.shop.keys["a"], "/ui/actors/ada")
    expect(page.locator("figure.chart svg rect")).not_to_have_count(0)
    tables = page.get_by_role("region", name="By table")
    expect(tables.locator("li", has_text="public.customers").locator(".num")).to_have_text("2")
    expect(tables.locator("li", has_text="public.orders").locator(".num")).to_have_text("1")


def test_the_overview_lists_the_unattributed_changes(context, explorer):
    page = sign_in(context, explorer, explorer.shop.keys["a"])
    section = page.get_by_role("region", name="Unattributed changes")
    expect(section.locator("table.records tbody tr")).to_have_count(1)  # the administrator
    expect(section.locator("table.records tbody tr")).to_contain_text("delete")
    expect(section.locator(".share strong")).to_have_text(f"{100 / 51:.1f} %")


# --- scope, origin, keyboard --------------------------------------------------------------


def test_a_key_for_one_table_sees_nothing_else_anywhere(context, explorer):
    shop = explorer.shop
    page = sign_in(context, explorer, shop.keys["orders"])
    for region in ("By source", "By table"):
        names = page.get_by_role("region", name=region).locator(".name").all_inner_texts()
        assert names == (["shop"] if region == "By source" else ["public.orders"])
    search(page, explorer, "")
    assert page.get_by_role("region", name="Table").locator(".name").all_inner_texts() == [
        "public.orders"
    ]
    expect(page.get_by_role("heading", name="48 changes")).to_be_visible()
    search(page, explorer, "table:customers")
    expect(page.get_by_role("heading", name="0 changes match")).to_be_visible()
    # Direct links to what the key may not read answer as if it did not exist.
    page.goto(f"{explorer.base}/ui/objects/shop/public.customers/1")
    expect(page.locator("ol.timeline")).to_have_count(0)
    page.goto(f"{explorer.base}/ui/transactions/shop/{shop.xid_signup}")
    expect(page.locator("table.records tbody tr")).to_have_count(1)
    expect(page.locator("#revert-sql")).not_to_contain_text("customers")
    page.goto(f"{explorer.base}/ui/actors/ada")
    tables = page.get_by_role("region", name="By table").locator(".name").all_inner_texts()
    assert tables == ["public.orders"]
    response = page.goto(f"{explorer.base}/ui/requests/req-ada-2")
    assert response is not None and response.ok
    expect(page.locator(".empty")).to_contain_text("No change made under request req-ada-2")
    with page.expect_download() as download:
        page.goto(f"{explorer.base}/ui/search")
        page.get_by_role("link", name="CSV").click()
    with open(download.value.path(), newline="") as file:
        assert {row["table.name"] for row in csv.DictReader(file)} == {"orders"}


def test_no_page_sends_a_request_to_another_origin(context, explorer):
    shop = explorer.shop
    page = sign_in(context, explorer, shop.keys["a"])
    headers = []
    page.on("response", lambda r: headers.append(r.headers) if "/ui/" in r.url else None)
    for path in [
        "/ui/",
        "/ui/search?q=actor%3Aada",
        "/ui/actors/ada",
        f"/ui/transactions/shop/{shop.xid_signup}",
        "/ui/requests/req-ada-1",
        "/ui/objects/shop/public.orders/1",
    ]:
        page.goto(explorer.base + path)
        page.wait_for_load_state("networkidle")
    page.goto(f"{explorer.base}/ui/search?q=actor%3Aada")
    page.locator("table.records tbody tr td:first-child a").first.click()
    page.wait_for_load_state("networkidle")
    foreign = [url for url in context.requested if not url.startswith(explorer.base + "/")]
    assert foreign == []
    assert any(url.endswith("/ui/static/explorer.css") for url in context.requested)
    assert all("default-src 'none'" in h.get("content-security-policy", "") for h in headers)


ACCESSIBLE_NAMES = """() => [...document.querySelectorAll(
    'input:not([type=hidden]), button, select, textarea, a[href], svg[role=img]')]
  .filter(el => !((el.labels && el.labels.length) || el.getAttribute('aria-label')
                  || el.getAttribute('aria-labelledby') || el.textContent.trim()))
  .map(el => el.outerHTML.slice(0, 120))"""


def test_every_control_is_labelled_and_the_keyboard_reaches_the_search(context, explorer):
    shop = explorer.shop
    page = sign_in(context, explorer, shop.keys["a"])
    for path in [
        "/ui/login",
        "/ui/",
        "/ui/search",
        "/ui/actors/ada",
        f"/ui/transactions/shop/{shop.xid_signup}",
        "/ui/objects/shop/public.orders/1",
        "/ui/requests/req-ada-1",
    ]:
        page.goto(explorer.base + path)
        assert page.evaluate(ACCESSIBLE_NAMES) == [], path
    page.goto(f"{explorer.base}/ui/")
    page.keyboard.press("Tab")
    expect(page.locator(":focus")).to_have_text("Skip to the content")
    page.keyboard.press("/")  # anywhere: to the search page, where the bar has the focus
    page.wait_for_url(f"{explorer.base}/ui/search")
    expect(page.get_by_label("Search the audit trail")).to_be_focused()
    page.keyboard.type("actor:ada")
    page.keyboard.press("Enter")
    page.wait_for_url("**/ui/search?q=*")
    assert parse_qs(urlsplit(page.url).query)["q"] == ["actor:ada"]
    page.locator("body").focus()
    page.keyboard.press("/")  # on a page of results: back to the bar
    expect(page.get_by_label("Search the audit trail")).to_be_focused()


def test_a_sign_in_link_fills_in_its_key_and_waits_for_a_click(context, explorer):
    """`audit-platform demo` prints /ui/login#key=...: the key rides in the fragment (never sent
    to the server in a URL) and leaves the address bar. Opening the link signs nobody in: a
    link that did would let anyone sign a person in under their key (login CSRF). The page
    names the key, and the person's click signs in."""
    key = explorer.shop.keys["a"]
    seen = []
    context.on("request", lambda request: seen.append(request.url))
    page = context.new_page()
    page.goto(f"{explorer.base}/ui/login#key={key}")
    page.wait_for_load_state("networkidle")
    expect(page).to_have_url(f"{explorer.base}/ui/login")
    assert context.cookies() == [], "opening the link opened a session"
    expect(page.get_by_role("status")).to_contain_text(key[:15])  # ak_<12 hex>, the key id
    expect(page.get_by_label("API key")).to_have_value(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{explorer.base}/ui/")
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    assert [c["name"] for c in context.cookies()] == [f"audit_ui_{explorer.shop.env}"]
    assert not [url for url in seen if key in url]
    page.go_back()
    assert key not in page.url


def test_a_missing_page_is_a_page_that_says_so(context, explorer):
    page = sign_in(context, explorer, explorer.shop.keys["a"])
    response = page.goto(f"{explorer.base}/ui/events/{explorer.shop.env}:shop:0:0")
    assert response is not None and response.status == 404
    expect(page.get_by_role("alert")).to_contain_text("No record")
    expect(page.locator("header .env")).to_contain_text(explorer.shop.env)
    response = page.goto(f"{explorer.base}/ui/objects/shop/public.orders/1?at=yesterday")
    assert response is not None and response.status == 422
    expect(page.get_by_role("alert")).to_contain_text("2026-11-27T14:30")


def test_what_the_explorer_shows_is_in_the_read_log(context, explorer):
    page = sign_in(context, explorer, explorer.shop.keys["a"])
    search(page, explorer, "actor:ada table:customers")
    with page.expect_download() as download:
        page.get_by_role("link", name="CSV").click()
    download.value.path()
    key_id = explorer.shop.keys["a"].split("_")[1]
    deadline = time.monotonic() + 10  # an export's row is written as its last line goes out
    while True:
        with psycopg.connect(explorer.pg_url, autocommit=True) as conn:
            rows = read_rows(conn, explorer.shop.env, key_id=key_id, limit=1_000)
        seen = [(r["route"], r["params"].get("q"), r["returned"]) for r in rows]
        if ("/ui/export", "actor:ada table:customers", 2) in seen or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert ("/ui/search", "actor:ada table:customers", 2) in seen
    assert ("/ui/export", "actor:ada table:customers", 2) in seen
    assert all(r["route"] != "/ui/login" for r in rows)
