"""Stream delivery through the real deployment, under a steady load, with the delivering run killed.

The local deployment (Dagster webserver and daemon, whose keeper sensor keeps the live capture
run going; that run delivers the streams) serves an environment that copies ``dev``. A webhook
stream points at a receiver in this process that verifies every delivery's Standard Webhooks
signature (with the specification's library, as a receiver would), and records per message its
``webhook-id``, arrival time and records. The shop is written at a fixed rate
(``sustained_load.Load``: transactions of five changes with their context, one probe a second),
and, ``--kill-after`` minutes in, the live run's process is SIGKILLed: the keeper starts the next
run, which takes over the slot and the stream's cursor.

Reported:
- delivery lag behind indexing: a message's arrival against the time its feed entry was written,
  which is after its documents were accepted (the message's ``timestamp``), per record; p50, p95,
  p99 and max, over the whole run and apart from the minute after the kill;
- commit to delivery (arrival against the record's commit time), for comparison;
- records delivered against records indexed (Elasticsearch) and changes committed (a trigger
  table in the shop database, the ground truth), once caught up;
- duplicates: messages received more than once (same ``webhook-id``), and their records;
  bounded by one message per stream and source per kill, as docs/design.md says.

Run: ``eval "$(audit-platform stack env)"; .venv/bin/python benchmarks/stream_delivery.py
--rate 1000 --minutes 30``. Writes ``benchmarks/results/stream_delivery[-<tag>].md``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Annotated

import psycopg
import typer
from _deployment import bench_deployment, remove_environment
from _live import capture_run_process, machine_load, quantile, truth_count
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from sustained_load import Load

from audit_platform.clients import elasticsearch_client
from audit_platform.naming import read_alias
from audit_platform.settings import Settings
from audit_platform.streams.definitions import create_stream

RESULTS = Path(__file__).parent / "results"
ENV = "benchstream"
app = typer.Typer(add_completion=False)


@dataclass
class Received:
    """What the receiver saw: per accepted message its id, arrival and records' (id, commit
    time); and the signatures it refused."""

    secret: str = ""
    messages: list[tuple[str, float, float, list[tuple[str, float]]]] = field(default_factory=list)
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, headers, body: bytes) -> bool:
        arrived = time.time()
        try:
            message = Webhook(self.secret).verify(body, dict(headers))
        except WebhookVerificationError:
            with self.lock:
                self.refused += 1
            return False
        indexed = datetime.fromisoformat(message["timestamp"]).timestamp()
        records = [
            (r["id"], datetime.fromisoformat(r["@timestamp"]).timestamp())
            for r in message["data"]["records"]
        ]
        with self.lock:
            self.messages.append((headers["webhook-id"], arrived, indexed, records))
        return True


def serve(received: Received) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            self.send_response(200 if received.take(self.headers, body) else 401)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def indexed_ids(es) -> set[str]:
    es.indices.refresh(index=read_alias(ENV))
    found: set[str] = set()
    body = {"query": {"match_all": {}}, "_source": False, "size": 10_000, "sort": ["_doc"]}
    page = es.search(index=read_alias(ENV), scroll="2m", **body)
    while hits := page["hits"]["hits"]:
        found.update(hit["_id"] for hit in hits)
        page = es.scroll(scroll_id=page["_scroll_id"], scroll="2m")
    es.clear_scroll(scroll_id=page["_scroll_id"])
    return found


def _row(name: str, values: list[float]) -> str:
    cells = [quantile(values, q) for q in (50, 95, 99)] + [max(values, default=float("nan"))]
    return f"| {name} | {len(values):,} | " + " | ".join(f"{v:.2f}" for v in cells) + " |"


@app.command()
def main(
    rate: Annotated[int, typer.Option(help="Row changes per second.")] = 1000,
    minutes: Annotated[float, typer.Option(help="Minutes of load.")] = 30,
    kill_after: Annotated[
        float, typer.Option(help="Minutes into the load when the delivering run is SIGKILLed.")
    ] = 10,
    writers: Annotated[int, typer.Option(help="Writer connections.")] = 2,
    catch_up: Annotated[float, typer.Option(help="Seconds to wait for delivery after.")] = 300,
    tag: Annotated[str, typer.Option(help="Suffix of the results file.")] = "",
) -> None:
    settings = Settings()
    es = elasticsearch_client(settings.elasticsearch)
    command = "python benchmarks/stream_delivery.py " + " ".join(sys.argv[1:])
    load_before = machine_load()
    bench = bench_deployment(ENV, "streams")
    received = Received()
    server = serve(received)
    url = f"http://127.0.0.1:{server.server_address[1]}/audit"
    with psycopg.connect(os.environ["AUDIT_PG_URL"], autocommit=True) as conn:
        received.secret = (
            create_stream(conn, ENV, "bench", "webhook", url, created_by="benchmark").secret or ""
        )
    with psycopg.connect(bench.shop_url) as conn:
        conn.execute("""SELECT audit.set_context('{"actor": {"type": "service", "id": "b"}}')""")
        customer = conn.execute(
            "INSERT INTO customers (name, email, password_hash) VALUES ('Load', 'l@x.io', 'x')"
            " RETURNING id"
        ).fetchone()[0]
        conn.commit()
    killed: list[tuple[float, int | None]] = []
    try:
        bench.deployment.start()
        deadline = time.time() + 300  # the customer's record delivered: all is going
        while not received.messages and time.time() < deadline:
            time.sleep(1)
        typer.echo(f"{datetime.now(UTC):%H:%M:%S} load: {rate} changes/s for {minutes} min")
        load = Load(bench.shop_url, customer, rate, writers)

        def kill() -> None:
            pid = capture_run_process(bench.deployment)
            killed.append((time.time(), pid))
            if pid:
                os.kill(pid, signal.SIGKILL)
            typer.echo(f"{datetime.now(UTC):%H:%M:%S} delivering run {pid} SIGKILLed")

        timer = threading.Timer(kill_after * 60, kill) if kill_after < minutes else None
        if timer:
            timer.start()
        started = time.time()
        load.run(minutes * 60)
        ended = time.time()
        truth = truth_count(bench.shop_url)
        deadline = time.time() + catch_up
        while time.time() < deadline:  # every change indexed, every record delivered
            es.indices.refresh(index=read_alias(ENV))
            count = es.count(index=read_alias(ENV))["count"]
            with received.lock:
                delivered = {i for m in received.messages for i, _ in m[3]}
            if count >= truth and len(delivered) >= count:
                break
            time.sleep(2)
        caught_up = time.time() - ended
        time.sleep(5)
        indexed = indexed_ids(es)
    finally:
        bench.deployment.stop()
        server.shutdown()
        typer.echo(f"logs: {bench.deployment.logs}")
        remove_environment(ENV)
        with psycopg.connect(os.environ["AUDIT_PG_URL"], autocommit=True) as conn:
            conn.execute(
                "UPDATE audit_platform.streams SET deleted_at = now(), deleted_by = 'benchmark'"
                " WHERE env = %s AND deleted_at IS NULL",
                (ENV,),
            )
    seen = Counter(m[0] for m in received.messages)
    repeated = {k for k, n in seen.items() if n > 1}
    records = Counter(i for m in received.messages for i, _ in m[3])
    first: dict[str, tuple[float, float, float]] = {}
    for _, arrived, indexed_at, recs in received.messages:
        for record_id, committed in recs:
            first.setdefault(record_id, (arrived, indexed_at, committed))
    behind = [a - i for a, i, _ in first.values()]
    kill_at = killed[0][0] if killed else None
    steady = [
        a - i for a, i, _ in first.values() if kill_at is None or not kill_at <= a <= kill_at + 60
    ]
    commit = [a - c for a, _, c in first.values()]
    lines = [
        "# Stream delivery through the deployment",
        "",
        f"Command: `{command}`, run {datetime.fromtimestamp(started, UTC):%Y-%m-%d %H:%M} to "
        f"{datetime.fromtimestamp(ended, UTC):%H:%M} UTC; machine before: {load_before}, after: "
        f"{machine_load()}.",
        "",
        f"One webhook stream (every record), receiver in the benchmark verifying signatures; "
        f"{rate} changes/s for {minutes:g} min; the live capture run (which delivers) "
        + (
            f"SIGKILLed at {datetime.fromtimestamp(kill_at, UTC):%H:%M:%S} (pid {killed[0][1]})."
            if kill_at
            else "not killed."
        ),
        "",
        "| seconds | records | p50 | p95 | p99 | max |",
        "| --- | --- | --- | --- | --- | --- |",
        _row("delivery behind indexing (feed entry written to arrival)", behind),
        _row("the same, apart from the minute after the kill", steady),
        _row("commit to delivery", commit),
        "",
        "| count | value |",
        "| --- | --- |",
        f"| changes committed (trigger table) | {truth:,} |",
        f"| records indexed (Elasticsearch) | {len(indexed):,} |",
        f"| records delivered (distinct) | {len(records):,} |",
        f"| indexed and not delivered | {len(indexed - set(records)):,} |",
        f"| delivered and not indexed | {len(set(records) - indexed):,} |",
        f"| messages received | {sum(seen.values()):,} |",
        f"| messages received more than once | {len(repeated):,} |",
        f"| records received more than once | {sum(1 for n in records.values() if n > 1):,} |",
        f"| signatures refused | {received.refused} |",
        f"| caught up after the load | {caught_up:.1f} s |",
    ]
    out = RESULTS / f"stream_delivery{'-' + tag if tag else ''}.md"
    out.write_text("\n".join(lines) + "\n")
    typer.echo("\n".join(lines))


if __name__ == "__main__":
    app()
