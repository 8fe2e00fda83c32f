"""Records per second and peak memory of the enrichment join, on one hour of 1,000,000 changes.

The hour is synthetic but shaped like staged data from the capture benchmark (7 columns per row,
60% inserts, 40% updates with before-images, one context per 1,000-change transaction, 1% of
transactions without context). Enrichment runs in a child process so its peak memory (VmHWM) is
its own; the time to build the input frames is not counted.

Run: ``.venv/bin/python benchmarks/enrich_throughput.py``; writes
``benchmarks/results/enrich_throughput.md``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

RESULTS = Path(__file__).parent / "results" / "enrich_throughput.md"

CHILD = """
import json, sys, time
from datetime import UTC, datetime, timedelta
import polars as pl
from audit_platform.enrich.join import enrich
from audit_platform.policy import SourcePolicy, TablePolicy

n = int(sys.argv[1])
T0 = datetime(2026, 11, 26, 10, tzinfo=UTC)
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
    pl.lit("bench").alias("env"),
    pl.lit("bench").alias("source"),
    pl.lit("1:abcd").alias("policy_version"),
)
txns = changes.select("lsn", "xid").unique()
with_context = txns.filter(pl.col("xid") % 100 != 0)
contexts = with_context.with_columns(
    pl.lit(0, pl.Int32).alias("seq"), pl.lit("context").alias("kind"),
    pl.col("xid").alias("target_xid"),
    pl.lit(json.dumps({"actor": {"type": "user", "id": "u1"}, "reason": "bench"})).alias("context"),
    pl.lit(T0).alias("commit_time"), pl.lit("bench").alias("env"), pl.lit("bench").alias("source"),
)
policy = SourcePolicy(source="bench", version=1, tables={"public.orders": TablePolicy()})
start = time.monotonic()
result = enrich(changes, contexts, policy, now=T0 + timedelta(hours=2), grace=timedelta(minutes=10))
seconds = time.monotonic() - start
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"changes": n, "records": result.records.height, "seconds": seconds,
                  "peak_rss": hwm, "counts": result.counts}))
"""

app = typer.Typer(add_completion=False)


@app.command()
def main(
    changes: Annotated[int, typer.Option(help="Changes in the hour.")] = 1_000_000,
    rounds: Annotated[int, typer.Option(help="Repeats.")] = 2,
) -> None:
    rows = []
    for _ in range(rounds):
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(changes)], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        typer.echo(json.dumps(rows[-1]))
    lines = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC (2 cores): one hour of {changes:,} "
        "staged changes joined with their contexts into records (1% of transactions without "
        "context, released as unattributed).",
        "",
        "| round | records | seconds | records/s | peak RSS (MiB) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for i, r in enumerate(rows, 1):
        lines.append(
            f"| {i} | {r['records']:,} | {r['seconds']:.1f} | {r['records'] / r['seconds']:,.0f} "
            f"| {r['peak_rss'] / 2**20:.0f} |"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("# Enrichment throughput and memory\n\n" + "\n".join(lines) + "\n")
    typer.echo("\n".join(lines))


if __name__ == "__main__":
    app()
