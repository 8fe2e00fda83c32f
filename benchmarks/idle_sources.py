"""Idle sources on a busy server: what many configured but quiet sources cost, and how much WAL
their slots make the server keep.

An environment of N sources (shop databases, each with a trigger-table ground truth) none of
which changes, captured live through the real deployment (one long-lived capture run per
shard, a worker thread per source, kept alive by ``capture_keeper_sensor``), while a neighbour
database on the same server, which no slot tracks, commits ~1 KB rows at a steady rate. Logical
decoding is per database but WAL is per server: every idle slot's walsender reads the
neighbour's WAL, and each slot holds it back unless its worker confirms past it (the heartbeat,
``slot_heartbeat_bytes``). Side by side, for the same minutes, a pgoutput slot on another quiet
database that nothing ever confirms (what a slot does without the heartbeat).

Reports the CPU of the idle sources together (the capture run's process, which serves only
them, and the walsenders of their slots, by pid), the rest of the deployment's, the whole
machine's; and each idle slot's retained WAL as the server measures it (``pg_current_wal_lsn()
- restart_lsn``), sampled every ``--sample-seconds``, against the unconfirmed slot's.

Run (the issue's target; needs max_replication_slots and max_wal_senders above the sources,
and max_connections for two connections per source): ``eval "$(audit-platform stack env)";
.venv/bin/python benchmarks/idle_sources.py --sources 200 --minutes 10 --rate 300``. It measures
twice, one deployment after the other: sources that park when quiet (``live.py``; the default
``capture_park_after_seconds``, 120) and sources that never do (0), each ``--minutes`` long.
Writes ``benchmarks/results/idle_sources[-<tag>].md``.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import psycopg
import typer
from _cpu import CpuSampler
from _database import drop_database, fresh_database
from _deployment import bench_deployment, remove_environment
from _live import (
    capture_runs,
    indexed_by_source,
    machine_load,
    marker,
    retained_wal,
    slot_pids,
    truth_count,
)
from fleet import check_server

from audit_platform.clients import elasticsearch_client
from audit_platform.environment import load_environment
from audit_platform.naming import slot_name
from audit_platform.settings import Settings

RESULTS = Path(__file__).parent / "results"
ENV = "benchidle"
NEIGHBOUR = "bench_idle_neighbour"
BASELINE = "bench_idle_baseline"
WALSENDERS = "walsenders of the idle slots"
app = typer.Typer(add_completion=False)


def neighbour(url: str, rate: float, stop: threading.Event, written: list[int]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS busy (id bigserial, note text)")
        start = time.monotonic()
        while not stop.is_set():
            conn.execute("INSERT INTO busy (note) VALUES (repeat('x', 1000))")
            written[0] += 1
            if (wait := start + written[0] / rate - time.monotonic()) > 0:
                time.sleep(wait)


@app.command()
def main(
    sources: Annotated[int, typer.Option(help="Idle sources configured.")] = 200,
    minutes: Annotated[float, typer.Option(help="Minutes the neighbour writes.")] = 10,
    rate: Annotated[float, typer.Option(help="Neighbour transactions (~1 KB) per second.")] = 100,
    shards: Annotated[int, typer.Option(help="capture_shards of the environment.")] = 1,
    sample_seconds: Annotated[float, typer.Option(help="Retained WAL sampled this often.")] = 10,
    tag: Annotated[str, typer.Option(help="Suffix of the results file.")] = "",
    park_after: Annotated[
        list[float] | None,
        typer.Option(
            help="capture_park_after_seconds of a measurement (repeat: one after the other in "
            "this run; 0 never parks). Default: 120, then 0."
        ),
    ] = None,
) -> None:
    admin = os.environ["AUDIT_PG_URL"]
    check_server(admin, sources + 1)
    command = "python benchmarks/idle_sources.py " + " ".join(sys.argv[1:])
    found = [
        measure(admin, sources, minutes, rate, shards, sample_seconds, after)
        for after in park_after or [120.0, 0.0]
    ]
    lines = [
        f"Command: `{command}`",
        "",
        "| capture_park_after_seconds | idle sources' cores (run + walsenders) | their walsenders"
        " | idle slots streaming (median of samples) | max retained WAL of an idle slot (MiB) |",
        "| ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {after:g} | {idle:.3f} | {wal:.3f} | {streams:g} | {kept:.1f} |"
            for after, idle, wal, streams, kept, _ in found
        ),
    ]
    for after, *_, section in found:
        lines += ["", f"## capture_park_after_seconds = {after:g}", "", *section]
    out = RESULTS / f"idle_sources{'-' + tag if tag else ''}.md"
    out.write_text(
        "# Idle sources on a busy server: CPU and retained WAL\n\n" + "\n".join(lines) + "\n"
    )
    typer.echo("\n".join(lines))
    typer.echo(f"written: {out}")


def measure(
    admin: str,
    sources: int,
    minutes: float,
    rate: float,
    shards: int,
    sample_seconds: float,
    park_after: float,
) -> tuple[float, float, float, float, float, list[str]]:
    """One deployment's window: (park_after, the idle sources' cores, their walsenders' cores,
    idle slots streaming (median of samples), the most WAL an idle slot retained in MiB, the
    report's lines)."""
    load_before = machine_load()
    names = [f"idle{n:03d}" for n in range(sources)]
    slots = [slot_name(ENV, s) for s in names]
    overrides = {"capture_shards": shards, "capture_park_after_seconds": park_after}
    bench = bench_deployment(ENV, "idle", sources=names, overrides=overrides)
    deployment = bench.deployment
    heartbeat = load_environment(bench.resources, ENV).slot_heartbeat_bytes
    neighbour_url = fresh_database(admin, NEIGHBOUR)
    baseline_url = fresh_database(admin, BASELINE)
    with psycopg.connect(baseline_url, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (BASELINE,))
    samples: list[tuple[float, dict[str, int], int]] = []
    streams: list[int] = []  # idle slots with a walsender, per sample
    stop, written = threading.Event(), [0]
    try:
        deployment.start()
        with psycopg.connect(admin, autocommit=True) as conn:
            deadline = time.time() + 600  # every idle slot held by its worker (then it may park)
            ever: set[str] = set()
            while len(ever) < sources and time.time() < deadline:
                ever |= set(slot_pids(conn, slots))
                time.sleep(2)
            held = len(ever)
            typer.echo(f"{datetime.now(UTC):%H:%M:%S} {held} of {sources} idle slots held")
            held_at = time.time()

            def walsenders() -> dict[int, str]:
                with psycopg.connect(admin, autocommit=True) as c:
                    return dict.fromkeys(slot_pids(c, slots).values(), WALSENDERS)

            # Warm: every idle slot confirmed past the WAL of the setup (databases made, slots
            # created), so the window measures the steady state, not that backlog.
            first = retained_wal(conn, slots)
            setup_backlog = max((r for r, _ in first.values()), default=0)
            while time.time() < deadline:
                kept = [r for r, _ in retained_wal(conn, slots).values()]
                if kept and max(kept) < heartbeat:
                    break
                time.sleep(2)
            # With parking, the window starts once the quiet sources have parked (most of them:
            # one may be awake to confirm), so it measures their steady state too.
            while park_after and time.time() < deadline + park_after:
                if len(slot_pids(conn, slots)) <= sources // 20:
                    break
                time.sleep(2)
            warmed = time.time()
            cpu = CpuSampler(extra=walsenders, mine=marker(deployment))
            cpu.start()
            started = time.time()
            lsn0 = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
            writer = threading.Thread(
                target=neighbour, args=(neighbour_url, rate, stop, written), daemon=True
            )
            writer.start()
            while time.time() - started < minutes * 60:
                found = retained_wal(conn, [*slots, BASELINE])
                baseline = found.pop(BASELINE, (0, 0))[0]
                samples.append(
                    (time.time() - started, {s: r for s, (r, _) in found.items()}, baseline)
                )
                streams.append(len(slot_pids(conn, slots)))
                time.sleep(sample_seconds)
            stop.set()
            writer.join(timeout=10)
            ended = time.time()
            cpu_totals = cpu.stop()
            wal = conn.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)::bigint", (lsn0,)
            ).fetchone()[0]
        runs = capture_runs(deployment)
        es = elasticsearch_client(Settings().elasticsearch)
        indexed = sum(indexed_by_source(es, ENV).values())
        truth = sum(truth_count(bench.urls[s]) for s in names)
    finally:
        stop.set()
        deployment.stop()
        typer.echo(f"logs: {deployment.logs}")
        drop_database(admin, NEIGHBOUR)
        drop_database(admin, BASELINE)
        remove_environment(ENV, bench)
    seconds = ended - started
    cores = {k: v / seconds for k, v in cpu_totals.items()}
    mb = 1024**2
    per_slot_max = {s: max(x[1].get(s, 0) for x in samples) for s in slots}
    over = sum(v > heartbeat for v in per_slot_max.values())
    idle_cores = cores.get("run worker", 0) + cores.get(WALSENDERS, 0)
    lines = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on the local stack ({os.cpu_count()} "
        f"cores, shared; machine load before: {load_before}; after: {machine_load()}). "
        f"{sources} idle sources of one environment ({shards} capture shard(s)), "
        f"{held} of their slots held by the live run (each at least once: a parked source lets "
        f"its slot go); before the window, each idle slot was waited for until it retained "
        f"less than the heartbeat threshold (the setup's WAL, at most "
        f"{setup_backlog / mb:.0f} MiB, was confirmed), and, when sources park, until most had "
        f"parked: {warmed - held_at:.0f} s after the slots were held. Then a neighbour "
        f"database committed {written[0]} transactions of one ~1 KB row ({written[0] / seconds:.0f}"
        f"/s) for {seconds / 60:.1f} min, {wal / mb:.0f} MiB of WAL. Heartbeat threshold "
        f"{heartbeat / mb:.0f} MiB (`slot_heartbeat_bytes`).",
        "",
        f"Ground truth: the idle sources' trigger tables hold {truth} changes; {indexed} "
        f"documents were indexed. Capture runs alive in the window: "
        f"{sum(r.alive_during(started, ended) for r in runs)}.",
        "",
        "CPU, in cores (from /proc; the walsenders by the pids serving the idle slots; "
        "PostgreSQL and Elasticsearch count every such process on the machine, shared with "
        "other work; Dagster and API processes of other deployments are counted apart):",
        "",
        "| process | cores |",
        "| --- | ---: |",
        *(f"| {k} | {v:.3f} |" for k, v in sorted(cores.items())),
        "",
        f"The idle sources together (capture run process + their walsenders): "
        f"{idle_cores:.3f} cores, {idle_cores / sources * 1000:.2f} ms of CPU per second per "
        "idle source.",
        "",
        "Retained WAL (MiB), server-side `pg_current_wal_lsn() - restart_lsn`:",
        "",
        "| seconds | idle slots: median | idle slots: max | unconfirmed slot | streaming |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    step = max(1, round(60 / sample_seconds))
    rows = list(zip(samples, streams, strict=True))
    for (t, found, baseline), open_ in rows[::step] + ([rows[-1]] if len(rows) % step != 1 else []):
        values = list(found.values()) or [0]
        lines.append(
            f"| {t:.0f} | {statistics.median(values) / mb:.1f} | {max(values) / mb:.1f} | "
            f"{baseline / mb:.1f} | {open_} |"
        )
    lines += [
        "",
        f"Per idle slot over the window: max retained median "
        f"{statistics.median(per_slot_max.values()) / mb:.1f} MiB, max of all "
        f"{max(per_slot_max.values()) / mb:.1f} MiB; {over} of {sources} slots ever above the "
        f"heartbeat threshold. Unconfirmed slot at the end: {samples[-1][2] / mb:.1f} MiB.",
    ]
    lines += [
        "",
        "Each idle slot: retained WAL (MiB) max over the window and at the end:",
        "",
        "| slot | max | at the end |",
        "| --- | ---: | ---: |",
        *(
            f"| {slot} | {per_slot_max[slot] / mb:.1f} | {samples[-1][1].get(slot, 0) / mb:.1f} |"
            for slot in slots
        ),
    ]
    worst = max(per_slot_max.values()) / mb
    return (
        park_after,
        idle_cores,
        cores.get(WALSENDERS, 0),
        statistics.median(streams),
        worst,
        lines,
    )


if __name__ == "__main__":
    app()
