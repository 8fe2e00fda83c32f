"""Capture speed and memory on a large backlog, next to the raw speed of reading the slot.

Each round builds a fresh backlog of ``--changes`` row changes (inserts in 1,000-row
transactions, then updates) behind two slots created at the same moment, then drains one slot
raw (streamed, messages counted, nothing decoded: the physical limit of reading the slot here)
and the other with the real capture (decode, policy with one masked column, Parquet staging,
slot confirmation), each in its own process so its peak memory (VmHWM) is its own. The order of
the two alternates between rounds.

Run: ``eval "$(audit-platform stack env)"; .venv/bin/python benchmarks/capture_throughput.py``
Writes ``benchmarks/results/capture_throughput.md``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import psycopg
import typer
from _database import drop_database, fresh_database

from audit_platform.clients import pg_url_from_settings
from audit_platform.policy import SourcePolicy, TablePolicy
from audit_platform.settings import Settings
from audit_platform.sources.setup import setup_source

RESULTS = Path(__file__).parent / "results" / "capture_throughput.md"
DB = "bench_capture"
RAW_SLOT = "bench_raw"
POLICY = SourcePolicy(
    source="bench",
    version=1,
    tables={"public.orders": TablePolicy(mask=["email"])},
)
DDL = """
CREATE TABLE orders (
    id bigint PRIMARY KEY, customer_id bigint, email text, status text,
    amount numeric(12, 2), created_at timestamptz, note text
);
ALTER TABLE orders REPLICA IDENTITY FULL;
"""

RAW_DRAIN = """
import json, resource, select, sys, time
import psycopg2
from psycopg2.extras import LogicalReplicationConnection
url, slot, target = sys.argv[1], sys.argv[2], int(sys.argv[3])
conn = psycopg2.connect(url, connection_factory=LogicalReplicationConnection)
cur = conn.cursor()
cur.start_replication(slot_name=slot, decode=False, options={
    "proto_version": "1", "publication_names": "audit_bench_bench", "messages": "true"})
start = time.monotonic(); changes = 0; last_end = 0
while True:
    msg = cur.read_message()
    if msg is None:
        if cur.wal_end >= target and last_end >= 0:
            break
        cur.send_feedback(reply=True); select.select([conn], [], [], 0.5); continue
    kind = msg.payload[0]
    if kind in (73, 85, 68, 84):
        changes += 1
    elif kind == 67:
        cur.send_feedback(flush_lsn=msg.data_start)
seconds = time.monotonic() - start
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"changes": changes, "seconds": seconds, "peak_rss": hwm}))
"""

CAPTURE = """
import json, sys, time
from audit_platform.capture.run import capture
from audit_platform.staging import StagingStore
sys.path.insert(0, sys.argv[4])
from capture_throughput import POLICY
url, root, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
start = time.monotonic()
result = capture(url, "bench", POLICY, StagingStore(root, "bench", "bench"),
                 mask_key=b"bench-key", batch_changes=batch)
seconds = time.monotonic() - start
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"changes": result.changes, "seconds": seconds, "peak_rss": hwm,
                  "batches": result.batches, "staged_bytes": result.staged_bytes,
                  "payload_bytes": result.payload_bytes}))
"""

app = typer.Typer(add_completion=False)


def _fresh_backlog(admin_url: str, changes: int) -> tuple[str, int]:
    url = fresh_database(admin_url, DB)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(DDL)
    setup_source(url, "bench", POLICY, Settings().resources_dir / "sql")
    inserts = changes * 6 // 10
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (RAW_SLOT,))
        for start in range(0, inserts, 1000):
            conn.execute(
                "INSERT INTO orders SELECT g, g %% 5000, 'user' || g || '@example.com', 'new',"
                " (g %% 100000) / 100.0, now(), repeat('n', 40)"
                " FROM generate_series(%s::bigint, %s::bigint) g",
                (start + 1, min(start + 1000, inserts)),
            )
        updates = changes - inserts
        for start in range(0, updates, 1000):
            conn.execute(
                "UPDATE orders SET status = 'paid', amount = amount + 1 WHERE id BETWEEN %s AND %s",
                (start + 1, min(start + 1000, updates)),
            )
        target = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0]
    return url, int(target)


def _run(script: str, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


@app.command()
def main(
    changes: Annotated[int, typer.Option(help="Row changes in each backlog.")] = 1_000_000,
    batch: Annotated[int, typer.Option(help="Capture batch size in changes.")] = 50_000,
    rounds: Annotated[int, typer.Option(help="Rounds; the order alternates.")] = 2,
) -> None:
    settings = Settings()
    if not settings.pg_url:
        raise typer.BadParameter('set AUDIT_PG_URL (eval "$(audit-platform stack env)")')
    rows = []
    for round_number in range(rounds):
        url, target = _fresh_backlog(pg_url_from_settings(settings), changes)
        with tempfile.TemporaryDirectory() as root:
            order = ["raw", "capture"] if round_number % 2 == 0 else ["capture", "raw"]
            for kind in order:
                if kind == "raw":
                    result = _run(RAW_DRAIN, url, RAW_SLOT, str(target))
                else:
                    result = _run(CAPTURE, url, root, str(batch), str(Path(__file__).parent))
                result |= {"kind": kind, "round": round_number + 1}
                result["changes_per_s"] = result["changes"] / result["seconds"]
                rows.append(result)
                typer.echo(json.dumps(result))
    _report(rows, changes=changes, batch=batch)
    drop_database(pg_url_from_settings(settings), DB)


def _report(rows: list[dict], *, changes: int, batch: int) -> None:
    lines = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on this repo's local stack (2 cores): "
        f"backlog of {changes:,} row changes (60% inserts in 1,000-row transactions, 40% "
        f"updates with before-images), capture batches of {batch:,} changes.",
        "",
        "| round | what | changes | seconds | changes/s | peak RSS (MiB) | vs raw |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    raw_speed = {r["round"]: r["changes_per_s"] for r in rows if r["kind"] == "raw"}
    for r in rows:
        what = "raw slot read" if r["kind"] == "raw" else "capture (decode + policy + stage)"
        lines.append(
            f"| {r['round']} | {what} | {r['changes']:,} | {r['seconds']:.1f} "
            f"| {r['changes_per_s']:,.0f} | {r['peak_rss'] / 2**20:.0f} "
            f"| {r['changes_per_s'] / raw_speed[r['round']]:.2f}x |"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    RESULTS.write_text(f"# Capture throughput and memory\n\n{text}")
    typer.echo(text)


if __name__ == "__main__":
    app()
