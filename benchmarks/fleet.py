"""A fleet: one environment capturing many sources at once, through the real deployment.

Ten shop databases (by default) on the stack's PostgreSQL are ten sources of one environment:
ten slots, ten capture sensors, ten capture jobs, one Dagster daemon, the run queue of
``dagster.yaml`` (at most 8 runs at once, one per slot). Each source is written at a fixed rate,
every transaction with its context, plus one probe transaction a second whose ``request_id`` the
API is polled for. It reports, per source: freshness (commit to searchable through the API)
p50 / p95, slot lag median / max, runs, committed and indexed; in total: sustained throughput and
each process's CPU share, the Dagster daemon's in particular.

With ``--faults``, half-way through, the last source's database refuses connections (an outage)
and the one before it loses its slot (dropped, as an invalidated slot is gone to capture): the
other sources' freshness before and after shows whether either held them up.

Run: ``eval "$(audit-platform stack env)"; .venv/bin/python benchmarks/fleet.py --sources 10
--rate 50 --minutes 12 --faults``. Writes ``benchmarks/results/fleet[-<tag>].md``.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import psycopg
import typer
import yaml
from _cpu import CpuSampler
from _database import drop_database
from psycopg import sql
from sustained_load import Load, index_stats, poll_probes, quantile

from audit_platform.api_keys import create_key
from audit_platform.clients import elasticsearch_client
from audit_platform.environment import load_environment
from audit_platform.policy import load_policy
from audit_platform.settings import Settings
from audit_platform.sources.setup import setup_source
from audit_platform.stack.deployment import LocalDeployment, ensure_database
from audit_platform.stack.system import free_port

RESULTS = Path(__file__).parent / "results"
ENV = "benchfleet"
RUNS = """
query { runsOrError(filter: {pipelineName: "capture_%s_job"}, limit: 100000) {
  ... on Runs { results { status startTime endTime } } } }"""
app = typer.Typer(add_completion=False)


def prepare(sources: list[str], admin_url: str) -> tuple[Path, Path, dict[str, str]]:
    """A copy of the resources with an environment of these sources, and their databases."""
    root = Path(tempfile.mkdtemp(prefix="fleet-"))
    resources = root / "resources"
    shutil.copytree(Settings().resources_dir, resources)
    environment = yaml.safe_load((resources / "environments" / "dev.yaml").read_text())
    environment["sources"] = {s: {"url_env": f"AUDIT_SOURCE_{s.upper()}_URL"} for s in sources}
    (resources / "environments" / f"{ENV}.yaml").write_text(yaml.safe_dump(environment))
    shop_policy = (resources / "sources" / "shop.yaml").read_text()
    urls = {}
    for source in sources:
        (resources / "sources" / f"{source}.yaml").write_text(
            shop_policy.replace("source: shop", f"source: {source}")
        )
        name = f"{source}_{ENV}"
        drop_database(admin_url, name)
        url = ensure_database(admin_url, name)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute((resources / "demo" / "shop.sql").read_text())
        setup_source(url, ENV, load_policy(resources / "sources" / f"{source}.yaml"),
                     resources / "sql")  # fmt: skip
        urls[source] = url
    return root, resources, urls


def new_customer(url: str) -> int:
    with psycopg.connect(url) as conn:
        conn.execute(
            """SELECT audit.set_context('{"actor": {"type": "service", "id": "bench"}}')"""
        )
        return conn.execute(
            "INSERT INTO customers (name, email, password_hash) VALUES ('Load', %s, 'x')"
            " RETURNING id", (f"load-{uuid.uuid4().hex[:6]}@example.com",),
        ).fetchone()[0]  # fmt: skip


def sample_lag(pg_url: str, lags: dict[str, list[int]], started: float,
               stop: threading.Event) -> None:  # fmt: skip
    with psycopg.connect(pg_url, autocommit=True) as conn:
        while not stop.wait(5.0):
            for slot, lag in conn.execute(
                "SELECT slot_name, pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)"
                "::bigint FROM pg_replication_slots WHERE slot_name LIKE %s",
                (f"audit_{ENV}_%",),
            ):
                lags.setdefault(slot.removeprefix(f"audit_{ENV}_"), []).append(lag or 0)


def take_down(admin_url: str, url: str) -> None:
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(
            sql.Identifier(name)))  # fmt: skip
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                      (name,))  # fmt: skip


def drop_slot(url: str, source: str) -> None:
    slot = f"audit_{ENV}_{source}"
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(50):  # a capture run may hold it: end that session, then drop
            conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                         " WHERE slot_name = %s AND active_pid IS NOT NULL", (slot,))  # fmt: skip
            try:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                return
            except psycopg.errors.ObjectInUse:
                time.sleep(0.2)
    raise RuntimeError(f"could not drop {slot}")


@app.command()
def main(
    sources: Annotated[int, typer.Option(help="Number of sources.")] = 10,
    rate: Annotated[int, typer.Option(help="Row changes per second, per source.")] = 50,
    minutes: Annotated[float, typer.Option(help="Minutes of load.")] = 12,
    faults: Annotated[bool, typer.Option(help="Half-way: one source down, one slot lost.")] = False,
    catch_up: Annotated[float, typer.Option(help="Seconds to wait for catch-up.")] = 300,
    tag: Annotated[str, typer.Option(help="Suffix of the results file.")] = "",
) -> None:
    settings = Settings()
    es = elasticsearch_client(settings.elasticsearch)
    for index in es.indices.get(index=f"audit-{ENV}-*"):
        es.indices.delete(index=index)
    admin = os.environ["AUDIT_PG_URL"]
    names = [f"fleet{n:02d}" for n in range(sources)]
    drop_database(admin, f"dagster_{ENV}")
    root, resources, urls = prepare(names, admin)
    exports = {k: v for k, v in os.environ.items() if k.startswith("AUDIT_")}
    deployment = LocalDeployment(exports, ENV, root, urls, dagster_port=free_port(),
                                 api_port=free_port(), resources_dir=resources)  # fmt: skip
    deployment.prepare()
    with psycopg.connect(admin, autocommit=True) as conn:
        key = create_key(conn, ENV, "fleet benchmark").secret
    customers = {s: new_customer(u) for s, u in urls.items()}
    down, lost = (names[-1], names[-2]) if faults else (None, None)
    loads = {s: Load(urls[s], customers[s], rate, 1) for s in names}
    seen: dict[str, float] = {}
    lags: dict[str, list[int]] = {}
    stop = threading.Event()
    fault_at = None
    try:
        deployment.start()
        deadline = time.time() + 300  # every source's first record, so the clock starts warm
        while time.time() < deadline:
            es.indices.refresh(index=f"audit-{ENV}-*")
            if all(index_stats(es, f"{ENV}-{s}")[0] >= 1 for s in names):
                break
            time.sleep(2)
        docs_before = {s: index_stats(es, f"{ENV}-{s}")[0] for s in names}
        started = time.time()
        since = datetime.now(UTC).isoformat()
        helpers = [
            threading.Thread(target=poll_probes, args=(deployment.api_url, key, since, seen, stop)),
            threading.Thread(target=sample_lag, args=(admin, lags, started, stop)),
        ]
        for thread in helpers:
            thread.start()
        cpu = CpuSampler()
        cpu.start()
        typer.echo(f"{datetime.now(UTC):%H:%M:%S} load: {sources} sources x {rate} changes/s")
        workers = {s: threading.Thread(target=loads[s].run, args=(minutes * 60,)) for s in names}
        if faults:
            # The source that goes down stops writing then: its load would only fail.
            workers[down] = threading.Thread(target=loads[down].run, args=(minutes * 30,))
        for worker in workers.values():
            worker.start()
        if faults:
            time.sleep(minutes * 30)
            fault_at = time.time()
            workers[down].join()
            take_down(admin, urls[down])
            drop_slot(urls[lost], lost)
            typer.echo(f"{datetime.now(UTC):%H:%M:%S} {down} down, {lost}'s slot dropped")
        for worker in workers.values():
            worker.join()
        ended = time.time()
        shares = {k: v / (ended - started) for k, v in cpu.stop().items()}
        healthy = [s for s in names if s not in (down, lost)]
        committed = {s: loads[s].committed for s in names}
        caught_up = None
        deadline = ended + catch_up
        while time.time() < deadline:
            if all(index_stats(es, f"{ENV}-{s}")[0] - docs_before[s] >= committed[s]
                   for s in healthy):  # fmt: skip
                caught_up = time.time() - ended
                break
            time.sleep(2)
        time.sleep(2)
        runs = {s: [r for r in deployment_runs(deployment, s) if started <= r[0] <= ended]
                for s in names}  # fmt: skip
    finally:
        stop.set()
        deployment.stop()
    indexed = {s: index_stats(es, f"{ENV}-{s}")[0] - docs_before[s] for s in names}
    interval = load_environment(resources, ENV).capture_flush_seconds
    lines = report(names, loads, seen, lags, runs, committed, indexed, shares, started, ended,
                   fault_at, down, lost, caught_up, rate, interval)  # fmt: skip
    out = RESULTS / f"fleet{'-' + tag if tag else ''}.md"
    out.write_text("# A fleet of sources through one deployment\n\n" + "\n".join(lines) + "\n")
    typer.echo("\n".join(lines))
    typer.echo(f"logs: {deployment.logs}")


def deployment_runs(deployment: LocalDeployment, source: str) -> list[tuple[float, float]]:
    """(start, duration) of the source's finished capture runs, from Dagster's run records."""
    found = deployment.graphql(RUNS % source)["runsOrError"]["results"]
    return sorted((r["startTime"], r["endTime"] - r["startTime"])
                  for r in found if r["startTime"] and r["endTime"])  # fmt: skip


def report(names, loads, seen, lags, runs, committed, indexed, shares, started, ended, fault_at,
           down, lost, caught_up, rate, interval) -> list[str]:  # fmt: skip
    seconds = ended - started

    def fresh(source: str, after: bool | None = None) -> list[float]:
        return [seen[r] - t for r, t in loads[source].probes.items() if r in seen and (
            after is None or fault_at is None or (t >= fault_at) == after)]  # fmt: skip

    healthy = [s for s in names if s not in (down, lost)]
    total_committed = sum(committed[s] for s in names)
    caught = (f"{caught_up:.0f} s after the load stopped." if caught_up is not None
              else "not within the wait.")  # fmt: skip
    lines = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on the local stack: one 2-core machine "
        f"shared by PostgreSQL ({len(names)} source databases), Elasticsearch (1 GB heap), the "
        "Dagster webserver and daemon with their code servers and run processes, the Audit API "
        f"and the load itself. {len(names)} sources x {rate} row changes/s for "
        f"{seconds / 60:.1f} min; capture sensor interval {interval} s; at most 8 runs at once, "
        "one per slot (dagster.yaml).",
        "",
        f"Total: {total_committed} changes committed ({total_committed / seconds:.0f}/s), "
        f"{sum(indexed.values())} indexed; the healthy sources caught up "
        + caught
        + f" Dagster daemon: {shares.get('dagster daemon', 0):.2f} cores; run workers: "
        f"{shares.get('run worker', 0):.2f}; code server: "
        f"{shares.get('dagster code server', 0):.2f}.",
        "",
        "| source | committed | indexed | runs | run s median | slot lag MB median / max "
        "| fresh p50 / p95 / max s |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for s in names:
        f = fresh(s)
        lag = [b / 1e6 for b in lags.get(s, [])] or [0.0]
        durations = [d for _, d in runs[s]]
        note = " (down half-way)" if s == down else " (slot dropped half-way)" if s == lost else ""
        lines.append(
            f"| {s}{note} | {committed[s]} | {indexed[s]} | {len(runs[s])} | "
            f"{statistics.median(durations) if durations else float('nan'):.1f} | "
            f"{statistics.median(lag):.1f} / {max(lag):.1f} | {quantile(f, 50):.1f} / "
            f"{quantile(f, 95):.1f} / {max(f, default=float('nan')):.1f} |"
        )
    if fault_at is not None:
        before = [x for s in healthy for x in fresh(s, after=False)]
        after = [x for s in healthy for x in fresh(s, after=True)]
        lines += [
            "",
            f"The other {len(healthy)} sources, before and after {down} went down and {lost}'s "
            f"slot was dropped: freshness p50 / p95 {quantile(before, 50):.1f} / "
            f"{quantile(before, 95):.1f} s before, {quantile(after, 50):.1f} / "
            f"{quantile(after, 95):.1f} s after.",
        ]
    lines += ["", "CPU, in cores (2 available):", "", "| process | cores |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in sorted(shares.items())]
    return lines


if __name__ == "__main__":
    app()
