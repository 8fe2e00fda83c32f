"""Index enriched records: a run's pending batches, or a whole hour (backfill, reconciliation).

Both read records from their per-batch files, so indexing again (a retried run, a
reconciliation, a backfill) sends the same documents under the same ids. A pending entry leaves
the ledger only after its documents were accepted or dead-lettered: a run that fails here (for
example while Elasticsearch is down) leaves it for the next run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

import polars as pl
import psycopg
from elasticsearch import Elasticsearch

from audit_platform.faults import crash_point
from audit_platform.index import feed as stream_feed
from audit_platform.index.bulk import IndexResult, index_records
from audit_platform.naming import STANDARD_CLASS
from audit_platform.staging.store import (
    COALESCE,
    FILE,
    TOGETHER_ROWS,
    PendingBatch,
    StagingStore,
    coalesced,
    hour_from_path,
)


@dataclass
class HourIndexed:
    hour: datetime
    records: int = 0
    indexed: int = 0
    failed: int = 0
    seconds: float = 0.0

    @property
    def metadata(self) -> dict[str, float | int]:
        return {
            "records": self.records,
            "indexed": self.indexed,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
            # The indexing rate as alerting reads it, without dividing two series itself.
            "docs_per_second": round(self.indexed / self.seconds, 1) if self.seconds else 0.0,
        }


def index_files(
    client: Elasticsearch,
    store: StagingStore,
    records_paths: list[str],
    *,
    database: str,
    now: datetime,
    ids: list[str] | None = None,
    retention_class: str = STANDARD_CLASS,
) -> list[HourIndexed]:
    """Index the records of these files (only ``ids``, where given); dead letters per file.
    ``retention_class``: the source's, naming the indices (``EnvironmentConfig``)."""
    records = store.read(records_paths)
    if ids is not None and records.height:
        records = records.filter(pl.col("id").is_in(pl.Series(ids, dtype=pl.String).implode()))
    if records.is_empty():
        return []
    result = index_records(
        client, records, database=database, ingested_at=now, retention_class=retention_class
    )
    _write_dead_letters(store, records, result)
    return _by_hour(records, result)


def _write_dead_letters(store: StagingStore, records: pl.DataFrame, result: IndexResult) -> None:
    """Per records file: keep earlier dead letters of records not sent now, add today's."""
    paths = records.get_column(FILE).unique().to_list()
    targets = {path: path.replace("/records/", "/deadletter/", 1) for path in paths}
    if result.failed.is_empty():
        # The usual case: no frame work, one look for a file that is almost never there.
        targets = {path: t for path, t in targets.items() if store.fs.exists(t)}
        if not targets:
            return
    failed = result.failed.join(records.select("id", FILE), on="id", how="left")
    for (path,), sent in records.select("id", FILE).group_by(FILE):
        if (target := targets.get(path)) is None:
            continue
        existing = store.read([target])
        new = failed.filter(pl.col(FILE) == path).drop(FILE)
        if existing.height:
            kept = existing.drop(FILE).filter(~pl.col("id").is_in(sent["id"].implode()))
            new = pl.concat([kept, new])
        if new.height:
            store.write_file(target, new)
        elif existing.height:
            store.remove([target])


def _by_hour(
    records: pl.DataFrame, result: IndexResult, seconds: float | None = None
) -> list[HourIndexed]:
    failed_ids = set(result.failed["id"].to_list())
    hours: dict[datetime, HourIndexed] = {}
    grouped = records.group_by(FILE).agg("id")
    for path, ids in grouped.iter_rows():
        hour = hour_from_path(path)
        spent = result.seconds if seconds is None else seconds
        found = hours.setdefault(hour, HourIndexed(hour, seconds=spent))
        failed = sum(1 for i in ids if i in failed_ids) if failed_ids else 0
        found.records += len(ids)
        found.failed += failed
        found.indexed += len(ids) - failed
    return sorted(hours.values(), key=lambda h: h.hour)


@dataclass(frozen=True)
class IndexShare:
    """One source's part of an indexing that serves several sources at once: its store, the
    database its records name and the retention class naming its indices."""

    store: StagingStore
    database: str
    retention_class: str = STANDARD_CLASS

    @property
    def source(self) -> str:
        return self.store.source


def index_pending(
    client: Elasticsearch,
    store: StagingStore,
    *,
    database: str,
    now: datetime,
    retention_class: str = STANDARD_CLASS,
    between: Callable[[], None] | None = None,
    coalesce: int = COALESCE,
    feed: psycopg.Connection | None = None,
) -> list[HourIndexed]:
    """Index every enriched pending entry of one source: ``index_pending_together`` of one."""
    share = IndexShare(store, database, retention_class)
    found = index_pending_together(
        client, [share], now=now, between=between, coalesce=coalesce, feed=feed
    )
    return found[store.source]


def index_pending_together(
    client: Elasticsearch,
    shares: list[IndexShare],
    *,
    now: datetime,
    between: Callable[[], None] | None = None,
    coalesce: int = COALESCE,
    feed: psycopg.Connection | None = None,
) -> dict[str, list[HourIndexed]]:
    """Index every enriched pending entry of these sources (this run's and any an earlier run
    left), each source's oldest first, and take each off its ledger once its documents are in;
    ``between`` is called after each turn.

    Up to ``coalesce`` whole batches of a source go together, and the sources' groups in one
    series of bulk requests (as ``enrich_pending_together`` enriches them: a batch's fixed cost
    paid once for the turn). An entry that re-indexes some records (``ids``) goes alone of its
    source, after the batches before it.

    With ``feed`` (the platform database), each entry whose documents are in is added to the
    streams' feed before it leaves the ledger (``index.feed``): streams deliver what indexing
    did, in the order it did it."""
    results: dict[str, list[HourIndexed]] = {share.source: [] for share in shares}
    queues = {
        share.source: (share, _groups(share.store, share.store.pending(), coalesce))
        for share in shares
    }
    held: dict[str, list[PendingBatch]] = {}  # a group left for the next turn
    while queues:
        turn: list[tuple[IndexShare, list[PendingBatch], pl.DataFrame]] = []
        rows = 0
        for source in sorted(queues, key=lambda name: name not in held):  # held ones first
            share, groups = queues[source]
            entries = held.pop(source, None) or next(groups, None)
            if entries is None:
                del queues[source]
                continue
            size = sum(entry.rows_in(share.store, entry.records or ()) for entry in entries)
            if turn and rows + size > TOGETHER_ROWS:
                held[source] = entries
                continue
            rows += size
            turn.append((share, entries, _records(share.store, entries)))
        if not turn:
            continue
        every = pl.concat([records for _, _, records in turn], how="diagonal_relaxed")
        if every.height:
            result = index_records(
                client,
                every,
                database={share.source: share.database for share, _, _ in turn},
                ingested_at=now,
                retention_class={share.source: share.retention_class for share, _, _ in turn},
            )
            for share, _, records in turn:
                if records.height:
                    # Each source's share of the turn's time: its documents' share.
                    seconds = result.seconds * records.height / every.height
                    _write_dead_letters(share.store, records, result)
                    results[share.source].extend(_by_hour(records, result, seconds))
        crash_point("index.documents_sent")
        if feed is not None:
            for share, entries, _ in turn:
                stream_feed.add(feed, share.store.env, share.source, entries)
            crash_point("streams.fed")
        for share, entries, _ in turn:
            for entry in entries:
                share.store.done(entry)
        if between is not None:
            between()
    return {source: merge_indexed(found) for source, found in results.items()}


def _records(store: StagingStore, entries: list[PendingBatch]) -> pl.DataFrame:
    """The records of a group of entries: all of their files', or the ``ids`` a re-index
    entry (alone in its group) names."""
    records = store.read([path for entry in entries for path in entry.records or ()])
    if entries[0].ids is not None and records.height:
        wanted = pl.Series(entries[0].ids, dtype=pl.String).implode()
        records = records.filter(pl.col("id").is_in(wanted))
    return records


def _groups(
    store: StagingStore, pending: list[PendingBatch], coalesce: int
) -> Iterator[list[PendingBatch]]:
    """Enriched entries in ledger order: runs of whole batches ``coalesced``, a re-index
    alone."""
    run: list[PendingBatch] = []
    for entry in pending:
        if entry.records is None:
            continue  # not enriched yet: the enrich step of this or the next run comes first
        if entry.ids is None:
            run.append(entry)
            continue
        yield from coalesced(store, run, lambda e: list(e.records or ()), coalesce)
        run = []
        yield [entry]
    yield from coalesced(store, run, lambda e: list(e.records or ()), coalesce)


def index_hour(
    client: Elasticsearch,
    store: StagingStore,
    hour: datetime,
    *,
    database: str,
    now: datetime,
    retention_class: str = STANDARD_CLASS,
) -> HourIndexed:
    """Index every record of an hour again (a backfill, a reconciliation of a short hour)."""
    found = index_files(
        client,
        store,
        store.hour_files("records", hour),
        database=database,
        now=now,
        retention_class=retention_class,
    )
    return found[0] if found else HourIndexed(hour)


def merge_indexed(results: list[HourIndexed]) -> list[HourIndexed]:
    merged: dict[datetime, HourIndexed] = {}
    for result in results:
        total = merged.setdefault(result.hour, HourIndexed(result.hour))
        total.records += result.records
        total.indexed += result.indexed
        total.failed += result.failed
        total.seconds += result.seconds
    return sorted(merged.values(), key=lambda h: h.hour)
