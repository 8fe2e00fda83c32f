"""A fleet: one environment capturing many sources at once, through the real deployment.

N shop databases on the stack's PostgreSQL are N sources of one environment, captured live: one
long-lived capture run per shard (``capture_shard_<n>_job``, a worker thread per source) kept
alive by ``capture_keeper_sensor``, one Dagster daemon and webserver, the Audit API. Each source
is written at a fixed rate, every transaction with its context, plus one probe transaction a
second whose ``request_id`` is read back through the API. The ground truth is a trigger table in
each source database (``_live.py``), compared with the documents indexed for the source at the
end. It reports, per source: committed (trigger table) against indexed, freshness (commit to
searchable through the API) p50 / p95 / max, retained WAL; in total: whole-machine CPU and CPU per
process group, and the Dagster runs in the window.

Faults (``--faults outage,slot,kill,es`` or ``all``), one at a time from 30% of the load on
(due at 30, 45, 60 and 75%, each at least ``--fault-gap`` seconds after the one before ended; a
fault still going on when the load's time is up extends the load until it ends): the last
source's database refuses connections for ``--outage-seconds`` (then accepts them again); the
one before it loses its slot (dropped, as an invalidated slot is gone to capture), and ``source
setup`` makes it again ``--slot-setup-after`` seconds later (an operator's fix; what was
committed meanwhile is the gap setup records); the capture run's process is SIGKILLed (Dagster's
run monitoring, or the keeper's stale check, fails the run and the keeper starts another);
Elasticsearch is paused (SIGSTOP, then SIGCONT) for ``--es-pause-seconds``. Each fault's
freshness recovery is reported: when the probes of the affected source, and of the others, were
searchable within the steady state's bound again.

Then (``--compare-minutes``, in the same script run) one source alone at the fleet's total rate,
on a deployment of its own: its CPU beside the fleet's.

Run (the issue's target; needs a server with max_replication_slots and max_wal_senders above
the sources): ``eval "$(audit-platform stack env)"; .venv/bin/python benchmarks/fleet.py
--sources 50 --rate 20 --minutes 25 --faults all``. Writes ``benchmarks/results/fleet[-<tag>].md``.
"""

from __future__ import annotations

import atexit
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import psycopg
import typer
import yaml
from _cpu import CpuSampler
from _deployment import BenchDeployment, bench_deployment, remove_environment
from _live import (
    IndexLag,
    ProbePoller,
    SourceLoad,
    all_runs,
    capture_run_kind,
    capture_run_process,
    capture_runs,
    elasticsearch_pid,
    indexed_by_source,
    machine_load,
    marker,
    quantile,
    renice_postgres,
    retained_wal,
    truth_count,
)
from psycopg import sql

from audit_platform.clients import elasticsearch_client
from audit_platform.naming import slot_name
from audit_platform.policy import load_policy
from audit_platform.settings import Settings
from audit_platform.sources.setup import setup_source

RESULTS = Path(__file__).parent / "results"
ENV = "benchfleet"
SINGLE_ENV = "benchfleetone"
FAULTS = ("outage", "slot", "kill", "es")
#: Where in the load each selected fault starts (fraction of the load's duration).
FAULT_AT = (0.3, 0.45, 0.6, 0.75)
app = typer.Typer(add_completion=False)


@dataclass
class Fault:
    name: str
    source: str | None  # the source it hits; None: all of them
    started: float
    ended: float = 0.0
    note: str = ""


@dataclass
class Phase:
    """One deployment's load window and what it measured."""

    bench: BenchDeployment
    loads: dict[str, SourceLoad]
    poller: ProbePoller
    lag: IndexLag | None = None
    started: float = 0.0
    ended: float = 0.0
    cpu: dict[str, float] | None = None
    steady_cpu: dict[str, float] | None = None
    steady_until: float = 0.0
    committed: dict[str, int] | None = None
    indexed: dict[str, int] | None = None
    caught_up: float | None = None
    runs_alive: int = 0
    runs_started: int = 0
    runs_all: int = 0
    retained: dict[str, list[tuple[float, int, int]]] | None = None
    gaps: dict[str, int] | None = None  # changes committed while a source's slot was gone


def check_server(admin: str, slots: int) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        limit = {
            n: int(v)
            for n, v in conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN"
                " ('max_replication_slots', 'max_wal_senders')"
            )
        }
        used = conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone()[0]
        senders = conn.execute("SELECT count(*) FROM pg_stat_replication").fetchone()[0]
    if used + slots > limit["max_replication_slots"] or senders + slots > limit["max_wal_senders"]:
        raise typer.BadParameter(
            f"{slots} sources need {slots} more slots and walsenders: the server has "
            f"{limit['max_replication_slots'] - used} slots and "
            f"{limit['max_wal_senders'] - senders} walsenders free (max_replication_slots "
            f"{limit['max_replication_slots']}, max_wal_senders {limit['max_wal_senders']}); "
            "raise them in postgresql.conf (a restart) or run fewer sources"
        )


def take_down(admin_url: str, url: str, allow: bool) -> None:
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                sql.Identifier(name), sql.SQL("true" if allow else "false")
            )
        )
        if not allow:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )


def drop_slot(url: str, slot: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(100):  # the worker may hold it: end that session, then drop
            conn.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                " WHERE slot_name = %s AND active_pid IS NOT NULL",
                (slot,),
            )
            try:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                return
            except psycopg.errors.ObjectInUse:
                time.sleep(0.1)
    raise RuntimeError(f"could not drop {slot}")


def run_faults(
    selected: list[str],
    phase: Phase,
    seconds: float,
    admin: str,
    outage: float,
    setup_after: float,
    es_pause: float,
    gap: float,
    done: list[Fault],
) -> None:
    """Each selected fault at its point of the load, one at a time, at least ``gap`` seconds
    after the one before ended (its recovery is measured in between)."""
    bench, names = phase.bench, sorted(phase.loads)
    for name, at in zip(selected, FAULT_AT, strict=False):
        due = phase.started + at * seconds
        if done:
            due = max(due, done[-1].ended + gap)
        wait = due - time.time()
        if wait > 0:
            time.sleep(wait)
        stamp = f"{datetime.now(UTC):%H:%M:%S}"
        if name == "outage":
            source = names[-1]
            fault = Fault(name, source, time.time())
            take_down(admin, bench.urls[source], allow=False)
            typer.echo(f"{stamp} fault: {source}'s database refuses connections")
            time.sleep(outage)
            take_down(admin, bench.urls[source], allow=True)
            fault.ended = time.time()
            fault.note = f"{source}'s database refused connections for {outage:.0f} s"
        elif name == "slot":
            source = names[-2]
            fault = Fault(name, source, time.time())
            drop_slot(bench.urls[source], slot_name(ENV, source))
            typer.echo(f"{stamp} fault: {source}'s slot dropped")
            time.sleep(setup_after)
            policy = load_policy(bench.resources / "sources" / f"{source}.yaml")
            setup_source(bench.urls[source], ENV, policy, bench.resources / "sql")
            fault.ended = time.time()
            fault.note = (
                f"{source}'s slot dropped; `source setup` made it again {setup_after:.0f} s later"
            )
        elif name == "kill":
            fault = Fault(name, None, time.time())
            pid = capture_run_process(bench.deployment)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
            fault.ended = time.time()
            fault.note = "the capture run's process SIGKILLed" if pid else "no run process found"
            typer.echo(f"{stamp} fault: run process {pid} SIGKILLed")
        else:
            pid = elasticsearch_pid()
            fault = Fault(name, None, time.time())
            os.kill(pid, signal.SIGSTOP)
            typer.echo(f"{stamp} fault: Elasticsearch ({pid}) paused")
            try:
                time.sleep(es_pause)
            finally:
                os.kill(pid, signal.SIGCONT)
            fault.ended = time.time()
            fault.note = f"Elasticsearch paused (SIGSTOP) for {es_pause:.0f} s"
        done.append(fault)


def sample_wal(
    admin: str, slots: dict[str, str], into: dict, started: float, stop: threading.Event
) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        while not stop.wait(5.0):
            found = retained_wal(conn, list(slots.values()))
            for source, slot in slots.items():
                retained, lag = found.get(slot, (0, 0))
                into.setdefault(source, []).append((time.time() - started, retained, lag))


def run_phase(
    phase: Phase,
    seconds: float,
    catch_up: float,
    admin: str,
    faults: list[str],
    options: tuple[float, float, float, float],
    done: list[Fault],
) -> None:
    bench, loads = phase.bench, phase.loads
    es = elasticsearch_client(Settings().elasticsearch)
    names = sorted(loads)
    bench.deployment.start()
    for load in loads.values():
        load.start()
    phase.poller.start()
    phase.lag = IndexLag(elasticsearch_client(Settings().elasticsearch), bench.deployment.env)
    phase.lag.start()
    # Warm: every source's probes searchable, so the window starts with the run going.
    deadline = time.time() + 300
    while time.time() < deadline:
        if all(phase.poller.freshness(loads[s]) for s in names):
            break
        time.sleep(1)
    else:
        raise RuntimeError(f"not every source was searchable within 300 s: {bench.deployment.logs}")
    phase.started = time.time()
    typer.echo(
        f"{datetime.now(UTC):%H:%M:%S} window: {len(names)} source(s), "
        f"{sum(x.rate for x in loads.values()):.0f} changes/s, {seconds / 60:g} min"
    )
    stop = threading.Event()
    phase.retained = {}
    wal = threading.Thread(
        target=sample_wal,
        daemon=True,
        args=(
            admin,
            {s: slot_name(bench.deployment.env, s) for s in names},
            phase.retained,
            phase.started,
            stop,
        ),
    )
    wal.start()
    mine = marker(bench.deployment)
    cpu, steady = (
        CpuSampler(mine=mine, extra=capture_run_kind(bench.deployment)) for _ in range(2)
    )
    cpu.start()
    steady.start()
    injector = None
    if faults:
        injector = threading.Thread(
            target=run_faults, daemon=True, args=(faults, phase, seconds, admin, *options, done)
        )
        injector.start()
        phase.steady_until = phase.started + FAULT_AT[0] * seconds
        time.sleep(max(0.0, phase.steady_until - time.time()))
        steady_totals = steady.stop()
        phase.steady_cpu = {k: v / (time.time() - phase.started) for k, v in steady_totals.items()}
    time.sleep(max(0.0, phase.started + seconds - time.time()))
    if injector is not None:
        injector.join()  # a fault still going on ends first
    for load in loads.values():
        load.stop.set()
    phase.ended = time.time()
    phase.cpu = {k: v / (phase.ended - phase.started) for k, v in cpu.stop().items()}
    if not faults:
        steady.stop()
        phase.steady_cpu, phase.steady_until = phase.cpu, phase.ended
    time.sleep(1)
    phase.committed = {s: truth_count(bench.urls[s]) for s in names}
    lost = {f.source for f in done if f.name == "slot"}
    deadline = time.time() + catch_up
    while time.time() < deadline:
        indexed = indexed_by_source(es, bench.deployment.env)
        if all(indexed.get(s, 0) >= phase.committed[s] for s in names if s not in lost):
            phase.caught_up = time.time() - phase.ended
            break
        time.sleep(2)
    time.sleep(5)  # the last probes reach the poller; a slot's gap source settles
    phase.poller.close()
    phase.lag.close()
    stop.set()
    phase.indexed = indexed_by_source(es, bench.deployment.env)
    runs = capture_runs(bench.deployment)
    phase.runs_alive = sum(r.alive_during(phase.started, phase.ended) for r in runs)
    phase.runs_started = sum(phase.started <= (r.started or 0) <= phase.ended for r in runs)
    phase.runs_all = all_runs(bench.deployment)
    phase.gaps = {
        f.source: truth_count(bench.urls[f.source], (f.started, f.ended))
        for f in done
        if f.name == "slot"
    }


def new_phase(
    env: str,
    prefix: str,
    names: list[str],
    rate: float,
    writers: int,
    overrides: dict,
    nice: int = 0,
) -> Phase:
    bench = bench_deployment(env, prefix, sources=names, overrides=overrides)
    loads = {s: SourceLoad(s, bench.urls[s], rate, writers, nice) for s in names}
    poller = ProbePoller(bench.deployment.api_url, bench.key, datetime.now(UTC).isoformat(), loads)
    return Phase(bench, loads, poller)


def recovery(
    phase: Phase, fault: Fault, sources: list[str], bound: float, until: float, gaps: list[Fault]
) -> str:
    """Seconds after the fault ended until every probe of ``sources`` committed in the next
    30 s was searchable within ``bound``, looking at probes committed before ``until`` (the
    next fault); the worst freshness until then (probes committed up to 10 s before the fault
    included: they were in flight when it began), and probes never seen. Probes of a source
    committed while its slot was gone (``gaps``) are left out: they are the recorded gap."""
    probes = []
    for s in sources:
        load = phase.loads[s]
        with load.lock:
            items = list(load.probes.items())
        holes = [(g.started, g.ended) for g in gaps if g.source == s]
        probes += [
            (t, phase.poller.seen.get(r))
            for r, t in items
            if fault.started - 10 <= t < until and not any(a <= t <= b for a, b in holes)
        ]
    probes.sort()
    if not probes:
        return "no probes"
    recovered = None
    for i, (t, _) in enumerate(probes):
        if t < fault.ended:
            continue
        window = [(u, seen) for u, seen in probes[i:] if u < t + 30]
        if all(seen is not None and seen - u <= bound for u, seen in window):
            recovered = t
            break
    last = recovered if recovered is not None else float("inf")
    during = [(t, seen) for t, seen in probes if t <= last]
    worst = max((seen - t for t, seen in during if seen is not None), default=float("nan"))
    unseen = sum(seen is None for _, seen in during)
    never = f", {unseen} probes never seen" if unseen else ""
    if recovered is None:
        return (
            f"not before {'the next fault' if until < phase.ended else 'the end'} (worst "
            f"{worst:.1f} s{never})"
        )
    return f"{max(0.0, recovered - fault.ended):.0f} s (worst {worst:.1f} s{never})"


def report(
    fleet: Phase,
    single: Phase | None,
    faults: list[Fault],
    rate: float,
    shards: int,
    command: str,
    load_before: str,
    load_after: str,
) -> list[str]:
    names = sorted(fleet.loads)
    seconds = fleet.ended - fleet.started
    steady = (fleet.started, fleet.steady_until)
    base = [x for s in names for x in fleet.poller.freshness(fleet.loads[s], steady)]
    bound = max(2 * quantile(base, 95), quantile(base, 95) + 5)
    total = sum(fleet.committed.values())
    caught = (
        f"caught up {fleet.caught_up:.0f} s after the load stopped"
        if fleet.caught_up is not None
        else "did not catch up within the wait"
    )
    lines = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on the local stack: one machine "
        f"({os.cpu_count()} cores) shared by PostgreSQL ({len(names)} source databases), "
        "Elasticsearch, the Dagster webserver and daemon with their code servers and the live "
        "capture run, the Audit API and the load itself. "
        f"{len(names)} sources x {rate:g} row changes/s for {seconds / 60:.1f} min, "
        f"{shards} capture shard(s); machine load before: {load_before}; after: {load_after}.",
        "",
        f"Command: `{command}`",
        "",
        f"Total: {total} changes committed (trigger tables, {total / seconds:.0f}/s with the "
        f"warm-up and catch-up), {sum(fleet.indexed.get(s, 0) for s in names)} indexed; "
        f"every source but a dropped slot's {caught}. Dagster runs in the window: "
        f"{fleet.runs_alive} capture run(s) alive, {fleet.runs_started} started; "
        f"{fleet.runs_all} runs in the instance in all.",
        "",
        "| source | committed (truth) | indexed | missing | fresh p50 / p95 / max s | probes "
        "unseen | newest searchable age p50 / p95 s | retained WAL MB max | slot lag MB max |",
        "| --- | ---: | ---: | ---: | --- | ---: | --- | ---: | ---: |",
    ]
    notes = {f.source: f.name for f in faults if f.source}
    for s in names:
        f = fleet.poller.freshness(fleet.loads[s], (fleet.started, fleet.ended))
        age = fleet.lag.lags(s, (fleet.started, fleet.ended))
        series = fleet.retained.get(s) or [(0, 0, 0)]
        note = {"outage": " (database down)", "slot": " (slot dropped)"}.get(notes.get(s), "")
        lines.append(
            f"| {s}{note} | {fleet.committed[s]} | {fleet.indexed.get(s, 0)} | "
            f"{fleet.committed[s] - fleet.indexed.get(s, 0)} | {quantile(f, 50):.1f} / "
            f"{quantile(f, 95):.1f} / {max(f, default=float('nan')):.1f} | "
            f"{fleet.poller.unseen(fleet.loads[s])} | {quantile(age, 50):.1f} / "
            f"{quantile(age, 95):.1f} | {max(r for _, r, _ in series) / 1e6:.1f} | "
            f"{max(g for _, _, g in series) / 1e6:.1f} |"
        )
    every = [x for s in names for x in fleet.poller.freshness(fleet.loads[s])]
    ages = [x for s in names for x in fleet.lag.lags(s, steady)]
    every_age = [x for s in names for x in fleet.lag.lags(s, (fleet.started, fleet.ended))]
    lines += [
        "",
        f"All sources: freshness p50 {quantile(every, 50):.1f} s, p95 "
        f"{quantile(every, 95):.1f} s, max {max(every, default=float('nan')):.1f} s; "
        f"steady state (before any fault) p50 {quantile(base, 50):.1f} s, p95 "
        f"{quantile(base, 95):.1f} s. The newest searchable change's age (sampled every 2 s "
        f"from Elasticsearch, `IndexLag`): steady p50 {quantile(ages, 50):.1f} s, p95 "
        f"{quantile(ages, 95):.1f} s; whole window p50 {quantile(every_age, 50):.1f} s, p95 "
        f"{quantile(every_age, 95):.1f} s.",
    ]
    for s, gap in (fleet.gaps or {}).items():
        lines.append(
            f"{s}: {gap} changes were committed while its slot was gone (by the trigger's "
            "clock): the gap `source setup` records; any other missing ones were committed just "
            "before the drop and not yet read (the slot took them with it)."
        )
    if faults:
        lines += [
            "",
            f"Faults and freshness recovery (seconds after the fault ended until the "
            f"probes of the next 30 s were all searchable within {bound:.1f} s, twice the "
            "steady p95 or p95 + 5 s; probes committed after the next fault began are not "
            "counted):",
            "",
            "| fault | at (min) | affected source | the other sources |",
            "| --- | ---: | --- | --- |",
        ]
        gaps = [f for f in faults if f.name == "slot"]
        for n, fault in enumerate(faults):
            at = (fault.started - fleet.started) / 60
            until = faults[n + 1].started if n + 1 < len(faults) else fleet.ended
            if fault.source:
                others = [s for s in names if s != fault.source]
                mine = recovery(fleet, fault, [fault.source], bound, until, gaps)
            else:
                others, mine = names, "(all)"
            theirs = recovery(fleet, fault, others, bound, until, gaps)
            lines.append(f"| {fault.note} | {at:.1f} | {mine} | {theirs} |")
    phases = [("fleet, steady (before faults)", fleet.steady_cpu)] if faults else []
    phases.append(("fleet, whole window", fleet.cpu))
    if single is not None:
        s_name = next(iter(single.loads))
        f = single.poller.freshness(single.loads[s_name], (single.started, single.ended))
        age = single.lag.lags(s_name, (single.started, single.ended))
        lines += [
            "",
            f"One source alone at the fleet's total rate ({single.loads[s_name].rate:g} "
            f"changes/s, {single.loads[s_name].writers} writer connection(s)) on a deployment "
            f"of its own, right after, for {(single.ended - single.started) / 60:.1f} min: "
            f"committed {single.committed[s_name]}, indexed {single.indexed.get(s_name, 0)}, "
            f"freshness p50 {quantile(f, 50):.1f} s, p95 {quantile(f, 95):.1f} s (newest "
            f"searchable change's age p50 {quantile(age, 50):.1f} s, p95 "
            f"{quantile(age, 95):.1f} s); capture runs "
            f"alive {single.runs_alive}.",
        ]
        phases.append((f"one source at {single.loads[s_name].rate:g}/s", single.cpu))
    kinds = sorted({k for _, cpu in phases for k in cpu})
    lines += [
        "",
        "CPU, in cores (the whole machine and per process group, from /proc; "
        "PostgreSQL and Elasticsearch count every such process on the machine, shared with "
        "other work; Dagster and API processes of other deployments are counted apart; "
        "run worker: the runs other than the capture run, such as health checks and "
        "reconciliation):",
        "",
        "| process | " + " | ".join(p for p, _ in phases) + " |",
        "| --- |" + " ---: |" * len(phases),
    ]
    lines += [
        f"| {k} | " + " | ".join(f"{cpu.get(k, 0):.2f}" for _, cpu in phases) + " |" for k in kinds
    ]
    return lines


@app.command()
def main(
    sources: Annotated[int, typer.Option(help="Number of sources.")] = 50,
    rate: Annotated[float, typer.Option(help="Row changes per second, per source.")] = 20,
    minutes: Annotated[float, typer.Option(help="Minutes of load.")] = 25,
    faults: Annotated[str, typer.Option(help="Comma-separated of outage,slot,kill,es; all.")] = "",
    outage_seconds: Annotated[float, typer.Option(help="How long a database is down.")] = 120,
    slot_setup_after: Annotated[
        float, typer.Option(help="Seconds from a slot's drop to `source setup`.")
    ] = 60,
    es_pause_seconds: Annotated[float, typer.Option(help="How long ES is paused.")] = 30,
    fault_gap: Annotated[
        float, typer.Option(help="Seconds at least between a fault's end and the next.")
    ] = 90,
    compare_minutes: Annotated[
        float, typer.Option(help="Minutes of one source at the total rate (0: none).")
    ] = 10,
    shards: Annotated[int, typer.Option(help="capture_shards of the environment.")] = 1,
    catch_up: Annotated[float, typer.Option(help="Seconds to wait for catch-up.")] = 600,
    tag: Annotated[str, typer.Option(help="Suffix of the results file.")] = "",
    setting: Annotated[
        list[str] | None,
        typer.Option(help="KEY=VALUE of the environment file, for both deployments (repeat)."),
    ] = None,
    sources_nice: Annotated[
        int,
        typer.Option(help="Nice value of PostgreSQL and the load's writers (sources elsewhere)."),
    ] = 0,
) -> None:
    overrides = {"capture_shards": shards}
    for item in setting or []:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    selected = list(FAULTS) if faults == "all" else [f for f in faults.split(",") if f]
    if unknown := set(selected) - set(FAULTS):
        raise typer.BadParameter(f"unknown faults {sorted(unknown)}; choose from {FAULTS}")
    if {"outage", "slot"} & set(selected) and sources < 3:
        raise typer.BadParameter("the outage and slot faults need at least 3 sources")
    admin = os.environ["AUDIT_PG_URL"]
    check_server(admin, sources)
    command = "python benchmarks/fleet.py " + " ".join(sys.argv[1:])
    load_before = machine_load()
    names = [f"fleet{n:02d}" for n in range(sources)]
    done: list[Fault] = []
    if sources_nice:
        typer.echo(f"{renice_postgres(sources_nice)} PostgreSQL processes at nice {sources_nice}")
        atexit.register(renice_postgres, 0)
    fleet = new_phase(ENV, "fleet", names, rate, 1, overrides, sources_nice)
    single = None
    try:
        run_phase(
            fleet,
            minutes * 60,
            catch_up,
            admin,
            selected,
            (outage_seconds, slot_setup_after, es_pause_seconds, fault_gap),
            done,
        )
    finally:
        for load in fleet.loads.values():
            load.stop.set()
        fleet.bench.deployment.stop()
        typer.echo(f"logs: {fleet.bench.deployment.logs} (removed with the environment)")
        for fault in done:  # a database left refusing connections cannot be dropped
            if fault.name == "outage":
                take_down(admin, fleet.bench.urls[fault.source], allow=True)
        remove_environment(ENV)
    lines = report(fleet, None, done, rate, shards, command, load_before, machine_load())
    typer.echo("\n".join(lines))
    remove_environment(ENV, fleet.bench)
    if compare_minutes:
        total = rate * sources
        single = new_phase(
            SINGLE_ENV,
            "fleet-one",
            ["single"],
            total,
            max(1, math.ceil(total / 400)),
            {**overrides, "capture_shards": 1},
            sources_nice,
        )
        try:
            run_phase(single, compare_minutes * 60, catch_up, admin, [], (0, 0, 0, 0), [])
        finally:
            for load in single.loads.values():
                load.stop.set()
            single.bench.deployment.stop()
            remove_environment(SINGLE_ENV, single.bench)
    lines = report(fleet, single, done, rate, shards, command, load_before, machine_load())
    if sources_nice:
        lines[:0] = [
            f"PostgreSQL (standing in for the sources' own servers: its walsenders included) and "
            f"the load's writers ran at nice {sources_nice}, so that the platform's processes "
            "(Dagster, the capture run, Elasticsearch, the API) took the CPU first, as they "
            "would on machines of their own. The whole machine's CPU counts them all.",
            "",
        ]
    out = RESULTS / f"fleet{'-' + tag if tag else ''}.md"
    out.write_text(
        "# A fleet of sources through one deployment (live capture)\n\n" + "\n".join(lines) + "\n"
    )
    typer.echo("\n".join(lines))
    typer.echo(f"written: {out}")


if __name__ == "__main__":
    app()
