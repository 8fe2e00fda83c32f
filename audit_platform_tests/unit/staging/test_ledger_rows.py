"""The pending ledger's row counts, and the local listing (pure logic on local files)."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl
import pytest

from audit_platform.staging.store import StagingStore, file_rows


def _changes(rows: int) -> pl.DataFrame:
    """Staged-looking rows over two commit hours."""
    hours = [datetime(2026, 12, 3, 5, 59, tzinfo=UTC), datetime(2026, 12, 3, 6, 0, tzinfo=UTC)]
    return pl.DataFrame(
        {
            "lsn": list(range(100, 100 + rows)),
            "commit_time": [hours[n * 2 // rows] for n in range(rows)],
            "value": ["x"] * rows,
        }
    )


def _stage(store: StagingStore, frame: pl.DataFrame):
    """What a capture run's staging does: announce the planned files with their rows, write
    them, settle the manifest into the ledger."""
    planned = store.plan("changes", frame)
    manifest = store.announce(100, 200, {path: rows.height for _, path, rows in planned})
    for hour, path, rows in planned:
        store.write_planned("changes", hour, path, rows)
    return store.settle([manifest])


def test_the_ledger_carries_each_files_rows_from_staging_to_indexing(tmp_path):
    store = StagingStore(str(tmp_path), "test", "shop")
    entry = _stage(store, _changes(9))
    staged = list(entry.staged)
    assert len(staged) == 2  # one file per commit hour
    footers = {path: file_rows(store, path) for path in staged}
    assert sum(footers.values()) == 9
    (read,) = store.pending()
    assert read.rows == footers == entry.rows  # written, and read back
    records = [store.derived_path(path, "records") for path in staged]
    for path in records:
        store.write_file(path, _changes(4).drop("commit_time"))
    marked = store.mark_enriched(read, records, {records[0]: 3})  # the first one counted
    (read,) = store.pending()
    assert read.rows == marked.rows == {**footers, records[0]: 3}
    # The counts are the ledger's: the staged files are never opened to size the entry.
    store.remove(staged)
    assert read.rows_in(store, staged) == 9
    # A file the ledger does not count is counted from its footer (4 rows), or as none when gone.
    assert read.rows_in(store, records) == 3 + 4
    store.remove(records[1:])
    assert read.rows_in(store, records) == 3


def test_an_entry_an_earlier_version_wrote_is_counted_from_footers(tmp_path):
    store = StagingStore(str(tmp_path), "test", "shop")
    path = f"{store.base}/changes/date=2026-12-03/hour=05/0000000000000064-00000000000000c8.parquet"
    store.write_file(path, _changes(5))
    store.write_json(f"{store.base}/_pending/0000000000000064.json", {"staged": [path]})
    (entry,) = store.pending()
    assert entry.rows == {}
    assert entry.rows_in(store, entry.staged) == 5


@pytest.mark.parametrize(
    "pattern",
    ["_pending/*.json", "*/date=*/hour=*", "changes/date=*/hour=*/*.parquet", "nothing/*"],
)
@pytest.mark.parametrize("root", ["absolute", "relative", "file://"])
def test_the_local_listing_finds_what_fsspec_finds(tmp_path, monkeypatch, pattern, root):
    """``glob`` lists a local store with the standard library: the same paths, in the same
    form, as fsspec's listing it replaced (a dot file included, folders where asked), whatever
    form the root is given in."""
    monkeypatch.chdir(tmp_path)
    given = {"absolute": str(tmp_path), "relative": "staged", "file://": f"file://{tmp_path}"}
    store = StagingStore(given[root], "test", "shop")
    _stage(store, _changes(4))
    store.write_json(f"{store.base}/_pending/.hidden.json", {})
    store.write_json(f"{store.base}/contexts/date=2026-12-03/hour=07/x.json", {})
    wanted = f"{store.base}/{pattern}"
    assert store.glob(wanted) == sorted(store.fs.glob(wanted))
    assert pattern == "nothing/*" or store.glob(wanted)


def test_the_backlog_is_what_is_staged_or_in_flight_and_not_indexed(tmp_path):
    store = StagingStore(str(tmp_path), "test", "shop")
    assert store.backlog() == ({}, 0)
    entry = _stage(store, _changes(9))
    assert store.backlog() == ({entry.path: 9}, 0)
    # A batch announced, not settled yet: its manifest's changes count too, its contexts
    # (which any role may write) do not.
    later = _changes(4).with_columns(pl.col("lsn") + 1000)
    planned = store.plan("changes", later) + store.plan("contexts", later)
    store.announce(1100, 1200, {path: rows.height for _, path, rows in planned})
    assert len(planned) == 4 and store.backlog() == ({entry.path: 9}, 4)
    # Enriched, not indexed: still owed, under the same entry; indexed (done): gone.
    (read, *_) = store.pending()
    store.mark_enriched(read, [], {})
    assert store.backlog() == ({entry.path: 9}, 4)
    # An entry that cannot be read at the moment (written over by another process) is
    # still there: only indexing takes an entry out of the ledger.
    store.fs.pipe(entry.path, b"{")
    assert store.backlog() == ({entry.path: 0}, 4)
    store.done(entry)
    assert store.backlog() == ({}, 4)
