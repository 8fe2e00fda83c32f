"""A screenshot of the Dagster asset graph, taken with headless Chromium, for README.

Run while the demo runs (`make demo` in another terminal; `make screenshot` does the rest)::

    .venv/bin/python -m audit_platform.demo.screenshot --out docs/asset-graph.png

Chromium comes from Debian's packages (`apt-get install chromium`), driven by Playwright
(the `docs` extra), so the page can be used like a person would: the first-visit dialog is
dismissed and every asset group is expanded before the picture is taken.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import httpx
import typer

app = typer.Typer(add_completion=False)

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    raise SystemExit("no Chromium found: install it with `apt-get install chromium` (Debian)")


@app.command()
def main(
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
        browser = playwright.chromium.launch(
            executable_path=find_browser(), args=["--no-sandbox", "--disable-gpu"]
        )
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


if __name__ == "__main__":
    app()
