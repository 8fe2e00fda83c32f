"""Traffic that acts like the shop's real users, jobs and administrators.

- People call the shop service over HTTP (so the SDK middleware records who and which request):
  customers sign up, order and pay; support agents change customers and cancel orders.
- A background job ships paid orders (``audit_job``: the job is the actor, each run has an id).
- A scheduled batch recalculates customer tiers (another job, many rows per transaction).
- An administrator fixes data with direct SQL and records no context: those changes are
  quarantined, then indexed as ``unattributed`` after the environment's grace window.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from dataclasses import dataclass, field

import httpx
import psycopg

from audit_platform_context import audit_job
from audit_platform_context.psycopg_hook import AuditedConnection

CUSTOMERS = ["carol", "dave", "erin"]
#: Which of the shop's tenants each customer belongs to (support agents act for none).
ORGANIZATION_OF = {"carol": "northwind", "dave": "contoso", "erin": "contoso"}
AGENTS = ["alice", "bob"]
SKUS = {"MUG-01": "9.50", "TEE-M": "19.00", "CAP-02": "14.25", "BAG-XL": "39.90"}


@dataclass
class Traffic:
    shop_url: str  # the shop service, over HTTP
    database_url: str  # the shop's database, for jobs and the administrator
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    counts: dict[str, int] = field(default_factory=dict)
    http: httpx.Client | None = None  # default: a client of shop_url

    def __post_init__(self) -> None:
        if self.http is None:
            self.http = httpx.Client(base_url=self.shop_url, timeout=10)

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def _call(self, user: str, method: str, path: str, body: dict | None = None) -> dict | None:
        assert self.http is not None
        headers = {"X-User": user}
        if user in ORGANIZATION_OF:
            headers["X-Org"] = ORGANIZATION_OF[user]
        response = self.http.request(method, path, json=body, headers=headers)
        self._count(f"{method} {path.split('/')[1]}")
        return response.json() if response.status_code == 200 else None

    def _ids(self, sql: str) -> list[int]:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            return [row[0] for row in conn.execute(sql)]

    def user_action(self) -> None:
        """One request by one person, chosen like a small shop's daytime traffic."""
        roll = self.rng.random()
        customer = self.rng.choice(CUSTOMERS)
        if roll < 0.15 or not self._ids("SELECT id FROM customers LIMIT 1"):
            n = self.rng.randrange(10_000)
            self._call(
                customer,
                "POST",
                "/customers",
                {
                    "name": f"{customer.title()} {n}",
                    "email": f"{customer}{n}@example.com",
                    "phone": f"+1-555-{n:04d}",
                },
            )
        elif roll < 0.55:
            [customer_id] = self._ids("SELECT id FROM customers ORDER BY random() LIMIT 1")
            lines = [
                {"sku": sku, "quantity": self.rng.randint(1, 3), "unit_price": price}
                for sku, price in self.rng.sample(sorted(SKUS.items()), self.rng.randint(1, 3))
            ]
            self._call(customer, "POST", "/orders", {"customer_id": customer_id, "lines": lines})
        elif roll < 0.8:
            for order_id in self._ids("SELECT id FROM orders WHERE status = 'new' LIMIT 1"):
                self._call(
                    customer,
                    "POST",
                    f"/orders/{order_id}/pay",
                    {"card_last4": f"{self.rng.randrange(10_000):04d}"},
                )
        elif roll < 0.92:
            agent = self.rng.choice(AGENTS)
            [customer_id] = self._ids("SELECT id FROM customers ORDER BY random() LIMIT 1")
            self._call(
                agent,
                "PATCH",
                f"/customers/{customer_id}",
                {"phone": f"+1-555-{self.rng.randrange(10_000):04d}"},
            )
        else:
            agent = self.rng.choice(AGENTS)
            for order_id in self._ids(
                "SELECT id FROM orders WHERE status IN ('new', 'paid') ORDER BY random() LIMIT 1"
            ):
                self._call(agent, "POST", f"/orders/{order_id}/cancel")

    @audit_job("ship-paid-orders", reason="warehouse pick-up")
    def ship_paid_orders(self) -> int:
        with AuditedConnection.connect(self.database_url) as conn:
            shipped = conn.execute(
                "UPDATE orders SET status = 'shipped', updated_at = now() WHERE status = 'paid'"
            ).rowcount
        self._count("job ship-paid-orders")
        return shipped

    @audit_job("tier-recalculation", reason="scheduled loyalty tiers")
    def recalculate_tiers(self) -> int:
        with AuditedConnection.connect(self.database_url) as conn:
            changed = conn.execute(
                "UPDATE customers c SET tier = t.tier, updated_at = now() FROM ("
                " SELECT customer_id, CASE WHEN sum(total) > 100 THEN 'gold' ELSE 'standard'"
                " END AS tier FROM orders WHERE status <> 'cancelled' GROUP BY customer_id) t"
                " WHERE t.customer_id = c.id AND c.tier IS DISTINCT FROM t.tier"
            ).rowcount
        self._count("batch tier-recalculation")
        return changed

    def administrator_fix(self) -> int:
        """Direct SQL from a console: no middleware, no context."""
        with psycopg.connect(self.database_url) as conn:
            fixed = conn.execute(
                "UPDATE orders SET total = total + 0.01, updated_at = now()"
                " WHERE id = (SELECT id FROM orders ORDER BY random() LIMIT 1)"
            ).rowcount
        self._count("admin direct SQL")
        return fixed

    def run(
        self,
        stop: threading.Event,
        *,
        requests_per_second: float = 2.0,
        job_every: float = 20.0,
        batch_every: float = 60.0,
        admin_every: float = 45.0,
    ) -> None:
        """Until ``stop`` is set: user requests at the given rate, jobs on their intervals."""
        started = time.monotonic()
        due = {
            "job": started + job_every,
            "batch": started + batch_every,
            "admin": started + admin_every,
        }
        while not stop.is_set():
            now = time.monotonic()
            if now >= due["job"]:
                self.ship_paid_orders()
                due["job"] = now + job_every
            if now >= due["batch"]:
                self.recalculate_tiers()
                due["batch"] = now + batch_every
            if now >= due["admin"]:
                self.administrator_fix()
                due["admin"] = now + admin_every
            # The service may be restarting or stopping: the next tick tries again.
            with contextlib.suppress(httpx.TransportError):
                self.user_action()
            stop.wait(self.rng.expovariate(requests_per_second))
