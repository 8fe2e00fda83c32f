"""Enrich staged files into records: a capture run's pending batches, or a whole hour.

Records are written per staged ``changes`` file, under its name (``StagingStore.derived_path``),
so a run's cost is the batches it captured, not the hour so far, while an hour stays a set of
immutable files that a backfill rebuilds as a pure function of its staged batches. Orphans wait
in the quarantine; a late context or a due retry re-enriches only those changes and rewrites only
the records files that hold them (``resolve_quarantine``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import polars as pl
import psycopg

from audit_platform.enrich import quarantine
from audit_platform.enrich.join import EnrichResult, enrich, ignored_counts, transaction_contexts
from audit_platform.enrich.rejections import REJECTED, rejected_frame, store_rejections
from audit_platform.faults import crash_point
from audit_platform.policy import SourcePolicy
from audit_platform.record import RECORD_SCHEMA
from audit_platform.staging.store import (
    COALESCE,
    FILE,
    PendingBatch,
    StagingStore,
    coalesced,
    hour_from_path,
    lsn_range,
)
from audit_platform.trust.leaves import (
    attach_leaves,
    context_leaves,
    record_leaves,
    rejected_leaves,
)
from audit_platform.trust.log import TrustLog

REJECTED_SCHEMA = pl.Schema({"lsn": pl.Int64, "change_index": pl.Int32, "reason": pl.String})


@dataclass
class HourResult:
    """What one enrichment did to one hour: the increment of a run, or a whole rebuild."""

    hour: datetime
    changes: int = 0
    records: int = 0
    attributed: int = 0
    late: int = 0
    unattributed: int = 0
    orphans_waiting: int = 0
    rejected: int = 0
    #: Messages under the platform's prefix that were not valid contexts (capture.messages).
    rejected_messages: int = 0

    @property
    def metadata(self) -> dict[str, int | float]:
        orphan_rate = (
            (self.orphans_waiting + self.unattributed) / self.changes if self.changes else 0.0
        )
        return {**vars(self), "hour": self.hour.isoformat(), "orphan_rate": round(orphan_rate, 4)}


@dataclass
class EnrichOutcome:
    """Counts per hour of one enrichment, and the records files it wrote."""

    records_paths: list[str] = field(default_factory=list)
    by_hour: dict[datetime, HourResult] = field(default_factory=dict)
    #: The trail's leaves of what was enriched (when asked for): see ``trust.leaves``.
    leaves: list[pl.DataFrame] = field(default_factory=list)

    def add(self, path: str | None, changes: int, result: EnrichResult) -> None:
        """Count one file's (or one resolution's) result into its hours."""

        def of(where: str | None, committed: datetime | None = None) -> HourResult:
            if where:
                hour = hour_from_path(where)
            elif committed is not None:
                hour = _hour(committed)
            else:  # a rejected change read without its file: no hour to count it in
                raise ValueError("a result with neither its file nor its commit time has no hour")
            return self.by_hour.setdefault(hour, HourResult(hour))

        if path is not None and changes:
            of(path).changes += changes
        counts = result.records.group_by(
            FILE, pl.col("commit_time").dt.truncate("1h"), "attribution_status"
        ).len()
        for where, hour, status, count in counts.iter_rows():
            found = of(where, hour)
            found.records += count
            setattr(found, status, getattr(found, status) + count)
        for orphan in result.orphans:
            of(orphan.file, orphan.commit_time).orphans_waiting += 1
        for _, _, _, where in result.rejected:
            of(where).rejected += 1

    def add_rejected_messages(self, rejected: pl.DataFrame) -> None:
        for committed in rejected["commit_time"]:
            hour = _hour(committed)
            self.by_hour.setdefault(hour, HourResult(hour)).rejected_messages += 1

    @property
    def hours(self) -> list[HourResult]:
        return sorted(self.by_hour.values(), key=lambda h: h.hour)


def enrich_files(
    store: StagingStore,
    state: psycopg.Connection,
    policy: SourcePolicy,
    changes_paths: list[str],
    contexts_paths: list[str],
    *,
    now: datetime,
    grace: timedelta,
    leaves: bool = False,
    groups: list[list[str]] | None = None,
) -> EnrichOutcome:
    """Enrich these staged files and write one records file per changes file.

    The files must hold whole transactions (a pending batch with its parts, or an hour), so
    every change meets its transaction's context. Contexts (one small row per transaction) are
    read once; changes are joined one file at a time, so memory is bounded by one batch
    however many batches an hour holds. With ``leaves``, the outcome holds the trail's leaves
    of every change (records and orphans alike) and context. ``groups`` splits the changes
    files into sets no transaction crosses (several pending batches enriched at once): each
    is counted on its own, and a set of one file needs no counting pass.
    """
    contexts = store.read(contexts_paths, "contexts")
    env, source = store.env, store.source
    outcome = EnrichOutcome()
    # Attachments and refused messages are rare: a batch without them does no work for them
    # (a live run pays this per batch, per source).
    kinds = set(contexts.get_column("kind").unique().to_list())
    with state.transaction():
        if "attach" in kinds:
            quarantine.store_late_contexts(state, env, source, contexts)
        if REJECTED in kinds:
            rejected = rejected_frame(contexts)
            store_rejections(state, env, source, rejected)
            outcome.add_rejected_messages(rejected)
        own = transaction_contexts(contexts)
        if leaves:
            times = contexts.group_by("lsn").agg(pl.col("commit_time").first())
            outcome.leaves.append(context_leaves(own.join(times, on="lsn"), env, source))
            if "attach" in kinds:
                outcome.leaves.append(attach_leaves(contexts, env, source))
            if REJECTED in kinds:
                outcome.leaves.append(rejected_leaves(contexts, env, source))
        counts: dict[str, tuple | None] = {}
        for group in groups if groups is not None else [changes_paths]:
            found = _transaction_counts(store, policy, group, contexts, now)
            counts.update(dict.fromkeys(group, found))
        for path in changes_paths:
            changes = store.read([path], "changes")
            result = _enrich_known(
                state, store, policy, changes, contexts, own, now, grace, counts.get(path)
            )
            if leaves:
                outcome.leaves.append(record_leaves(result.records))
                if result.waiting is not None and not result.waiting.is_empty():
                    outcome.leaves.append(record_leaves(result.waiting))
            target = store.derived_path(path, "records")
            store.write_file(target, result.records.drop(FILE).sort("lsn", "change_index"))
            outcome.records_paths.append(target)
            if result.rejected:
                rows = [(lsn, index, reason) for lsn, index, reason, _ in result.rejected]
                frame = pl.DataFrame(rows, schema=REJECTED_SCHEMA, orient="row")
                store.write_file(store.derived_path(path, "rejected"), frame)
            quarantine.record_orphans(state, env, source, result.orphans, now=now)
            quarantine.settle(state, env, source, result.records, now=now)
            outcome.add(path, changes.height, result)
    return outcome


def _transaction_counts(store, policy, paths, contexts, now) -> tuple | None:
    """(captured, ignored) per transaction over several files, where one transaction may be
    staged in parts across them (counted file by file, it would have as many totals as
    parts); None for a single file, which holds its transactions whole."""
    if len(paths) < 2:
        return None
    captured, ignored = [], []
    for path in paths:
        changes = store.read([path], "changes")
        captured.append(changes.select("lsn", "change_index"))
        if any(t.ignore_changes_to for t in policy.tables.values()):
            ignored.extend(
                enrich(changes, contexts, policy, now=now, grace=timedelta(0)).ignored_lsns
            )
    captured_counts = (
        pl.concat(captured)
        .unique()
        .group_by("lsn")
        .agg(pl.len().cast(pl.Int32).alias("txn_changes"))
    )
    return captured_counts, ignored_counts(ignored)


def _enrich_known(
    state, store, policy, changes, contexts, own, now, grace, counts=None
) -> EnrichResult:
    """``enrich`` with the late contexts of the changes that have no context of their own."""
    unmatched = changes.join(own.select("lsn", "xid"), on=["lsn", "xid"], how="anti")
    xids = unmatched["xid"].unique().to_list()
    late = quarantine.late_contexts_for(state, store.env, store.source, xids) if xids else None
    captured, ignored = counts if counts is not None else (None, None)
    return enrich(
        changes,
        contexts,
        policy,
        now=now,
        grace=grace,
        late_contexts=late,
        captured=captured,
        ignored=ignored,
        own=own,
    )


def _split(records: pl.DataFrame, paths: Iterable[str]) -> Iterable[tuple[str, pl.DataFrame]]:
    wanted = set(paths)
    for (path,), rows in records.group_by(FILE):
        if path in wanted:
            yield path, rows.drop(FILE).sort("lsn", "change_index")


def enrich_hour(
    store: StagingStore,
    state: psycopg.Connection,
    policy: SourcePolicy,
    hour: datetime,
    *,
    now: datetime,
    grace: timedelta,
) -> HourResult:
    """Rebuild an hour's records from its staged files (a backfill, a reconciliation)."""
    outcome = enrich_files(
        store,
        state,
        policy,
        store.hour_files("changes", hour),
        store.hour_files("contexts", hour),
        now=now,
        grace=grace,
    )
    found = [h for h in outcome.hours if h.hour == hour]
    return found[0] if found else HourResult(hour)


def enrich_pending(
    store: StagingStore,
    state: psycopg.Connection,
    policy: SourcePolicy,
    *,
    now: datetime,
    grace: timedelta,
    trail: bool = True,
    between: Callable[[], None] | None = None,
    coalesce: int = COALESCE,
) -> list[HourResult]:
    """Enrich every pending batch not enriched yet: this run's, and any an earlier run left,
    in LSN order, appending their leaves to the trail's log before they count as done.

    Up to ``coalesce`` batches are enriched together: what a batch costs whatever it holds
    (reading the contexts, the quarantine's queries, the trail's append) is paid once for
    them, so a source that waited for its turn (a live run's lanes, a backlog after a crash)
    catches up instead of falling further behind (docs/design.md, "The capture run"). Each
    keeps its own records files, so a backfill still rebuilds the same files. ``between`` is
    called after each group (a live worker keeps its stream alive with it)."""
    hours: list[HourResult] = []
    log = TrustLog(store) if trail else None
    waiting = [entry for entry in store.pending() if entry.records is None]
    for entries in coalesced(store, waiting, lambda entry: list(entry.staged), coalesce):
        # An entry may repeat files of the one before it (two entries of one transaction
        # staged in parts, after a crash in ``StagingStore.settle``): each file is enriched
        # once, its transactions counted with the first entry that holds it, the whole one.
        groups: list[list[str]] = []
        for entry in entries:
            taken = {path for group in groups for path in group}
            groups.append([p for p in entry.staged_paths("changes") if p not in taken])
        contexts = [p for entry in entries for p in entry.staged_paths("contexts")]
        outcome = enrich_files(
            store,
            state,
            policy,
            [path for group in groups for path in group],
            list(dict.fromkeys(contexts)),
            now=now,
            grace=grace,
            leaves=log is not None,
            groups=[group for group in groups if group],
        )
        crash_point("enrich.records_written")
        if log is not None:
            _append_per_entry(log, entries, pl.concat(outcome.leaves))
        crash_point("enrich.logged")
        for entry in entries:
            changes = entry.staged_paths("changes")
            store.mark_enriched(entry, [store.derived_path(path, "records") for path in changes])
        hours.extend(outcome.hours)
        if between is not None:
            between()
    return merge_hours(hours)


def _append_per_entry(log: TrustLog, entries: list[PendingBatch], leaves: pl.DataFrame) -> None:
    """Append each entry's leaves on its own, split by the commit LSNs its files end at: a
    leaves file is named by its LSN range and first position, so a rerun after a crash in the
    middle writes the same file again whatever the group holds this time."""
    low: int | None = None
    for entry in entries:
        high = max((lsn_range(path)[1] for path in entry.staged), default=0)
        if low is not None and high <= low:
            continue  # an entry overlapping the one before (two entries of one transaction)
        lsn = pl.col("lsn")
        log.append(leaves.filter(lsn <= high if low is None else (lsn > low) & (lsn <= high)))
        low = high
    rest = leaves if low is None else leaves.filter(pl.col("lsn") > low)
    if not rest.is_empty():  # nothing, unless a file is misnamed
        log.append(rest)


def resolve_quarantine(
    store: StagingStore,
    state: psycopg.Connection,
    policy: SourcePolicy,
    *,
    now: datetime,
    grace: timedelta,
    limit: int = 10_000,
) -> list[HourResult]:
    """Re-enrich the orphans that are due or whose context has arrived, and only them.

    Each changed record replaces its old version in its batch's records file (same id), and
    the ids go to the pending ledger, so indexing re-sends just those documents.
    """
    env, source = store.env, store.source
    entries = quarantine.entries_to_revisit(state, env, source, now, limit=limit)
    if entries.is_empty():
        return []
    wanted = entries.select("lsn", "change_index")
    by_hour = entries.group_by(pl.col("commit_time").dt.truncate("1h").alias("hour")).agg("lsn")
    files = sorted(
        path
        for hour, lsns in by_hour.iter_rows()
        for path in store.files_holding("changes", hour, lsns)
    )
    whole = store.read(files, "changes")
    # The orphans are some of their transactions' changes: count each transaction in the
    # batch files, which hold all of it.
    captured = (
        whole.join(wanted.select("lsn").unique(), on="lsn", how="semi")
        .unique(["lsn", "change_index"])
        .group_by("lsn")
        .agg(pl.len().cast(pl.Int32).alias("txn_changes"))
    )
    changes = whole.join(wanted, on=["lsn", "change_index"], how="semi")
    late = quarantine.late_contexts_for(state, env, source, entries["xid"].unique().to_list())
    # Orphans had no context of their own in their batch: only late contexts can attribute them.
    no_contexts = store.read([], "contexts")
    result = enrich(
        changes, no_contexts, policy, now=now, grace=grace, late_contexts=late, captured=captured
    )
    reindex: dict[str, list[str]] = {}
    for path, rows in _split(result.records, files):
        target = store.derived_path(path, "records")
        existing = store.read([target])
        kept = (
            existing.drop(FILE).filter(~pl.col("id").is_in(rows["id"].implode()))
            if existing.height
            else rows.clear()
        )
        # A file written by an earlier version may lack later columns or order them otherwise.
        both = pl.concat([kept, rows], how="diagonal_relaxed").select(list(RECORD_SCHEMA))
        store.write_file(target, both.sort("lsn", "change_index"))
        reindex[target] = rows["id"].to_list()
    if reindex:
        store.add_reindex(reindex)
    with state.transaction():
        quarantine.record_orphans(state, env, source, result.orphans, now=now)
        quarantine.settle(state, env, source, result.records, now=now)
    outcome = EnrichOutcome()
    outcome.add(None, 0, result)
    return outcome.hours


def _hour(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def merge_hours(results: Iterable[HourResult]) -> list[HourResult]:
    """Add up several results of the same hours."""
    merged: dict[datetime, HourResult] = {}
    for result in results:
        total = merged.setdefault(result.hour, HourResult(result.hour))
        for name, value in vars(result).items():
            if name != "hour":
                setattr(total, name, getattr(total, name) + value)
    return sorted(merged.values(), key=lambda h: h.hour)
