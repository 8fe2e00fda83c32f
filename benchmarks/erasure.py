"""Erasing one person with 10,000 records among 1,000,000, and ``verify`` afterwards.

Builds the environment ``benchpersonal`` (``--reload`` rebuilds; otherwise kept between runs
until an erasure has run in it): staged changes and contexts of 1,000,000 changes of five
tables whose rows name a customer (``customer_id``) and hold two personal columns (``email``,
``address``) of five; each transaction's context names a customer as its actor, with a name
and a client address, declared personal too. Customer 42 has every hundredth change, 10,000
records; the others are spread over 10,000 more customers. Enriched by the pipeline's own
``enrich_files``, their leaves committed with the customers' keys (``ensure_keys``, as capture
does), appended to the trail's log, signed, and indexed.

Then: customer 42's erasure is requested, approved by a second admin and carried out
(``erasure.run.carry_out``: plan from the staged files and Elasticsearch, the erasure leaf,
Elasticsearch updates, staged files rewritten, key destroyed), timed; and ``verify_source``
runs over everything, without and with the staging check, and must pass.

Run: ``eval "$(audit-platform stack env)"; .venv/bin/python benchmarks/erasure.py``
Writes ``benchmarks/results/erasure.md``.
"""

from __future__ import annotations

import json
import resource
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import polars as pl
import psycopg
import typer

from audit_platform import platform_db
from audit_platform.clients import es_from_settings, pg_url_from_settings
from audit_platform.enrich.batch import enrich_files
from audit_platform.enrich.join import transaction_contexts
from audit_platform.erasure import requests as erasure
from audit_platform.erasure.run import carry_out
from audit_platform.index.bulk import index_records
from audit_platform.index.template import install_template
from audit_platform.naming import read_alias
from audit_platform.policy import ContextPersonalData, SourcePolicy, TablePolicy
from audit_platform.settings import Settings
from audit_platform.signing import new_private_key, private_key
from audit_platform.staging import StagingStore
from audit_platform.staging.store import FILE
from audit_platform.trust.commitments import Commitments, all_keys, ensure_keys, subjects_in
from audit_platform.trust.leaves import attach_leaves, context_leaves, record_leaves
from audit_platform.trust.log import TrustLog
from audit_platform.verify import Window, verify_source

RESULTS = Path(__file__).parent / "results" / "erasure.md"
ENV, SOURCE, BATCH = "benchpersonal", "shop", 48_000  # whole transactions (3 changes) per batch
#: The same records without a personal declaration: what verify costs without commitments.
PLAIN = "benchplain"
TABLES = ["orders", "invoices", "payments", "tickets", "shipments"]
COLUMNS = '{"id":"integer","customer_id":"integer","status":"text","email":"text","address":"text"}'
PERSON, EVERY = 42, 100  # customer 42 has every hundredth change
PERSONAL = {"subject": "customer_id", "of": "public.customers", "columns": ["address", "email"]}
POLICY = SourcePolicy(
    source=SOURCE,
    version=1,
    tables={f"public.{t}": TablePolicy.model_validate({"personal": PERSONAL}) for t in TABLES},
    # Each transaction's actor is the customer of its first change, with a name and an address.
    context_personal=ContextPersonalData(of="public.customers"),
)
PLAIN_POLICY = SourcePolicy(
    source=SOURCE, version=1, tables={f"public.{t}": TablePolicy() for t in TABLES}
)
app = typer.Typer(add_completion=False)


def _customer(i: int) -> int:
    return PERSON if i % EVERY == 0 else 1_000 + i % 10_000


def _image(i: int, status: str) -> str:
    c = _customer(i)
    return json.dumps(
        {
            "id": str(i),
            "customer_id": str(c),
            "status": status,
            "email": f"customer{c}.{i}@example.com",
            "address": f"{i} Main Street, flat {c}",
        },
        separators=(",", ":"),
    )


def _batch(
    start: int, n: int, t0: datetime, step: timedelta, env: str = ENV
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Staged changes (three per transaction) and their transactions' contexts, with the
    personal declaration capture stages beside each change."""
    ids = range(start, start + n)
    changes = pl.DataFrame(
        {
            "lsn": [10_000 + i // 3 for i in ids],
            "xid": [1_000 + i // 3 for i in ids],
            "change_index": [i % 3 for i in ids],
            "operation": [("insert", "update", "delete")[i % 3] for i in ids],
            "schema": ["public"] * n,
            "table": [TABLES[(i // 3) % 5] for i in ids],
            "key_columns": ['["id"]'] * n,
            "before": [None if i % 3 == 0 else _image(i, "new") for i in ids],
            "after": [None if i % 3 == 2 else _image(i, "paid") for i in ids],
            "unchanged_toast": [None] * n,
            "column_types": [COLUMNS] * n,
            "commit_time": [t0 + step * (i // 3) for i in ids],
            "env": [env] * n,
            "source": [SOURCE] * n,
            "policy_version": [POLICY.policy_version] * n,
            "personal_spec": [
                POLICY.tables[f"public.{TABLES[(i // 3) % 5]}"].personal.spec(  # type: ignore[union-attr]
                    f"public.{TABLES[(i // 3) % 5]}"
                )
                for i in ids
            ],
        }
    )
    transactions = changes.unique("lsn", keep="first")
    contexts = transactions.select(
        "lsn",
        "xid",
        pl.lit(0, pl.Int32).alias("seq"),
        pl.lit("context").alias("kind"),
        pl.lit(None, pl.Int64).alias("target_xid"),
        pl.col("after")
        .fill_null(pl.col("before"))
        .str.json_path_match("$.customer_id")
        .map_elements(_context, return_dtype=pl.String)
        .alias("context"),
        "commit_time",
        "env",
        "source",
        pl.lit(POLICY.context_spec() if env == ENV else None, pl.String).alias("personal_spec"),
    )
    return changes, contexts


def _context(customer: str) -> str:
    """A transaction's context: its customer acting, with their name and address."""
    c = int(customer)
    actor = {"id": customer, "name": f"Customer {c} Name", "type": "user"}
    return json.dumps(
        {"actor": actor, "client_addr": f"10.{c // 65536 % 256}.{c // 256 % 256}.{c % 256}"},
        separators=(",", ":"),
        sort_keys=True,
    )


def build(settings: Settings, count: int, key_path: Path, env: str = ENV) -> dict[str, float]:
    """``env`` ``PLAIN``: the same changes staged without their personal declaration."""
    es = es_from_settings(settings)
    store = StagingStore(settings.staging_root, env, SOURCE)
    policy = POLICY if env == ENV else PLAIN_POLICY
    if store.fs.exists(store.base):
        store.fs.rm(store.base, recursive=True)
    for name in es.options(ignore_status=404).indices.get(index=f"audit-{env}-*"):
        es.indices.delete(index=name)
    install_template(es, settings.resources_dir, env, replicas=0)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.write_text(new_private_key())
    log, spent = TrustLog(store), {"enrich": 0.0, "leaves": 0.0, "index": 0.0}
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    step = timedelta(hours=1) / (count // 3)
    with psycopg.connect(pg_url_from_settings(settings), autocommit=True) as state:
        platform_db.install(state, settings.resources_dir / "sql")
        state.execute("DELETE FROM audit_platform.subject_keys WHERE env = %s", (env,))
        state.execute(
            "DELETE FROM audit_platform.erasure_leaves WHERE request IN"
            " (SELECT id FROM audit_platform.erasure_requests WHERE env = %s)",
            (env,),
        )
        state.execute("DELETE FROM audit_platform.erasure_requests WHERE env = %s", (env,))
        for start in range(0, count, BATCH):
            changes, contexts = _batch(start, min(BATCH, count - start), t0, step, env)
            if env == PLAIN:
                changes = changes.with_columns(pl.lit(None, pl.String).alias("personal_spec"))
            staged = [f.path for f in store.write("changes", changes)]
            context_paths = [f.path for f in store.write("contexts", contexts)]
            now = datetime.now(UTC)
            began = time.perf_counter()
            enrich_files(store, state, policy, staged, context_paths, now=now, grace=timedelta(0))
            spent["enrich"] += time.perf_counter() - began
            records = store.read([store.derived_path(p, "records") for p in staged]).drop(FILE)
            began = time.perf_counter()
            read = store.read(context_paths, "contexts")
            times = read.group_by("lsn").agg(pl.col("commit_time").first())
            keys = Commitments(
                ensure_keys(
                    state,
                    env,
                    subjects_in(pl.concat([records["personal"], records["context_personal"]])),
                )
            )
            leaves = pl.concat(
                [
                    context_leaves(transaction_contexts(read).join(times, on="lsn"), env, keys),
                    attach_leaves(read, env, SOURCE, keys),
                    record_leaves(records, keys),
                ]
            )
            log.append(leaves)
            spent["leaves"] += time.perf_counter() - began
            began = time.perf_counter()
            index_records(es, records, database="benchdb", ingested_at=now)
            spent["index"] += time.perf_counter() - began
            rounded = {k: round(v, 1) for k, v in spent.items()}
            typer.echo(f"built {start + records.height:,}: {json.dumps(rounded)}")
    log.checkpoint(private_key(key_path.read_text()), datetime.now(UTC))
    es.indices.refresh(index=read_alias(env))
    es.indices.forcemerge(index=f"audit-{env}-*", max_num_segments=1)
    return spent


@app.command()
def main(
    count: Annotated[int, typer.Option(help="Changes to build.")] = 1_000_000,
    reload: Annotated[bool, typer.Option(help="Rebuild even if built.")] = False,
) -> None:
    settings = Settings(env=ENV)
    store = StagingStore(settings.staging_root, ENV, SOURCE)
    key_path = Path(settings.staging_root) / f"{ENV}-signing-key"
    with psycopg.connect(pg_url_from_settings(settings), autocommit=True) as state:
        platform_db.install(state, settings.resources_dir / "sql")
        erased = any(r.state == "done" for r in erasure.list_requests(state, ENV))
    spent = None
    if reload or erased or TrustLog(store).state().size < count or not key_path.exists():
        spent = build(settings, count, key_path)
    key = private_key(key_path.read_text())
    es = es_from_settings(settings)
    with psycopg.connect(pg_url_from_settings(settings), autocommit=True) as state:
        subject = erasure.Subject("public.customers", str(PERSON))
        request = erasure.request_erasure(
            state,
            es,
            ENV,
            subject,
            reason="benchmark",
            requested_by="dpo",
            waiting=timedelta(hours=72),
        )
        erasure.approve(state, ENV, request.id, "legal")
        began = time.perf_counter()
        outcome = carry_out(
            state, es, ENV, request.id, sources={SOURCE: (store, POLICY)}, now=datetime.now(UTC)
        )
        erase_seconds = time.perf_counter() - began
        [part] = outcome.sources
        typer.echo(f"erased {part.records:,} records in {erase_seconds:.1f} s: {part}")
        assert part.records == count // EVERY, "rebuild with --reload: the keys are gone"
        keys = all_keys(state, ENV)
    es.indices.refresh(index=read_alias(ENV))
    left = es.count(index=read_alias(ENV), q=f'"customer{PERSON}."')["count"]
    acted = es.count(index=read_alias(ENV), q=f'"Customer {PERSON} Name"')["count"]
    plain = StagingStore(settings.staging_root, PLAIN, SOURCE)
    plain_key = Path(settings.staging_root) / f"{PLAIN}-signing-key"
    if reload or TrustLog(plain).state().size < count or not plain_key.exists():
        build(settings, count, plain_key, PLAIN)
    trails = {
        ENV: (store, POLICY, key, keys),
        PLAIN: (plain, PLAIN_POLICY, private_key(plain_key.read_text()), {}),
    }
    rows = []
    for staging in (False, True):
        for env, (trail, policy, signer, known) in trails.items():  # side by side
            began = time.perf_counter()
            report = verify_source(
                trail,
                es,
                policy,
                signer.public_key(),
                since=None,
                until=None,
                window=Window(datetime.now(UTC)),
                staging=staging,
                keys=known,
            )
            seconds = time.perf_counter() - began
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            assert report.ok, report.problems[:5]
            rows.append((env, staging, report.documents, report.staged_changes, seconds, peak))
            typer.echo(f"verify {env} staging={staging}: {seconds:.1f} s")
    lines = [
        "# Erasing one person among 1,000,000 records, and verify afterwards",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on the local stack (single-node "
        "Elasticsearch, 1 GB heap; PostgreSQL 15; 2 cores shared by all). The environment "
        f"`{ENV}` holds {count:,} records of one source in five tables, each naming a "
        "customer and holding two personal columns of five (email, address), their leaves "
        "committing those values with each customer's key. Each transaction's context names "
        "the customer of its first change as its actor, with a name and a client address, "
        "declared personal too (`context_personal`). Customer 42 has every hundredth change. "
        f"`{PLAIN}` holds the same records with no personal declaration (no commitments): "
        "verify over both, side by side.",
        "",
        "| step | number |",
        "| --- | --- |",
        f"| erasure of customer 42 (plan, key, leaf, log, staged files, Elasticsearch) | "
        f"**{erase_seconds:.1f} s** (target: under 60 s) |",
        f"| records erased / values replaced | {part.records:,} / {part.values:,} |",
        f"| documents rewritten / staged files rewritten | {part.documents:,} / "
        f"{part.staged_files:,} |",
        f"| contexts the customer acted under, erased | {part.contexts:,} |",
        f"| documents still matching `customer42.` / `Customer 42 Name` afterwards | {left} / "
        f"{acted} |",
        "",
        "| verify | staging check | documents | staged changes enriched again | seconds | "
        "peak RSS MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
        *(
            f"| `{e}` | {'on' if s else 'off'} | {d:,} | {c:,} | **{t:.1f}** | {m:.0f} |"
            for e, s, d, c, t, m in rows
        ),
    ]
    if spent is not None:
        lines += [
            "",
            f"Build (this run): enrichment {spent['enrich']:.1f} s, leaves with commitments and "
            f"log appends {spent['leaves']:.1f} s, indexing {spent['index']:.1f} s.",
        ]
    lines += ["", "Run: `.venv/bin/python benchmarks/erasure.py`"]
    RESULTS.write_text("\n".join(lines) + "\n")
    typer.echo(f"wrote {RESULTS}")


if __name__ == "__main__":
    app()
