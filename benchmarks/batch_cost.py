"""What a batch costs downstream whatever it holds: the fixed cost a fleet pays per source.

A live run enriches and indexes each source's batch as it closes (``SourceWorker._downstream``):
the trail's append, the records file, the quarantine's queries, a bulk request. At 50 sources
that is 20 or more batches a second however few changes each holds, so the fixed part decides
what a fleet costs (``fleet.py``). This measures it on the real servers, in this process (no
Dagster, no other threads): a shop database, transactions of five changes with their context,
staged by ``capture``, then ``enrich_pending`` and ``index_pending`` timed alone
(``time.process_time``: this process's CPU; Elasticsearch's and PostgreSQL's are not in it).

Three tables: batches of 1 to 1,000 transactions, one at a time (the fixed cost is the
1-transaction row; the cost per change is the slope); eight waiting batches of 10 transactions,
taken one at a time (``coalesce=1``) or together (the default), as a source that waited for its
turn does; and one batch of 10 transactions from each of ``--sources`` sources, each source's
turn on its own or one turn for all (``enrich_pending_together``, ``index_pending_together``),
as a live run's workers share a turn (``live.Turns``); its wall time shows what the lane waits
for besides the processor (the disk's flushes, Elasticsearch).

Run: ``eval "$(audit-platform stack env)"; .venv/bin/python benchmarks/batch_cost.py``; writes
``benchmarks/results/batch_cost.md``.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated
from unittest import mock

import psycopg
import typer
from psycopg import sql

from audit_platform import platform_db
from audit_platform.capture.run import capture
from audit_platform.clients import elasticsearch_client
from audit_platform.enrich.batch import Share, enrich_pending, enrich_pending_together
from audit_platform.index.batch import IndexShare, index_pending, index_pending_together
from audit_platform.index.template import install_template
from audit_platform.naming import slot_name
from audit_platform.policy import SourcePolicy, TablePolicy
from audit_platform.settings import Settings
from audit_platform.sources.setup import setup_source
from audit_platform.staging import StagingStore
from audit_platform.staging.writers import TURNS

RESULTS = Path(__file__).parent / "results" / "batch_cost.md"
CONTEXT = json.dumps({"actor": {"type": "service", "id": "bench"}, "reason": "load"})
app = typer.Typer(add_completion=False)


@dataclass
class Source:
    url: str
    env: str
    policy: SourcePolicy
    store: StagingStore

    def capture(self) -> None:
        capture(self.url, self.env, self.policy, self.store, mask_key=None)


def write(source: Source, transactions: int) -> None:
    """Transactions of five changes (three inserts, an update, a delete) with their context."""
    with psycopg.connect(source.url) as conn:
        for _ in range(transactions):
            conn.execute("SELECT audit.set_context(%s::jsonb)", (CONTEXT,))
            conn.execute("INSERT INTO orders (status, total) VALUES ('new', 1), ('new', 2)")
            conn.execute("INSERT INTO orders (status, total) VALUES ('new', 3)")
            conn.execute("UPDATE orders SET status = 'paid' WHERE id = lastval()")
            conn.execute("DELETE FROM orders WHERE id = lastval() - 1")
            conn.commit()


def downstream(source, state, es, coalesce: int | None = None) -> tuple[float, float]:
    """CPU and wall seconds of enriching and indexing what is pending."""
    cpu, wall = time.process_time(), time.perf_counter()
    now = datetime.now(UTC)
    extra = {} if coalesce is None else {"coalesce": coalesce}
    grace = timedelta(minutes=10)
    enrich_pending(source.store, state, source.policy, now=now, grace=grace, **extra)
    index_pending(es, source.store, database="bench", now=now, **extra)
    return time.process_time() - cpu, time.perf_counter() - wall


def together(sources: list[Source], state, es) -> tuple[float, float]:
    """CPU and wall seconds of one turn that enriches and indexes every source's pending
    batches."""
    cpu, wall, now = time.process_time(), time.perf_counter(), datetime.now(UTC)
    shares = [Share(source.store, source.policy) for source in sources]
    enrich_pending_together(state, shares, now=now, grace=timedelta(minutes=10))
    index_shares = [IndexShare(source.store, "bench") for source in sources]
    index_pending_together(es, index_shares, now=now)
    return time.process_time() - cpu, time.perf_counter() - wall


@contextmanager
def one_writer() -> Iterator[None]:
    """A turn's files written one after another (one writer thread), as before ``TURNS``."""
    with ThreadPoolExecutor(1) as one, mock.patch.object(TURNS, "_pool", one):
        yield


def new_source(admin: str, env: str, name: str, folder: str, settings: Settings) -> Source:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(f"{env}_{name}")))
    url = admin.rsplit("/", 1)[0] + "/" + f"{env}_{name}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE orders (id serial PRIMARY KEY, status text, total int);"
            "ALTER TABLE orders REPLICA IDENTITY FULL;"
        )
    policy = SourcePolicy(source=name, version=1, tables={"public.orders": TablePolicy()})
    setup_source(url, env, policy, settings.resources_dir / "sql")
    return Source(url, env, policy, StagingStore(folder, env, name))


@app.command()
def main(
    repeats: Annotated[int, typer.Option(help="Measured batches per size.")] = 15,
    fleet: Annotated[int, typer.Option("--sources", help="Sources for the last table.")] = 20,
) -> None:
    settings = Settings()
    admin = os.environ["AUDIT_PG_URL"]
    env = f"batchcost{uuid.uuid4().hex[:6]}"
    es = elasticsearch_client(settings.elasticsearch)
    sources: list[Source] = []
    try:
        with tempfile.TemporaryDirectory() as folder:
            for i in range(fleet):
                sources.append(new_source(admin, env, f"shop{i:02d}", folder, settings))
            source = sources[0]
            st = psycopg.connect(source.url, autocommit=True)
            platform_db.install(st, settings.resources_dir / "sql")
            install_template(es, settings.resources_dir, env, replicas=0)
            sizes = []
            for transactions in (1, 10, 100, 1000):
                cpu, wall = [], []
                for i in range(repeats + 3):
                    write(source, transactions)
                    source.capture()
                    c, w = downstream(source, st, es)
                    if i >= 3:  # the first ones warm caches and connections
                        cpu.append(c)
                        wall.append(w)
                sizes.append((transactions, statistics.median(cpu), statistics.median(wall)))
            waiting = []
            for coalesce in (1, None):
                cpu = []
                for _ in range(max(3, repeats // 3)):
                    for _ in range(8):
                        write(source, 10)
                        source.capture()
                    cpu.append(downstream(source, st, es, coalesce)[0] / 8)
                waiting.append((coalesce, statistics.median(cpu)))
            shared: dict[str, list[tuple[float, float]]] = {
                "each on its own": [],
                "one turn for all, files written one at a time": [],
                "one turn for all": [],
            }
            for _ in range(max(3, repeats // 3)):
                for way, found in shared.items():
                    for each in sources:
                        write(each, 10)
                        each.capture()
                    if way == "each on its own":
                        alone = [downstream(each, st, es) for each in sources]
                        found.append((sum(c for c, _ in alone), sum(w for _, w in alone)))
                    elif way == "one turn for all":
                        found.append(together(sources, st, es))
                    else:
                        with one_writer():
                            found.append(together(sources, st, es))
            st.close()
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            for each in sources:
                name = psycopg.conninfo.conninfo_to_dict(each.url)["dbname"]
                conn.execute(
                    "SELECT pg_drop_replication_slot(%s)", (slot_name(env, each.store.source),)
                )
                conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        for index in es.indices.get(index=f"audit-{env}-*", expand_wildcards="all"):
            es.indices.delete(index=index)
        es.options(ignore_status=404).indices.delete_index_template(name=f"audit-{env}")
    lines = [
        "# What a batch costs downstream (enrich and index), whatever it holds",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on the local stack ({os.cpu_count()} "
        f"cores, shared); this process's CPU only, median of {repeats} batches per size.",
        "",
        "Command: `python benchmarks/batch_cost.py`",
        "",
        "| transactions per batch | changes | CPU ms per batch | CPU us per change | wall ms |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {t} | {5 * t} | {c * 1e3:.1f} | {c * 1e6 / (5 * t):.0f} | {w * 1e3:.1f} |"
        for t, c, w in sizes
    ]
    lines += [
        "",
        "Eight waiting batches of 10 transactions:",
        "",
        "| taken | CPU ms per batch |",
        "| --- | ---: |",
    ]
    lines += [
        f"| {'one at a time' if c == 1 else 'together (default)'} | {cpu * 1e3:.1f} |"
        for c, cpu in waiting
    ]
    lines += [
        "",
        f"One batch of 10 transactions from each of {fleet} sources (median of"
        f" {len(shared['one turn for all'])}, taken in turn; the one at a time row writes a"
        " turn's files as the code did before ``TURNS``):",
        "",
        "| turns | CPU ms for all | CPU ms per source | wall ms for all |",
        "| --- | ---: | ---: | ---: |",
    ]
    for way, found in shared.items():
        cpu = statistics.median(c for c, _ in found)
        wall = statistics.median(w for _, w in found)
        lines.append(f"| {way} | {cpu * 1e3:.1f} | {cpu * 1e3 / fleet:.1f} | {wall * 1e3:.1f} |")
    RESULTS.write_text("\n".join(lines) + "\n")
    typer.echo("\n".join(lines))
    typer.echo(f"written: {RESULTS}")


if __name__ == "__main__":
    app()
