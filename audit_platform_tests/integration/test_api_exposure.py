"""What a deployed API shows to whom: the documents and metrics as AUDIT_API_DOCS and
AUDIT_API_METRICS say, TLS seen through a trusted proxy only, and an access log that holds no
query string.

The proxy and log tests run `audit-platform api serve` as a deployment does (uvicorn's options
are the promise under test). A proxy at another address than the server's own is reached from
another loopback address (Linux answers on all of 127/8).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient

from audit_platform import platform_db
from audit_platform.api.main import create_app
from audit_platform.api_keys import create_key
from audit_platform.settings import ApiSettings, Settings
from audit_platform_tests.helpers import serving_api

PROXY = "127.0.0.2"  # the ingress, trusted by the server below
STRANGER = "127.0.0.3"  # any other client


@dataclass
class Env:
    name: str
    key: str


@pytest.fixture(scope="module")
def env(servers) -> Env:
    name = f"exp_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(servers.pg_url, autocommit=True) as conn:
        platform_db.install(conn, Settings().resources_dir / "sql")
        return Env(name, create_key(conn, name, "exposure tests").secret)


def _client(env: Env, **api: str) -> TestClient:
    settings = Settings(env=env.name, api=ApiSettings(key_cache_seconds=0, **api))
    return TestClient(create_app(settings))


# --- documents and metrics ----------------------------------------------------------------

DOCS = ("/docs", "/redoc", "/openapi.json")


@pytest.mark.parametrize(
    ("mode", "without_key", "with_key"),
    [
        (
            "open",
            {"/docs": 200, "/redoc": 200, "/openapi.json": 200},
            {"/docs": 200, "/redoc": 200, "/openapi.json": 200},
        ),
        # The browser pages cannot send a key: keyed serves the document to tools only.
        (
            "keyed",
            {"/docs": 404, "/redoc": 404, "/openapi.json": 401},
            {"/docs": 404, "/redoc": 404, "/openapi.json": 200},
        ),
        (
            "off",
            {"/docs": 404, "/redoc": 404, "/openapi.json": 404},
            {"/docs": 404, "/redoc": 404, "/openapi.json": 404},
        ),
    ],
)
def test_the_api_documents_are_served_as_the_setting_says(env, mode, without_key, with_key):
    with _client(env, docs=mode) as client:
        assert {path: client.get(path).status_code for path in DOCS} == without_key
        headers = {"X-API-Key": env.key}
        assert {path: client.get(path, headers=headers).status_code for path in DOCS} == with_key
        if with_key["/openapi.json"] == 200:
            document = client.get("/openapi.json", headers=headers).json()
            assert "/v1/events" in document["paths"]


@pytest.mark.parametrize(
    ("mode", "without_key", "with_key"),
    [("open", 200, 200), ("keyed", 401, 200), ("off", 404, 404)],
)
def test_the_metrics_are_served_as_the_setting_says(env, mode, without_key, with_key):
    with _client(env, metrics=mode) as client:
        assert client.get("/metrics").status_code == without_key
        # As a scraper sends it: a bearer token.
        answer = client.get("/metrics", headers={"Authorization": f"Bearer {env.key}"})
        assert answer.status_code == with_key
        if with_key == 200:
            assert "audit_api_requests_total" in answer.text


def test_a_bad_exposure_setting_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="'off', 'keyed' or 'open'"):
        ApiSettings(metrics="closed")


# --- the served API: proxies and the access log --------------------------------------------


@dataclass
class Served:
    url: str
    port: int
    log: Path


@pytest.fixture(scope="module")
def served_api(env, tmp_path_factory) -> Iterator[Served]:
    """`audit-platform api serve` trusting :data:`PROXY` only, its output in a file."""
    log = tmp_path_factory.mktemp("exposure") / "api.log"
    environ = {**os.environ, "AUDIT_ENV": env.name, "AUDIT_API_TRUSTED_PROXIES": PROXY}
    with serving_api(environ, log) as (url, _):
        yield Served(url, int(url.rsplit(":", 1)[1]), log)


def _sign_in(served: Served, env: Env, source: str, origin_scheme: str) -> httpx.Response:
    """The Explorer's sign-in as a TLS ingress at ``source`` forwards it."""
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport) as client:
        return client.post(
            f"{served.url}/ui/login",
            data={"key": env.key, "next": "/ui/"},
            headers={
                "X-Forwarded-Proto": "https",
                "Origin": f"{origin_scheme}://127.0.0.1:{served.port}",
            },
        )


def test_behind_a_trusted_tls_proxy_sign_in_passes_and_the_cookie_is_secure(served_api, env):
    answer = _sign_in(served_api, env, PROXY, "https")
    assert answer.status_code == 303, answer.text
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"audit_ui_{env.name}=")
    assert "secure" in cookie.lower().split("; "), cookie


def test_an_untrusted_client_cannot_claim_tls(served_api, env):
    # It claims https: the request is taken for what it is, http, so its Origin is foreign.
    answer = _sign_in(served_api, env, STRANGER, "https")
    assert answer.status_code == 403 and "set-cookie" not in answer.headers
    # Signed in over plain http, the cookie is not marked Secure (a browser would drop it).
    answer = _sign_in(served_api, env, STRANGER, "http")
    assert answer.status_code == 303, answer.text
    assert "secure" not in answer.headers["set-cookie"].lower().split("; ")


def test_the_access_log_holds_no_query_string(served_api, env):
    """Filters are personal data (e-mail addresses, names): the access log has the route's
    template, the key id and the status, never the query."""
    headers = {"X-API-Key": env.key}
    httpx.get(
        f"{served_api.url}/v1/events", params={"query": "actor:alice@example.com"}, headers=headers
    )
    httpx.get(f"{served_api.url}/v1/objects/shop/public.customers/bob@example.com/history")
    httpx.get(f"{served_api.url}/ui/search", params={"q": "carol@example.com"})
    deadline = time.monotonic() + 10
    while "/ui/search" not in served_api.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    log = served_api.log.read_text()
    lines = [line for line in log.splitlines() if "GET /" in line]
    assert any(" GET /v1/events " in line for line in lines), log[-3000:]
    assert any(" GET /ui/search " in line for line in lines), log[-3000:]
    for name in ("alice", "bob", "carol"):
        assert name not in log, [line for line in lines if name in line]
