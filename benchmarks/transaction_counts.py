"""What counting a multi-file turn's transactions costs, before and after 1de4729.

A turn of several staged files counts each transaction's changes and ignored updates over all
of them (``enrich.batch._transaction_counts``). Before 1de4729 it enriched every file in full
to find the ignored updates whenever the policy ignored any column; since, it enriches only
the updates of tables with ``ignore_changes_to``. This stages a snapshot of ``--rows``
customers of the demo shop (whose policy ignores ``updated_at``) plus ``--updates`` ignored
updates, in files of ``--batch`` changes as capture writes them, and times both ways on the
same files, alternating, in one process; it checks that both count the same.

Run: ``eval "$(audit-platform stack env)"; .venv/bin/python benchmarks/transaction_counts.py``
Writes ``benchmarks/results/transaction_counts.md``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import polars as pl
import psycopg
import typer
from _database import drop_database, fresh_database
from polars.testing import assert_frame_equal

from audit_platform.capture.run import capture
from audit_platform.capture.snapshot import run_snapshot
from audit_platform.clients import pg_url_from_settings
from audit_platform.enrich.batch import _transaction_counts
from audit_platform.enrich.join import enrich, ignored_counts
from audit_platform.policy import load_policy
from audit_platform.settings import Settings
from audit_platform.sources.setup import setup_source
from audit_platform.staging import StagingStore

RESULTS = Path(__file__).parent / "results" / "transaction_counts.md"
DB = "bench_txn_counts"
app = typer.Typer(add_completion=False)


def before_1de4729(store, policy, paths, contexts, now):
    """The counting as it was: every file enriched in full for its ignored updates."""
    captured, ignored = [], []
    for path in paths:
        changes = store.read([path], "changes")
        captured.append(changes.select("source", "lsn", "change_index"))
        if any(t.ignore_changes_to for t in policy.tables.values()):
            ignored.extend(
                enrich(changes, contexts, policy, now=now, grace=timedelta(0)).ignored_lsns
            )
    counts = (
        pl.concat(captured)
        .unique()
        .group_by("source", "lsn")
        .agg(pl.len().cast(pl.Int32).alias("txn_changes"))
    )
    return counts, ignored_counts(ignored)


@app.command()
def main(
    rows: Annotated[int, typer.Option(help="Customers snapshotted.")] = 200_000,
    updates: Annotated[int, typer.Option(help="Ignored updates (updated_at only).")] = 20_000,
    batch: Annotated[int, typer.Option(help="Changes per staged file.")] = 50_000,
    rounds: Annotated[int, typer.Option(help="Timed rounds of each way.")] = 3,
) -> None:
    settings = Settings()
    admin = pg_url_from_settings(settings)
    url = fresh_database(admin, DB)
    root = Path(tempfile.mkdtemp(prefix="txncounts-"))
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute((settings.resources_dir / "demo" / "shop.sql").read_text())
            conn.execute(
                "INSERT INTO customers (name, email, phone, password_hash)"
                " SELECT 'c ' || g, 'c' || g || '@example.com', '+1', 'x'"
                " FROM generate_series(1, %s) g",
                (rows,),
            )
        policy = load_policy(settings.resources_dir / "sources" / "shop.yaml")
        setup_source(url, "bench", policy, settings.resources_dir / "sql")
        run_snapshot(url, policy, "counts")
        with psycopg.connect(url) as conn:
            conn.execute("""SELECT audit.set_context('{"actor": {"type": "job", "id": "b"}}')""")
            conn.execute(
                "UPDATE customers SET updated_at = now() + interval '1 day' WHERE id <= %s",
                (updates,),
            )
        store = StagingStore(str(root), "bench", "shop")
        capture(url, "bench", policy, store, mask_key=b"k" * 32, batch_changes=batch)
        paths = sorted(store.files("changes"))
        contexts = store.read(sorted(store.files("contexts")), "contexts")
        now = datetime.now(UTC)
        seconds: dict[str, list[float]] = {"before 1de4729": [], "1de4729": []}
        results = {}
        for _ in range(rounds):
            for name, way in (("before 1de4729", before_1de4729), ("1de4729", _transaction_counts)):
                started = time.perf_counter()
                results[name] = way(store, policy, paths, contexts, now)
                seconds[name].append(time.perf_counter() - started)
        for new, old in zip(results["1de4729"], results["before 1de4729"], strict=True):
            assert_frame_equal(new.sort(pl.all()), old.sort(pl.all()))
        changes = sum(store.read([p], "changes").height for p in paths)
    finally:
        drop_database(admin, DB)
    lines = [
        "# Counting a multi-file turn's transactions, before and after 1de4729",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on the local stack (2 cores), one "
        f"process, the same {len(paths)} staged files ({changes:,} changes: a snapshot of "
        f"{rows:,} customers and {updates:,} updates of `updated_at` only, which the shop's "
        f"policy ignores), {rounds} rounds of each way, alternating. Both counted the same.",
        "",
        f"Command: `python benchmarks/transaction_counts.py --rows {rows} --updates {updates}"
        f" --batch {batch} --rounds {rounds}`",
        "",
        "| counting | median s | min s | changes/s (median) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, times in seconds.items():
        median = statistics.median(times)
        lines.append(f"| {name} | {median:.2f} | {min(times):.2f} | {changes / median:,.0f} |")
    RESULTS.write_text("\n".join(lines) + "\n")
    typer.echo("\n".join(lines))


if __name__ == "__main__":
    app()
