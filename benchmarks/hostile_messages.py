"""What an oversized logical message costs capture: time and peak memory, side by side.

A role with nothing but CONNECT can emit a message of up to 1 GB with any prefix
(``pg_logical_emit_message``). Capture must neither stop nor hold such messages in its batches
(docs/design.md, invariant 10). Each round builds the same backlog of ``--changes`` row changes
with a context per transaction in three fresh databases: one with nothing else, one with a
``--megabytes`` message of someone else's prefix in the middle, one with a message of ours (a
"context" of that size) in the middle; then captures each in its own process, so each peak
(VmHWM) is its own. The order rotates between rounds.

What to read: the driver (libpq, then psycopg2) holds one whole message while it is read, so the
peak grows by about twice the message, once; it does not grow with the number of such messages,
because the stream drops someone else's and keeps at most 16 KiB of ours before batching.

Run: ``eval "$(audit-platform stack env)"; .venv/bin/python benchmarks/hostile_messages.py``
Writes ``benchmarks/results/hostile_messages.md``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import psycopg
import typer
from _database import drop_database, fresh_database

from audit_platform.capture.messages import CONTEXT_PREFIX
from audit_platform.clients import pg_url_from_settings
from audit_platform.policy import SourcePolicy, TablePolicy
from audit_platform.settings import Settings
from audit_platform.sources.setup import setup_source

RESULTS = Path(__file__).parent / "results" / "hostile_messages.md"
POLICY = SourcePolicy(source="bench", version=1, tables={"public.orders": TablePolicy()})
DDL = """
CREATE TABLE orders (id bigint PRIMARY KEY, status text, note text);
ALTER TABLE orders REPLICA IDENTITY FULL;
"""
CONTEXT = '{"actor": {"type": "service", "id": "bench"}}'
VARIANTS = ("none", "foreign", "ours")

CAPTURE = """
import json, sys, time
from audit_platform.capture.run import capture
from audit_platform.policy import SourcePolicy, TablePolicy
from audit_platform.staging import StagingStore
url, root = sys.argv[1], sys.argv[2]
policy = SourcePolicy(source="bench", version=1, tables={"public.orders": TablePolicy()})
start = time.monotonic()
result = capture(url, "bench", policy, StagingStore(root, "bench", "bench"), mask_key=b"k",
                 batch_changes=5000)
seconds = time.monotonic() - start
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"changes": result.changes, "contexts": result.contexts, "seconds": seconds,
                  "peak_rss": hwm, "payload_bytes": result.payload_bytes}))
"""

app = typer.Typer(add_completion=False)


def _backlog(admin_url: str, name: str, variant: str, changes: int, megabytes: int) -> str:
    url = fresh_database(admin_url, name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(DDL)
    setup_source(url, "bench", POLICY, Settings().resources_dir / "sql")
    with psycopg.connect(url, autocommit=True) as conn:
        for start in range(0, changes, 100):
            with conn.transaction():
                conn.execute("SELECT audit.set_context(%s::jsonb)", (CONTEXT,))
                conn.execute(
                    "INSERT INTO orders SELECT g, 'new', repeat('n', 40)"
                    " FROM generate_series(%s::bigint, %s::bigint) g",
                    (start + 1, start + 100),
                )
            if start == changes // 2 and variant != "none":
                prefix = CONTEXT_PREFIX if variant == "ours" else "other.tool"
                conn.execute(
                    "SELECT pg_logical_emit_message(true, %s, repeat('x', %s))",
                    (prefix, megabytes * 1024 * 1024),
                )
    return url


def _capture(url: str) -> dict:
    with tempfile.TemporaryDirectory() as root:
        done = subprocess.run(
            [sys.executable, "-c", CAPTURE, url, root], capture_output=True, text=True
        )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


@app.command()
def main(
    changes: Annotated[int, typer.Option(help="Row changes in each backlog.")] = 100_000,
    megabytes: Annotated[int, typer.Option(help="Size of the one large message.")] = 256,
    rounds: Annotated[int, typer.Option(help="Rounds; the order rotates.")] = 2,
) -> None:
    admin = pg_url_from_settings(Settings())
    if not admin:
        raise typer.BadParameter('set AUDIT_PG_URL (eval "$(audit-platform stack env)")')
    rows = []
    for round_ in range(rounds):
        order = VARIANTS[round_ % 3 :] + VARIANTS[: round_ % 3]
        for variant in order:
            name = f"bench_hostile_{variant}"
            url = _backlog(admin, name, variant, changes, megabytes)
            try:
                result = {"round": round_ + 1, "variant": variant, **_capture(url)}
            finally:
                drop_database(admin, name)
            typer.echo(json.dumps(result))
            rows.append(result)
    _report(rows, changes=changes, megabytes=megabytes)


def _report(rows: list[dict], *, changes: int, megabytes: int) -> None:
    label = {
        "none": "no large message",
        "foreign": f"one {megabytes} MiB message, someone else's prefix",
        "ours": f"one {megabytes} MiB message, our context prefix (rejected)",
    }
    lines = [
        "# An oversized logical message in the slot",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on the local stack (2 cores, shared). "
        f"Each backlog: {changes:,} row changes in transactions of 100, each with its context; "
        "the variant's message is emitted half-way. Capture in its own process (batches of "
        "5,000 changes); peak RSS is the process's VmHWM.",
        "",
        "| round | backlog | changes | contexts staged | seconds | peak RSS MiB | bytes kept |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['round']} | {label[row['variant']]} | {row['changes']:,} | "
            f"{row['contexts']:,} | {row['seconds']:.1f} | {row['peak_rss'] / 2**20:.0f} | "
            f"{row['payload_bytes']:,} |"
        )
    lines += [
        "",
        "`contexts staged` counts the contexts and the rejection (ours); `bytes kept` is what the "
        "batches held of the stream's payloads.",
        "",
        f"Command: `.venv/bin/python benchmarks/hostile_messages.py --changes {changes} "
        f"--megabytes {megabytes}`",
    ]
    text = "\n".join(lines) + "\n"
    RESULTS.write_text(text)
    typer.echo(text)


if __name__ == "__main__":
    app()
