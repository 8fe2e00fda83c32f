"""How long ``verify`` takes over 1,000,000 records, and what appending the trail costs.

Builds the environment ``benchtrust`` once (kept between runs; ``--reload`` rebuilds): staged
changes and contexts of 1,000,000 changes (5 tables, 200 actors, 1% of transactions without a
context), enriched by the pipeline's own ``enrich_files`` in batches of 50,000 with their leaves,
appended to the trail's log, signed, and indexed. The build reports what the leaves cost next to
the enrichment they ride on (the same batches, timed apart).

Then it runs ``verify_source`` over everything, with and without the staging check (which
enriches the staged hours again), and reports time and peak memory of each.

Run: ``eval "$(audit-platform stack env)"; .venv/bin/python benchmarks/verify_trail.py``
Writes ``benchmarks/results/verify_trail.md``.
"""

from __future__ import annotations

import json
import resource
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import polars as pl
import psycopg
import typer

from audit_platform import platform_db
from audit_platform.clients import es_from_settings, pg_url_from_settings
from audit_platform.enrich.batch import enrich_files
from audit_platform.enrich.join import transaction_contexts
from audit_platform.index.bulk import index_records
from audit_platform.index.template import install_template
from audit_platform.naming import read_alias
from audit_platform.policy import load_policy, policy_path
from audit_platform.settings import Settings
from audit_platform.signing import new_private_key, private_key
from audit_platform.staging import StagingStore
from audit_platform.staging.store import FILE
from audit_platform.trust.leaves import attach_leaves, context_leaves, record_leaves
from audit_platform.trust.log import TrustLog
from audit_platform.verify import Window, verify_source

RESULTS = Path(__file__).parent / "results" / "verify_trail.md"
ENV, SOURCE, BATCH = "benchtrust", "shop", 48_000  # whole transactions (3 changes) per batch
TABLES = ["orders", "customers", "payments", "order_lines", "shipments"]
COLUMNS = '{"id":"integer","status":"text","note":"text"}'
app = typer.Typer(add_completion=False)


def _batch(start: int, n: int, t0: datetime, step: timedelta) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Staged changes (three per transaction) and their transactions' contexts."""
    ids = range(start, start + n)
    lsn = [10_000 + i // 3 for i in ids]
    changes = pl.DataFrame(
        {
            "lsn": lsn,
            "xid": [1_000 + i // 3 for i in ids],
            "change_index": [i % 3 for i in ids],
            "operation": [("insert", "update", "delete")[i % 3] for i in ids],
            "schema": ["public"] * n,
            "table": [TABLES[(i // 3) % 5] for i in ids],
            "key_columns": ['["id"]'] * n,
            "before": [
                None if i % 3 == 0 else f'{{"id":"{i}","status":"new","note":"item {i}"}}'
                for i in ids
            ],
            "after": [
                None if i % 3 == 2 else f'{{"id":"{i}","status":"paid","note":"item {i}"}}'
                for i in ids
            ],
            "unchanged_toast": [None] * n,
            "column_types": [COLUMNS] * n,
            "commit_time": [t0 + step * (i // 3) for i in ids],
            "env": [ENV] * n,
            "source": [SOURCE] * n,
            "policy_version": ["1:bench"] * n,
        }
    )
    transactions = changes.unique("lsn", keep="first").filter(pl.col("xid") % 100 != 0)
    contexts = transactions.select(
        "lsn",
        "xid",
        pl.lit(0, pl.Int32).alias("seq"),
        pl.lit("context").alias("kind"),
        pl.lit(None, pl.Int64).alias("target_xid"),
        pl.format(
            '{{"actor":{{"id":"u-{}","type":"user"}},"reason":"ticket {}"}}',
            pl.col("xid") % 200,
            pl.col("xid"),
        ).alias("context"),
        "commit_time",
        "env",
        "source",
    )
    return changes, contexts


def build(settings: Settings, count: int, key_path: Path) -> dict[str, float]:
    es = es_from_settings(settings)
    store = StagingStore(settings.staging_root, ENV, SOURCE)
    policy = load_policy(policy_path(settings.resources_dir, SOURCE))
    if store.fs.exists(store.base):
        store.fs.rm(store.base, recursive=True)
    for name in es.options(ignore_status=404).indices.get(index=f"audit-{ENV}-*"):
        es.indices.delete(index=name)
    install_template(es, settings.resources_dir, ENV, replicas=0)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.write_text(new_private_key())
    log, spent = TrustLog(store), {"enrich": 0.0, "leaves": 0.0, "index": 0.0}
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    step = timedelta(hours=1) / (count // 3)
    with psycopg.connect(pg_url_from_settings(settings), autocommit=True) as state:
        platform_db.install(state, settings.resources_dir / "sql")
        for start in range(0, count, BATCH):
            changes, contexts = _batch(start, min(BATCH, count - start), t0, step)
            staged = [f.path for f in store.write("changes", changes)]
            context_paths = [f.path for f in store.write("contexts", contexts)]
            now = datetime.now(UTC)
            began = time.perf_counter()
            enrich_files(store, state, policy, staged, context_paths, now=now, grace=timedelta(0))
            spent["enrich"] += time.perf_counter() - began
            records = store.read([store.derived_path(p, "records") for p in staged]).drop(FILE)
            began = time.perf_counter()
            # The leaves enrich_pending appends, built from the same batch (timed apart).
            read = store.read(context_paths, "contexts")
            times = read.group_by("lsn").agg(pl.col("commit_time").first())
            leaves = pl.concat(
                [
                    context_leaves(transaction_contexts(read).join(times, on="lsn"), ENV),
                    attach_leaves(read, ENV, SOURCE),
                    record_leaves(records),
                ]
            )
            log.append(leaves)
            spent["leaves"] += time.perf_counter() - began
            began = time.perf_counter()
            index_records(es, records, database="benchdb", ingested_at=now)
            spent["index"] += time.perf_counter() - began
            rounded = {k: round(v, 1) for k, v in spent.items()}
            typer.echo(f"built {start + records.height:,}: {json.dumps(rounded)}")
    log.checkpoint(private_key(key_path.read_text()), datetime.now(UTC))
    es.indices.refresh(index=read_alias(ENV))
    es.indices.forcemerge(index=f"audit-{ENV}-*", max_num_segments=1)
    return spent


@app.command()
def main(
    count: Annotated[int, typer.Option(help="Changes to build.")] = 1_000_000,
    reload: Annotated[bool, typer.Option(help="Rebuild even if built.")] = False,
) -> None:
    settings = Settings(env=ENV)
    store = StagingStore(settings.staging_root, ENV, SOURCE)
    key_path = Path(settings.staging_root) / f"{ENV}-signing-key"
    spent = None
    if reload or TrustLog(store).state().size < count or not key_path.exists():
        spent = build(settings, count, key_path)
    key = private_key(key_path.read_text())
    es = es_from_settings(settings)
    policy = load_policy(policy_path(settings.resources_dir, SOURCE))
    rows = []
    for staging in (False, True, False, True):
        began = time.perf_counter()
        report = verify_source(
            store,
            es,
            policy,
            key.public_key(),
            since=None,
            until=None,
            window=Window(datetime.now(UTC)),
            staging=staging,
        )
        seconds = time.perf_counter() - began
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        assert report.ok, report.problems[:5]
        rows.append(
            (staging, report.documents, report.log_size, report.staged_changes, seconds, peak)
        )
        typer.echo(f"staging={staging}: {seconds:.1f} s, {report.documents:,} documents")
    lines = [
        "# Verifying the trail: 1,000,000 records",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on the local stack (single-node "
        "Elasticsearch 9.5.4, 1 GB heap; PostgreSQL 15; 2 cores shared by all). The environment "
        f"`{ENV}` holds {rows[0][1]:,} records of one source, built through the pipeline's own "
        "enrichment, leaves, log, checkpoint and indexing code.",
        "",
        "`verify_source` over everything: the log against its checkpoint (every leaf hashed "
        "into the root again), every document's leaves recomputed and compared, every "
        "document rebuilt from its own facts (derived fields), and, with the staging check, "
        "every staged hour enriched again and compared. Peak RSS is of the whole process so "
        "far (it only grows).",
        "",
        "| run | staging check | documents | log leaves | staged changes | seconds | peak MiB |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {i} | {'yes' if s else 'no'} | {d:,} | {n:,} | {c:,} | {t:.1f} | {m:.0f} |"
            for i, (s, d, n, c, t, m) in enumerate(rows, start=1)
        ),
    ]
    if spent is not None:
        lines += [
            "",
            f"Build (this run): enrichment {spent['enrich']:.1f} s, the trail's leaves and "
            f"log appends {spent['leaves']:.1f} s ({spent['leaves'] / spent['enrich']:.0%} of "
            f"the enrichment they follow), indexing {spent['index']:.1f} s.",
        ]
    lines += ["", "Run: `.venv/bin/python benchmarks/verify_trail.py`"]
    RESULTS.write_text("\n".join(lines) + "\n")
    typer.echo(f"wrote {RESULTS}")


if __name__ == "__main__":
    app()
