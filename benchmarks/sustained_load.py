"""Sustained load: the real deployment while a source is written at a fixed rate, for minutes.

What grows with time only shows under steady load: a run whose cost grows with the hour, slot
lag that creeps up, freshness that drifts. This runs the local deployment (Dagster webserver and
daemon with the default-on sensors, the Audit API) for an environment that copies ``dev``, and
writes the demo shop's tables at a fixed rate of row changes per second, every transaction with
its context. Per rate step it reports:

- capture-run duration over time (Dagster's own run records): median of the first 10 runs
  against the last 10;
- slot lag (bytes behind ``confirmed_flush_lsn``), sampled every 5 s;
- freshness, commit to searchable through the API, from one probe transaction per second whose
  ``request_id`` the API is polled for;
- documents indexed against changes committed, once the pipeline has caught up;
- Elasticsearch index operations per new document (index stats);
- each process's CPU share (cores), from /proc.

After the steps, the same documents are bulk-indexed with bare ``helpers.bulk`` into a scratch
index with the same mappings: the cluster's own rate on this machine, for comparison.

Run: ``eval "$(audit-platform stack env)"; .venv/bin/python benchmarks/sustained_load.py
--rates 1000 --minutes 30`` (across an hour boundary) and ``--rates 500,1000,2000,3000
--minutes 10`` (rising rates). Writes ``benchmarks/results/sustained_load[-<tag>].md``.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import httpx
import psycopg
import typer
from _cpu import CpuSampler
from _deployment import bench_deployment
from elasticsearch import helpers

from audit_platform.clients import elasticsearch_client
from audit_platform.environment import load_environment
from audit_platform.naming import read_alias, slot_name
from audit_platform.settings import Settings
from audit_platform.stack.deployment import LocalDeployment

RESULTS = Path(__file__).parent / "results"
ENV = "benchsustain"
CHANGES_PER_TX = 5  # an order, three lines, the order's status update
RUNS = """
query { runsOrError(filter: {pipelineName: "capture_shop_job"}, limit: 100000) {
  ... on Runs { results { status startTime endTime } } } }"""
app = typer.Typer(add_completion=False)


@dataclass
class Step:
    rate: int
    seconds: float
    started: float = 0.0
    ended: float = 0.0
    committed: int = 0
    caught_up_seconds: float | None = None
    indexed_after: int = 0
    index_ops: int = 0
    docs_before: int = 0
    probes: dict[str, float] = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)
    lag: list[tuple[float, int]] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    runs: list[tuple[float, float]] = field(default_factory=list)  # (start, duration)
    trail: bool = True  # the trail's log appended (environment setting ``trail``)

    @property
    def freshness(self) -> list[float]:
        return [self.seen[r] - t for r, t in self.probes.items() if r in self.seen]


class Load:
    """Writers at a fixed rate of row changes per second, and one probe transaction a second."""

    def __init__(self, url: str, customer: int, rate: int, writers: int) -> None:
        self.url, self.customer, self.rate, self.writers = url, customer, rate, writers
        self.stop = threading.Event()
        self.committed = 0
        self.probes: dict[str, float] = {}
        self.lock = threading.Lock()
        self.errors: list[str] = []

    def run(self, seconds: float) -> None:
        threads = [threading.Thread(target=self._write, args=(i,)) for i in range(self.writers)]
        threads.append(threading.Thread(target=self._probe))
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        self.stop.set()
        for thread in threads:
            thread.join()
        if self.errors:
            raise RuntimeError(f"the load failed: {self.errors[:3]}")

    def _write(self, writer: int) -> None:
        per_second = self.rate / CHANGES_PER_TX / self.writers
        context = json.dumps({"actor": {"type": "service", "id": f"writer-{writer}"},
                              "service": "shop", "reason": "sustained load"})  # fmt: skip
        try:
            with psycopg.connect(self.url) as conn:
                start, done = time.monotonic(), 0
                while not self.stop.is_set():
                    due = start + done / per_second
                    if (wait := due - time.monotonic()) > 0:
                        time.sleep(wait)
                    conn.execute("SELECT audit.set_context(%s::jsonb)", (context,))
                    order = conn.execute(
                        "INSERT INTO orders (customer_id, total) VALUES (%s, 30) RETURNING id",
                        (self.customer,),
                    ).fetchone()[0]
                    conn.execute(
                        "INSERT INTO order_lines VALUES (%s, 1, 'sku-1', 1, 10),"
                        " (%s, 2, 'sku-2', 1, 10), (%s, 3, 'sku-3', 1, 10)",
                        (order, order, order),
                    )
                    conn.execute("UPDATE orders SET status = 'paid' WHERE id = %s", (order,))
                    conn.commit()
                    done += 1
                    with self.lock:
                        self.committed += CHANGES_PER_TX
        except Exception as exc:  # reported by run()
            self.errors.append(repr(exc))

    def _probe(self) -> None:
        try:
            with psycopg.connect(self.url) as conn:
                conn.execute(
                    """SELECT audit.set_context('{"actor": {"type": "user", "id": "probe"}}')"""
                )
                order = conn.execute(
                    "INSERT INTO orders (customer_id) VALUES (%s) RETURNING id", (self.customer,)
                ).fetchone()[0]
                conn.commit()
                with self.lock:
                    self.committed += 1
                while not self.stop.wait(1.0):
                    request = f"probe-{uuid.uuid4().hex[:12]}"
                    context = {"actor": {"type": "user", "id": "probe"}, "request_id": request}
                    conn.execute("SELECT audit.set_context(%s::jsonb)", (json.dumps(context),))
                    conn.execute(
                        "INSERT INTO payments (order_id, amount, card_last4)"
                        " VALUES (%s, 1, '4242')",
                        (order,),
                    )
                    conn.commit()
                    with self.lock:
                        self.probes[request] = time.time()
                        self.committed += 1
        except Exception as exc:
            self.errors.append(repr(exc))


def poll_probes(api: str, key: str, since: str, seen: dict[str, float], stop: threading.Event):
    """The API, every 0.5 s, for the newest probe records (the only writes to payments)."""
    with httpx.Client(base_url=api, headers={"X-API-Key": key}, timeout=30) as client:
        while not stop.wait(0.5):
            try:
                params = {"since": since, "limit": 200, "order": "desc", "table": "payments"}
                reply = client.get("/v1/events", params=params)
            except httpx.HTTPError:
                continue
            now = time.time()
            for event in reply.json().get("events", []):
                request = (event.get("context") or {}).get("request_id")
                if request and request not in seen:
                    seen[request] = now


def sample(pg_url: str, slot: str, step: Step, stop: threading.Event) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        while not stop.wait(5.0):
            lag = conn.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint"
                " FROM pg_replication_slots WHERE slot_name = %s",
                (slot,),
            ).fetchone()
            step.lag.append((time.time() - step.started, lag[0] if lag else 0))


def index_stats(es, env: str) -> tuple[int, int]:
    """(documents, index operations) on the environment's indices."""
    stats = es.indices.stats(index=f"audit-{env}-*", metric="docs,indexing")["_all"]["primaries"]
    return stats.get("docs", {}).get("count", 0), stats.get("indexing", {}).get("index_total", 0)


def bare_bulk_rate(es, env: str, documents: int) -> tuple[int, float]:
    """Bare helpers.bulk of the same documents into a scratch index with the same mappings."""
    source = sorted(es.indices.get(index=f"audit-{env}-*"))[-1]
    mapping = es.indices.get_mapping(index=source)[source]["mappings"]
    scratch = f"bench-bare-{uuid.uuid4().hex[:8]}"
    es.indices.create(index=scratch, mappings=mapping,
                      settings={"number_of_shards": 1, "number_of_replicas": 0})  # fmt: skip
    try:
        actions = []
        for hit in helpers.scan(es, index=read_alias(env), size=2000):
            actions.append({"_index": scratch, "_id": hit["_id"], "_source": hit["_source"]})
            if len(actions) >= documents:
                break
        started = time.perf_counter()
        helpers.bulk(es, actions, chunk_size=1000)
        seconds = time.perf_counter() - started
    finally:
        es.indices.delete(index=scratch)
    return len(actions), len(actions) / seconds


def run_step(step: Step, deployment: LocalDeployment, shop_url: str, customer: int, key: str,
             es, pg_url: str, writers: int, catch_up_limit: float) -> None:  # fmt: skip
    slot = slot_name(ENV, "shop")
    step.docs_before, ops_before = index_stats(es, ENV)
    stop = threading.Event()
    step.started = time.time()
    since = datetime.now(UTC).isoformat()
    threads = [
        threading.Thread(
            target=poll_probes, args=(deployment.api_url, key, since, step.seen, stop)
        ),
        threading.Thread(target=sample, args=(pg_url, slot, step, stop)),
    ]
    for thread in threads:
        thread.start()
    try:
        cpu = CpuSampler()
        cpu.start()
        load = Load(shop_url, customer, step.rate, writers)
        load.run(step.seconds)
        step.ended = time.time()
        step.cpu = {k: v / (step.ended - step.started) for k, v in cpu.stop().items()}
        step.committed, step.probes = load.committed, dict(load.probes)
        # Caught up: every committed change is a document.
        deadline = time.time() + catch_up_limit
        while time.time() < deadline:
            docs, _ = index_stats(es, ENV)
            if docs - step.docs_before >= step.committed:
                step.caught_up_seconds = time.time() - step.ended
                break
            time.sleep(1)
        time.sleep(2)  # the last probes reach the poller
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    docs, ops = index_stats(es, ENV)
    step.indexed_after, step.index_ops = docs - step.docs_before, ops - ops_before
    runs = deployment.graphql(RUNS)["runsOrError"]["results"]
    step.runs = sorted(
        (r["startTime"], r["endTime"] - r["startTime"])
        for r in runs
        if r["startTime"] and r["endTime"] and step.started <= r["startTime"] <= step.ended
    )


def set_trail(resources: Path, on: bool) -> None:
    path = resources / "environments" / f"{ENV}.yaml"
    text = re.sub(r"(?m)^trail: .*\n", "", path.read_text())
    path.write_text(text + f"trail: {'true' if on else 'false'}\n")


def quantile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else (
        values[0] if values else float("nan"))  # fmt: skip


def report(steps: list[Step], bare: tuple[int, float], writers: int, interval: int) -> list[str]:
    lines = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on the local stack: one 2-core machine "
        "shared by PostgreSQL, Elasticsearch (1 GB heap), the Dagster webserver and daemon with "
        "their code servers and run processes, the Audit API and the load itself "
        f"({writers} writer connections, transactions of {CHANGES_PER_TX} row changes with "
        f"their context, plus one probe transaction a second). Capture sensor interval {interval} "
        "s (the `dev` default is 10).",
        "",
        "| rate (changes/s) | minutes | committed | indexed | caught up after | runs | run s, "
        "first 10 / last 10 (ratio) | slot lag MB, median / max | fresh p50 / p95 / max s | "
        "ES index ops per new doc |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | ---: |",
    ]
    for s in steps:
        durations = [d for _, d in s.runs]
        first = statistics.median(durations[:10]) if durations else float("nan")
        last = statistics.median(durations[-10:]) if durations else float("nan")
        lags = [b / 1e6 for _, b in s.lag] or [0.0]
        fresh = s.freshness
        caught = f"{s.caught_up_seconds:.0f} s" if s.caught_up_seconds is not None else "no"
        lines.append(
            f"| {s.rate} ({s.committed / (s.ended - s.started):.0f} achieved) | "
            f"{s.seconds / 60:.0f} | {s.committed} | {s.indexed_after} | {caught} | {len(s.runs)} "
            f"| {first:.1f} / {last:.1f} ({last / first:.2f}x) | {statistics.median(lags):.1f} / "
            f"{max(lags):.1f} | {quantile(fresh, 50):.1f} / {quantile(fresh, 95):.1f} / "
            f"{max(fresh, default=float('nan')):.1f} | "
            f"{s.index_ops / max(1, s.indexed_after):.2f} |"
        )
    if any(not s.trail for s in steps):
        lines += [
            "", "The trail's cost, step by step (run workers capture, enrich with the trail's "
            "leaves, and index):", "",
            "| step | rate | trail | run workers, cores | run-worker CPU ms per 1,000 changes "
            "| run s, median |",
            "| ---: | ---: | --- | ---: | ---: | ---: |",
        ]  # fmt: skip
        for n, s in enumerate(steps, start=1):
            cores = s.cpu.get("run worker", 0.0)
            per = cores * (s.ended - s.started) / max(1, s.committed) * 1e6
            median = statistics.median([d for _, d in s.runs]) if s.runs else float("nan")
            lines.append(f"| {n} | {s.rate} | {'on' if s.trail else 'off'} | {cores:.2f} | "
                         f"{per:.0f} | {median:.2f} |")  # fmt: skip
    lines += ["", "CPU, in cores (2 available), per step:", ""]
    kinds = sorted({k for s in steps for k in s.cpu})
    lines.append("| rate | " + " | ".join(kinds) + " |")
    lines.append("| ---: |" + " ---: |" * len(kinds))
    for s in steps:
        lines.append(f"| {s.rate} | " + " | ".join(f"{s.cpu.get(k, 0):.2f}" for k in kinds) + " |")
    lines += ["", f"Bare `helpers.bulk` of {bare[0]} of the same documents into a scratch index "
              f"with the same mappings, same cluster, same run: {bare[1]:.0f} docs/s."]  # fmt: skip
    for s in steps:
        if s.seconds < 600:
            continue
        lines += ["", f"Over time at {s.rate} changes/s, per 5 minutes:", "",
                  "| minutes | runs | run s median | slot lag MB max | fresh p95 s |",
                  "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for start in range(0, int(s.seconds), 300):
            window = (s.started + start, s.started + start + 300)
            runs = [d for t, d in s.runs if window[0] <= t < window[1]]
            lag = [b / 1e6 for t, b in s.lag if start <= t < start + 300] or [0.0]
            fresh = [s.seen[r] - t for r, t in s.probes.items()
                     if r in s.seen and window[0] <= t < window[1]]  # fmt: skip
            lines.append(
                f"| {start // 60}-{start // 60 + 5} | {len(runs)} | "
                f"{statistics.median(runs) if runs else float('nan'):.1f} | {max(lag):.1f} | "
                f"{quantile(fresh, 95):.1f} |"
            )
    return lines


@app.command()
def main(
    rates: Annotated[
        str, typer.Option(help="Comma-separated changes per second, one step each.")
    ] = "1000",
    minutes: Annotated[float, typer.Option(help="Minutes per step.")] = 30,
    writers: Annotated[int, typer.Option(help="Writer connections.")] = 2,
    bare_documents: Annotated[
        int, typer.Option(help="Documents for the bare bulk rate.")
    ] = 100_000,
    catch_up: Annotated[
        float, typer.Option(help="Seconds to wait for catch-up after a step.")
    ] = 300,
    tag: Annotated[str, typer.Option(help="Suffix of the results file.")] = "",
    interval: Annotated[
        int, typer.Option(help="Capture sensor interval, seconds (0: the dev default).")
    ] = 0,
    trail_off: Annotated[
        str, typer.Option(help="Steps (1-based, comma-separated) run with the trail's log off.")
    ] = "",
) -> None:
    settings = Settings()
    es = elasticsearch_client(settings.elasticsearch)
    for index in es.indices.get(index=f"audit-{ENV}-*"):
        es.indices.delete(index=index)
    root, resources, shop_url, deployment, key = bench_deployment(
        ENV, "sustained", interval=interval
    )
    pg_url = os.environ["AUDIT_PG_URL"]
    with psycopg.connect(shop_url) as conn:
        conn.execute(
            """SELECT audit.set_context('{"actor": {"type": "service", "id": "bench"}}')"""
        )
        customer = conn.execute(
            "INSERT INTO customers (name, email, password_hash) VALUES"
            " ('Load', %s, 'x') RETURNING id", (f"load-{uuid.uuid4().hex[:6]}@example.com",),
        ).fetchone()[0]  # fmt: skip
        conn.commit()
    off = {int(n) for n in trail_off.split(",") if n}
    steps = [Step(int(r), minutes * 60, trail=i not in off)
             for i, r in enumerate(rates.split(","), start=1)]  # fmt: skip
    try:
        deployment.start()
        deadline = time.time() + 180  # the customer's record first, so steps count only theirs
        while index_stats(es, ENV)[0] < 1 and time.time() < deadline:
            time.sleep(1)
        for step in steps:
            # The code location reads the environment file at every run: a step switches the
            # trail's log on or off without restarting anything.
            set_trail(resources, step.trail)
            typer.echo(f"{datetime.now(UTC):%H:%M:%S} step: {step.rate} changes/s, {minutes} min"
                       f", trail {'on' if step.trail else 'off'}")  # fmt: skip
            run_step(step, deployment, shop_url, customer, key, es, pg_url,
                     writers, catch_up)  # fmt: skip
            typer.echo(f"  committed {step.committed}, indexed {step.indexed_after}, "
                       f"caught up after {step.caught_up_seconds}")  # fmt: skip
    finally:
        deployment.stop()
    bare = bare_bulk_rate(es, ENV, bare_documents)
    interval = load_environment(resources, ENV).capture_flush_seconds
    lines = report(steps, bare, writers, interval)
    out = RESULTS / f"sustained_load{'-' + tag if tag else ''}.md"
    out.write_text("# Sustained load through the deployment\n\n" + "\n".join(lines) + "\n")
    raw = [{"rate": s.rate, "runs": s.runs, "lag": s.lag, "freshness": s.freshness, "cpu": s.cpu}
           for s in steps]  # fmt: skip
    (root / "raw.json").write_text(json.dumps(raw))
    typer.echo("\n".join(lines))
    typer.echo(f"raw series: {root / 'raw.json'}; logs: {deployment.logs}")


if __name__ == "__main__":
    app()
