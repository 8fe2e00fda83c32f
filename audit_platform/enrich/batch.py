"""Enrich staged files into records: a capture run's pending batches, or a whole hour.

Records are written per staged ``changes`` file, under its name (``StagingStore.derived_path``),
so a run's cost is the batches it captured, not the hour so far, while an hour stays a set of
immutable files that a backfill rebuilds as a pure function of its staged batches. Orphans wait
in the quarantine; a late context or a due retry re-enriches only those changes and rewrites only
the records files that hold them (``resolve_quarantine``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial

import polars as pl
import psycopg

from audit_platform.enrich import quarantine
from audit_platform.enrich.join import (
    TRANSACTION,
    EnrichResult,
    enrich,
    ignored_counts,
    transaction_contexts,
)
from audit_platform.enrich.rejections import REJECTED, rejected_frame, store_rejections
from audit_platform.faults import crash_point
from audit_platform.policy import SourcePolicy
from audit_platform.record import RECORD_SCHEMA, Operation
from audit_platform.staging.schemas import with_context_spec
from audit_platform.staging.store import (
    COALESCE,
    FILE,
    TOGETHER_ROWS,
    PendingBatch,
    StagingStore,
    coalesced,
    hour_from_path,
    lsn_range,
)
from audit_platform.staging.writers import TURNS
from audit_platform.trust.commitments import (
    Commitments,
    context_shape,
    ensure_keys,
    subjects_in,
)
from audit_platform.trust.leaves import (
    LEAF_SCHEMA,
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
    """Counts per hour of one enrichment of one source, and the records files it wrote."""

    #: Each records file written, with its rows (the ledger keeps them: ``PendingBatch.rows``).
    records_rows: dict[str, int] = field(default_factory=dict)
    by_hour: dict[datetime, HourResult] = field(default_factory=dict)
    #: The trail's leaves of what was enriched (when asked for): see ``trust.leaves``.
    leaves: list[pl.DataFrame] = field(default_factory=list)

    def of(self, where: str | None, committed: datetime | None = None) -> HourResult:
        """The hour a file's path names, or else a commit time's."""
        if where:
            hour = hour_from_path(where)
        elif committed is not None:
            hour = _hour(committed)
        else:  # a rejected change read without its file: no hour to count it in
            raise ValueError("a result with neither its file nor its commit time has no hour")
        return self.by_hour.setdefault(hour, HourResult(hour))

    def add_rejected_messages(self, rejected: pl.DataFrame) -> None:
        for committed in rejected["commit_time"]:
            hour = _hour(committed)
            self.by_hour.setdefault(hour, HourResult(hour)).rejected_messages += 1

    @property
    def all_leaves(self) -> pl.DataFrame:
        return pl.concat(self.leaves) if self.leaves else pl.DataFrame(schema=LEAF_SCHEMA)

    @property
    def hours(self) -> list[HourResult]:
        return sorted(self.by_hour.values(), key=lambda h: h.hour)


@dataclass(frozen=True)
class Share:
    """One source's part of an enrichment that serves several sources at once."""

    store: StagingStore
    policy: SourcePolicy

    @property
    def source(self) -> str:
        return self.store.source


class _Turn:
    """What one enrichment of several sources' files shares: where each file belongs, and an
    outcome per source. Frames hold every source's rows together (their ``source`` column
    tells them apart), so a query costs the same for fifty sources as for one; what is one
    source's own (its files, its quarantine, its trail) is written per source."""

    def __init__(self, shares: list[Share], *, now: datetime, grace: timedelta, leaves: bool):
        self.shares = {share.source: share for share in shares}
        self.policies = {share.source: share.policy for share in shares}
        self.env = shares[0].store.env
        self.now, self.grace, self.leaves = now, grace, leaves
        self.outcomes = {share.source: EnrichOutcome() for share in shares}
        #: changes file -> its source, in the order they are enriched.
        self.files: dict[str, str] = {}

    def contexts(self, state: psycopg.Connection, contexts: pl.DataFrame) -> pl.DataFrame:
        """Store what the contexts hold besides transactions' own (attachments, refused
        messages: rare, so a batch without them does no work for them); return the own ones."""
        env = self.env
        contexts = with_context_spec(contexts)
        kinds = set(contexts.get_column("kind").unique().to_list())
        if kinds & {"attach", REJECTED}:
            for (source,), part in contexts.group_by("source"):
                outcome = self.outcomes[str(source)]
                if "attach" in kinds:
                    quarantine.store_late_contexts(state, env, str(source), part)
                    if self.leaves:
                        attached = part.filter(pl.col("kind") == "attach")
                        keys = self._context_keys(state, attached["personal_spec"], attached)
                        outcome.leaves.append(attach_leaves(part, env, str(source), keys))
                if REJECTED in kinds:
                    rejected = rejected_frame(part)
                    store_rejections(state, env, str(source), rejected)
                    outcome.add_rejected_messages(rejected)
                    if self.leaves:
                        outcome.leaves.append(rejected_leaves(part, env, str(source)))
        own = transaction_contexts(contexts)
        if self.leaves and own.height:
            times = contexts.group_by("source", "lsn").agg(pl.col("commit_time").first())
            timed = own.join(times, on=["source", "lsn"])
            keys = self._context_keys(state, timed["context_spec"], timed)
            self._add_leaves(context_leaves(timed, env, keys), timed)
        return own

    def _context_keys(
        self, state: psycopg.Connection, specs: pl.Series, contexts: pl.DataFrame
    ) -> Commitments:
        """The keys of the actors whose personal fields the contexts hold (none where no
        policy declares any: the usual batch asks nothing)."""
        if specs.null_count() == specs.len():
            return Commitments()
        shapes = [
            context_shape(spec, text)
            for spec, text in zip(specs.to_list(), contexts["context"].to_list(), strict=True)
        ]
        return Commitments(ensure_keys(state, self.env, subjects_in(shapes)))

    def changes(
        self,
        state: psycopg.Connection,
        changes: pl.DataFrame,
        contexts: pl.DataFrame,
        own: pl.DataFrame,
        paths: list[str],
        counts: tuple[pl.DataFrame, pl.DataFrame] | None = None,
    ) -> None:
        """Enrich changes read from ``paths`` and write one records file per path, with the
        late contexts of the changes that have no context of their own. The changes hold whole
        transactions, or ``counts`` (captured, ignored) counts them (``_transaction_counts``)."""
        unmatched = changes.join(own.select(*TRANSACTION), on=TRANSACTION, how="anti")
        late = None
        if unmatched.height:
            wanted = unmatched.group_by("source").agg(pl.col("xid").unique())
            late = pl.concat(
                quarantine.late_contexts_for(state, self.env, source, xids)
                for source, xids in wanted.iter_rows()
            )
        result = enrich(
            changes,
            contexts,
            self.policies,
            now=self.now,
            grace=self.grace,
            late_contexts=late,
            own=own,
            captured=None if counts is None else counts[0],
            ignored=None if counts is None else counts[1],
        )
        records = result.records
        if self.leaves:
            waiting = result.waiting if result.waiting is not None else records.clear()
            subjects = subjects_in(pl.concat([records["personal"], waiting["personal"]]))
            commitments = Commitments(ensure_keys(state, self.env, subjects))
            self._add_leaves(record_leaves(records, commitments), records)
            if not waiting.is_empty():
                self._add_leaves(record_leaves(waiting, commitments), waiting)
        by_file = _by(records, FILE, paths)
        rejected: dict[str, list[tuple[int, int, str]]] = {}
        for lsn, index, reason, path in result.rejected:
            rejected.setdefault(str(path), []).append((lsn, index, reason))
        TURNS.side_by_side(
            partial(self._write, path, by_file[path], rejected.get(path)) for path in paths
        )
        for path in paths:
            store = self.shares[self.files[path]].store
            written = self.outcomes[self.files[path]].records_rows
            written[store.derived_path(path, "records")] = by_file[path].height
        quarantine.record_orphans(state, self.env, result.orphans, now=self.now)
        quarantine.settle(state, self.env, records, now=self.now)
        self.count(changes, result)

    def _write(
        self, path: str, records: pl.DataFrame, rejected: list[tuple[int, int, str]] | None
    ) -> None:
        """The records file (and the rejected changes' file) of one staged changes file."""
        store = self.shares[self.files[path]].store
        target = store.derived_path(path, "records")
        store.write_file(target, records.drop(FILE).sort("lsn", "change_index"))
        if rejected:
            frame = pl.DataFrame(rejected, schema=REJECTED_SCHEMA, orient="row")
            store.write_file(store.derived_path(path, "rejected"), frame)

    def count(self, changes: pl.DataFrame, result: EnrichResult) -> None:
        """Count each file's changes and results into its source's hours."""

        def of(path: str | None, committed: datetime | None = None) -> HourResult:
            if path is not None:
                return self.outcomes[self.files[path]].of(path, committed)
            if len(self.outcomes) > 1:
                raise ValueError("a result without its file in a turn of several sources")
            return next(iter(self.outcomes.values())).of(path, committed)

        for path, count in changes.group_by(FILE).len().iter_rows():
            of(path).changes += count
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

    def _add_leaves(self, leaves: pl.DataFrame, rows: pl.DataFrame) -> None:
        """Give each source the leaves of its rows (``leaves`` is in ``rows``' order)."""
        for source, part in _by(leaves.with_columns(rows["source"]), "source", []).items():
            self.outcomes[source].leaves.append(part.drop("source"))


def _by(frame: pl.DataFrame, column: str, keys: list[str]) -> dict[str, pl.DataFrame]:
    """``frame``'s rows per value of ``column``, an empty frame for each of ``keys`` it lacks
    (one value, the usual turn of one source: no split)."""
    values = frame.get_column(column).unique().to_list() if frame.height else []
    if len(values) <= 1:
        found = {str(v): frame for v in values}
    else:
        found = {str(k[0]): part for k, part in frame.partition_by(column, as_dict=True).items()}
    return {**{key: frame.clear() for key in keys}, **found}


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
) -> EnrichOutcome:
    """Enrich these staged files of one source, one changes file at a time (an hour's, a
    backfill: memory is bounded by one batch however many an hour holds), and write one
    records file per changes file. Each file must hold whole transactions.

    With ``leaves``, the outcome holds the trail's leaves of every change (records and orphans
    alike) and context."""
    turn = _Turn([Share(store, policy)], now=now, grace=grace, leaves=leaves)
    contexts = store.read(contexts_paths, "contexts")
    with state.transaction():
        own = turn.contexts(state, contexts)
        counts = _transaction_counts(store, policy, changes_paths, contexts, now)
        for path in changes_paths:
            turn.files[path] = store.source
            changes = store.read([path], "changes")
            turn.changes(state, changes, contexts, own, [path], counts)
    return turn.outcomes[store.source]


def _transaction_counts(
    store: StagingStore,
    policy: SourcePolicy,
    paths: list[str],
    contexts: pl.DataFrame,
    now: datetime,
) -> tuple[pl.DataFrame, pl.DataFrame] | None:
    """(captured, ignored) per transaction over several files, where one transaction may be
    staged in parts across them (counted file by file, it would have as many totals as
    parts); None for a single file, which holds its transactions whole."""
    if len(paths) < 2:
        return None
    captured, ignored = [], []
    # Only an update of a table with ignore_changes_to can be ignored: the rest (a snapshot's
    # rows, say) need not be enriched a second time just to be counted.
    ignoring = sorted(name for name, t in policy.tables.items() if t.ignore_changes_to)
    for path in paths:
        changes = store.read([path], "changes")
        captured.append(changes.select("source", "lsn", "change_index"))
        candidates = changes.filter(
            (pl.col("operation") == Operation.update.value)
            & pl.concat_str("schema", pl.lit("."), "table").is_in(ignoring)
        )
        if candidates.height:
            ignored.extend(
                enrich(candidates, contexts, policy, now=now, grace=timedelta(0)).ignored_lsns
            )
    captured_counts = (
        pl.concat(captured)
        .unique()
        .group_by("source", "lsn")
        .agg(pl.len().cast(pl.Int32).alias("txn_changes"))
    )
    return captured_counts, ignored_counts(ignored)


def enrich_together(
    state: psycopg.Connection,
    parts: list[tuple[Share, list[str], list[str]]],
    *,
    now: datetime,
    grace: timedelta,
    leaves: bool = False,
) -> dict[str, EnrichOutcome]:
    """Enrich several sources' staged files at once: for each source (its share), changes files
    that together hold whole transactions (one or more pending batches) and their contexts
    files. Each changes file gets its records file, each source its outcome, as
    ``enrich_files`` gives them: what differs is only that the frame work is done once for all
    (a live run's fixed cost per turn, docs/design.md "The capture run")."""
    turn = _Turn([share for share, _, _ in parts], now=now, grace=grace, leaves=leaves)
    contexts = _concat(share.store.read(paths, "contexts") for share, _, paths in parts)
    frames = []
    for share, paths, _ in parts:
        turn.files.update(dict.fromkeys(paths, share.source))
        frames.append(share.store.read(paths, "changes"))
    with state.transaction():
        own = turn.contexts(state, contexts)
        turn.changes(state, _concat(frames), contexts, own, list(turn.files))
    return turn.outcomes


def _concat(frames: Iterable[pl.DataFrame]) -> pl.DataFrame:
    found = list(frames)
    return found[0] if len(found) == 1 else pl.concat(found, how="diagonal_relaxed")


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


def _paths(entries: list[PendingBatch]) -> tuple[list[str], list[str]]:
    """The changes and contexts files of a group of entries, each once (two entries of one
    transaction staged in parts, after a crash in ``StagingStore.settle``, share files)."""
    changes = [path for entry in entries for path in entry.staged_paths("changes")]
    contexts = [path for entry in entries for path in entry.staged_paths("contexts")]
    return list(dict.fromkeys(changes)), list(dict.fromkeys(contexts))


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
    """Enrich every pending batch of one source: ``enrich_pending_together`` of one."""
    found = enrich_pending_together(
        state,
        [Share(store, policy)],
        now=now,
        grace=grace,
        trail=trail,
        between=between,
        coalesce=coalesce,
    )
    return found[store.source]


def enrich_pending_together(
    state: psycopg.Connection,
    shares: list[Share],
    *,
    now: datetime,
    grace: timedelta,
    trail: bool = True,
    between: Callable[[], None] | None = None,
    coalesce: int = COALESCE,
) -> dict[str, list[HourResult]]:
    """Enrich every pending batch of these sources not enriched yet (this run's, and any an
    earlier run left), each source's in LSN order, appending their leaves to each source's
    trail before they count as done.

    Up to ``coalesce`` batches of a source are enriched together, and the sources' groups
    together (``enrich_together``, up to ``TOGETHER_ROWS`` staged rows; a larger group alone,
    a file at a time, as a backfill enriches an hour):
    what a batch costs whatever it holds (the frame work, the quarantine's queries) is paid
    once for them, so a source that waited for its turn (a live run's lanes, a backlog after a
    crash) catches up instead of falling further behind, and fifty busy sources cost about
    what one does (docs/design.md, "The capture run"). Each batch keeps its own records
    files, so a backfill still rebuilds the same files. ``between`` is called after each
    turn (a live worker keeps its stream alive with it)."""
    hours: dict[str, list[HourResult]] = {share.source: [] for share in shares}
    queues: dict[str, tuple[Share, Iterator[list[PendingBatch]]]] = {}
    for share in shares:
        waiting = [entry for entry in share.store.pending() if entry.records is None]
        if waiting:
            groups = coalesced(share.store, waiting, lambda entry: list(entry.staged), coalesce)
            queues[share.source] = (share, groups)
    held: dict[str, list[PendingBatch]] = {}  # a group left for the next turn
    while queues:
        turn: list[tuple[Share, list[PendingBatch]]] = []
        alone: list[tuple[Share, list[PendingBatch]]] = []
        rows = 0
        for source in sorted(queues, key=lambda name: name not in held):  # held ones first
            share, groups = queues[source]
            entries = held.pop(source, None) or next(groups, None)
            if entries is None:
                del queues[source]
                continue
            size = sum(e.rows_in(share.store, e.staged) for e in entries)
            if size > TOGETHER_ROWS:  # a large transaction in parts: a file at a time, alone
                alone.append((share, entries))
            elif rows + size > TOGETHER_ROWS:
                held[source] = entries
            else:
                rows += size
                turn.append((share, entries))
        outcomes = {}
        if turn:
            parts = [(share, *_paths(entries)) for share, entries in turn]
            outcomes = enrich_together(state, parts, now=now, grace=grace, leaves=trail)
        for share, entries in alone:
            changes, contexts = _paths(entries)
            outcomes[share.source] = enrich_files(
                share.store,
                state,
                share.policy,
                changes,
                contexts,
                now=now,
                grace=grace,
                leaves=trail,
            )
        crash_point("enrich.records_written")
        if trail:  # each source's trail its own: appended side by side
            TURNS.side_by_side(
                partial(
                    _append_per_entry,
                    TrustLog(share.store),
                    entries,
                    outcomes[share.source].all_leaves,
                )
                for share, entries in turn + alone
            )
        crash_point("enrich.logged")
        TURNS.side_by_side(
            partial(_mark_enriched, share.store, entries, outcomes[share.source].records_rows)
            for share, entries in turn + alone
        )
        for share, _ in turn + alone:
            hours[share.source].extend(outcomes[share.source].hours)
        if between is not None:
            between()
    return {source: merge_hours(found) for source, found in hours.items()}


def _mark_enriched(
    store: StagingStore, entries: list[PendingBatch], rows: Mapping[str, int]
) -> None:
    """Enrichment of these entries is done: each names its records files in the ledger."""
    for entry in entries:
        changes = entry.staged_paths("changes")
        records = [store.derived_path(path, "records") for path in changes]
        store.mark_enriched(entry, records, rows)


def _split(records: pl.DataFrame, paths: Iterable[str]) -> Iterable[tuple[str, pl.DataFrame]]:
    wanted = set(paths)
    for (path,), rows in records.group_by(FILE):
        if path in wanted:
            yield path, rows.drop(FILE).sort("lsn", "change_index")


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
        .group_by("source", "lsn")
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
        quarantine.record_orphans(state, env, result.orphans, now=now)
        quarantine.settle(state, env, result.records, now=now)
    turn = _Turn([Share(store, policy)], now=now, grace=grace, leaves=False)
    turn.files.update(dict.fromkeys(files, source))
    turn.count(changes.clear(), result)  # its changes were counted when first enriched
    return turn.outcomes[source].hours


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
