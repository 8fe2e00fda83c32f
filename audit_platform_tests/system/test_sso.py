"""Single sign-on to the Explorer in a real browser: Chromium driven by Playwright, against a real
OpenID provider (panva's certified oidc-provider, run by Node.js from dev/oidc), the real API
server (uvicorn) and records from a real capture of two tenants' changes.

The provider's development sign-in accepts any password; who the person is and which groups
they are in come from the accounts it is started with. A second Explorer reaches the provider's
token endpoint through a proxy in the test, which can alter the ID token on the way: the way a
token is tampered with that the browser never sees.
"""

from __future__ import annotations

import base64
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import psycopg
import pytest
from playwright.sync_api import BrowserContext, Page, expect
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from audit_platform import platform_db
from audit_platform.api.main import create_app
from audit_platform.read_log import read_rows
from audit_platform.settings import ApiSettings, GroupGrant, Settings, SsoSettings
from audit_platform.ui_sessions import revoke_person
from audit_platform_dev.stack.system import free_port
from audit_platform_tests.capture_support import capture_enrich_index, make_source
from audit_platform_tests.conftest import new_database
from audit_platform_tests.helpers import policy_for
from audit_platform_tests.serving import serving
from audit_platform_tests.shop_data import write

OIDC = Path(__file__).resolve().parents[2] / "dev" / "oidc"
CLIENT, SECRET = "audit-explorer", "test-client-secret"
ACCOUNTS = {
    "alice": {"groups": ["audit-admins"], "name": "Alice Admin"},
    "bob": {"groups": ["staff", "acme-admins"], "name": "Bob of Acme"},
    "carol": {"groups": ["marketing"], "name": "Carol"},
}
GRANTS = [
    GroupGrant(group="acme-admins", role="auditor", organizations=["acme"]),
    GroupGrant(group="audit-admins", role="admin"),
]
GLOBEX_VALUE = "globex-only-status"


@dataclass
class Explorer:
    base: str
    env: str
    pg_url: str


@dataclass
class TokenProxy:
    """Between an Explorer and the provider: passes everything on, and with ``tamper`` gives
    the person of every ID token the group ``audit-admins``, keeping the token's signature."""

    upstream: str
    tamper: bool = False
    tampered: list[str] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def forward(self, request: BaseHTTPRequestHandler, method: str) -> None:
        body = request.rfile.read(int(request.headers.get("content-length") or 0))
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        answer = httpx.request(method, self.upstream + request.path, content=body, headers=headers)
        content = answer.content
        if request.path.startswith("/.well-known/openid-configuration"):
            found = answer.json()
            found["token_endpoint"] = self.url + urlsplit(found["token_endpoint"]).path
            content = json.dumps(found).encode()
        elif request.path.endswith("/token") and self.tamper and answer.is_success:
            tokens = answer.json()
            header, payload, signature = tokens["id_token"].split(".")
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            claims["groups"] = ["audit-admins"]
            forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
            tokens["id_token"] = f"{header}.{forged}.{signature}"
            self.tampered.append(claims["sub"])
            content = json.dumps(tokens).encode()
        request.send_response(answer.status_code)
        request.send_header("content-type", answer.headers.get("content-type", "text/plain"))
        request.send_header("content-length", str(len(content)))
        request.end_headers()
        request.wfile.write(content)


@pytest.fixture(scope="module")
def tenants(servers, es, tmp_path_factory) -> Iterator[str]:
    env = f"sso_{uuid.uuid4().hex[:8]}"
    policy = policy_for("shop", public__orders={})
    ddl = "CREATE TABLE orders (id int PRIMARY KEY, status text);"
    with new_database(servers) as url:
        source = make_source(url, tmp_path_factory.mktemp("sso"), ddl, policy, env=env)
        for n, (org, status) in enumerate([("acme", "acme-new"), ("globex", GLOBEX_VALUE)]):
            context = {"actor": {"type": "user", "id": "u"}, "organization": {"id": org}}
            write(url, [("INSERT INTO orders VALUES (%s, %s)", (n, status))], context)
        with psycopg.connect(servers.pg_url, autocommit=True) as state:
            platform_db.install(state, Settings().resources_dir / "sql")
            assert capture_enrich_index(source, state, es, grace=timedelta(0)) == 2
        yield env
    for index in es.indices.get(index=f"audit-{env}-*", expand_wildcards="all"):
        es.indices.delete(index=index)


@pytest.fixture(scope="module")
def provider_and_explorers(tenants, servers) -> Iterator[tuple[Explorer, Explorer, TokenProxy]]:
    """The provider; an Explorer that talks to it directly; one whose token requests go
    through a :class:`TokenProxy`."""
    assert (OIDC / "node_modules" / "oidc-provider").exists(), "run `make oidc` (npm ci)"
    ports = [free_port() for _ in range(3)]
    provider_port, direct_port, proxied_port = ports
    callbacks = ",".join(f"http://127.0.0.1:{p}/ui/sso/callback" for p in ports[1:])
    node = subprocess.Popen(
        [
            "node",
            "provider.mjs",
            str(provider_port),
            CLIENT,
            SECRET,
            callbacks,
            json.dumps(ACCOUNTS),
        ],
        cwd=OIDC,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    issuer = f"http://127.0.0.1:{provider_port}"
    proxy = TokenProxy(issuer)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            proxy.forward(self, "GET")

        def do_POST(self) -> None:
            proxy.forward(self, "POST")

        def log_message(self, *args) -> None:
            pass

    proxy.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=proxy.server.serve_forever, daemon=True).start()
    stack = ExitStack()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{issuer}/.well-known/openid-configuration").raise_for_status()
                break
            except httpx.HTTPError:
                assert node.poll() is None, node.stdout.read() if node.stdout else ""
                assert time.monotonic() < deadline, "the OpenID provider did not start"
                time.sleep(0.2)
        explorers = []
        for port, through in ((direct_port, issuer), (proxied_port, proxy.url)):
            sso = SsoSettings(
                issuer=through,
                client_id=CLIENT,
                client_secret=SECRET,
                grants=GRANTS,
                state_secret="x" * 32,
            )
            app = create_app(Settings(env=tenants, api=ApiSettings(key_cache_seconds=0), sso=sso))
            base = stack.enter_context(serving(app, port))
            explorers.append(Explorer(base, tenants, servers.pg_url))
        yield explorers[0], explorers[1], proxy
    finally:
        stack.close()
        proxy.server.shutdown()
        node.terminate()
        node.wait(timeout=30)


@pytest.fixture
def context(browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.requested = []  # type: ignore[attr-defined]
    ctx.on("request", lambda request: ctx.requested.append(request.url))  # type: ignore[attr-defined]
    yield ctx
    ctx.close()


def sso_sign_in(context: BrowserContext, explorer: Explorer, login: str, path: str) -> Page:
    """From a page of the Explorer to the provider's sign-in, and back."""
    page = context.new_page()
    page.goto(explorer.base + path)
    assert urlsplit(page.url).path == "/ui/login"
    page.get_by_role("link", name="Sign in with your company account").click()
    page.locator("input[name=login]").fill(login)
    page.locator("input[name=password]").fill("any password")
    page.get_by_role("button", name="Sign-in").click()
    page.get_by_role("button", name="Continue").click()  # the provider's consent
    # The callback answers with a page that moves on to the Explorer, or with why not.
    try:
        page.wait_for_url(lambda url: urlsplit(url).path != "/ui/sso/callback", timeout=5_000)
    except PlaywrightTimeout:
        assert "Signed in." not in page.content()  # an answer saying why not, which stays
    page.wait_for_load_state()
    return page


def _session(explorer: Explorer, principal: str) -> list[tuple]:
    with psycopg.connect(explorer.pg_url) as conn:
        return conn.execute(
            "SELECT role, organizations, key_id FROM audit_platform.ui_sessions"
            " WHERE env = %s AND principal = %s",
            (explorer.env, principal),
        ).fetchall()


def test_a_person_signs_in_with_the_provider_and_gets_what_their_group_grants(
    provider_and_explorers, context
):
    explorer, _, _ = provider_and_explorers
    page = sso_sign_in(context, explorer, "alice", "/ui/search?q=table%3Aorders")
    expect(page).to_have_url(f"{explorer.base}/ui/search?q=table%3Aorders")
    expect(page.locator("header .who")).to_contain_text("Signed in as alice")
    expect(page.locator("header .who")).to_contain_text("admin")
    expect(page.locator("table.records tbody tr")).to_have_count(2)  # the whole environment
    # PKCE: the browser carried the challenge, never the verifier.
    (authorize,) = [u for u in context.requested if urlsplit(u).path == "/auth"]  # type: ignore[attr-defined]
    query = parse_qs(urlsplit(authorize).query)
    assert query["code_challenge_method"] == ["S256"] and len(query["code_challenge"][0]) >= 43
    assert not any("code_verifier" in u for u in context.requested)  # type: ignore[attr-defined]
    (cookie,) = [c for c in context.cookies() if c["name"] == f"audit_ui_{explorer.env}"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert _session(explorer, "sso:alice") == [("admin", None, None)]
    deadline = time.monotonic() + 10  # the read log is written after the answer
    while True:
        with psycopg.connect(explorer.pg_url) as conn:
            routes = {r["route"] for r in read_rows(conn, explorer.env, key_id="sso:alice")}
        if "/ui/search" in routes or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "/ui/search" in routes
    # Signing out ends the session: the next page asks to sign in again.
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(f"{explorer.base}/ui/login")
    assert _session(explorer, "sso:alice") == []
    page.goto(explorer.base + "/ui/")
    assert urlsplit(page.url).path == "/ui/login"


def test_a_group_limited_to_an_organization_reads_that_organization_only(
    provider_and_explorers, context
):
    explorer, _, _ = provider_and_explorers
    page = sso_sign_in(context, explorer, "bob", "/ui/search?q=table%3Aorders")
    expect(page.locator("header .who")).to_contain_text("organization acme")
    expect(page.locator("table.records tbody tr")).to_have_count(1)
    page.locator("table.records tbody tr td:first-child a").click()  # the record itself
    expect(page.locator("main")).to_contain_text("acme-new")
    assert GLOBEX_VALUE not in page.content() and "globex" not in page.content().lower()
    assert _session(explorer, "sso:bob") == [("auditor", ["acme"], None)]


def test_a_person_whose_groups_give_no_access_gets_no_session(provider_and_explorers, context):
    explorer, _, _ = provider_and_explorers
    page = sso_sign_in(context, explorer, "carol", "/ui/")
    expect(page.locator("main")).to_contain_text("No access")
    expect(page.locator("main")).to_contain_text("none of your groups (marketing)")
    assert not [c for c in context.cookies() if c["name"] == f"audit_ui_{explorer.env}"]
    assert _session(explorer, "sso:carol") == []


def test_an_expired_session_asks_to_sign_in_again(provider_and_explorers, context):
    explorer, _, _ = provider_and_explorers
    page = sso_sign_in(context, explorer, "alice", "/ui/")
    expect(page.locator("header .who")).to_contain_text("Signed in as alice")
    with psycopg.connect(explorer.pg_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE audit_platform.ui_sessions SET expires_at = now() - interval '1 second'"
            " WHERE env = %s AND principal = 'sso:alice'",
            (explorer.env,),
        )
    page.goto(explorer.base + "/ui/search")
    assert urlsplit(page.url).path == "/ui/login"


def test_revoking_a_person_ends_their_sessions_at_once(provider_and_explorers, context):
    explorer, _, _ = provider_and_explorers
    page = sso_sign_in(context, explorer, "bob", "/ui/")
    expect(page.locator("header .who")).to_contain_text("Signed in as bob")
    live = len(_session(explorer, "sso:bob"))  # this one, and any other test's
    with psycopg.connect(explorer.pg_url, autocommit=True) as conn:
        assert revoke_person(conn, explorer.env, "sso:bob") == live >= 1
    assert _session(explorer, "sso:bob") == []
    page.goto(explorer.base + "/ui/search")
    assert urlsplit(page.url).path == "/ui/login"


def test_a_forged_callback_and_a_tampered_id_token_open_no_session(
    provider_and_explorers, context, browser
):
    _, proxied, proxy = provider_and_explorers
    page = context.new_page()
    page.goto(proxied.base + "/ui/sso/callback?code=stolen&state=forged")
    expect(page.locator("main")).to_contain_text("Single sign-on did not complete")
    # Through the proxy as it is, bob signs in with his own grant: the path works.
    page = sso_sign_in(context, proxied, "bob", "/ui/")
    expect(page.locator("header .who")).to_contain_text("organization acme")
    page.get_by_role("button", name="Sign out").click()
    # The proxy gives bob's ID token the admins' group: its signature no longer verifies.
    proxy.tamper = True
    fresh = browser.new_context()  # no session at the provider: bob signs in again
    try:
        page = sso_sign_in(fresh, proxied, "bob", "/ui/")
    finally:
        proxy.tamper = False
    assert proxy.tampered == ["bob"]
    expect(page.locator("main")).to_contain_text("does not verify")
    fresh.close()
    assert _session(proxied, "sso:bob") == []
