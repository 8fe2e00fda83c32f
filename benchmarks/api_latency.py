"""Latency of typical Audit API queries next to the same queries sent straight to Elasticsearch.

Loads 1,000,000 records (30 days, 5 tables, 200 actors, 100,000 objects) into the environment
``benchapi`` through this project's own indexing code (kept between runs; ``--reload`` rebuilds),
starts ``audit-platform api serve`` as its own process, and then, for each query, alternates: one
request to the API over HTTP, one search with the same body to Elasticsearch with the Python
client. The difference is the API's cost: HTTP, key check, validation, building and serializing
the answer.

Run: ``eval "$(audit-platform stack env)"; .venv/bin/python benchmarks/api_latency.py``
Writes ``benchmarks/results/api_latency.md``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import httpx
import polars as pl
import psycopg
import typer

from audit_platform import platform_db
from audit_platform.api_keys import Scope, create_key
from audit_platform.clients import es_from_settings, pg_url_from_settings
from audit_platform.index.bulk import index_records
from audit_platform.index.template import install_template
from audit_platform.naming import read_alias
from audit_platform.query.filters import EventFilter, bool_query, filter_clauses, sort
from audit_platform.record import RECORD_SCHEMA
from audit_platform.settings import Settings
from audit_platform_dev.stack.system import free_port

RESULTS = Path(__file__).parent / "results" / "api_latency.md"
ENV = "benchapi"
TABLES = ["orders", "customers", "payments", "order_lines", "shipments"]
app = typer.Typer(add_completion=False)


#: The column types the benchmark's records carry (``row.types``).
#: A transaction id the records hold (ids are the record numbers).
XID = 123_457

TYPES = '{"id":"integer","status":"text","note":"text"}'


def _records(start: int, n: int, t0: datetime, span: timedelta) -> pl.DataFrame:
    ids = range(start, start + n)
    step = span / 1_000_000

    def ctx(i: int) -> str:
        return json.dumps(
            {
                "actor": {"type": "user", "id": f"u-{i % 200}"},
                "request_id": f"req-{i // 3}",
                "reason": "support ticket",
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
            "column_types": [TYPES] * n,
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


def _server_timing(header: str) -> tuple[float, float]:
    """(milliseconds in Elasticsearch, milliseconds in the API process) of one answer."""
    es_part, total_part = header.split(", ")
    return float(es_part.split(";")[1].removeprefix("dur=")), float(
        total_part.removeprefix("total;dur=")
    )


def _quantiles(samples: list[float]) -> tuple[float, float]:
    return statistics.median(samples), statistics.quantiles(samples, n=20, method="inclusive")[18]


@app.command()
def main(
    count: Annotated[int, typer.Option(help="Records to index.")] = 1_000_000,
    repeats: Annotated[int, typer.Option(help="Requests per query and side.")] = 100,
    reload: Annotated[bool, typer.Option(help="Re-index even if the records exist.")] = False,
) -> None:
    settings = Settings(env=ENV)
    es = es_from_settings(settings)
    t0 = load(es, settings, count, reload)
    with psycopg.connect(pg_url_from_settings(settings), autocommit=True) as conn:
        platform_db.install(conn, settings.resources_dir / "sql")
        key = create_key(conn, ENV, "api latency benchmark").secret
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
    scope = Scope(ENV)
    week = (datetime.now(UTC) - timedelta(days=7)).isoformat()
    month = (t0 - timedelta(hours=1)).isoformat()

    def search(f: EventFilter, since: str | None, size: int = 50) -> dict[str, Any]:
        start = datetime.fromisoformat(since) if since else datetime.now(UTC) - timedelta(days=7)
        clauses = filter_clauses(f, start, datetime.now(UTC))
        return {
            "query": bool_query(scope, clauses, f.q),
            "sort": sort("desc"),
            "size": size + 1,
            "track_total_hits": 10_000,
        }

    # (name, API path and params, the equivalent Elasticsearch body)
    queries: list[tuple[str, str, dict, Callable[[], dict]]] = [
        ("latest changes, last 7 days", "/v1/events", {}, lambda: search(EventFilter(), None)),
        (
            "one actor, last 7 days",
            "/v1/events",
            {"actor_id": "u-17"},
            lambda: search(EventFilter(actor_id="u-17"), None),
        ),
        (
            "table + changed column, 30 days",
            "/v1/events",
            {"table": "payments", "column": "status", "since": month},
            lambda: search(EventFilter(table=["payments"], column=["status"]), month),
        ),
        (
            "free text, 30 days",
            "/v1/events",
            {"q": "item 123456", "since": month},
            lambda: search(EventFilter(q="item 123456"), month),
        ),
        (
            "object history",
            "/v1/objects/shop/orders/4242/history",
            {},
            lambda: {
                "query": bool_query(
                    scope,
                    [
                        {"term": {"source.service": "shop"}},
                        {"term": {"table.name": "orders"}},
                        {"term": {"object_id": "4242"}},
                    ],
                ),
                "sort": sort("asc"),
                "size": 101,
                "track_total_hits": False,
            },
        ),
        (
            "counts by hour, 7 days",
            "/v1/stats",
            {"since": week},
            lambda: {
                "size": 0,
                "track_total_hits": True,
                "query": bool_query(
                    scope,
                    filter_clauses(EventFilter(), datetime.fromisoformat(week), datetime.now(UTC)),
                ),
                "aggs": {
                    "t": {"date_histogram": {"field": "@timestamp", "fixed_interval": "1h"}},
                    **{
                        k: {"terms": {"field": f, "size": 50}}
                        for k, f in (
                            ("s", "source.service"),
                            ("o", "operation"),
                            ("a", "context.actor.id"),
                            ("n", "table.name"),
                            ("r", "attribution.status"),
                        )
                    },
                },
            },
        ),
        # The endpoints of investigations (#15).
        (
            "query language: actor and op",
            "/v1/events",
            {"query": "actor:u-17 op:update"},
            lambda: search(EventFilter(query="actor:u-17 op:update"), None),
        ),
        (
            "value filter: after.status, 7 days",
            "/v1/events",
            {"after.status": "paid"},
            lambda: search(EventFilter(after=["status:paid"]), None),
        ),
        (
            "a request, across sources",
            "/v1/requests/req-123456",
            {},
            lambda: {
                "query": bool_query(scope, [{"term": {"context.request_id": "req-123456"}}]),
                "sort": sort("asc"),
                "size": 501,
                "track_total_hits": False,
            },
        ),
        (
            "a transaction, with completeness",
            f"/v1/transactions/shop/{XID}",
            {},
            lambda: {
                "query": bool_query(
                    scope,
                    [{"term": {"source.service": "shop"}}, {"term": {"transaction.xid": XID}}],
                ),
                "sort": sort("asc"),
                "size": 501,
                "track_total_hits": 10_000,
            },
        ),
    ]
    try:
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": key}, timeout=60
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
            if time.monotonic() > deadline:
                raise SystemExit("the API did not start within 60 s")
        floor = []
        for i in range(repeats + 5):  # what any request costs: HTTP, ASGI, no key, no query
            start = time.perf_counter()
            assert client.get("/healthz").status_code == 200
            if i >= 5:
                floor.append((time.perf_counter() - start) * 1000)
        rows = []
        for name, path, params, body in queries:
            api_times, es_times, inside, inside_es = [], [], [], []
            for i in range(repeats + 5):  # 5 warm-up rounds, not counted
                for side in ("api", "es") if i % 2 else ("es", "api"):
                    start = time.perf_counter()
                    if side == "api":
                        response = client.get(path, params=params)
                        assert response.status_code == 200, response.text
                        es_ms, total_ms = _server_timing(response.headers["server-timing"])
                    else:
                        es.search(index=read_alias(ENV), **body())
                    elapsed = (time.perf_counter() - start) * 1000
                    if i >= 5:
                        (api_times if side == "api" else es_times).append(elapsed)
                        if side == "api":
                            inside.append(total_ms)
                            inside_es.append(es_ms)
            (a50, a95), (e50, e95) = _quantiles(api_times), _quantiles(es_times)
            rows.append(
                (name, a50, a95, e50, e95, statistics.median(inside), statistics.median(inside_es))
            )
            typer.echo(
                f"{name}: api p50 {a50:.1f} ms p95 {a95:.1f} ms | "
                f"es p50 {e50:.1f} ms p95 {e95:.1f} ms"
            )
    finally:
        server.terminate()
        server.wait(timeout=30)
    total = es.count(index=read_alias(ENV))["count"]
    lines = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {total:,} records in one environment "
        "(single-node Elasticsearch 9.5.4, 1 GB heap, force-merged), the API served by "
        "`audit-platform api serve` (one uvicorn worker); client, API and cluster share 2 cores. "
        f"{repeats} requests per query and side, alternating API and direct, after 5 warm-up "
        "rounds. Direct = the same query body sent with the Python Elasticsearch client.",
        "",
        "| query | API p50 ms | API p95 ms | direct p50 ms | direct p95 ms | API/direct p50 "
        "| in the API process, p50 ms | of which Elasticsearch | of which the API's own |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, a50, a95, e50, e95, inside, inside_es in rows:
        lines.append(
            f"| {name} | {a50:.1f} | {a95:.1f} | {e50:.1f} | {e95:.1f} "
            f"| {a50 / e50:.2f}x | {inside:.1f} | {inside_es:.1f} "
            f"| {inside - inside_es:.1f} |"
        )
    f50, f95 = _quantiles(floor)
    lines += [
        "",
        f"The floor, `GET /healthz` through the same client and server (HTTP and the "
        f"framework, no key, no query): p50 {f50:.1f} ms, p95 {f95:.1f} ms.",
    ]
    RESULTS.write_text("# Audit API latency\n\n" + "\n".join(lines) + "\n")
    typer.echo("\n".join(lines))


if __name__ == "__main__":
    app()
