"""The demo shop service: what a real service looks like after adopting audit-platform.

Its only audit code is the two lines a service adds: the ASGI middleware (who is calling, for
which organization, which request) and the audited connection class (the context travels with
each writing transaction).
A ``reason`` is added where the service knows one (cancelling an order).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

from fastapi import FastAPI, HTTPException
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, Field

from audit_platform_context import Actor, Organization, audit_context
from audit_platform_context.asgi import AuditContextMiddleware
from audit_platform_context.psycopg_hook import AuditedConnection

#: The demo's people: support agents and customers, identified by the X-User header.
PEOPLE = {
    "alice": "Alice Martin (support)",
    "bob": "Bob Chen (support)",
    "carol": "Carol Diaz (customer)",
    "dave": "Dave Okafor (customer)",
    "erin": "Erin Novak (customer)",
}


#: The shop is a SaaS: each customer belongs to one of its tenants, named by the X-Org header.
ORGANIZATIONS = {"northwind": "Northwind Traders", "contoso": "Contoso Ltd"}


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _actor(scope: dict[str, Any]) -> Actor | None:
    """The demo trusts an X-User header; a real service takes this from its session or token."""
    user = _header(scope, b"x-user")
    return Actor(type="user", id=user, name=PEOPLE.get(user)) if user else None


def _organization(scope: dict[str, Any]) -> Organization | None:
    """The tenant the request is for; a real service takes it from the authenticated session,
    never from a header a caller chooses."""
    org = _header(scope, b"x-org")
    return Organization(id=org, name=ORGANIZATIONS[org]) if org in ORGANIZATIONS else None


class NewCustomer(BaseModel):
    name: str
    email: str
    phone: str | None = None


class CustomerChange(BaseModel):
    email: str | None = None
    phone: str | None = None
    tier: str | None = None


class Line(BaseModel):
    sku: str
    quantity: int = Field(gt=0)
    unit_price: Decimal


class NewOrder(BaseModel):
    customer_id: int
    lines: list[Line] = Field(min_length=1)


class Payment(BaseModel):
    card_last4: str = Field(pattern=r"^\d{4}$")


def create_shop_app(database_url: str) -> FastAPI:
    pool = ConnectionPool(
        database_url, connection_class=AuditedConnection, min_size=1, max_size=4, open=False
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool.open(wait=True, timeout=30)
        yield
        pool.close()

    app = FastAPI(title="Demo shop service", lifespan=lifespan)
    app.add_middleware(
        AuditContextMiddleware,
        service="shop-api",
        get_actor=_actor,
        get_organization=_organization,
    )

    @app.post("/customers")
    def create_customer(body: NewCustomer) -> dict[str, int]:
        password_hash = hashlib.sha256(secrets.token_bytes(16)).hexdigest()
        with pool.connection() as conn:
            row = conn.execute(
                "INSERT INTO customers (name, email, phone, password_hash) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (email) DO UPDATE SET name = excluded.name RETURNING id",
                (body.name, body.email, body.phone, password_hash),
            ).fetchone()
        assert row is not None  # the upsert returns its row whether it inserted or updated
        return {"id": row[0]}

    @app.patch("/customers/{customer_id}")
    def change_customer(customer_id: int, body: CustomerChange) -> dict[str, int]:
        changes = body.model_dump(exclude_none=True)
        if not changes:
            raise HTTPException(422, "nothing to change")
        assignments = ", ".join(f"{column} = %({column})s" for column in changes)
        with pool.connection() as conn:
            updated = conn.execute(
                f"UPDATE customers SET {assignments}, updated_at = now() WHERE id = %(id)s",
                {**changes, "id": customer_id},
            ).rowcount
        if not updated:
            raise HTTPException(404, "no such customer")
        return {"id": customer_id}

    @app.post("/orders")
    def place_order(body: NewOrder) -> dict[str, int]:
        total = sum(line.quantity * line.unit_price for line in body.lines)
        with pool.connection() as conn:
            row = conn.execute(
                "INSERT INTO orders (customer_id, total) VALUES (%s, %s) RETURNING id",
                (body.customer_id, total),
            ).fetchone()
            assert row is not None  # INSERT ... RETURNING always returns the inserted row
            order_id = row[0]
            for number, line in enumerate(body.lines, start=1):
                conn.execute(
                    "INSERT INTO order_lines VALUES (%s, %s, %s, %s, %s)",
                    (order_id, number, line.sku, line.quantity, line.unit_price),
                )
        return {"id": order_id}

    @app.post("/orders/{order_id}/pay")
    def pay(order_id: int, body: Payment) -> dict[str, int]:
        with pool.connection() as conn:
            row = conn.execute(
                "UPDATE orders SET status = 'paid', updated_at = now()"
                " WHERE id = %s AND status = 'new' RETURNING total",
                (order_id,),
            ).fetchone()
            if row is None:
                raise HTTPException(409, "order is not awaiting payment")
            inserted = conn.execute(
                "INSERT INTO payments (order_id, amount, card_last4) VALUES (%s, %s, %s)"
                " RETURNING id",
                (order_id, row[0], body.card_last4),
            ).fetchone()
            assert inserted is not None  # INSERT ... RETURNING always returns the inserted row
            payment = inserted[0]
        return {"id": payment}

    @app.post("/orders/{order_id}/cancel")
    def cancel(order_id: int) -> dict[str, int]:
        with audit_context(reason="customer asked to cancel"), pool.connection() as conn:
            cancelled = conn.execute(
                "UPDATE orders SET status = 'cancelled', updated_at = now()"
                " WHERE id = %s AND status IN ('new', 'paid')",
                (order_id,),
            ).rowcount
        if not cancelled:
            raise HTTPException(409, "order cannot be cancelled")
        return {"id": order_id}

    return app


def app_from_environment() -> FastAPI:
    """``uvicorn --factory audit_platform_dev.demo.service:app_from_environment``."""
    return create_shop_app(os.environ["SHOP_DATABASE_URL"])
