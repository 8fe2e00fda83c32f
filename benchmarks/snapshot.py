"""A snapshot of a large table, next to ``COPY ... TO`` of the same table in the same run.

Builds a table of ``--rows`` rows (several types; one row in 200 holds a TOASTed 12.8 kB text),
sets the source up (a slot, as in production: the snapshot's WAL is kept for it), then:

1. ``COPY accounts TO STDOUT``, read whole by the client: the physical limit of reading it;
   then the same table read in the snapshot's chunks (by key, each chunk one transaction) by
   ``COPY``, without row locks and with them: where the snapshot's time goes, and what a read
   without locks or WAL (a watermark design, docs/design.md, "Snapshots") could reach;
2. the snapshot (``capture.snapshot.run_snapshot``): the source's side, chunk by chunk, each
   chunk one transaction; its longest chunk is the longest transaction it held open;
3. capture of what the snapshot wrote to the slot (decode, policy with a masked column, Parquet
   staging), in this process: the rows reach staging as records-to-be.

Enrichment and indexing of the staged rows cost what any change costs (see
``enrich_throughput.md`` and ``index_throughput.md``); they are not repeated here.

Run: ``eval "$(audit-platform stack env)"; .venv/bin/python benchmarks/snapshot.py``
Writes ``benchmarks/results/snapshot.md`` (or ``snapshot-<tag>.md``).
"""

from __future__ import annotations

import resource
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import psycopg
import typer
from _database import drop_database, fresh_database
from psycopg import sql

from audit_platform.capture.run import capture
from audit_platform.capture.snapshot import MAX_CHUNK_ROWS, TableProgress, run_snapshot
from audit_platform.clients import pg_url_from_settings
from audit_platform.policy import SourcePolicy, TablePolicy
from audit_platform.settings import Settings
from audit_platform.sources.setup import setup_source
from audit_platform.staging import StagingStore

RESULTS = Path(__file__).parent / "results"
DB = "bench_snapshot"
POLICY = SourcePolicy(
    source="bench", version=1, tables={"public.accounts": TablePolicy(mask=["email"])}
)
DDL = """
CREATE TABLE accounts (
    id bigint PRIMARY KEY, customer_id bigint, email text, status text,
    amount numeric(12, 2), created_at timestamptz, tags text[], doc text
);
ALTER TABLE accounts REPLICA IDENTITY FULL;
"""
FILL = """
INSERT INTO accounts
SELECT g, g %% 9973, 'user' || g || '@example.com', (ARRAY['new', 'paid', 'shipped'])[g %% 3 + 1],
       (g %% 100000) / 100.0, timestamptz '2026-01-01' + g * interval '1 second',
       ARRAY['t' || g %% 7, 't' || g %% 11],
       CASE WHEN g %% 200 = 0 THEN (SELECT string_agg(md5(g::text || i), '')
                                  FROM generate_series(1, 400) i) END
FROM generate_series(%s::bigint, %s::bigint) g
"""


def _copy(url: str) -> tuple[float, int]:
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        start, size = time.monotonic(), 0
        with cur.copy("COPY accounts TO STDOUT") as copy:
            for block in copy:
                size += len(block)
        return time.monotonic() - start, size


def _read_chunks(url: str, chunk_rows: int, *, lock: bool) -> tuple[float, int, float]:
    """(seconds, rows, longest chunk's seconds) to read the table in chunks of ``chunk_rows``
    by key, as the snapshot bounds them (each chunk's last key read first), each chunk one
    transaction streamed by ``COPY``; ``lock``: its rows locked ``FOR SHARE`` as the snapshot
    locks them, nothing written."""
    lock_clause = sql.SQL(" FOR SHARE" if lock else "")
    start, total, longest, last = time.monotonic(), 0, 0.0, 0
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        while True:
            began = time.monotonic()
            with conn.transaction():
                found = cur.execute(
                    "SELECT id FROM accounts WHERE id > %s ORDER BY id OFFSET %s LIMIT 1",
                    (last, chunk_rows - 1),
                ).fetchone()
                upper = sql.SQL("") if found is None else sql.SQL(" AND id <= {}").format(found[0])
                statement = sql.SQL(
                    "COPY (SELECT * FROM accounts WHERE id > {}{} ORDER BY id{}) TO STDOUT"
                ).format(last, upper, lock_clause)
                with cur.copy(statement) as copy:
                    for _ in copy:
                        pass
                total += cur.rowcount
            longest = max(longest, time.monotonic() - began)
            if found is None:
                return time.monotonic() - start, total, longest
            last = found[0]


def main(
    rows: Annotated[int, typer.Option(help="Rows in the table.")] = 5_000_000,
    tag: Annotated[str | None, typer.Option(help="Suffix of the results file.")] = None,
) -> None:
    settings = Settings()
    admin = pg_url_from_settings(settings)
    url = fresh_database(admin, DB)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(DDL)
            for first in range(1, rows + 1, 500_000):
                conn.execute(FILL, (first, min(rows, first + 499_999)))
            conn.execute("VACUUM ANALYZE accounts")
            table_bytes = conn.execute("SELECT pg_total_relation_size('accounts')").fetchone()[0]
        setup_source(url, "bench", POLICY, settings.resources_dir / "sql")
        copy_seconds, copy_bytes = _copy(url)
        unlocked = _read_chunks(url, MAX_CHUNK_ROWS, lock=False)

        chunk_seconds: list[float] = []
        last = [time.monotonic()]

        def timed(_: TableProgress) -> None:
            now = time.monotonic()
            chunk_seconds.append(now - last[0])
            last[0] = now

        with psycopg.connect(url) as conn:
            wal_before = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        start = time.monotonic()
        last[0] = start
        [progress] = run_snapshot(url, POLICY, "bench", on_chunk=timed)
        snapshot_seconds = time.monotonic() - start
        with psycopg.connect(url) as conn:
            wal_bytes = conn.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (wal_before,)
            ).fetchone()[0]
        snapshot_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        with tempfile.TemporaryDirectory() as staging:
            store = StagingStore(staging, "bench", "bench")
            start = time.monotonic()
            result = capture(url, "bench", POLICY, store, mask_key=b"bench-mask-key")
            capture_seconds = time.monotonic() - start
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        # Last, once capture has moved the slot on: the locks write WAL the slot keeps.
        locked = _read_chunks(url, MAX_CHUNK_ROWS, lock=True)
    finally:
        drop_database(admin, DB)

    copy_rate = rows / copy_seconds
    snap_rate = progress.rows / snapshot_seconds
    capture_rate = result.changes / capture_seconds
    both = progress.rows / (snapshot_seconds + capture_seconds)
    chunk_seconds.sort()
    median_ms = chunk_seconds[len(chunk_seconds) // 2] * 1000
    lines = [
        "# A snapshot of a large table, next to COPY TO",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on the local stack (one machine, 2 "
        f"cores, PostgreSQL 15; nothing else running). Table: {rows:,} rows, "
        f"{table_bytes / 1024**2:,.0f} MB with its TOAST and index.",
        "",
        f"Command: `python benchmarks/snapshot.py --rows {rows}"
        + (f" --tag {tag}`" if tag else "`"),
        "",
        "| step | seconds | rows/s | against COPY TO |",
        "| --- | ---: | ---: | ---: |",
        f"| `COPY accounts TO STDOUT` ({copy_bytes / 1024**2:,.0f} MB read) | "
        f"{copy_seconds:.1f} | {copy_rate:,.0f} | 1.00 |",
        *(
            f"| {what} ({MAX_CHUNK_ROWS:,}-row chunks by key, each one transaction; longest "
            f"{longest * 1000:.0f} ms) | {seconds:.1f} | {read / seconds:,.0f} | "
            f"{read / seconds / copy_rate:.2f} |"
            for what, (seconds, read, longest) in (
                ("the same rows by `COPY` in chunks, no row locks", unlocked),
                ("the same chunks locked `FOR SHARE` as the snapshot locks them", locked),
            )
        ),
        f"| snapshot, the source's side ({progress.chunks:,} chunks) | {snapshot_seconds:.1f} | "
        f"{snap_rate:,.0f} | {snap_rate / copy_rate:.2f} |",
        f"| capture of the snapshot's rows to staging | {capture_seconds:.1f} | "
        f"{capture_rate:,.0f} | {capture_rate / copy_rate:.2f} |",
        f"| snapshot and capture, one after the other | "
        f"{snapshot_seconds + capture_seconds:.1f} | {both:,.0f} | {both / copy_rate:.2f} |",
        "",
        f"- Rows recorded: {progress.rows:,} by the snapshot, {result.changes:,} staged by "
        "capture.",
        f"- Longest transaction the snapshot held open (its longest chunk): "
        f"{chunk_seconds[-1] * 1000:.0f} ms; median chunk {median_ms:.0f} ms.",
        f"- WAL the snapshot wrote: {wal_bytes / 1024**2:,.0f} MB "
        f"({wal_bytes / max(1, table_bytes):.2f} of the table's size): its rows travel "
        "through the slot, and the chunks' row locks write WAL too.",
        f"- Peak memory of this process: {snapshot_rss:,.0f} MB after the snapshot, "
        f"{peak_rss:,.0f} MB after capture (VmHWM).",
    ]
    name = f"snapshot-{tag}.md" if tag else "snapshot.md"
    (RESULTS / name).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    typer.run(main)
