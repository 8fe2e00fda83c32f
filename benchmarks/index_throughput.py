"""Documents per second indexed by this code, next to raw bulk indexing with the bare client.

Both index the same documents into a fresh index of the local cluster, interleaved, in one run:
``ours`` is ``index_records`` from records (columnar document building, NDJSON bodies, a few
requests in flight, per-document failure handling), at several chunk sizes and request counts
in flight, which is how the defaults were chosen; ``raw`` is ``elasticsearch.helpers.bulk`` over
the same documents built beforehand as dicts (chunks of 1,000, the helper's default shape).

Run: ``eval "$(audit-platform stack env)"; .venv/bin/python benchmarks/index_throughput.py``
Writes ``benchmarks/results/index_throughput.md``.
"""

from __future__ import annotations

import json
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import polars as pl
import typer
from elasticsearch.helpers import bulk

from audit_platform.clients import es_from_settings
from audit_platform.index.bulk import index_records
from audit_platform.index.documents import documents
from audit_platform.index.template import install_template
from audit_platform.naming import read_alias, template_name
from audit_platform.record import RECORD_SCHEMA
from audit_platform.settings import Settings

RESULTS = Path(__file__).parent / "results" / "index_throughput.md"
ENV = "benchidx"
T0 = datetime(2026, 11, 26, 10, tzinfo=UTC)
app = typer.Typer(add_completion=False)


#: The column types the benchmark's records carry (``row.types``).
TYPES = '{"id":"integer","status":"text","amount":"numeric(12,2)","note":"text"}'


def records(n: int) -> pl.DataFrame:
    context = json.dumps(
        {
            "actor": {"type": "user", "id": "u-1", "name": "Ada"},
            "request_id": "req-1",
            "reason": "refund",
        }
    )
    return pl.DataFrame(
        {
            "id": [f"{ENV}:shop:{i:016X}:0" for i in range(n)],
            "commit_time": [T0 + timedelta(milliseconds=i) for i in range(n)],
            "env": [ENV] * n,
            "source": ["shop"] * n,
            "schema": ["public"] * n,
            "table": ["orders"] * n,
            "operation": ["update"] * n,
            "object_id": [str(i) for i in range(n)],
            "changed_columns": ['["status"]'] * n,
            "before": [
                f'{{"id":"{i}","status":"new","amount":"12.50","note":"{"n" * 40}"}}'
                for i in range(n)
            ],
            "after": [
                f'{{"id":"{i}","status":"paid","amount":"12.50","note":"{"n" * 40}"}}'
                for i in range(n)
            ],
            "context": [context] * n,
            "attribution_status": ["attributed"] * n,
            "attribution_lag_seconds": [None] * n,
            "xid": list(range(n)),
            "lsn": list(range(n)),
            "change_index": [0] * n,
            "policy_version": ["1:x"] * n,
            "key_columns": ['["id"]'] * n,
            "column_types": [TYPES] * n,
            "txn_changes": [1] * n,
            "txn_ignored": [0] * n,
            "server_version": [150000] * n,
            "row_organization": [None] * n,
            "personal": [None] * n,
            "context_personal": [None] * n,
        },
        schema=RECORD_SCHEMA,
    )


def _reset(client) -> None:
    found = client.options(ignore_status=404).indices.get(index=f"audit-{ENV}-*")
    for name in found:
        client.indices.delete(index=name)


@app.command()
def main(
    count: Annotated[int, typer.Option(help="Documents per run.")] = 200_000,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds.")] = 2,
    variants: Annotated[
        str, typer.Option(help="Chunk size x requests in flight of this code, comma-separated.")
    ] = "1000x2,500x2,2000x2,4000x2,1000x1,1000x3",
) -> None:
    settings = Settings()
    client = es_from_settings(settings)
    install_template(client, settings.resources_dir, ENV, replicas=0)
    frame = records(count)
    prepared = [
        {"_index": index, "_id": doc_id, "_source": doc}
        for index, doc_id, doc in documents(frame, database="shopdb", ingested_at=T0)
    ]
    rows = []
    kinds = ["raw", *variants.split(",")]
    for round_number in range(1, rounds + 1):
        order = kinds if round_number % 2 else list(reversed(kinds))
        for kind in order:
            _reset(client)
            start = time.monotonic()
            if kind != "raw":
                chunk, in_flight = (int(v) for v in kind.split("x"))
                result = index_records(
                    client,
                    frame,
                    database="shopdb",
                    ingested_at=T0,
                    chunk_size=chunk,
                    in_flight=in_flight,
                )
                assert result.failed.height == 0
            else:
                bulk(client, prepared, chunk_size=1000)
            seconds = time.monotonic() - start
            client.indices.refresh(index=read_alias(ENV))
            indexed = client.count(index=read_alias(ENV))["count"]
            rows.append({"round": round_number, "kind": kind, "docs": indexed, "seconds": seconds})
            typer.echo(json.dumps(rows[-1]))
    _reset(client)
    client.indices.delete_index_template(name=template_name(ENV))
    lines = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC against the local single-node cluster "
        f"(Elasticsearch 9.5.4, 1 GB heap, 2 cores shared with this client): {count:,} "
        "documents per run into a fresh index. `this code CxF`: `index_records` from records, "
        "chunks of C documents, F requests in flight; bare: `helpers.bulk` of the same "
        "documents built beforehand as dicts, chunks of 1,000.",
        "",
        "| round | what | documents | seconds | docs/s | vs bare, same round |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    bare = {r["round"]: r["docs"] / r["seconds"] for r in rows if r["kind"] == "raw"}
    for r in rows:
        what = f"this code {r['kind']}" if r["kind"] != "raw" else "bare client helpers.bulk"
        rate = r["docs"] / r["seconds"]
        lines.append(
            f"| {r['round']} | {what} | {r['docs']:,} | {r['seconds']:.1f} "
            f"| {rate:,.0f} | {rate / bare[r['round']]:.2f}x |"
        )
    lines += ["", "Median over rounds, against bare of the same round:", ""]
    for kind in kinds[1:]:
        ratios = [r["docs"] / r["seconds"] / bare[r["round"]] for r in rows if r["kind"] == kind]
        lines.append(f"- `{kind}`: {statistics.median(ratios):.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("# Indexing throughput\n\n" + "\n".join(lines) + "\n")
    typer.echo("\n".join(lines))


if __name__ == "__main__":
    app()
