"""What recording transaction context costs the source database, measured with pgbench.

Variants, all on pgbench's tpcb-like transaction, run interleaved in one session so that the
machine's noise hits them alike:

- ``none``: no auditing at all (the baseline).
- ``message``: this project: ``audit.set_context`` (a transactional logical message) sent in the
  same round trip as ``BEGIN``, REPLICA IDENTITY FULL on the tables, and the pgoutput slot
  consumed during the run the way capture consumes it: a bulk read of everything new every
  ``--poll`` seconds (``pg_logical_slot_get_binary_changes``, one decode per change).
- ``row``: the same, but the context is written as a row of a context table (published too).
- ``trigger``: the classic approach: row triggers writing old and new row as jsonb into an
  audit table.
- ``slot``: REPLICA IDENTITY FULL and the consumed slot without any context call: the part of
  ``message``'s cost that is change data capture itself.
- ``statement``: ``slot`` plus an empty ``SELECT NULL`` in the same message as ``BEGIN``: what
  one more statement costs by itself, to tell the context function's cost from the statement's.
- ``emit`` (a diagnostic, only with ``--only``): ``pg_logical_emit_message`` called directly with
  the same context, no validation and no PL/pgSQL: the message's own cost.
- ``message_stream``: ``message`` with the slot streamed continuously by ``pg_recvlogical``
  instead, to show what an always-connected consumer costs on the same two cores.

The consumer's last bulk read happens after pgbench stops, so at most ``--poll`` seconds of
decoding fall outside each timed run; runs are long (90 s) to keep that share small, and the
report says so.

Run: ``eval "$(audit-platform stack env)"; .venv/bin/python benchmarks/context_write_cost.py``
Writes ``benchmarks/results/context_write_cost.md`` and prints the same table.
"""

from __future__ import annotations

import json
import random
import re
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import psycopg
import typer
from _database import drop_database, fresh_database
from psycopg import sql

from audit_platform.settings import Settings
from audit_platform.sources.setup import apply_migrations
from audit_platform.stack.postgres import find_bindir

RESULTS = Path(__file__).parent / "results" / "context_write_cost.md"
DB = "bench_write_cost"
SLOT = "bench_write_cost"
VARIANTS = ["none", "message", "row", "trigger", "slot", "statement", "message_stream"]
#: Variants that run with a logical slot consumed during the run.
CAPTURED = {"message", "row", "slot", "message_stream", "statement", "emit"}
TABLES = ["pgbench_accounts", "pgbench_tellers", "pgbench_branches", "pgbench_history"]

CONTEXT = {
    "actor": {"type": "user", "id": "u-:aid", "name": "Bench User"},
    "service": "payments-api",
    "request_id": "req-:aid-:tid",
    "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    "reason": "transfer",
    "client_addr": "203.0.113.7",
}

TPCB = """\\set aid random(1, 100000 * :scale)
\\set bid random(1, 1 * :scale)
\\set tid random(1, 10 * :scale)
\\set delta random(-5000, 5000)
{begin}
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime)
  VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
END;
"""

SETUP_SQL = """
CREATE TABLE IF NOT EXISTS audit.context_rows (
    xid xid8 PRIMARY KEY DEFAULT pg_current_xact_id(),
    context jsonb NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE OR REPLACE FUNCTION audit.set_context_row(ctx jsonb) RETURNS void
LANGUAGE plpgsql VOLATILE AS $fn$
BEGIN
    PERFORM audit.validate_context(ctx);
    INSERT INTO audit.context_rows (context) VALUES (ctx)
    ON CONFLICT (xid) DO UPDATE SET context = audit.context_rows.context || EXCLUDED.context;
END
$fn$;
CREATE TABLE IF NOT EXISTS trigger_audit_log (
    id bigserial PRIMARY KEY,
    table_name text NOT NULL,
    operation text NOT NULL,
    old_row jsonb,
    new_row jsonb,
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    changed_at timestamptz NOT NULL DEFAULT now()
);
CREATE OR REPLACE FUNCTION trigger_audit() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO trigger_audit_log (table_name, operation, old_row, new_row)
    VALUES (TG_TABLE_NAME, TG_OP,
            CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END,
            CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END);
    RETURN NULL;
END
$fn$;
"""

app = typer.Typer(add_completion=False)


def _prepare(admin_url: str, bindir: Path, scale: int) -> str:
    url = fresh_database(admin_url, DB)
    subprocess.run(
        [str(bindir / "pgbench"), "-i", "-q", "-s", str(scale), url],
        check=True,
        capture_output=True,
    )
    with psycopg.connect(url, autocommit=True) as conn:
        apply_migrations(conn, Settings().resources_dir / "sql")
        conn.execute(SETUP_SQL)
        for table in TABLES:
            conn.execute(
                sql.SQL(
                    "CREATE TRIGGER audit_row AFTER INSERT OR UPDATE OR DELETE ON {}"
                    " FOR EACH ROW EXECUTE FUNCTION trigger_audit()"
                ).format(sql.Identifier(table))
            )
            conn.execute(
                sql.SQL("ALTER TABLE {} DISABLE TRIGGER audit_row").format(sql.Identifier(table))
            )
        conn.execute(
            "CREATE PUBLICATION bench FOR TABLE pgbench_accounts, pgbench_tellers,"
            " pgbench_branches, pgbench_history, audit.context_rows"
        )
    return url


def _script(variant: str) -> str:
    context = json.dumps(CONTEXT, separators=(",", ":"))
    begin = {
        "none": "BEGIN;",
        "slot": "BEGIN;",
        "trigger": "BEGIN;",
        "statement": "BEGIN \\; SELECT NULL;",
        # Diagnostic (run with --only): the message alone, without validation or PL/pgSQL.
        "emit": f"BEGIN \\; SELECT pg_logical_emit_message(true, 'audit_platform.context.v1',"
        f" '{context}');",
        # \; joins statements into one message: the context costs no round trip of its own.
        "message": f"BEGIN \\; SELECT audit.set_context('{context}');",
        "message_stream": f"BEGIN \\; SELECT audit.set_context('{context}');",
        "row": f"BEGIN \\; SELECT audit.set_context_row('{context}');",
    }[variant]
    return TPCB.format(begin=begin)


def _configure(url: str, variant: str) -> None:
    """Switch the database to the variant: triggers on or off, replica identity, slot."""
    with psycopg.connect(url, autocommit=True) as conn:
        for table in TABLES:
            ident = sql.Identifier(table)
            trigger = "ENABLE" if variant == "trigger" else "DISABLE"
            conn.execute(sql.SQL(f"ALTER TABLE {{}} {trigger} TRIGGER audit_row").format(ident))
            identity = "FULL" if variant in CAPTURED else "DEFAULT"
            conn.execute(sql.SQL(f"ALTER TABLE {{}} REPLICA IDENTITY {identity}").format(ident))
        conn.execute("TRUNCATE pgbench_history, trigger_audit_log, audit.context_rows")
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")
        if variant in CAPTURED:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (SLOT,))


class BulkReader(threading.Thread):
    """Capture's way of consuming: wake every ``interval`` s and read everything new at once."""

    def __init__(self, url: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.url, self.interval = url, interval
        self.stopping = threading.Event()
        self.changes = 0

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while True:
                stop = self.stopping.wait(self.interval)
                self.changes += conn.execute(
                    "SELECT count(*) FROM pg_logical_slot_get_binary_changes(%s, NULL, NULL,"
                    " 'proto_version', '1', 'publication_names', 'bench', 'messages', 'true')",
                    (SLOT,),
                ).fetchone()[0]
                if stop:
                    return

    def stop(self) -> None:
        self.stopping.set()
        self.join()


def _streamer(bindir: Path, url: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            str(bindir / "pg_recvlogical"), "-d", url, "--slot", SLOT, "--start",
            "-o", "proto_version=1", "-o", "publication_names=bench", "-o", "messages=true",
            "--fsync-interval=1", "--status-interval=1", "-f", "/dev/null",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip


def _slot_lag(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint"
            " FROM pg_replication_slots WHERE slot_name = %s",
            (SLOT,),
        ).fetchone()
    return int(row[0]) if row else 0


def _run_once(
    bindir: Path, url: str, variant: str, clients: int, seconds: int, poll: float
) -> dict:
    _configure(url, variant)
    streamer = _streamer(bindir, url) if variant == "message_stream" else None
    reader = BulkReader(url, poll) if variant in CAPTURED and streamer is None else None
    if reader is not None:
        reader.start()
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(_script(variant))
    try:
        done = subprocess.run(
            [
                str(bindir / "pgbench"), "-n", "-M", "simple", "-c", str(clients), "-j", "2",
                "-T", str(seconds), "-f", f.name, url,
            ],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        match = re.search(r"tps = ([\d.]+) \(without initial connection time\)", done.stdout)
        if not match:
            raise RuntimeError(f"pgbench printed no tps:\n{done.stdout}\n{done.stderr}")
        lag = 0
        if streamer is not None:
            time.sleep(2)  # one status interval: what the consumer has confirmed by now
            lag = _slot_lag(url)
        if reader is not None:
            lag = _slot_lag(url)  # what the last bulk read, after pgbench, still had to do
        return {"variant": variant, "tps": float(match.group(1)), "lag_after_bytes": lag}
    finally:
        Path(f.name).unlink()
        if reader is not None:
            reader.stop()
        if streamer is not None:
            streamer.send_signal(signal.SIGINT)
            streamer.wait(timeout=30)
        if variant in CAPTURED:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (SLOT,))


@app.command()
def main(
    repeats: Annotated[int, typer.Option(help="Interleaved rounds.")] = 3,
    seconds: Annotated[int, typer.Option(help="pgbench duration per run.")] = 90,
    poll: Annotated[float, typer.Option(help="Seconds between the consumer's bulk reads.")] = 10,
    clients: Annotated[int, typer.Option(help="pgbench clients.")] = 4,
    scale: Annotated[int, typer.Option(help="pgbench scale factor.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed for the variant order.")] = 7,
    only: Annotated[
        list[str] | None, typer.Option(help="Run only these variants (exploration; no report).")
    ] = None,
) -> None:
    settings = Settings()
    if not settings.pg_url:
        raise typer.BadParameter('set AUDIT_PG_URL (eval "$(audit-platform stack env)")')
    bindir = find_bindir()
    url = _prepare(settings.pg_url, bindir, scale)
    variants = list(only or VARIANTS)
    order = random.Random(seed)
    runs = []
    for round_number in range(repeats):
        order.shuffle(variants)
        for variant in variants:
            result = _run_once(bindir, url, variant, clients, seconds, poll)
            result["round"] = round_number + 1
            runs.append(result)
            typer.echo(json.dumps(result))
    if only:
        for variant in variants:
            tps = statistics.median(r["tps"] for r in runs if r["variant"] == variant)
            typer.echo(f"{variant}: median {tps:.0f} tps")
    else:
        _report(runs, repeats=repeats, seconds=seconds, clients=clients, scale=scale, poll=poll)
    drop_database(settings.pg_url, DB)


def _report(runs: list[dict], **params: float) -> None:
    by_variant: dict[str, list[float]] = {}
    for run in runs:
        by_variant.setdefault(run["variant"], []).append(run["tps"])
    base = statistics.median(by_variant["none"])
    with psycopg.connect(Settings().pg_url) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
    lines = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on this repo's local stack "
        f"(PostgreSQL {version}, 2 cores): pgbench tpcb-like, scale {params['scale']}, "
        f"{params['clients']} clients, {params['seconds']} s per run, {params['repeats']} "
        f"interleaved rounds in random order; bulk reads every {params['poll']} s.",
        "",
        "| variant | median tps | runs (tps) | vs none |",
        "| --- | ---: | --- | ---: |",
    ]
    for variant in VARIANTS:
        values = by_variant[variant]
        median = statistics.median(values)
        lines.append(
            f"| {variant} | {median:.0f} | {', '.join(f'{v:.0f}' for v in values)} "
            f"| {median / base:.2f}x |"
        )
    lags = [r["lag_after_bytes"] for r in runs if r["variant"] in CAPTURED]
    lines += ["", f"WAL bytes left for the consumer when each captured run ended: {lags}"]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    table = "\n".join(lines) + "\n"
    text = RESULTS.read_text() if RESULTS.exists() else ""
    marker = "<!-- results -->"
    if marker in text:
        head = text.split(marker, 1)[0]
        RESULTS.write_text(f"{head}{marker}\n{table}")
    else:
        RESULTS.write_text(f"# Context write cost\n\n{marker}\n{table}")
    typer.echo(table)


if __name__ == "__main__":
    app()
