"""Sustained load: the real deployment while a source is written at a fixed rate, for minutes.

What grows with time only shows under steady load: a run whose cost grows with the hour, slot
lag that creeps up, freshness that drifts. This runs the local deployment (Dagster webserver and
daemon with ``capture_keeper_sensor``, which keeps the environment's one long-lived capture run
going, and the Audit API) for an environment that copies ``dev``, and writes the demo shop's
tables at a fixed rate of row changes per second, every transaction with its context. A trigger
table in the shop database is the ground truth (``_live.py``). Per rate step it reports:

- the live run's cost over time: the capture run's CPU (cores, and ms per 1,000 changes; the
  environment's other runs apart) per window, first window against the last, and the capture
  runs alive in the step (Dagster's records);
- slot lag (bytes behind ``confirmed_flush_lsn``) and retained WAL (behind ``restart_lsn``),
  sampled every 5 s;
- freshness, commit to searchable through the API, from one probe transaction per second whose
  ``request_id`` the API is polled for;
- documents indexed against changes committed (the trigger table), once caught up;
- Elasticsearch index operations per new document (index stats);
- each process group's CPU (cores) and the whole machine's, from /proc.

With ``--snapshot-rows N``, the shop's ``customers`` table holds N rows from before the source
joined (written with the slot dropped and the ground truth's trigger off, then the slot made
again), and ``--snapshot-after`` minutes into the first step a snapshot of it starts, as
``audit-platform source snapshot`` runs it, while the load goes on. The report then adds: the
snapshot's rows per second on the source's side and to searchable (all N snapshot records
found in Elasticsearch), its longest chunk (the longest transaction it held open), and the
live stream's freshness while the snapshot's records were on their way against the rest of
the step. The ground truth then compares the indexed documents other than snapshot records with
the trigger table, and the snapshot records with N.

After the steps, the same documents are bulk-indexed with bare ``helpers.bulk`` into a scratch
index with the same mappings: the cluster's own rate on this machine, for comparison.

Run: ``eval "$(audit-platform stack env)"; .venv/bin/python benchmarks/sustained_load.py
--rates 1000 --minutes 25`` (the issue's target; 30 crosses an hour boundary) and
``--rates 1000,2000,3000,4000 --minutes 10`` (rising steps). Writes
``benchmarks/results/sustained_load[-<tag>].md``.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
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
import yaml
from _cpu import CpuSampler
from _deployment import bench_deployment, remove_environment
from _live import (
    capture_run_kind,
    capture_runs,
    indexed_by_source,
    machine_load,
    marker,
    truth_count,
    truth_seq,
)
from elasticsearch import helpers

from audit_platform.capture.snapshot import TableProgress, new_snapshot_id, run_snapshot
from audit_platform.capture.snapshot_pace import PipelinePace, pipeline_pace
from audit_platform.clients import elasticsearch_client
from audit_platform.environment import load_environment
from audit_platform.naming import read_alias, slot_name
from audit_platform.policy import load_policy
from audit_platform.settings import Settings
from audit_platform.sources.setup import setup_source
from audit_platform_dev.stack.deployment import LocalDeployment

RESULTS = Path(__file__).parent / "results"
ENV = "benchsustain"
CHANGES_PER_TX = 5  # an order, three lines, the order's status update
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
    lag: list[tuple[float, int, int]] = field(default_factory=list)  # (s, lag, retained)
    cpu: dict[str, float] = field(default_factory=dict)
    cpu_series: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    seq: tuple[int, int] = (0, 0)  # the trigger table's sequence at the start and the end
    runs_alive: int = 0
    runs_started: int = 0
    trail: bool = True  # the trail's log appended (environment setting ``trail``)

    @property
    def freshness(self) -> list[float]:
        return [self.seen[r] - t for r, t in self.probes.items() if r in self.seen]


@dataclass
class Snapshot:
    """A snapshot taken during a step: when, how long its chunks held a transaction open, and
    when all its records were searchable (Unix times)."""

    rows: int
    after_seconds: float
    #: Where the deployment stages, for the snapshot's pace (None: not paced, as fast as the
    #: source can).
    staging_root: str | None = None
    started: float = 0.0
    read: float = 0.0
    searchable: float | None = None
    recorded: int = 0
    longest_chunk: float = 0.0
    chunks: int = 0
    waited: float = 0.0
    #: The pace's backlog bound at the end, and the indexing rate it was measured from.
    bound: int = 0
    rate: float | None = None
    error: str | None = None


def prefill(shop_url: str, resources: Path, rows: int) -> None:
    """``rows`` customers that predate the source's joining: written with the slot dropped and
    the ground truth's trigger off (``session_replication_role``), then the slot made again."""
    slot = slot_name(ENV, "shop")
    with psycopg.connect(shop_url, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        conn.execute("SET session_replication_role = replica")
        conn.execute(
            "INSERT INTO customers (name, email, phone, password_hash, tier)"
            " SELECT 'customer ' || g, 'c' || g || '@example.com',"
            " '+1555' || lpad(g::text, 7, '0'), 'x', (ARRAY['standard', 'gold'])[g %% 2 + 1]"
            " FROM generate_series(1, %s) g",
            (rows,),
        )
        conn.execute("VACUUM ANALYZE customers")
    setup_source(shop_url, ENV, load_policy(resources / "sources" / "shop.yaml"), resources / "sql")


def snapshot_records(es) -> int:
    es.indices.refresh(index=f"audit-{ENV}-*")
    return es.count(index=f"audit-{ENV}-*", query={"term": {"operation": "snapshot"}})["count"]


class TimedPace(PipelinePace):
    """The deployment's pace (``capture.snapshot_pace``), noting when each wait ended, so a
    chunk's time is its own."""

    def __init__(self, staging_root: str, ended: list[float]) -> None:
        paced = pipeline_pace(staging_root, ENV, "shop")
        super().__init__(paced.store, paced.slot)
        self.ended = ended

    def wait(self, conn, written_lsn: int) -> None:
        super().wait(conn, written_lsn)
        self.ended[0] = time.monotonic()


def take_snapshot(snap: Snapshot, shop_url: str, resources: Path, es, stop: threading.Event):
    """The snapshot at its time in the step, then its records watched until all are found."""
    if stop.wait(snap.after_seconds):
        return
    policy = load_policy(resources / "sources" / "shop.yaml")
    last = [time.monotonic()]
    pace = None if snap.staging_root is None else TimedPace(snap.staging_root, last)

    def chunk(progress: TableProgress) -> None:  # a chunk's time, its wait for capture apart
        now = time.monotonic()
        snap.longest_chunk = max(snap.longest_chunk, now - last[0])
        snap.chunks = progress.chunks
        snap.waited = pace.waited if pace else 0.0
        snap.bound, snap.rate = (pace.bound(), pace.rate) if pace else (0, None)
        last[0] = now

    with psycopg.connect(shop_url) as conn:  # the prefilled rows, and the load's customer
        snap.rows = conn.execute("SELECT count(*) FROM customers").fetchone()[0]
    snap.started = time.time()
    try:
        run_snapshot(
            shop_url,
            policy,
            new_snapshot_id(),
            tables=["public.customers"],
            reason="benchmark",
            on_chunk=chunk,
            pace=pace,
        )
    except Exception as exc:  # reported with the results
        snap.error = repr(exc)
        return
    snap.read = time.time()
    while not stop.is_set():
        snap.recorded = snapshot_records(es)
        if snap.recorded >= snap.rows:
            snap.searchable = time.time()
            return
        stop.wait(2.0)


class Load:
    """Writers at a fixed rate of row changes per second, and one probe transaction a second."""

    def __init__(
        self, url: str, customer: int, rate: int, writers: int, users: bool = False
    ) -> None:
        self.url, self.customer, self.rate, self.writers = url, customer, rate, writers
        self.users = users
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
        context = json.dumps(
            {
                "actor": {"type": "service", "id": f"writer-{writer}"},
                "service": "shop",
                "reason": "sustained load",
            }
            if not self.users
            else {  # a person acting, with a name and an address (``--users``)
                "actor": {"type": "user", "id": f"user-{writer}", "name": f"Load User {writer}"},
                "client_addr": f"192.0.2.{10 + writer}",
                "service": "shop",
                "reason": "sustained load",
            }
        )
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
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint,"
                " pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint"
                " FROM pg_replication_slots WHERE slot_name = %s",
                (slot,),
            ).fetchone()
            step.lag.append((time.time() - step.started, *(lag or (0, 0))))


def index_stats(es, env: str) -> tuple[int, int]:
    """(documents, index operations) on the environment's indices."""
    stats = es.indices.stats(index=f"audit-{env}-*", metric="docs,indexing")["_all"]["primaries"]
    return stats.get("docs", {}).get("count", 0), stats.get("indexing", {}).get("index_total", 0)


def bare_bulk_rate(es, env: str, documents: int) -> tuple[int, float]:
    """Bare helpers.bulk of the same documents into a scratch index with the same mappings."""
    source = sorted(es.indices.get(index=f"audit-{env}-*"))[-1]
    mapping = es.indices.get_mapping(index=source)[source]["mappings"]
    scratch = f"bench-bare-{uuid.uuid4().hex[:8]}"
    es.indices.create(
        index=scratch, mappings=mapping, settings={"number_of_shards": 1, "number_of_replicas": 0}
    )
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


def run_step(
    step: Step,
    deployment: LocalDeployment,
    shop_url: str,
    customer: int,
    key: str,
    es,
    pg_url: str,
    writers: int,
    catch_up_limit: float,
    snapshot: Snapshot | None = None,
    resources: Path | None = None,
    users: bool = False,
) -> None:
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
    if snapshot is not None:
        threads.append(
            threading.Thread(target=take_snapshot, args=(snapshot, shop_url, resources, es, stop))
        )
    for thread in threads:
        thread.start()
    try:
        cpu = CpuSampler(
            series_every=30, mine=marker(deployment), extra=capture_run_kind(deployment)
        )
        cpu.start()
        before = truth_seq(shop_url)
        load = Load(shop_url, customer, step.rate, writers, users)
        load.run(step.seconds)
        step.ended = time.time()
        totals = cpu.stop()
        step.cpu = {k: v / (step.ended - step.started) for k, v in totals.items()}
        step.cpu_series = [*cpu.series, (step.ended - step.started, totals)]
        step.seq = (before, truth_seq(shop_url))
        step.committed, step.probes = step.seq[1] - step.seq[0], dict(load.probes)
        # Caught up: every change the trigger table holds is a document (and every row of a
        # snapshot, which the trigger does not see).
        truth = truth_count(shop_url) + (snapshot.rows if snapshot else 0)
        deadline = time.time() + catch_up_limit
        while time.time() < deadline:
            if indexed_by_source(es, ENV).get("shop", 0) >= truth:
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
    runs = capture_runs(deployment)
    step.runs_alive = sum(r.alive_during(step.started, step.ended) for r in runs)
    step.runs_started = sum(step.started <= (r.started or 0) <= step.ended for r in runs)


#: The load's transaction: an order inserted (6 values) and updated (12), three lines (15).
#: Declared personal: the order's status and total, the lines' sku and price: 12 of 33 (36%).
PERSONAL = {
    "public.orders": {
        "subject": "customer_id",
        "of": "public.customers",
        "columns": ["status", "total"],
    },
    "public.order_lines": {
        "subject": "order_id",
        "of": "public.orders",
        "columns": ["sku", "unit_price"],
    },
}


def declare_personal(resources: Path) -> None:
    path = resources / "sources" / "shop.yaml"
    policy = yaml.safe_load(path.read_text())
    for table, declared in PERSONAL.items():
        policy["tables"].setdefault(table, {})["personal"] = declared
    policy["context_personal"] = {"of": "public.customers"}  # actor.name and client_addr
    path.write_text(yaml.safe_dump(policy))
    load_policy(path)  # valid, or the benchmark stops here


def set_trail(resources: Path, on: bool) -> None:
    path = resources / "environments" / f"{ENV}.yaml"
    text = re.sub(r"(?m)^trail: .*\n", "", path.read_text())
    path.write_text(text + f"trail: {'true' if on else 'false'}\n")


def quantile(values: list[float], q: int) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1]
        if len(values) > 1
        else (values[0] if values else float("nan"))
    )


def windows(s: Step) -> list[tuple[float, float]]:
    """Windows of the step for the over-time table: 5 minutes, or 1 in a step under 10."""
    size = 300 if s.seconds >= 600 else 60
    return [(t, min(t + size, s.seconds)) for t in range(0, int(s.seconds), size)]


def run_worker_cpu(s: Step, window: tuple[float, float]) -> float:
    """Run-process CPU seconds within ``window`` (seconds into the step), from the series."""
    series = [(0.0, {}), *s.cpu_series]

    def at(t: float) -> float:
        best = min(series, key=lambda p: abs(p[0] - t))
        return best[1].get("capture run", 0.0)

    return at(window[1]) - at(window[0])


def snapshot_report(snap: Snapshot, step: Step) -> list[str]:
    if snap.error or not snap.started:
        return [f"The snapshot did not finish: {snap.error or 'not started'}."]
    read = snap.read - snap.started
    end = snap.searchable or step.ended
    during = [
        step.seen[r] - t
        for r, t in step.probes.items()
        if r in step.seen and snap.started <= t < end
    ]
    outside = [
        step.seen[r] - t
        for r, t in step.probes.items()
        if r in step.seen and not snap.started <= t < end
    ]
    if snap.searchable:
        took = snap.searchable - snap.started
        whole = f"{took:.0f} s, {snap.rows / took:,.0f} rows/s"
    else:
        whole = f"not all within the step ({snap.recorded:,} of {snap.rows:,} found)"
    return [
        f"Snapshot of `customers` ({snap.rows:,} rows, all but the load's own customer from "
        "before the source joined), started "
        f"{snap.after_seconds / 60:g} minutes into the step, while the load went on:",
        "",
        "| what | value |",
        "| --- | --- |",
        f"| source's side (chunks written) | {read:.0f} s, {snap.rows / read:,.0f} rows/s, "
        f"{snap.chunks} chunks |",
        "| paced by capture (`--snapshot-pace`) | "
        + (
            f"yes: {snap.waited:.0f} s of it waiting; at the end, at most {snap.bound:,} "
            f"staged changes ahead of a chunk (the pipeline gaining "
            f"{snap.rate or 0:,.0f} changes/s on its backlog) |"
            if snap.staging_root
            else "no |"
        ),
        f"| longest chunk (transaction held open) | {snap.longest_chunk * 1000:.0f} ms |",
        f"| start to every record searchable | {whole} |",
        f"| live freshness p50 / p95 / max while its records were on their way | "
        f"{quantile(during, 50):.1f} / {quantile(during, 95):.1f} / "
        f"{max(during, default=float('nan')):.1f} s ({len(during)} probes) |",
        f"| live freshness p50 / p95 / max, the rest of the step | "
        f"{quantile(outside, 50):.1f} / {quantile(outside, 95):.1f} / "
        f"{max(outside, default=float('nan')):.1f} s ({len(outside)} probes) |",
    ]


def report(
    steps: list[Step],
    bare: tuple[int, float],
    writers: int,
    flush: float,
    totals: tuple[int, int, int],
    command: str,
    loads: tuple[str, str],
    snapshot: Snapshot | None = None,
) -> list[str]:
    lines = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on the local stack: one machine "
        f"({os.cpu_count()} cores) shared by PostgreSQL, Elasticsearch, the Dagster webserver "
        "and daemon with their code servers and the live capture run, the Audit API and the "
        f"load itself ({writers} writer connections, transactions of {CHANGES_PER_TX} row "
        "changes with their context, plus one probe transaction a second). "
        f"`capture_flush_seconds` {flush:g}; one capture shard. Machine load before: "
        f"{loads[0]}; after: {loads[1]}.",
        "",
        f"Command: `{command}`",
        "",
        f"Ground truth: the shop database's trigger table holds {totals[0]} row changes in all; "
        f"{totals[1]} documents of source shop were indexed "
        f"({'equal' if totals[0] == totals[1] else 'NOT equal'})"
        + (
            f", snapshot records not counted: {totals[2]} of the {snapshot.rows} rows "
            f"({'each once' if totals[2] == snapshot.rows else 'NOT equal'})."
            if snapshot is not None
            else "."
        ),
        "",
        "| rate (changes/s) | minutes | committed (truth) | indexed | caught up after | capture "
        "runs alive / started | capture-run CPU ms per 1,000 changes, first / last window "
        "| slot lag MB, median / max | fresh p50 / p95 / max s | ES index ops per new doc |",
        "| ---: | ---: | ---: | ---: | ---: | --- | --- | --- | --- | ---: |",
    ]
    for s in steps:
        spans = windows(s)
        first, last = spans[0], spans[-1]
        rate = s.committed / max(1.0, s.ended - s.started)

        def per_k(w: tuple[float, float], s: Step = s, rate: float = rate) -> float:
            return run_worker_cpu(s, w) / max(1.0, rate * (w[1] - w[0])) * 1e6

        lags = [b / 1e6 for _, b, _ in s.lag] or [0.0]
        fresh = s.freshness
        caught = f"{s.caught_up_seconds:.0f} s" if s.caught_up_seconds is not None else "no"
        lines.append(
            f"| {s.rate} ({rate:.0f} achieved) | {s.seconds / 60:.0f} | {s.committed} | "
            f"{s.indexed_after} | {caught} | {s.runs_alive} / {s.runs_started} | "
            f"{per_k(first):.0f} / {per_k(last):.0f} | {statistics.median(lags):.1f} / "
            f"{max(lags):.1f} | {quantile(fresh, 50):.1f} / {quantile(fresh, 95):.1f} / "
            f"{max(fresh, default=float('nan')):.1f} | "
            f"{s.index_ops / max(1, s.indexed_after):.2f} |"
        )
    if snapshot is not None:
        lines += ["", *snapshot_report(snapshot, steps[0])]
    if any(not s.trail for s in steps):
        lines += [
            "",
            "The trail's cost, step by step (the setting applies from the next capture run):",
            "",
            "| step | rate | trail | capture run, cores | capture-run CPU ms per 1,000 changes |",
            "| ---: | ---: | --- | ---: | ---: |",
        ]
        for n, s in enumerate(steps, start=1):
            cores = s.cpu.get("capture run", 0.0)
            per = cores * (s.ended - s.started) / max(1, s.committed) * 1e6
            lines.append(
                f"| {n} | {s.rate} | {'on' if s.trail else 'off'} | {cores:.2f} | {per:.0f} |"
            )
    lines += [
        "",
        "CPU, in cores, per step (the whole machine and per process group, from /proc; "
        "PostgreSQL and Elasticsearch count every such process on the machine, shared with "
        "other work; Dagster and API processes of other deployments are counted apart; "
        "run worker: the runs other than the capture run, such as health checks and the "
        "trail's hourly run):",
        "",
    ]
    kinds = sorted({k for s in steps for k in s.cpu})
    lines.append("| rate | " + " | ".join(kinds) + " |")
    lines.append("| ---: |" + " ---: |" * len(kinds))
    for s in steps:
        lines.append(f"| {s.rate} | " + " | ".join(f"{s.cpu.get(k, 0):.2f}" for k in kinds) + " |")
    lines += [
        "",
        f"Bare `helpers.bulk` of {bare[0]} of the same documents into a scratch index with the "
        f"same mappings, same cluster, same run: {bare[1]:.0f} docs/s.",
    ]
    for s in steps:
        lines += [
            "",
            f"Over time at {s.rate} changes/s:",
            "",
            "| minutes | capture run, cores | slot lag MB max | retained WAL MB max | fresh p50 / "
            "p95 s |",
            "| --- | ---: | ---: | ---: | --- |",
        ]
        for w in windows(s):
            lag = [b / 1e6 for t, b, _ in s.lag if w[0] <= t < w[1]] or [0.0]
            kept = [r / 1e6 for t, _, r in s.lag if w[0] <= t < w[1]] or [0.0]
            fresh = [
                s.seen[r] - t
                for r, t in s.probes.items()
                if r in s.seen and s.started + w[0] <= t < s.started + w[1]
            ]
            lines.append(
                f"| {w[0] / 60:g}-{w[1] / 60:g} | {run_worker_cpu(s, w) / (w[1] - w[0]):.2f} | "
                f"{max(lag):.1f} | {max(kept):.1f} | {quantile(fresh, 50):.1f} / "
                f"{quantile(fresh, 95):.1f} |"
            )
    return lines


@app.command()
def main(
    rates: Annotated[
        str, typer.Option(help="Comma-separated changes per second, one step each.")
    ] = "1000",
    minutes: Annotated[float, typer.Option(help="Minutes per step.")] = 25,
    writers: Annotated[int, typer.Option(help="Writer connections.")] = 2,
    bare_documents: Annotated[
        int, typer.Option(help="Documents for the bare bulk rate.")
    ] = 100_000,
    catch_up: Annotated[
        float, typer.Option(help="Seconds to wait for catch-up after a step.")
    ] = 300,
    tag: Annotated[str, typer.Option(help="Suffix of the results file.")] = "",
    flush_seconds: Annotated[
        float, typer.Option(help="capture_flush_seconds (0: the dev default).")
    ] = 0,
    trail_off: Annotated[
        str,
        typer.Option(
            help="Steps (1-based, comma-separated) run with the trail's log off; the live run "
            "reads the setting when it starts, so it applies from the next capture run."
        ),
    ] = "",
    snapshot_rows: Annotated[
        int, typer.Option(help="Customers from before joining, snapshotted in step 1 (0: none).")
    ] = 0,
    snapshot_after: Annotated[
        float, typer.Option(help="Minutes into the first step when the snapshot starts.")
    ] = 3,
    snapshot_pace: Annotated[
        bool,
        typer.Option(
            help="Pace the snapshot by the deployment's capture, as `source snapshot` does by "
            "default; --no-snapshot-pace: as fast as the source can."
        ),
    ] = True,
    personal: Annotated[
        bool,
        typer.Option(
            help="Declare personal columns in the shop's policy (PERSONAL: 12 of the 33 values "
            "of each load transaction), and the contexts' actor name and client address, "
            "committed in the trail through salted commitments."
        ),
    ] = False,
    users: Annotated[
        bool,
        typer.Option(
            help="The load's transactions are made by users with a name and a client address "
            "(what --personal declares personal in contexts), not by services."
        ),
    ] = False,
) -> None:
    settings = Settings()
    es = elasticsearch_client(settings.elasticsearch)
    command = "python benchmarks/sustained_load.py " + " ".join(sys.argv[1:])
    load_before = machine_load()
    overrides = {"capture_flush_seconds": flush_seconds} if flush_seconds else {}
    bench = bench_deployment(ENV, "sustained", overrides=overrides)
    root, resources, shop_url, deployment = (
        bench.root,
        bench.resources,
        bench.shop_url,
        bench.deployment,
    )
    pg_url = os.environ["AUDIT_PG_URL"]
    if personal:
        declare_personal(resources)
    snapshot = None
    if snapshot_rows:
        typer.echo(f"{datetime.now(UTC):%H:%M:%S} {snapshot_rows:,} customers before joining")
        prefill(shop_url, resources, snapshot_rows)
        staging = str(root / "staging") if snapshot_pace else None
        snapshot = Snapshot(snapshot_rows, snapshot_after * 60, staging)
    with psycopg.connect(shop_url) as conn:
        conn.execute(
            """SELECT audit.set_context('{"actor": {"type": "service", "id": "bench"}}')"""
        )
        customer = conn.execute(
            "INSERT INTO customers (name, email, password_hash) VALUES ('Load', %s, 'x')"
            " RETURNING id",
            (f"load-{uuid.uuid4().hex[:6]}@example.com",),
        ).fetchone()[0]
        conn.commit()
    off = {int(n) for n in trail_off.split(",") if n}
    steps = [
        Step(int(r), minutes * 60, trail=i not in off)
        for i, r in enumerate(rates.split(","), start=1)
    ]
    try:
        deployment.start()
        deadline = time.time() + 300  # the customer's record first: the live run is going
        while index_stats(es, ENV)[0] < 1 and time.time() < deadline:
            time.sleep(1)
        for n, step in enumerate(steps):
            set_trail(resources, step.trail)
            typer.echo(
                f"{datetime.now(UTC):%H:%M:%S} step: {step.rate} changes/s, {minutes} min, "
                f"trail {'on' if step.trail else 'off'}"
            )
            run_step(
                step,
                deployment,
                shop_url,
                customer,
                bench.key,
                es,
                pg_url,
                writers,
                catch_up,
                snapshot if n == 0 else None,
                resources,
                users,
            )
            typer.echo(
                f"  committed {step.committed}, indexed {step.indexed_after}, "
                f"caught up after {step.caught_up_seconds}"
            )
        snapshotted = snapshot_records(es) if snapshot else 0
        totals = (
            truth_count(shop_url),
            indexed_by_source(es, ENV).get("shop", 0) - snapshotted,
            snapshotted,
        )
        bare = bare_bulk_rate(es, ENV, bare_documents)
    finally:
        deployment.stop()
        typer.echo(f"logs: {deployment.logs}")
        remove_environment(ENV)
    flush = load_environment(resources, ENV).capture_flush_seconds
    lines = report(
        steps, bare, writers, flush, totals, command, (load_before, machine_load()), snapshot
    )
    out = RESULTS / f"sustained_load{'-' + tag if tag else ''}.md"
    out.write_text("# Sustained load through the deployment\n\n" + "\n".join(lines) + "\n")
    raw = [
        {
            "rate": s.rate,
            "lag": s.lag,
            "freshness": s.freshness,
            "cpu": s.cpu,
            "cpu_series": s.cpu_series,
        }
        for s in steps
    ]
    (root / "raw.json").write_text(json.dumps(raw))
    typer.echo("\n".join(lines))
    typer.echo(f"raw series: {root / 'raw.json'}")


if __name__ == "__main__":
    app()
