"""A quiet source on a busy server: how much WAL its slot makes the server keep.

Logical decoding is per database, WAL is per server. While a neighbouring database writes, a
tracked database with no changes of its own holds back that WAL through its slot unless
something confirms the slot. Side by side on one server, for the same minutes:

- the deployed pipeline's slot for a quiet ``shop`` (its worker in the live capture run
  confirms past the neighbour's WAL at the environment's ``slot_heartbeat_bytes``);
- a baseline pgoutput slot on another quiet database that nothing ever confirms (what every
  slot did before the heartbeat).

A neighbour database commits ~1 KB rows at a steady rate meanwhile. Samples each slot's retained
WAL (``pg_current_wal_lsn() - restart_lsn``) every 5 s. ``idle_sources.py`` measures the same
for many idle sources at once, with their CPU.

Run: ``eval "$(audit-platform stack env)"; .venv/bin/python benchmarks/quiet_source_wal.py``
Writes ``benchmarks/results/quiet_source_wal.md``.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import psycopg
import typer
from _database import drop_database, fresh_database
from _deployment import bench_deployment, remove_environment
from _live import capture_runs

from audit_platform.environment import load_environment
from audit_platform.naming import slot_name

RESULTS = Path(__file__).parent / "results" / "quiet_source_wal.md"
ENV = "benchquiet"
BASELINE_SLOT = "bench_quiet_baseline"
app = typer.Typer(add_completion=False)


def retained(conn: psycopg.Connection, slot: str) -> int:
    return conn.execute(
        "SELECT pg_current_wal_lsn() - restart_lsn FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()[0]


def neighbour(url: str, rate: float, stop: threading.Event) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS busy (id bigserial, note text)")
        written = 0
        while not stop.is_set():
            conn.execute("INSERT INTO busy (note) VALUES (repeat('x', 1000))")
            written += 1
            time.sleep(1 / rate)
    return written


@app.command()
def main(
    seconds: Annotated[int, typer.Option(help="How long the neighbour writes.")] = 300,
    rate: Annotated[float, typer.Option(help="Neighbour transactions per second.")] = 100,
) -> None:
    admin = os.environ["AUDIT_PG_URL"]
    bench = bench_deployment(ENV, "quiet")
    resources, deployment = bench.resources, bench.deployment
    heartbeat = load_environment(resources, ENV).slot_heartbeat_bytes
    neighbour_url = fresh_database(admin, "bench_neighbour")
    baseline_url = fresh_database(admin, "bench_quiet_baseline")
    with psycopg.connect(baseline_url, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (BASELINE_SLOT,))
    slot = slot_name(ENV, "shop")
    samples: list[tuple[float, int, int]] = []
    stop = threading.Event()
    try:
        deployment.start()
        writer = threading.Thread(target=neighbour, args=(neighbour_url, rate, stop), daemon=True)
        started = time.monotonic()
        writer.start()
        with psycopg.connect(admin, autocommit=True) as conn:
            while time.monotonic() - started < seconds:
                samples.append(
                    (
                        time.monotonic() - started,
                        retained(conn, slot),
                        retained(conn, BASELINE_SLOT),
                    )
                )
                time.sleep(5)
        stop.set()
        writer.join(timeout=10)
        runs = capture_runs(deployment)
    finally:
        stop.set()
        deployment.stop()
        drop_database(admin, "bench_neighbour")
        drop_database(admin, "bench_quiet_baseline")
        remove_environment(ENV, bench)
    mb = 1024**2
    lines = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on the local stack: a neighbour "
        f"database commits {rate:g} transactions a second (one ~1 KB row each) for {seconds} s; "
        f"the tracked `shop` database and the baseline database change nothing. Heartbeat "
        f"threshold {heartbeat / mb:.0f} MiB (`slot_heartbeat_bytes`, the default).",
        "",
        "| seconds | retained WAL (MiB), deployed slot | retained WAL (MiB), unconfirmed slot |",
        "| ---: | ---: | ---: |",
        *(f"| {t:.0f} | {a / mb:.1f} | {b / mb:.1f} |" for t, a, b in samples[::6]),
        "",
        f"Deployed slot: max {max(a for _, a, _ in samples) / mb:.1f} MiB, at the end "
        f"{samples[-1][1] / mb:.1f} MiB; baseline: max {max(b for _, _, b in samples) / mb:.1f} "
        f"MiB, at the end {samples[-1][2] / mb:.1f} MiB. Live capture runs: {len(runs)}.",
    ]
    RESULTS.write_text(
        "# A quiet source on a busy server: retained WAL\n\n" + "\n".join(lines) + "\n"
    )
    typer.echo("\n".join(lines))


if __name__ == "__main__":
    app()
