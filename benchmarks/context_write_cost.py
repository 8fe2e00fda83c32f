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

Throughput counts the consumer's whole work: a captured run's transactions are divided by
pgbench's time plus the time the consumer then needs to catch up with the slot (its last bulk
read, or the walsender sending the last commit), so no decoding falls outside the clock.

Each round runs every variant once, in random order; a variant is compared with ``none`` of the
same round, and the report gives the median and the range of those paired ratios (the machine's
speed drifts between rounds by more than the differences being measured).

Beside pgbench, the script times the context call itself inside the database (a PL/pgSQL loop of
``audit.set_context`` against the same loop of ``pg_logical_emit_message`` and of nothing), which
gives its cost in microseconds per transaction without pgbench's noise.

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

from audit_platform.clients import pg_url_from_settings
from audit_platform.settings import Settings
from audit_platform.sources.setup import apply_migrations
from audit_platform_dev.stack.postgres import find_bindir

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
            str(bindir / "pg_recvlogical"),
            "-d",
            url,
            "--slot",
            SLOT,
            "--start",
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=bench",
            "-o",
            "messages=true",
            "--fsync-interval=1",
            "--status-interval=1",
            "-f",
            "/dev/null",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _wal_lsn(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return int(conn.execute("SELECT pg_current_wal_lsn() - '0/0'").fetchone()[0])


def _slot_lag(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint"
            " FROM pg_replication_slots WHERE slot_name = %s",
            (SLOT,),
        ).fetchone()
    return int(row[0]) if row else 0


def _wait_sent(url: str, timeout: float = 300) -> None:
    """Wait until the walsender has decoded and sent everything written so far.

    Sent, not confirmed: pg_recvlogical confirms once a second, which would charge the stream
    for a wait that is not work.
    """
    with psycopg.connect(url, autocommit=True) as conn:
        target = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sent = conn.execute(
                "SELECT r.sent_lsn >= %s::pg_lsn FROM pg_replication_slots s"
                " JOIN pg_stat_replication r ON r.pid = s.active_pid WHERE s.slot_name = %s",
                (target, SLOT),
            ).fetchone()
            if sent and sent[0]:
                return
            time.sleep(0.02)
    raise RuntimeError(f"the streaming consumer did not catch up within {timeout} s")


CALL_LOOP = """
DO $$
DECLARE c jsonb;
BEGIN
    FOR i IN 1..{calls} LOOP
        c := jsonb_build_object('actor', jsonb_build_object('type', 'user', 'id', 'u-' || i,
                 'name', 'Bench User'), 'service', 'payments-api', 'request_id', 'req-' || i,
                 'trace_id', '4bf92f3577b34da6a3ce929d0e0e4736', 'reason', 'transfer',
                 'client_addr', '203.0.113.7');
        {call}
    END LOOP;
END
$$
"""
CALLS = {
    "nothing": "",
    "emit": "PERFORM pg_logical_emit_message(true, 'audit_platform.context.v1', c::text);",
    "set_context": "PERFORM audit.set_context(c);",
}


def _call_cost(url: str, calls: int = 50_000, repeats: int = 5) -> dict[str, float]:
    """Microseconds per call of the context call and of the bare message, less the loop itself.

    Each loop runs in a transaction that is rolled back; the fastest of ``repeats`` counts, as
    the least disturbed by the rest of the machine.
    """
    best = dict.fromkeys(CALLS, float("inf"))
    with psycopg.connect(url) as conn:
        for _ in range(repeats):
            for name, call in CALLS.items():
                started = time.perf_counter()
                conn.execute(CALL_LOOP.format(calls=calls, call=call))
                best[name] = min(best[name], time.perf_counter() - started)
                conn.rollback()
    per_call = {name: seconds / calls * 1e6 for name, seconds in best.items()}
    return {name: per_call[name] - per_call["nothing"] for name in ("emit", "set_context")}


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
        wal_start = _wal_lsn(url)
        done = subprocess.run(
            [
                str(bindir / "pgbench"),
                "-n",
                "-M",
                "simple",
                "-c",
                str(clients),
                "-j",
                "2",
                "-T",
                str(seconds),
                "-f",
                f.name,
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        ended = time.monotonic()
        tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", done.stdout)
        count = re.search(r"number of transactions actually processed: (\d+)", done.stdout)
        if not tps or not count:
            raise RuntimeError(f"pgbench printed no tps:\n{done.stdout}\n{done.stderr}")
        transactions = int(count.group(1))
        wal_per_transaction = (_wal_lsn(url) - wal_start) / transactions
        lag = _slot_lag(url) if variant in CAPTURED else 0  # WAL the consumer still has to read
        if reader is not None:
            reader.stop()  # its last bulk read, now, without waiting for the interval
        if streamer is not None:
            _wait_sent(url)
        catch_up = time.monotonic() - ended if variant in CAPTURED else 0.0
        seconds_timed = transactions / float(tps.group(1)) + catch_up
        return {
            "variant": variant,
            "tps": round(transactions / seconds_timed, 1),
            "pgbench_tps": float(tps.group(1)),
            "catch_up_s": round(catch_up, 2),
            "wal_bytes_per_tx": round(wal_per_transaction),
            "lag_after_bytes": lag,
        }
    finally:
        Path(f.name).unlink()
        if reader is not None and reader.is_alive():
            reader.stop()
        if streamer is not None:
            streamer.send_signal(signal.SIGINT)
            streamer.wait(timeout=30)
        if variant in CAPTURED:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (SLOT,))


@app.command()
def main(
    repeats: Annotated[int, typer.Option(help="Interleaved rounds.")] = 6,
    seconds: Annotated[int, typer.Option(help="pgbench duration per run.")] = 40,
    poll: Annotated[float, typer.Option(help="Seconds between the consumer's bulk reads.")] = 10,
    clients: Annotated[int, typer.Option(help="pgbench clients.")] = 4,
    scale: Annotated[int, typer.Option(help="pgbench scale factor.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed for the variant order.")] = 7,
    only: Annotated[
        list[str] | None,
        typer.Option(help="Run only these variants, with none (exploration; no report)."),
    ] = None,
) -> None:
    settings = Settings()
    if not settings.pg_url:
        raise typer.BadParameter('set AUDIT_PG_URL (eval "$(audit-platform stack env)")')
    bindir = find_bindir()
    url = _prepare(pg_url_from_settings(settings), bindir, scale)
    variants = sorted({"none", *only}) if only else list(VARIANTS)
    call_cost = [_call_cost(url)]
    typer.echo(json.dumps({"call_cost_us": call_cost[0]}))
    order = random.Random(seed)
    runs = []
    for round_number in range(repeats):
        order.shuffle(variants)
        for variant in variants:
            result = _run_once(bindir, url, variant, clients, seconds, poll)
            result["round"] = round_number + 1
            runs.append(result)
            typer.echo(json.dumps(result))
    call_cost.append(_call_cost(url))
    typer.echo(json.dumps({"call_cost_us": call_cost[1]}))
    params = {"repeats": repeats, "seconds": seconds, "clients": clients, "scale": scale}
    table = _report(runs, call_cost, poll=poll, **params)
    typer.echo(table)
    if not only:
        _write(table)
    drop_database(pg_url_from_settings(settings), DB)


def _paired_ratios(runs: list[dict], variant: str) -> list[float]:
    """``variant`` against ``none`` of the same round: drift between rounds cancels out."""
    rounds = {r["round"] for r in runs}
    tps = {(r["round"], r["variant"]): r["tps"] for r in runs}
    return [tps[n, variant] / tps[n, "none"] for n in sorted(rounds)]


def _report(runs: list[dict], call_cost: list[dict[str, float]], **params: float) -> str:
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in runs)]
    variants += sorted({r["variant"] for r in runs} - set(variants))
    with psycopg.connect(pg_url_from_settings(Settings())) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
    lines = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on this repo's local stack "
        f"(PostgreSQL {version}, 2 cores): pgbench tpcb-like, scale {params['scale']}, "
        f"{params['clients']} clients, {params['seconds']} s per run, {params['repeats']} "
        f"rounds, each running every variant once in random order; bulk reads every "
        f"{params['poll']} s. Throughput of a captured run includes the consumer's catch-up "
        "after pgbench ends. Catch-up and WAL per transaction are medians.",
        "",
        "| variant | vs none, same round: median (min-max) | median tps | runs (tps) "
        "| catch-up s | WAL bytes per transaction |",
        "| --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for variant in variants:
        tps = [r["tps"] for r in runs if r["variant"] == variant]
        ratios = _paired_ratios(runs, variant)
        catch_up = statistics.median(r["catch_up_s"] for r in runs if r["variant"] == variant)
        wal = statistics.median(r["wal_bytes_per_tx"] for r in runs if r["variant"] == variant)
        lines.append(
            f"| {variant} | {statistics.median(ratios):.2f}x "
            f"({min(ratios):.2f}-{max(ratios):.2f}) | {statistics.median(tps):.0f} "
            f"| {', '.join(f'{v:.0f}' for v in tps)} | {catch_up:.1f} | {wal:.0f} |"
        )
    base = statistics.median(r["tps"] for r in runs if r["variant"] == "none")
    first, last = call_cost
    share = max(first["set_context"], last["set_context"]) * base / 2e6
    lines += [
        "",
        "The call alone, inside the database (PL/pgSQL loop of 50,000 calls, fastest of 5, "
        "before / after the rounds): `audit.set_context` "
        f"{first['set_context']:.1f} / {last['set_context']:.1f} µs per call, the bare "
        f"`pg_logical_emit_message` {first['emit']:.1f} / {last['emit']:.1f} µs. At the "
        f"baseline's {base:.0f} tps the two cores give a transaction {2e6 / base:.0f} µs, so "
        f"the call can cost at most about {share:.1%} of throughput.",
    ]
    return "\n".join(lines) + "\n"


def _write(table: str) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    text = RESULTS.read_text() if RESULTS.exists() else ""
    marker = "<!-- results -->"
    if marker in text:
        head = text.split(marker, 1)[0]
        RESULTS.write_text(f"{head}{marker}\n{table}")
    else:
        RESULTS.write_text(f"# Context write cost\n\n{marker}\n{table}")


if __name__ == "__main__":
    app()
