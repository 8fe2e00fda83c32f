"""Enrichment: join each staged change with its transaction's context, into audit records.

A change and the context its transaction recorded share (commit LSN, xid), and travel in the same
staged batch, so the join is exact. A change whose transaction recorded no context is an orphan:
it waits in the quarantine for a late context (``audit.attach_context``), and after the grace
window it is released as ``unattributed``; if the context arrives even later, re-enriching its
batch replaces the record (same ``_id``). Nothing here does I/O: callers pass frames in and get
frames and counts out, so a Dagster run, a test and a backfill all get the same result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

import polars as pl

from audit_platform.policy import SourcePolicy
from audit_platform.record import (
    RECORD_SCHEMA,
    Operation,
    object_id,
    organization_id,
    record_id,
)
from audit_platform.staging.schemas import STAGED_LATER, with_context_spec
from audit_platform.staging.store import FILE
from audit_platform.trust.commitments import context_shape
from audit_platform_context.model import merge_fields


@dataclass
class Orphan:
    """A change still waiting for its context."""

    source: str
    lsn: int
    change_index: int
    xid: int
    commit_time: datetime
    #: The staged changes file it is in, where the caller read it with ``StagingStore.read``.
    file: str | None = None


@dataclass
class EnrichResult:
    records: pl.DataFrame
    orphans: list[Orphan] = field(default_factory=list)
    ignored: int = 0
    #: The source and commit LSN of each ignored change (how many each transaction lost to the
    #: policy).
    ignored_lsns: list[tuple[str, int]] = field(default_factory=list)
    #: Changes that could not be turned into a record: (lsn, change index, reason, file);
    #: set aside, never silently dropped.
    rejected: list[tuple[int, int, str, str | None]] = field(default_factory=list)
    #: The orphans as the records they will be once attributed (status ``waiting``): what
    #: the trail's log covers of them before they are indexed (``trust.leaves``).
    waiting: pl.DataFrame | None = None

    @property
    def counts(self) -> dict[str, int]:
        statuses = self.records["attribution_status"].value_counts()
        counts = dict(zip(statuses["attribution_status"], statuses["count"], strict=True))
        return {
            "records": self.records.height,
            "attributed": counts.get("attributed", 0),
            "late": counts.get("late", 0),
            "unattributed": counts.get("unattributed", 0),
            "orphans_waiting": len(self.orphans),
            "ignored": self.ignored,
            "rejected": len(self.rejected),
        }


#: What names a transaction in frames that may hold several sources' rows (a live run's turn
#: enriches many sources' batches at once): LSNs and xids are one source's.
TRANSACTION = ("source", "lsn", "xid")


def transaction_contexts(contexts: pl.DataFrame) -> pl.DataFrame:
    """One context per (source, lsn, xid): several set_context calls in a transaction merge in
    order; ``context_spec`` is the personal declaration staged with them."""
    own = (
        with_context_spec(contexts).filter(pl.col("kind") == "context").sort("source", "lsn", "seq")
    )
    merged = own.group_by(*TRANSACTION, maintain_order=True).agg(
        pl.col("context"), pl.col("personal_spec").first().alias("context_spec")
    )
    if merged.height == own.height:  # one call per transaction, the usual case: no Python
        return merged.with_columns(pl.col("context").list.first())
    return merged.with_columns(pl.col("context").map_elements(_merge_json, return_dtype=pl.String))


def attached_contexts(contexts: pl.DataFrame) -> pl.DataFrame:
    """Contexts attached to earlier transactions: (target xid, context, when it committed)."""
    return contexts.filter(pl.col("kind") == "attach").select(
        pl.col("target_xid"), pl.col("context"), pl.col("commit_time").alias("attached_at")
    )


def _merge_json(values: pl.Series) -> str:
    if values.len() == 1:
        return values[0]
    merged: dict[str, Any] = {}
    for value in values:
        merged = merge_fields(merged, json.loads(value))
    return json.dumps(merged, separators=(",", ":"), sort_keys=True)


def enrich(
    changes: pl.DataFrame,
    contexts: pl.DataFrame,
    policy: SourcePolicy | dict[str, SourcePolicy],
    *,
    now: datetime,
    grace: timedelta,
    late_contexts: pl.DataFrame | None = None,
    captured: pl.DataFrame | None = None,
    ignored: pl.DataFrame | None = None,
    own: pl.DataFrame | None = None,
) -> EnrichResult:
    """Turn staged changes into records; orphans within the grace window wait.

    The frames may hold several sources' rows (a live run's turn): ``policy`` is then each
    source's, by name, and every join is within a source (``TRANSACTION``).
    A ``file`` column on ``changes`` (see ``StagingStore.read``) is kept on the records and the
    orphans, so callers can write each record back beside the staged file it came from.
    ``late_contexts`` (source, target_xid, context, attached_at) are contexts attached after
    their transaction, from any hour; a change they name becomes ``late`` with its lag.
    ``captured`` (source, lsn, txn_changes) counts each transaction's staged changes where
    ``changes`` holds only some of them (orphans re-enriched on their own, one file of a
    transaction staged in parts); by default they are counted in ``changes``, which then holds
    whole transactions.
    ``ignored`` (source, lsn, txn_ignored) likewise counts the changes the policy ignores.
    ``own`` is ``transaction_contexts(contexts)`` where the caller has it already.
    """
    schema = (
        pl.Schema({**RECORD_SCHEMA, FILE: pl.String()})
        if FILE in changes.columns
        else RECORD_SCHEMA
    )
    if changes.is_empty():
        return EnrichResult(pl.DataFrame(schema=schema))
    changes = changes.unique(["source", "lsn", "change_index"], keep="first", maintain_order=True)
    if captured is None:
        captured = changes.group_by("source", "lsn").agg(
            pl.len().cast(pl.Int32).alias("txn_changes")
        )
    if own is None:
        own = transaction_contexts(contexts)
    joined = changes.join(own, on=TRANSACTION, how="left").join(
        captured, on=["source", "lsn"], how="left"
    )
    if late_contexts is None or late_contexts.is_empty():  # the usual batch: no joins
        joined = joined.with_columns(
            pl.lit(None, pl.String).alias("late_context"),
            pl.lit(None, pl.Datetime("us", "UTC")).alias("attached_at"),
            pl.lit(None, pl.String).alias("late_spec"),
        )
    else:
        late = (
            with_context_spec(late_contexts)
            .sort("attached_at")
            .group_by("source", "target_xid", maintain_order=True)
            .agg(
                pl.col("context").last().alias("late_context"),
                pl.col("attached_at").last(),
                pl.col("personal_spec").last().alias("late_spec"),
            )
        )
        joined = joined.join(
            late, left_on=["source", "xid"], right_on=["source", "target_xid"], how="left"
        )

    if FILE not in joined.columns:
        joined = joined.with_columns(pl.lit(None, pl.String).alias(FILE))
    result = EnrichResult(pl.DataFrame(schema=schema))
    ignore = {
        (source, name): set(t.ignore_changes_to)
        for source in joined.get_column("source").unique().to_list()
        for name, t in (policy[source] if isinstance(policy, dict) else policy).tables.items()
    }
    joined = joined.with_columns(  # staged before capture kept them
        pl.lit(None, pl.String).alias(name)
        for name in ("organization_column", "personal_spec", "erased_changed")
        if name not in joined.columns
    )
    # Slices bound the memory of the Python part: only the computed columns pass through Python
    # objects; the row images stay in Arrow and are selected into the records as they are.
    parts = [
        _enrich_slice(chunk, result, ignore, now, grace)
        for chunk in joined.iter_slices(n_rows=SLICE_ROWS)
    ]
    if parts:
        if ignored is None:
            ignored = ignored_counts(result.ignored_lsns)
        every = (
            pl.concat(parts)
            .join(ignored, on=["source", "lsn"], how="left")
            .with_columns(pl.col("txn_ignored").fill_null(0))
            .select(list(schema))
        )
        waiting = pl.col("attribution_status") == WAITING
        result.records, result.waiting = every.filter(~waiting), every.filter(waiting)
    return result


def ignored_counts(lsns: list[tuple[str, int]]) -> pl.DataFrame:
    """(source, lsn, txn_ignored): how many changes of each transaction the policy ignored."""
    frame = pl.DataFrame(lsns, schema={"source": pl.String, "lsn": pl.Int64}, orient="row")
    return frame.group_by("source", "lsn").agg(pl.len().cast(pl.Int32).alias("txn_ignored"))


SLICE_ROWS = 50_000
#: Status of an orphan's would-be record while it waits for its context (never indexed).
WAITING = "waiting"


def _enrich_slice(
    chunk: pl.DataFrame,
    result: EnrichResult,
    ignore: dict[tuple[str, str], set[str]],
    now: datetime,
    grace: timedelta,
) -> pl.DataFrame:
    columns = (
        "lsn",
        "change_index",
        "xid",
        "commit_time",
        "env",
        "source",
        "schema",
        "table",
        "operation",
        "before",
        "after",
        "key_columns",
        "unchanged_toast",
        "context",
        "context_spec",
        "late_context",
        "late_spec",
        "attached_at",
        "organization_column",
        "personal_spec",
        "erased_changed",
        FILE,
    )
    keep: list[bool] = []
    computed: dict[str, list] = {
        "id": [],
        "object_id": [],
        "changed_columns": [],
        "context": [],
        "attribution_status": [],
        "attribution_lag_seconds": [],
        "row_organization": [],
        "personal": [],
        "context_personal": [],
    }
    for (
        lsn,
        index,
        xid,
        committed,
        env,
        source,
        schema,
        table,
        op,
        before_text,
        after_text,
        key_text,
        toast_text,
        context,
        context_spec,
        late_context,
        late_spec,
        attached_at,
        organization_column,
        personal_spec,
        erased_changed,
        file,
    ) in zip(*(chunk.get_column(c).to_list() for c in columns), strict=True):
        lag, status = None, "attributed"
        if context is None and late_context is not None and attached_at >= committed:
            context, context_spec, status = late_context, late_spec, "late"
            lag = (attached_at - committed).total_seconds()
        if context is None:
            status = "unattributed" if now - committed >= grace else WAITING
        try:
            before = json.loads(before_text) if before_text is not None else None
            after = json.loads(after_text) if after_text is not None else None
            keys = json.loads(key_text)
            unchanged = set(json.loads(toast_text or "[]"))
        except (TypeError, ValueError) as exc:
            result.rejected.append((lsn, index, f"unreadable change: {exc}", file))
            keep.append(False)
            continue
        operation = Operation(op)
        changed = (
            changed_columns(operation, before, after, unchanged)
            if erased_changed is None
            else json.loads(erased_changed)  # an erasure's: the values no longer tell
        )
        if (
            operation is Operation.update
            and changed
            and set(changed) <= ignore.get((source, f"{schema}.{table}"), set())
        ):
            result.ignored += 1
            result.ignored_lsns.append((source, lsn))
            keep.append(False)
            continue
        image = after if after is not None else before
        missing = [k for k in keys if image is None or k not in image]
        if operation is not Operation.truncate and missing:
            result.rejected.append(
                (lsn, index, f"key columns {missing} not in the row image", file)
            )
            keep.append(False)
            continue
        if status == WAITING:
            result.orphans.append(Orphan(source, lsn, index, xid, committed, file))
        keep.append(True)
        computed["id"].append(record_id(env, source, lsn, index))
        computed["object_id"].append(
            object_id([image[k] for k in keys])
            if keys and image is not None and operation is not Operation.truncate
            else None
        )
        computed["changed_columns"].append(json.dumps(changed))
        computed["context"].append(context)
        computed["attribution_status"].append(status)
        computed["attribution_lag_seconds"].append(lag)
        computed["row_organization"].append(
            _row_organization(organization_column, operation, before, after)
        )
        computed["personal"].append(personal_shape(personal_spec, operation, before, after))
        computed["context_personal"].append(
            None if context_spec is None else context_shape(context_spec, context)
        )
    kept = chunk.filter(pl.Series(keep, dtype=pl.Boolean)).drop("context")
    extra = pl.DataFrame(computed, schema={k: RECORD_SCHEMA[k] for k in computed})
    both = pl.concat([kept, extra], how="horizontal")
    return both.select(
        *(
            # A column staged files gained later (staging.STAGED_LATER) is null in older ones.
            pl.lit(None, dtype).alias(name)
            if name in STAGED_LATER and name not in both.columns
            else pl.col(name).cast(dtype)
            for name, dtype in RECORD_SCHEMA.items()
            if name != "txn_ignored"
        ),
        pl.col(FILE),
    )


def _row_organization(
    column: str | None,
    operation: Operation,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
) -> str | None:
    """The organization a change belongs to, by its table's organization column (staged with
    the change, as the policy named it at capture): the row's value after the change, or before
    it for a delete. None where the table names no column: the context's organization then
    applies. ``""``, no organization at all, where the table names one but the change has
    none a key could name: the value is null, empty, longer than an id may be or not printable;
    the change is a schema change or a truncate; or the row moved from one organization to
    another (each side's keys would otherwise read the other's values in its images). The
    context is not asked then: it is the writer's claim, not the row's."""
    if column is None:
        return None
    if operation in (Operation.ddl, Operation.truncate):
        return ""
    found = {
        side: organization_id(image.get(column))
        for side, image in (("before", before), ("after", after))
        if image is not None and column in image
    }
    if len(found) == 2 and found["before"] != found["after"]:
        return ""
    value = found.get("after", found.get("before"))
    return value or ""


def personal_shape(
    spec: str | None,
    operation: Operation,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
) -> str | None:
    """The record's ``row.personal``: its table's personal declaration as staged with the
    change, and whose each image is, by the subject column of that image (the other image's
    where an image lacks it: an update's old key image holds only the key). None where the
    table declares nothing, and for schema changes and truncates, which hold no row values."""
    if spec is None or operation in (Operation.ddl, Operation.truncate):
        return None
    declared = _declaration(spec)
    column = declared["subject"]
    subjects = {
        side: subject_text(image.get(column))
        for side, image in (("before", before), ("after", after))
        if image is not None and column in image
    }
    fallback = subjects.get("after", subjects.get("before"))
    shape = {
        "of": declared["of"],
        "columns": declared["columns"],
        **{
            side: subjects.get(side, fallback) if image is not None else None
            for side, image in (("before", before), ("after", after))
        },
    }
    return json.dumps(shape, separators=(",", ":"))


@lru_cache(maxsize=256)
def _declaration(spec: str) -> dict[str, Any]:
    """A staged personal declaration, parsed once: every change of a table repeats it.
    Callers must not change what it returns."""
    return json.loads(spec)


def subject_text(value: Any) -> str | None:
    """A subject column's value as an erasure names it (``TABLE:ID``): text as it is, any
    other JSON value as its JSON text (42 -> "42")."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def changed_columns(
    operation: Operation,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    unchanged_toast: set[str],
) -> list[str]:
    """Which columns the change touched.

    Inserts and snapshots: every column given a value; deletes: every column of the old row;
    updates: columns whose value differs (a column only in one image counts as changed, an
    unchanged TOASTed value never does); truncate: none; a schema change: the columns added,
    dropped or retyped (its images are the table's shapes, ``capture.schema_changes``).
    """
    if operation is Operation.ddl:
        return changed_columns(
            Operation.update, (before or {}).get("columns"), (after or {}).get("columns"), set()
        )
    if operation in (Operation.insert, Operation.snapshot):
        return sorted(k for k, v in (after or {}).items() if v is not None)
    if operation is Operation.delete:
        return sorted((before or {}).keys())
    if operation is Operation.truncate:
        return []
    before, after = before or {}, after or {}
    keys = (before.keys() | after.keys()) - unchanged_toast
    return sorted(k for k in keys if before.get(k, _ABSENT) != after.get(k, _ABSENT))


_ABSENT = object()
