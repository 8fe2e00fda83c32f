"""How fast the Audit Explorer's pages appear on 1,000,000 records, in a real browser.

Uses the environment ``benchapi`` of ``api_latency.py`` (1,000,000 records over 30 days, loaded
once and kept; ``--reload`` rebuilds), starts ``audit-platform api serve`` as its own process,
signs in, and for each page alternates, ``--repeats`` times:

- Chromium (Debian's, headless, driven by Playwright) opens the page; the browser's own
  Navigation Timing gives the time from the request to the end of ``load`` (the page with its
  stylesheet and script, laid out), and to ``responseEnd`` (the HTML received);
- the same page's JSON twin from the Audit API over HTTP, when it has one (the search's first
  page is ``/v1/events`` plus ``/v1/stats`` for its facets and chart), so the Explorer's own cost
  shows beside the query's.

Run: ``eval "$(audit-platform stack env)"; .venv/bin/python benchmarks/explorer_pages.py``
Writes ``benchmarks/results/explorer_pages.md``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import httpx
import psycopg
import typer
from api_latency import ENV, load
from playwright.sync_api import sync_playwright

from audit_platform import platform_db
from audit_platform.api_keys import create_key
from audit_platform.clients import es_from_settings, pg_url_from_settings
from audit_platform.settings import Settings
from audit_platform_dev.demo.screenshot import launch
from audit_platform_dev.stack.system import free_port

RESULTS = Path(__file__).parent / "results" / "explorer_pages.md"
app = typer.Typer(add_completion=False)

NAVIGATION = """() => { const n = performance.getEntriesByType('navigation')[0];
  return [n.responseEnd - n.startTime, n.loadEventEnd - n.startTime]; }"""


def _q(text: str) -> str:
    return quote(text, safe="")


def _quantiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[max(0, round(0.95 * len(ordered)) - 1)]


@app.command()
def main(
    count: Annotated[int, typer.Option(help="Records to index.")] = 1_000_000,
    repeats: Annotated[int, typer.Option(help="Loads per page and side.")] = 30,
    reload: Annotated[bool, typer.Option(help="Re-index even if the records exist.")] = False,
) -> None:
    settings = Settings(env=ENV)
    es = es_from_settings(settings)
    load(es, settings, count, reload)
    total = es.count(index=f"audit-{ENV}")["count"]
    with psycopg.connect(pg_url_from_settings(settings), autocommit=True) as conn:
        platform_db.install(conn, settings.resources_dir / "sql")
        key = create_key(conn, ENV, "explorer benchmark").secret
    port = free_port()
    base = f"http://127.0.0.1:{port}"
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
    # (name, Explorer path, JSON twins fetched one after the other)
    pages: list[tuple[str, str, list[str]]] = [
        (
            "search, first page (last 7 days, with facets and chart)",
            "/ui/search",
            ["/v1/events?limit=50", "/v1/stats?interval=hour"],
        ),
        (
            "search: actor and operation",
            "/ui/search?q=" + _q("actor:u-17 op:update"),
            [
                f"/v1/events?limit=50&query={_q('actor:u-17 op:update')}",
                f"/v1/stats?interval=hour&query={_q('actor:u-17 op:update')}",
            ],
        ),
        (
            "search: table and after-value, 30 days",
            "/ui/search?q=" + _q("table:payments after.status:paid since:-30d"),
            [
                f"/v1/events?limit=50&query={_q('table:payments after.status:paid since:-30d')}",
                f"/v1/stats?interval=day&query={_q('table:payments after.status:paid since:-30d')}",
            ],
        ),
        ("overview, last 24 hours", "/ui/", ["/v1/stats?interval=hour&query=since%3A-24h"]),
        ("overview, last 30 days", "/ui/?range=30d", ["/v1/stats?interval=day&query=since%3A-30d"]),
        (
            "an object: timeline and state now",
            "/ui/objects/shop/orders/4242",
            [
                "/v1/objects/shop/orders/4242/history?order=desc&limit=50",
                "/v1/objects/shop/orders/4242/state",
            ],
        ),
        ("an actor, last 7 days", "/ui/actors/u-17", ["/v1/actors/u-17/activity?interval=hour"]),
    ]
    rows = []
    try:
        client = httpx.Client(base_url=base, headers={"X-API-Key": key}, timeout=60)
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the API did not start within 60 s")
            time.sleep(0.2)
        with sync_playwright() as playwright:
            browser = launch(playwright)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{base}/ui/login")
            page.get_by_label("API key").fill(key)
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url(f"{base}/ui/")
            for name, path, twins in pages:
                html, loaded, api = [], [], []
                for round_ in range(repeats + 3):  # three warm-up rounds
                    response = page.goto(base + path, wait_until="load")
                    assert response is not None and response.ok, (path, response)
                    received, done = page.evaluate(NAVIGATION)
                    started = time.perf_counter()
                    for twin in twins:
                        client.get(twin).raise_for_status()
                    spent = (time.perf_counter() - started) * 1000
                    if round_ >= 3:
                        html.append(received)
                        loaded.append(done)
                        api.append(spent)
                rows.append((name, path, *_quantiles(html), *_quantiles(loaded), *_quantiles(api)))
                typer.echo(f"{name}: loaded p50 {rows[-1][4]:.0f} ms, p95 {rows[-1][5]:.0f} ms")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    lines = [
        "# Audit Explorer: time to a page on 1,000,000 records",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {total:,} records in one environment "
        "(single-node Elasticsearch 9.5.4, 1 GB heap, force-merged; 30 days, 5 tables, "
        "200 actors), the Explorer served by `audit-platform api serve` (one uvicorn worker), "
        "opened in headless Chromium (Debian's) through Playwright; browser, API and cluster "
        f"share 2 cores. {repeats} loads per page after 3 warm-up loads, each followed by its "
        "JSON twins from the Audit API over HTTP, in the same run.",
        "",
        "Times in ms. *HTML received*: request to the last byte of the page (the browser's "
        "`responseEnd`). *Page loaded*: request to the end of the `load` event, stylesheet and "
        "script included. *JSON twins*: the same answers from the JSON API, fetched one after "
        "the other.",
        "",
        "| page | HTML received p50 | p95 | page loaded p50 | p95 | JSON twins p50 | p95 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {name} (`{path}`) | {h50:.0f} | {h95:.0f} | {l50:.0f} | {l95:.0f} | {a50:.0f} "
            f"| {a95:.0f} |"
            for name, path, h50, h95, l50, l95, a50, a95 in rows
        ),
        "",
        f"Run: `.venv/bin/python benchmarks/explorer_pages.py --repeats {repeats}`",
    ]
    RESULTS.write_text("\n".join(lines) + "\n")
    typer.echo(f"wrote {RESULTS}")


if __name__ == "__main__":
    app()
