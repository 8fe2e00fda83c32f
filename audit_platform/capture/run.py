"""One capture: read a source's slot up to a fixed LSN and stage it, batch by batch.

Per batch, in this order (docs/design.md, invariant 1): decode and apply the column policy, announce
the files in an in-flight manifest, write them durably, confirm the batch's end LSN to the slot,
wait until the server has taken it, then settle the manifest into the pending ledger (what
enrichment and indexing still owe). A crash anywhere re-reads from the slot's confirmed
position; ``StagingStore.recover`` first removes what an unconfirmed attempt wrote and settles
what the slot did confirm, so the result is the same files, once each, none forgotten.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial

import polars as pl
import psycopg

from audit_platform.capture.pgoutput import ChangeBatch, Masker, PgOutputDecoder
from audit_platform.capture.slot import Queries, slot_state, usable_slot_state
from audit_platform.capture.stream import SlotBusy, SlotStream
from audit_platform.clients import connect_source
from audit_platform.faults import crash_point
from audit_platform.naming import publication_name, slot_name
from audit_platform.policy import SourcePolicy
from audit_platform.staging import DECODED_CHANGES, DECODED_CONTEXTS, StagedFile, StagingStore
from audit_platform.staging.writers import STAGING


@dataclass
class CaptureResult:
    slot: str
    start_lsn: int
    target_lsn: int
    confirmed_lsn: int = 0
    batches: int = 0
    transactions: int = 0
    changes: int = 0
    contexts: int = 0
    payload_bytes: int = 0
    staged_bytes: int = 0
    files: list[StagedFile] = field(default_factory=list)
    recovered_files: list[str] = field(default_factory=list)
    lag_bytes_after: int = 0
    seconds: float = 0.0

    @property
    def hours(self) -> list[datetime]:
        return sorted({f.hour for f in self.files})


def frames(
    batch: ChangeBatch,
    *,
    env: str,
    source: str,
    policy_version: str,
    server_version: int | None = None,
    organization_columns: dict[str, str] | None = None,
    personal_specs: dict[str, str] | None = None,
    context_spec: str | None = None,
):
    """The batch as the two staged datasets, with the columns every record needs.

    ``organization_columns`` (schema.table -> column) is the policy's, staged with each change
    as its ``policy_version`` is: enrichment, and verification long after, read the row's
    organization by the rule in force when the change was captured (docs/design.md,
    "Organizations"). ``personal_specs`` (schema.table -> its personal declaration) likewise:
    what the change's leaf commits instead of values ("Erasure"); ``context_spec`` is the
    contexts' personal declaration, staged with each context."""
    changes = pl.DataFrame(
        {
            "lsn": batch.lsn,
            "xid": batch.xid,
            "commit_time_us": batch.commit_time_us,
            "change_index": batch.change_index,
            "operation": batch.operation,
            "schema": batch.schema,
            "table": batch.table,
            "key_columns": batch.key_columns,
            "before": batch.before,
            "after": batch.after,
            "unchanged_toast": batch.unchanged_toast,
            "column_types": batch.column_types,
        },
        schema=DECODED_CHANGES,
    )
    contexts = pl.DataFrame(
        {
            "lsn": batch.ctx_lsn,
            "xid": batch.ctx_xid,
            "commit_time_us": batch.ctx_commit_time_us,
            "seq": batch.ctx_seq,
            "kind": batch.ctx_kind,
            "target_xid": batch.ctx_target_xid,
            "context": batch.ctx_context,
        },
        schema=DECODED_CONTEXTS,
    )
    extra = [
        pl.from_epoch("commit_time_us", time_unit="us")
        .dt.replace_time_zone("UTC")
        .alias("commit_time"),
        pl.lit(env).alias("env"),
        pl.lit(source).alias("source"),
    ]
    qualified = pl.concat_str("schema", pl.lit("."), "table")
    changes = changes.with_columns(
        *extra,
        pl.lit(policy_version).alias("policy_version"),
        pl.lit(server_version, pl.Int32).alias("server_version"),
        qualified.replace_strict(
            organization_columns or {}, default=None, return_dtype=pl.String
        ).alias("organization_column"),
        qualified.replace_strict(personal_specs or {}, default=None, return_dtype=pl.String).alias(
            "personal_spec"
        ),
    )
    contexts = contexts.with_columns(*extra, pl.lit(context_spec, pl.String).alias("personal_spec"))
    return changes.drop("commit_time_us"), contexts.drop("commit_time_us")


def capture(
    url: str,
    env: str,
    policy: SourcePolicy,
    store: StagingStore,
    *,
    mask_key: bytes | None,
    target_lsn: int | None = None,
    batch_changes: int = 50_000,
) -> CaptureResult:
    """Stage everything committed up to ``target_lsn`` (default: the current WAL position)."""
    if mask_key is None and any(t.mask for t in policy.tables.values()):
        raise ValueError(
            f"policy of source {policy.source!r} masks columns but no masking key is set; "
            "set AUDIT_MASK_KEY (a secret per environment) before capturing"
        )
    started = time.monotonic()
    slot, publication = slot_name(env, policy.source), publication_name(env, policy.source)
    with connect_source(url) as conn:
        state = usable_slot_state(conn, slot)
        if state.active_pid is not None:
            raise SlotBusy(
                f"slot {slot} is in use by process {state.active_pid}; only one capture per "
                "slot may run at a time"
            )
        result = CaptureResult(
            slot=slot, start_lsn=state.confirmed_lsn, target_lsn=target_lsn or state.current_lsn
        )
        result.recovered_files = store.recover(state.confirmed_lsn)

        decoder = source_decoder(conn, policy, mask_key, env)
        stream = SlotStream(url, slot, publication)
        stager = _Stager(store, stream, conn, slot, env, policy, result)
        try:
            stream.start()
            for raw in stream.batches(result.target_lsn, batch_changes):
                result.payload_bytes += raw.payload_bytes
                stager.stage(decoder.decode(raw.messages, ChangeBatch(), complete=raw.complete))
            # Nothing (more) to stage up to the target: let the slot release that WAL too.
            if stream.server_wal_end >= result.target_lsn > result.confirmed_lsn:
                stager.confirm(result.target_lsn)
        finally:
            stream.close()
        result.confirmed_lsn = max(result.confirmed_lsn, result.start_lsn)
        result.lag_bytes_after = slot_state(conn, slot).lag_bytes
    result.seconds = time.monotonic() - started
    return result


def source_decoder(
    conn: Queries, policy: SourcePolicy, mask_key: bytes | None, env: str
) -> PgOutputDecoder:
    """A decoder for ``env``'s capture that asks the source (``conn``) for type names and
    primary keys."""

    def type_names(oids: list[int]) -> dict[int, str]:
        rows = conn.execute(
            "SELECT oid::bigint, format_type(oid, NULL) FROM pg_type WHERE oid = ANY(%s)",
            (oids,),
        ).fetchall()
        return dict(rows)

    def primary_key(schema: str, table: str) -> list[str]:
        rows = conn.execute(
            "SELECT a.attname FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY(i.indkey)"
            " WHERE n.nspname = %s AND c.relname = %s AND i.indisprimary"
            " ORDER BY array_position(i.indkey, a.attnum)",
            (schema, table),
        ).fetchall()
        return [row[0] for row in rows]

    return PgOutputDecoder(policy, Masker(mask_key or b""), type_names, primary_key, env)


class _Stager:
    """Stages decoded batches and moves the slot, in the order that makes crashes harmless."""

    def __init__(self, store, stream, conn, slot, env, policy, result) -> None:
        self.store, self.stream, self.conn, self.slot = store, stream, conn, slot
        self.env, self.policy, self.result = env, policy, result
        #: (commit LSN, manifest) of parts of transactions whose commit is not confirmed yet.
        self.open_parts: list[tuple[int, str]] = []

    def stage(self, batch: ChangeBatch) -> None:
        written = self.write(batch)
        if written is not None:
            self.confirm(*written)

    def write(self, batch: ChangeBatch) -> tuple[int, list[str]] | None:
        """Stage a batch's files; returns the LSN to confirm and the manifest to settle once
        the slot has (None: the batch ends inside a transaction, whose part waits). Apart from
        ``confirm`` so that a live worker holds its staging lane for this only: confirming
        waits for the server, not for the processor."""
        changes, contexts = frames(
            batch,
            env=self.env,
            source=self.policy.source,
            policy_version=self.policy.policy_version,
            server_version=self.stream.server_version,
            organization_columns=self.policy.organization_columns,
            personal_specs=self.policy.personal_specs(),
            context_spec=self.policy.context_spec(),
        )
        crash_point("capture.decoded")
        if batch.open_txn_lsn is not None:
            # The batch ends inside a transaction: what is complete is staged and confirmed as
            # usual; the open transaction's rows become a part file that is confirmed only when
            # its commit is (until then a crash removes the part, and it is read again).
            is_open = pl.col("lsn") == batch.open_txn_lsn
            self._write(
                changes.filter(is_open),
                contexts.filter(is_open),
                first_lsn=batch.open_txn_lsn,
                end_lsn=batch.open_txn_lsn + 1,
                part=batch.open_txn_part,
            )
            changes, contexts = changes.filter(~is_open), contexts.filter(~is_open)
        if batch.end_lsn is None:
            return None
        manifest = self._write(changes, contexts, first_lsn=batch.first_lsn, end_lsn=batch.end_lsn)
        crash_point("capture.staged")
        self.result.batches += 1
        self.result.transactions += batch.transactions
        return batch.end_lsn, [manifest]

    def _write(self, changes, contexts, *, first_lsn, end_lsn, part=None) -> str:
        datasets = (("changes", changes), ("contexts", contexts))
        planned = [(d, *file) for d, f in datasets for file in self.store.plan(d, f, part)]
        rows = {path: frame.height for _, _, path, frame in planned}
        manifest = self.store.announce(first_lsn, end_lsn, rows, part=part)
        written = STAGING.side_by_side(partial(self.store.write_planned, *p) for p in planned)
        self.result.changes += changes.height
        self.result.contexts += contexts.height
        self.result.files.extend(written)
        self.result.staged_bytes += sum(self.store.fs.size(f.path) for f in written)
        if part is not None:
            self.open_parts.append((first_lsn, manifest))
        return manifest

    def confirm(self, lsn: int, manifests: list[str] | None = None) -> None:
        self.stream.confirm(lsn)
        crash_point("capture.confirmed")
        _wait_confirmed(self.conn, self.slot, lsn)
        # A part is settled with the batch that confirms its transaction's commit, never
        # earlier: the pending ledger must hold a transaction's parts and its last piece in one
        # entry, or its changes would be enriched apart from the context one part carries.
        done = [manifest for commit, manifest in self.open_parts if commit < lsn]
        self.open_parts = [(commit, m) for commit, m in self.open_parts if commit >= lsn]
        self.store.settle([*done, *(manifests or [])])
        self.result.confirmed_lsn = lsn


def _wait_confirmed(conn: psycopg.Connection, slot: str, lsn: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while slot_state(conn, slot).confirmed_lsn < lsn:
        if time.monotonic() > deadline:
            raise TimeoutError(f"slot {slot} did not confirm LSN {lsn} within {timeout:.0f}s")
        time.sleep(0.02)
