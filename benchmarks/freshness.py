"""Freshness: seconds from a change's commit until the Audit API returns it.

Runs a real deployment on the local stack (Dagster webserver and daemon, the API) for an
environment that copies ``dev`` (so its ``capture_flush_seconds``; capture is one long-lived
run kept alive by ``capture_keeper_sensor``), commits one attributed change at a steady rate, and
polls the API every 250 ms for new records. Also reads the live capture runs from Dagster.

Run: ``eval "$(audit-platform stack env)"; .venv/bin/python benchmarks/freshness.py``
Writes ``benchmarks/results/freshness.md``.
"""

from __future__ import annotations

import json
import shutil
import statistics
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import httpx
import typer
from _deployment import bench_deployment
from _live import capture_runs

from audit_platform.environment import load_environment
from audit_platform_context import Actor, audit_context
from audit_platform_context.psycopg_hook import connect

RESULTS = Path(__file__).parent / "results" / "freshness.md"
ENV = "benchfresh"
app = typer.Typer(add_completion=False)


@app.command()
def main(
    seconds: Annotated[int, typer.Option(help="How long changes are committed.")] = 180,
    rate: Annotated[float, typer.Option(help="Changes committed per second.")] = 1.0,
) -> None:
    root, resources, shop_url, deployment, key, _ = bench_deployment(ENV, "freshness")
    interval = load_environment(resources, ENV).capture_flush_seconds
    es_indices = f"audit-{ENV}-*"
    committed: dict[str, float] = {}
    seen: dict[str, float] = {}
    done = threading.Event()
    try:
        deployment.start()
        started_at = datetime.now(UTC).isoformat()
        # A customer to attach orders to.
        with connect(shop_url) as conn, audit_context(actor=Actor(type="service", id="bench")):
            customer = conn.execute(
                "INSERT INTO customers (name, email, password_hash) VALUES"
                " ('Bench', 'bench@example.com', 'x') RETURNING id"
            ).fetchone()[0]
            conn.commit()

        def poll() -> None:
            client = httpx.Client(base_url=deployment.api_url, headers={"X-API-Key": key})
            while not done.is_set():
                reply = client.get(
                    "/v1/events",
                    params={"since": started_at, "limit": 500, "order": "desc", "table": "orders"},
                )
                now = time.time()
                for event in reply.json().get("events", []):
                    request = (event["context"] or {}).get("request_id")
                    if request and request not in seen:
                        seen[request] = now
                time.sleep(0.25)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        with connect(shop_url) as conn:
            for i in range(int(seconds * rate)):
                request = f"fresh-{i}"
                with audit_context(actor=Actor(type="user", id="bench"), request_id=request):
                    conn.execute(
                        "INSERT INTO orders (customer_id, total) VALUES (%s, %s)", (customer, i)
                    )
                    conn.commit()
                committed[request] = time.time()
                time.sleep(max(0.0, 1 / rate - 0.002))
        deadline = time.time() + 120
        while len(seen.keys() & committed.keys()) < len(committed) and time.time() < deadline:
            time.sleep(0.5)
        done.set()
        poller.join(timeout=10)
        runs = capture_runs(deployment)
    finally:
        deployment.stop()
    lags = [seen[r] - t for r, t in committed.items() if r in seen]
    missing = len(committed) - len(lags)
    p50, worst = statistics.median(lags), max(lags)
    p95 = statistics.quantiles(lags, n=20, method="inclusive")[18]
    lines = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on the local stack (2 cores shared by "
        "PostgreSQL, Elasticsearch, the Dagster webserver and daemon with their code servers, "
        f"run processes, the API and this script): {len(committed)} changes committed at "
        f"{rate:g}/s for {seconds} s, `capture_flush_seconds` {interval:g} (the `dev` default), "
        "API polled every 250 ms.",
        "",
        "| commit to searchable | p50 | p95 | max | not seen within 120 s |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| seconds | {p50:.1f} | {p95:.1f} | {worst:.1f} | {missing} |",
        "",
        f"Live capture runs: {len(runs)} (one long-lived run; started after "
        f"{runs[0].started - runs[0].created:.1f} s in the queue)."
        if runs and runs[0].started
        else "No live capture run started.",
    ]
    RESULTS.write_text("# Freshness: commit to searchable\n\n" + "\n".join(lines) + "\n")
    typer.echo("\n".join(lines))
    typer.echo(json.dumps({"p50": p50, "p95": p95, "max": worst, "missing": missing}))
    shutil.rmtree(root, ignore_errors=True)
    typer.echo(
        f"(left indices {es_indices} and databases shop_{ENV}, dagster_{ENV} for "
        "inspection; the next run replaces them)"
    )


if __name__ == "__main__":
    app()
