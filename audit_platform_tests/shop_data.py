"""A small shop captured into two environments, with keys of every kind: the data the API and
Explorer tests ask their questions of."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

from audit_platform import platform_db
from audit_platform.api_keys import create_key, revoke_key
from audit_platform.settings import Settings
from audit_platform_tests.capture_support import capture_enrich_index, make_source
from audit_platform_tests.conftest import new_database
from audit_platform_tests.helpers import policy_for

DDL = """
CREATE TABLE customers (id int PRIMARY KEY, name text, email text);
CREATE TABLE orders (id int PRIMARY KEY, customer_id int, status text, note text,
                     total numeric(12,2));
CREATE TABLE order_lines (order_id int, line int, sku text, qty int, PRIMARY KEY (order_id, line));
ALTER TABLE customers REPLICA IDENTITY FULL;
ALTER TABLE orders REPLICA IDENTITY FULL;
ALTER TABLE order_lines REPLICA IDENTITY FULL;
"""
POLICY = policy_for(
    "shop", public__customers={"mask": ["email"]}, public__orders={}, public__order_lines={}
)
ADA = {
    "actor": {"type": "user", "id": "ada", "name": "Ada"},
    "request_id": "req-ada-1",
    "reason": "new customer signup",
    "service": "shop-api",
}
CHECKOUT_ORDERS = 40


@dataclass
class Shop:
    env: str
    other_env: str
    url: str
    xid_signup: int
    xid_admin: int
    keys: dict[str, str]
    written: dict[str, datetime]


def write(url: str, statements: list[tuple[str, tuple]], context: dict | None = None) -> int:
    with psycopg.connect(url) as conn:
        if context is not None:
            conn.execute("SELECT audit.set_context(%s::jsonb)", (json.dumps(context),))
        for sql, params in statements:
            conn.execute(sql, params)
        return int(conn.execute("SELECT pg_current_xact_id()::text").fetchone()[0])


def traffic(url: str) -> tuple[int, int, dict[str, datetime]]:
    written = {}
    xid_signup = write(
        url,
        [
            ("INSERT INTO customers VALUES (1, 'Ada', 'ada@example.com')", ()),
            ("INSERT INTO orders VALUES (1, 1, 'new', 'fragile glass vase', 19.99)", ()),
            ("INSERT INTO order_lines VALUES (1, 1, 'VASE-1', 2)", ()),
        ],
        ADA,
    )
    written["signup"] = datetime.now(UTC)
    for i in range(2, CHECKOUT_ORDERS + 2):
        write(
            url,
            [("INSERT INTO orders VALUES (%s, 1, 'new', NULL, %s)", (i, i))],
            {"actor": {"type": "service", "id": "checkout"}, "request_id": f"req-{i}"},
        )
    written["checkout"] = datetime.now(UTC)
    write(
        url,
        [("UPDATE orders SET status = 'paid' WHERE id = 1", ())],
        {"actor": {"type": "service", "id": "billing"}, "reason": "payment captured"},
    )
    written["paid"] = datetime.now(UTC)
    write(
        url,
        [("UPDATE orders SET status = 'closed' WHERE id BETWEEN 2 AND 6", ())],
        {
            "actor": {"type": "job", "id": "nightly-close"},
            "job": {"name": "nightly-close", "run_id": "run-7"},
        },
    )
    write(
        url,
        [("UPDATE customers SET email = 'ada@new.example' WHERE id = 1", ())],
        {**ADA, "request_id": "req-ada-2", "reason": "gdpr request"},
    )
    xid_admin = write(url, [("DELETE FROM orders WHERE id = %s", (CHECKOUT_ORDERS + 1,))])
    return xid_signup, xid_admin, written


@contextmanager
def shop_environments(servers, es, tmp: Path) -> Iterator[Shop]:
    """Environments A and B of one shop database, with the traffic above captured and
    indexed, and API keys: all of A, all of B, A's orders only, another source, revoked."""
    env, other_env = (f"api_{uuid.uuid4().hex[:8]}" for _ in range(2))
    with new_database(servers) as url:
        source = make_source(url, tmp / "a", DDL, POLICY, env=env)
        other = make_source(url, tmp / "b", "SELECT 1", POLICY, env=other_env)
        xid_signup, xid_admin, written = traffic(url)
        with psycopg.connect(servers.pg_url, autocommit=True) as state:
            platform_db.install(state, Settings().resources_dir / "sql")
            for each in (source, other):
                # No grace: the administrator's change is released as unattributed at once.
                assert capture_enrich_index(each, state, es, grace=timedelta(0)) == 51
            keys = {
                "a": create_key(state, env, "all of A").secret,
                "b": create_key(state, other_env, "all of B").secret,
                "orders": create_key(
                    state, env, "orders only", sources=["shop"], tables=["public.orders"]
                ).secret,
                "other_source": create_key(state, env, "billing only", sources=["billing"]).secret,
            }
            revoked = create_key(state, env, "to revoke")
            revoke_key(state, env, revoked.key.key_id)
            keys["revoked"] = revoked.secret
        yield Shop(env, other_env, url, xid_signup, xid_admin, keys, written)
        for name in (env, other_env):
            for index in es.indices.get(index=f"audit-{name}-*", expand_wildcards="all"):
                es.indices.delete(index=index)
            es.indices.delete_index_template(name=f"audit-{name}")
