"""Screenshots for README, taken with headless Chromium over the demo's data: the Dagster asset
graph, and every page of the Audit Explorer.

Run while the demo runs (`make demo` in another terminal; `make screenshot` does the rest)::

    .venv/bin/python -m audit_platform_dev.demo.screenshot graph --out docs/asset-graph.png
    .venv/bin/python -m audit_platform_dev.demo.screenshot explorer --out docs/

Chromium comes from Debian's packages (`apt-get install chromium`), driven by Playwright, so
the pages are used like a person would: the first-visit dialog is dismissed, the asset groups
expanded, the Explorer signed in with the demo's key and its links followed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import httpx
import typer

app = typer.Typer(add_completion=False)

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    raise SystemExit("no Chromium found: install it with `apt-get install chromium` (Debian)")


def launch(playwright):
    return playwright.chromium.launch(
        executable_path=find_browser(), args=["--no-sandbox", "--disable-gpu"]
    )


@app.command()
def graph(
    url: Annotated[str, typer.Option(help="Dagster webserver.")] = "http://127.0.0.1:3000",
    out: Annotated[Path, typer.Option(help="PNG to write.")] = Path("docs/asset-graph.png"),
    width: int = 1800,
    height: int = 1150,
) -> None:
    from playwright.sync_api import sync_playwright

    try:
        httpx.get(f"{url}/server_info", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        raise SystemExit(
            f"Dagster does not answer at {url} ({exc}); start `make demo` first"
        ) from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(f"{url}/asset-groups", wait_until="networkidle")
        skip = page.get_by_role("button", name="Skip")
        if skip.count():
            skip.first.click()
        # Expand every collapsed group; the page remembers that, and a reload then lays the
        # whole expanded graph out to fit the window.
        for _ in range(10):
            collapsed = page.locator("[class*=collapsedGroupNodeBox]")
            if not collapsed.count():
                break
            collapsed.first.click()
            page.wait_for_timeout(700)
        page.reload(wait_until="networkidle")
        page.get_by_text("Loading...").first.wait_for(state="hidden", timeout=30_000)
        page.wait_for_timeout(2000)
        page.screenshot(path=str(out))
        browser.close()
    typer.echo(f"wrote {out} ({out.stat().st_size:,} bytes)")


@app.command()
def capture(
    url: Annotated[str, typer.Option(help="Dagster webserver.")] = "http://127.0.0.1:3000",
    out: Annotated[Path, typer.Option(help="Folder for the PNGs.")] = Path("docs"),
    width: int = 1800,
    height: int = 1000,
) -> None:
    """The runs list and the live capture run's page (its per-source status lines), as an
    operator sees them while the environment's capture runs (README, "Scaling past one
    machine": taken during the fleet benchmark)."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(f"{url}/runs", wait_until="networkidle")
        page.wait_for_timeout(3000)  # the first-visit dialog comes after the page
        skip = page.get_by_role("button", name="Skip")
        if skip.count():
            skip.first.click()
        page.wait_for_timeout(1000)
        page.screenshot(path=str(out / "dagster-runs.png"))
        page.goto(f"{url}/runs/{_live_capture_run(url)}", wait_until="networkidle")
        page.get_by_text("capture_live_").first.wait_for(timeout=120_000)
        page.wait_for_timeout(10_000)  # the run's events, as many as its lifetime wrote
        page.screenshot(path=str(out / "dagster-capture-run.png"))
        browser.close()
    typer.echo(f"wrote {out / 'dagster-runs.png'} and {out / 'dagster-capture-run.png'}")


LIVE_RUNS = """{ runsOrError(filter: {statuses: [STARTED]}) {
  ... on Runs { results { runId jobName } } } }"""


def _live_capture_run(url: str) -> str:
    found = httpx.post(f"{url}/graphql", json={"query": LIVE_RUNS}, timeout=30).json()
    runs = found["data"]["runsOrError"].get("results", [])
    for run in runs:
        if run["jobName"].startswith("capture_shard_"):
            return run["runId"]
    raise SystemExit(f"no live capture run is STARTED at {url}")


def _demo_key() -> str | None:
    from audit_platform.settings import Settings
    from audit_platform_dev.stack.settings import StackSettings

    path = StackSettings().dir / "demo" / Settings().env / "api-key"
    return os.environ.get("AUDIT_DEMO_KEY") or (path.read_text() if path.exists() else None)


@app.command()
def explorer(
    url: Annotated[str, typer.Option(help="The Audit API.")] = "http://127.0.0.1:8000",
    key: Annotated[str | None, typer.Option(help="API key (default: the demo's).")] = None,
    out: Annotated[Path, typer.Option(help="Folder for explorer-*.png.")] = Path("docs"),
    width: int = 1280,
    height: int = 900,
) -> None:
    """One picture per page of the Explorer, following links from the demo's own data."""
    from playwright.sync_api import sync_playwright

    key = key or _demo_key()
    if not key:
        raise SystemExit("no API key: start `make demo` first (it writes its key), or --key")
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": width, "height": height})

        def shot(name: str, path: str | None = None, full: bool = False) -> None:
            if path is not None:
                page.goto(url + path, wait_until="networkidle")
            target = out / f"explorer-{name}.png"
            page.screenshot(path=str(target), full_page=full)
            typer.echo(f"wrote {target} ({target.stat().st_size:,} bytes)")

        shot("sign-in", "/ui/login")
        page.get_by_label("API key").fill(key)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_load_state("networkidle")
        shot("overview", "/ui/?range=1h", full=True)
        shot("search", "/ui/search?q=" + quote("table:orders op:update since:-24h"))
        page.locator("table.records tbody tr td:first-child a").first.click()
        page.wait_for_load_state("networkidle")
        page.locator("details.unchanged summary").first.click()
        shot("record", full=True)
        labels = ("Its object's history", "Its transaction", "Its request", "Its actor")
        links = {name: page.get_by_role("link", name=name) for name in labels}
        hrefs = {n: link.first.get_attribute("href") for n, link in links.items() if link.count()}
        if (path := hrefs.get("Its object's history")) is not None:
            page.goto(url + path, wait_until="networkidle")
            moments = page.get_by_role("link", name="state then")
            if moments.count() > 1:
                moments.nth(1).click()
                page.wait_for_load_state("networkidle")
            shot("object", full=True)
        for name, label in (
            ("transaction", "Its transaction"),
            ("request", "Its request"),
            ("actor", "Its actor"),
        ):
            if (path := hrefs.get(label)) is not None:
                shot(name, path, full=True)
        browser.close()


@app.command()
def tenant(
    key: Annotated[str, typer.Option(help="An API key limited to one organization.")],
    url: Annotated[str, typer.Option(help="The Audit API.")] = "http://127.0.0.1:8000",
    out: Annotated[Path, typer.Option(help="Folder for the PNGs.")] = Path("docs"),
    query: Annotated[str, typer.Option(help="What the search shows.")] = "since:-24h",
) -> None:
    """The sign-in page (with single sign-on where the API has it) and the search as a key
    limited to one organization sees it: explorer-sign-in-sso.png, explorer-organization.png."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url + "/ui/login", wait_until="networkidle")
        page.screenshot(path=str(out / "explorer-sign-in-sso.png"))
        page.get_by_label("API key").fill(key)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_load_state("networkidle")
        page.goto(url + "/ui/search?q=" + quote(query), wait_until="networkidle")
        page.screenshot(path=str(out / "explorer-organization.png"))
        browser.close()
    typer.echo(f"wrote {out / 'explorer-sign-in-sso.png'} and {out / 'explorer-organization.png'}")


if __name__ == "__main__":
    app()
