"""Latency of a search limited to one organization, next to the same search without the limit.

Loads 1,000,000 records of 1,000 organizations (30 days, 5 tables, 200 actors; the
organization in each transaction's context) into the environment ``benchorg`` through this
project's own indexing code (kept between runs; ``--reload`` rebuilds), starts
``audit-platform api serve`` as its own process, and then, for each query, alternates one
request with a key limited to one organization and one with a key of the whole environment.
Both go through the same code; the limit adds one ``terms`` filter on ``organization.id``.

Run: ``eval "$(audit-platform stack env)"; .venv/bin/python benchmarks/organization_search.py``
Writes ``benchmarks/results/organization_search.md``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import httpx
import polars as pl
import psycopg
import typer

from audit_platform import platform_db
from audit_platform.api_keys import create_key
from audit_platform.clients import es_from_settings, pg_url_from_settings
from audit_platform.index.bulk import index_records
from audit_platform.index.template import install_template
from audit_platform.naming import read_alias
from audit_platform.record import RECORD_SCHEMA
from audit_platform.settings import Settings
from audit_platform_dev.stack.system import free_port

RESULTS = Path(__file__).parent / "results" / "organization_search.md"
ENV = "benchorg"
TABLES = ["orders", "customers", "payments", "order_lines", "shipments"]
ORGANIZATIONS = 1_000
#: The organization the limited key reads: one of the thousand, 1,000 records of the million.
ONE = "org-0417"
app = typer.Typer(add_completion=False)


def _records(start: int, n: int, t0: datetime, span: timedelta) -> pl.DataFrame:
    ids = range(start, start + n)
    step = span / 1_000_000

    def ctx(i: int) -> str:
        org = f"org-{i % ORGANIZATIONS:04d}"
        return json.dumps(
            {
                "actor": {"type": "user", "id": f"u-{i % 200}"},
                "organization": {"id": org, "name": f"Organization {org}"},
                "request_id": f"req-{i // 3}",
            }
        )

    return pl.DataFrame(
        {
            "id": [f"{ENV}:shop:{i:016X}:0" for i in ids],
            "commit_time": [t0 + step * i for i in ids],
            "env": [ENV] * n,
            "source": ["shop"] * n,
            "schema": ["public"] * n,
            "table": [TABLES[i % 5] for i in ids],
            "operation": [("insert", "update", "update", "delete")[i % 4] for i in ids],
            "object_id": [str(i % 100_000) for i in ids],
            "changed_columns": ['["status"]'] * n,
            "before": [f'{{"id":"{i % 100_000}","status":"new","note":"item {i}"}}' for i in ids],
            "after": [f'{{"id":"{i % 100_000}","status":"paid","note":"item {i}"}}' for i in ids],
            "context": [ctx(i) for i in ids],
            "attribution_status": ["attributed"] * n,
            "attribution_lag_seconds": [None] * n,
            "xid": list(ids),
            "lsn": list(ids),
            "change_index": [0] * n,
            "policy_version": ["1:bench"] * n,
            "key_columns": ['["id"]'] * n,
            "column_types": ['{"id":"integer","status":"text","note":"text"}'] * n,
            "txn_changes": [1] * n,
            "txn_ignored": [0] * n,
            "server_version": [150000] * n,
            "row_organization": [None] * n,
            "personal": [None] * n,
            "context_personal": [None] * n,
        },
        schema=RECORD_SCHEMA,
    )


def load(es, settings: Settings, count: int, reload: bool) -> datetime:
    """Index ``count`` records ending now-ish; returns the time of the first."""
    alias = read_alias(ENV)
    existing = es.options(ignore_status=404).count(index=alias).get("count", 0)
    span = timedelta(days=30)
    if existing >= count and not reload:
        first = es.search(index=alias, size=1, sort=[{"@timestamp": "asc"}])["hits"]["hits"][0]
        return datetime.fromisoformat(first["_source"]["@timestamp"])
    for name in es.options(ignore_status=404).indices.get(index=f"audit-{ENV}-*"):
        es.indices.delete(index=name)
    install_template(es, settings.resources_dir, ENV, replicas=0)
    t0 = datetime.now(UTC).replace(microsecond=0) - span
    started = time.monotonic()
    for start in range(0, count, 100_000):
        frame = _records(start, min(100_000, count - start), t0, span)
        index_records(es, frame, database="shopdb", ingested_at=datetime.now(UTC))
        typer.echo(f"indexed {start + frame.height:,} ({time.monotonic() - started:.0f} s)")
    es.indices.refresh(index=alias)
    es.indices.forcemerge(index=f"audit-{ENV}-*", max_num_segments=1)
    return t0


def _hits(body: dict) -> int:
    """How many records an answer counts (a page's total, or the statistics' total), or
    lists (an object's history)."""
    total = body.get("total")
    if isinstance(total, dict):
        return total["value"]
    if isinstance(total, int):
        return total
    return len(body.get("changes", []))


def _p50_p95(samples: list[float]) -> tuple[float, float]:
    return statistics.median(samples), statistics.quantiles(samples, n=20, method="inclusive")[18]


@app.command()
def main(
    count: Annotated[int, typer.Option(help="Records to index.")] = 1_000_000,
    repeats: Annotated[int, typer.Option(help="Requests per query and key.")] = 100,
    reload: Annotated[bool, typer.Option(help="Re-index even if the records exist.")] = False,
) -> None:
    settings = Settings(env=ENV)
    es = es_from_settings(settings)
    t0 = load(es, settings, count, reload)
    with psycopg.connect(pg_url_from_settings(settings), autocommit=True) as conn:
        platform_db.install(conn, settings.resources_dir / "sql")
        keys = {
            "whole": create_key(conn, ENV, "organization benchmark, whole").secret,
            "one organization": create_key(
                conn, ENV, "organization benchmark, one", organizations=[ONE]
            ).secret,
        }
    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("audit-platform")),
            "api",
            "serve",
            "--port",
            str(port),
        ],
        env={**os.environ, "AUDIT_ENV": ENV},
        stderr=subprocess.DEVNULL,
    )
    month = (t0 - timedelta(hours=1)).isoformat()
    queries = [
        ("latest changes, last 7 days", "/v1/events", {}),
        ("one actor, 30 days", "/v1/events", {"actor_id": "u-17", "since": month}),
        (
            "query language: table + operation, 30 days",
            "/v1/events",
            {"query": "table:payments op:update", "since": month},
        ),
        ("free text, 30 days", "/v1/events", {"q": "item 123417", "since": month}),
        ("counts by hour and facet, 30 days", "/v1/stats", {"since": month}),
        # Every change of payments 417 is org-0417's: both keys get the same 10 records.
        ("object history", "/v1/objects/shop/payments/417/history", {}),
    ]
    clients = {
        name: httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": key}, timeout=60
        )
        for name, key in keys.items()
    }
    rows = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if clients["whole"].get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
            if time.monotonic() > deadline:
                raise SystemExit("the API did not start within 60 s")
        for name, path, params in queries:
            times: dict[str, list[float]] = {k: [] for k in keys}
            found: dict[str, int] = {}
            for i in range(repeats + 5):  # 5 warm-up rounds, not counted
                order = list(keys) if i % 2 else list(reversed(keys))
                for which in order:
                    start = time.perf_counter()
                    reply = clients[which].get(path, params=params)
                    elapsed = (time.perf_counter() - start) * 1000
                    assert reply.status_code == 200, reply.text
                    body = reply.json()
                    found[which] = _hits(body)
                    if i >= 5:
                        times[which].append(elapsed)
            (w50, w95), (o50, o95) = _p50_p95(times["whole"]), _p50_p95(times["one organization"])
            rows.append((name, o50, o95, w50, w95, found["one organization"], found["whole"]))
            typer.echo(
                f"{name}: one organization p50 {o50:.1f} ms p95 {o95:.1f} | "
                f"whole p50 {w50:.1f} ms p95 {w95:.1f} ({o50 / w50:.2f}x)"
            )
    finally:
        server.terminate()
        server.wait(timeout=30)
    total = es.count(index=read_alias(ENV))["count"]
    lines = [
        "# A search limited to one organization, next to the same search without the limit",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {total:,} records of "
        f"{ORGANIZATIONS:,} organizations in one environment (single-node Elasticsearch, "
        "force-merged), the API served by `audit-platform api serve` (one uvicorn worker); "
        f"client, API and cluster share 2 cores. {repeats} requests per query and key, "
        "alternating the two keys, after 5 warm-up rounds. The limited key reads "
        f"`{ONE}` (1 in {ORGANIZATIONS:,} records).",
        "",
        "Command: `python benchmarks/organization_search.py`",
        "",
        "| query | one organization p50 ms | p95 ms | whole p50 ms | p95 ms | limited/whole p50 "
        "| p95 | hits (limited / whole) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, o50, o95, w50, w95, hits_one, hits_whole in rows:
        lines.append(
            f"| {name} | {o50:.1f} | {o95:.1f} | {w50:.1f} | {w95:.1f} | {o50 / w50:.2f}x "
            f"| {o95 / w95:.2f}x | {hits_one:,} / {hits_whole:,} |"
        )
    RESULTS.write_text("\n".join(lines) + "\n")
    typer.echo(f"wrote {RESULTS}")


if __name__ == "__main__":
    app()
