"""Records per second and peak memory of enrichment, on one hour of 1,000,000 staged changes.

The hour is synthetic but shaped like staged data from the capture benchmark (7 columns per row,
60% inserts, 40% updates with before-images, one context per 1,000-change transaction, 1% of
transactions without context), staged as batch files of 50,000 changes as capture writes them.
Two ways, side by side, each in a child process so its peak memory (VmHWM) is its own:

- ``whole hour``: every file of the hour read into one frame, joined at once, written as one
  records file, with the same quarantine writes (how hours were enriched before enrichment
  went per batch);
- ``per batch``: ``enrich_hour``, which backfills and reconciliation use: the hour's contexts
  read once, changes joined and written one batch file at a time, with the quarantine in the
  platform database (so this includes writing records files and the quarantine's rows).

Run: ``eval "$(audit-platform stack env)"; .venv/bin/python benchmarks/enrich_throughput.py``;
writes ``benchmarks/results/enrich_throughput.md``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import polars as pl
import psycopg
import typer

from audit_platform import platform_db
from audit_platform.clients import pg_url_from_settings
from audit_platform.lsn import lsn_hex
from audit_platform.settings import Settings
from audit_platform.staging import StagingStore

RESULTS = Path(__file__).parent / "results" / "enrich_throughput.md"
T0 = datetime(2026, 11, 26, 10, tzinfo=UTC)
ENV = "benchenrich"

CHILD = """
import json, sys, time
from datetime import UTC, datetime, timedelta
import polars as pl, psycopg
from audit_platform.enrich import quarantine
from audit_platform.enrich.batch import enrich_hour
from audit_platform.enrich.join import enrich
from audit_platform.policy import SourcePolicy, TablePolicy
from audit_platform.staging import StagingStore

kind, root, pg_url = sys.argv[1:4]
T0 = datetime(2026, 11, 26, 10, tzinfo=UTC)
store = StagingStore(root, "benchenrich", "bench")
policy = SourcePolicy(source="bench", version=1, tables={"public.orders": TablePolicy()})
now, grace = T0 + timedelta(hours=2), timedelta(minutes=10)
start = time.monotonic()
if kind == "whole":  # what enrich_hour did before: one frame, one records file per hour
    changes = store.read(store.hour_files("changes", T0), "changes").drop("file")
    contexts = store.read(store.hour_files("contexts", T0), "contexts").drop("file")
    with psycopg.connect(pg_url, autocommit=True) as state, state.transaction():
        result = enrich(changes, contexts, policy, now=now, grace=grace)
        store.write_file(f"{store.hour_dir('records', T0)}/records.parquet", result.records)
        quarantine.record_orphans(state, store.env, result.orphans, now=now)
        quarantine.settle(state, store.env, result.records, now=now)
    records = result.records.height
else:
    with psycopg.connect(pg_url, autocommit=True) as state:
        records = enrich_hour(store, state, policy, T0, now=now, grace=grace).records
seconds = time.monotonic() - start
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"kind": kind, "records": records, "seconds": seconds, "peak_rss": hwm}))
"""


def stage_hour(root: str, n: int, batch: int) -> None:
    """An hour of ``n`` changes as capture stages it: batch files of ``batch`` changes."""
    position = pl.int_range(0, n, eager=True)
    txn = position // 1000
    is_update = position >= n * 6 // 10
    rest = (
        '"amount":"12.50","created_at":"2026-11-26 10:00:00+00","customer_id":"17",'
        '"email":"masked:3f0a9c","note":"nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn","status":"'
    )
    image = pl.concat_str([pl.lit('{"id":"'), position.cast(pl.String), pl.lit('",' + rest)])
    changes = pl.DataFrame({"position": position}).select(
        (txn * 1000 + 1).alias("lsn"),
        (txn + 100).alias("xid"),
        (position % 1000).cast(pl.Int32).alias("change_index"),
        pl.when(is_update).then(pl.lit("update")).otherwise(pl.lit("insert")).alias("operation"),
        pl.lit("public").alias("schema"),
        pl.lit("orders").alias("table"),
        pl.lit('["id"]').alias("key_columns"),
        pl.when(is_update).then(image + pl.lit('new"}')).alias("before"),
        (image + pl.lit('paid"}')).alias("after"),
        pl.lit(None, pl.String).alias("unchanged_toast"),
        pl.lit("{}").alias("column_types"),
        pl.lit(T0).alias("commit_time"),
        pl.lit(ENV).alias("env"),
        pl.lit("bench").alias("source"),
        pl.lit("1:abcd").alias("policy_version"),
    )
    txns = changes.select("lsn", "xid", "commit_time", "env", "source").unique()
    contexts = txns.filter(pl.col("xid") % 100 != 0).with_columns(
        pl.lit(0, pl.Int32).alias("seq"),
        pl.lit("context").alias("kind"),
        pl.col("xid").alias("target_xid"),
        pl.lit(json.dumps({"actor": {"type": "user", "id": "u1"}, "reason": "bench"})).alias(
            "context"
        ),
    )
    store = StagingStore(root, ENV, "bench")
    for offset in range(0, n, batch):
        rows = changes.slice(offset, batch)
        first, last = rows["lsn"].min(), rows["lsn"].max()
        name = f"{lsn_hex(first)}-{lsn_hex(last)}.parquet"
        store.write_file(f"{store.hour_dir('changes', T0)}/{name}", rows)
        own = contexts.filter(pl.col("lsn").is_between(first, last))
        store.write_file(f"{store.hour_dir('contexts', T0)}/{name}", own)


app = typer.Typer(add_completion=False)


@app.command()
def main(
    changes: Annotated[int, typer.Option(help="Changes in the hour.")] = 1_000_000,
    batch: Annotated[int, typer.Option(help="Changes per staged batch file.")] = 50_000,
    rounds: Annotated[int, typer.Option(help="Repeats.")] = 2,
) -> None:
    pg_url = pg_url_from_settings(Settings())
    with psycopg.connect(pg_url, autocommit=True) as conn:
        platform_db.install(conn, Settings().resources_dir / "sql")
    root = tempfile.mkdtemp(prefix="enrich-bench-")
    stage_hour(root, changes, batch)
    rows = []
    for round_number in range(1, rounds + 1):
        kinds = ["whole", "batch"] if round_number % 2 else ["batch", "whole"]
        for kind in kinds:
            with psycopg.connect(pg_url, autocommit=True) as conn:
                conn.execute("DELETE FROM audit_platform.quarantine WHERE env = %s", (ENV,))
            done = subprocess.run(
                [sys.executable, "-c", CHILD, kind, root, pg_url], capture_output=True, text=True
            )
            if done.returncode != 0:
                raise RuntimeError(done.stderr[-3000:])
            rows.append({"round": round_number, **json.loads(done.stdout.strip().splitlines()[-1])})
            typer.echo(json.dumps(rows[-1]))
    shutil.rmtree(root, ignore_errors=True)
    lines = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC (2 cores): one hour of {changes:,} "
        f"staged changes in files of {batch:,}, joined with their contexts into records (1% of "
        "transactions without context, released as unattributed). `whole hour`: all files in "
        "one frame, one join, one records file; `per batch`: `enrich_hour` (records files written, "
        "quarantine rows in PostgreSQL).",
        "",
        "| round | how | records | seconds | records/s | peak RSS (MiB) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        how = "whole hour" if r["kind"] == "whole" else "per batch"
        lines.append(
            f"| {r['round']} | {how} | {r['records']:,} | {r['seconds']:.1f} "
            f"| {r['records'] / r['seconds']:,.0f} | {r['peak_rss'] / 2**20:.0f} |"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("# Enrichment throughput and memory\n\n" + "\n".join(lines) + "\n")
    typer.echo("\n".join(lines))


if __name__ == "__main__":
    app()
