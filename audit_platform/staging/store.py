"""Staged batches: immutable Parquet files laid out by commit hour, local or on S3.

Layout: ``<root>/<env>/<source>/<dataset>/date=YYYY-MM-DD/hour=HH/<first-lsn>-<last-lsn>.parquet``
with LSNs as 16 hex digits (so names sort in LSN order). The same LSN range always gives the
same name, so re-staging a range replaces its file instead of adding a second copy. Derived
datasets (``records``, ``rejected``, ``deadletter``) are kept per staged file, under the same
name as the ``changes`` file they came from: a batch's records can be rebuilt, re-indexed or
reconciled without touching the rest of its hour.

Durability before the slot moves (docs/design.md, invariant 1): a local file is written to a
temporary name, fsynced, renamed into place and its folder fsynced. Object storage has no rename and
needs none: an S3 PUT (or a completed multipart upload) makes the whole object visible at once and
is durable when it returns, so a reader sees the old object or the new one, never half; a write cut
short leaves no object at all. Nothing here depends on listing an object the moment it is written
(S3 lists are strongly consistent now, and listings are never cached here: several processes share a
root). A batch announces its files in an in-flight manifest before writing them; a capture that
starts after a crash removes the files of any manifest the slot never confirmed (see ``recover``).
Files that must never be replaced (signed checkpoints) are written with ``create=True``:
``If-None-Match: *`` on S3, a hard link (which refuses an existing name) locally, so a second writer
cannot overwrite what the first one published.

Once the slot has confirmed a batch, its manifest becomes a *pending* entry (``_pending/``): the
ledger of batches that are staged but not yet enriched and indexed. Enrichment marks an entry
with the records it wrote; indexing removes it. A run that fails after its retries leaves its
entries behind, and the next run finishes them first, so no staged batch is forgotten.
"""

from __future__ import annotations

import glob
import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import BinaryIO

import fsspec
import polars as pl

from audit_platform.faults import crash_point
from audit_platform.lsn import lsn_hex
from audit_platform.naming import check_identifier
from audit_platform.staging.schemas import STAGED_SCHEMAS

RAW_DATASETS = ("changes", "contexts")
#: The column that names the staged file a row was read from (see :meth:`StagingStore.read`).
FILE = "file"


@dataclass(frozen=True)
class StagedFile:
    dataset: str
    hour: datetime
    path: str
    rows: int
    first_lsn: int
    last_lsn: int


#: Pending entries a downstream step (``enrich_pending``, ``index_pending``) takes together at
#: most (``coalesced``): a live run's are seconds of one source's changes.
COALESCE = 16
#: Rows the entries after a group's first may add to it at most (its first is a batch, bounded
#: as any): a backlog of full batches, or of batches filled with large contexts by any role
#: that may call ``audit.set_context``, is taken one batch at a time, as before.
COALESCE_ROWS = 10_000
#: Rows a downstream turn of several sources holds in one frame at most (staged changes and
#: contexts to enrich, records to index); the groups past it wait for the next turn, and a
#: group larger on its own (a transaction staged in parts) is enriched alone, a file at a time.
TOGETHER_ROWS = 20_000


@dataclass(frozen=True)
class PendingBatch:
    """A ledger entry: staged files whose records are not all indexed yet.

    ``records`` is None until enrichment has written them. ``ids`` narrows indexing to some
    records of those files (a quarantine resolution re-indexes only what it changed).
    """

    name: str
    path: str
    staged: tuple[str, ...]
    records: tuple[str, ...] | None = None
    ids: tuple[str, ...] | None = None
    #: Rows of its files as their writers counted them (staging, enrichment): what sizes a
    #: downstream turn without opening each file's footer (three a source in every turn,
    #: docs/design.md). Only a size: it never decides what is read or indexed, and a file it
    #: does not name (an entry an earlier version wrote, a re-index) is counted from its
    #: footer. A quarantine resolution that rewrites a records file leaves its count as it
    #: was: a turn's size is off by the orphans resolved, no more.
    rows: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    def rows_in(self, store: StagingStore, paths: Iterable[str]) -> int:
        """Rows in these files of the entry: the ledger's counts, else the files' footers."""
        return sum(self.rows[p] if p in self.rows else file_rows(store, p) for p in paths)

    def staged_paths(self, dataset: str) -> list[str]:
        return [p for p in self.staged if f"/{dataset}/date=" in p]


class StagingStore:
    """One environment's and source's staged data under a root folder or URL."""

    def __init__(self, root: str, env: str, source: str) -> None:
        self.root = root.rstrip("/")
        self.env = check_identifier("environment", env)
        self.source = check_identifier("source", source)
        remote = fsspec.utils.get_protocol(self.root) not in {"file", "local"}
        # A listing cache would hide files other processes wrote (the API reading checkpoints
        # a capture run signed): object stores are listed afresh every time.
        options = {"use_listings_cache": False} if remote else {}
        self.fs, _ = fsspec.core.url_to_fs(self.root, **options)
        self.local = "file" in _protocols(self.fs)

    @property
    def base(self) -> str:
        return f"{self.root}/{self.env}/{self.source}"

    def hour_dir(self, dataset: str, hour: datetime) -> str:
        return f"{self.base}/{dataset}/date={hour:%Y-%m-%d}/hour={hour:%H}"

    def derived_path(self, staged_path: str, dataset: str) -> str:
        """The file of a derived dataset that belongs to a staged ``changes`` file."""
        prefix = f"{self.base}/changes/"
        if not staged_path.startswith(prefix):
            raise ValueError(f"{staged_path} is not a staged changes file of {self.base}")
        return f"{self.base}/{dataset}/{staged_path[len(prefix) :]}"

    # -- writing ------------------------------------------------------------------------------

    def plan(
        self, dataset: str, frame: pl.DataFrame, part: int | None = None
    ) -> list[tuple[datetime, str, pl.DataFrame]]:
        """Split a batch by commit hour: (hour, path, rows) for each file it will write.

        ``part`` names the pieces of one transaction too large for one batch:
        ``<lsn>-<lsn>.partNNNN.parquet``, numbered in the order they were read.
        """
        if frame.is_empty():
            return []
        hours = frame.with_columns(pl.col("commit_time").dt.truncate("1h").alias("_hour"))
        planned = []
        suffix = "" if part is None else f".part{part:04d}"
        for (hour,), rows in hours.sort("_hour").group_by("_hour", maintain_order=True):
            rows = rows.drop("_hour")
            first, last = _lsn_bounds(rows)
            name = f"{lsn_hex(first)}-{lsn_hex(last)}{suffix}.parquet"
            planned.append((hour, f"{self.hour_dir(dataset, hour)}/{name}", rows))
        return planned

    def write(self, dataset: str, frame: pl.DataFrame, part: int | None = None) -> list[StagedFile]:
        planned = self.plan(dataset, frame, part)
        return [self.write_planned(dataset, *file) for file in planned]

    def write_planned(
        self, dataset: str, hour: datetime, path: str, rows: pl.DataFrame
    ) -> StagedFile:
        """Write one file ``plan`` named."""
        self.write_file(path, rows)
        return StagedFile(dataset, hour, path, rows.height, *_lsn_bounds(rows))

    def write_file(self, path: str, frame: pl.DataFrame) -> None:
        """Write one Parquet file durably, replacing any previous version whole."""
        self._durably(path, lambda f: frame.write_parquet(f, compression="zstd", statistics=True))

    def write_bytes(self, path: str, data: bytes) -> None:
        """A small file of bytes (the trail's tiles), replaced whole and durably."""
        self._durably(path, lambda f: f.write(data))

    def write_json(self, path: str, body: dict, *, create: bool = False) -> bool:
        """A small JSON file, replaced atomically: a reader sees the old or the new, never half
        (a crash while writing in place once left an empty manifest that wedged capture).

        With ``create``, an existing file is left as it is and False is returned.
        """
        data = json.dumps(body, sort_keys=True).encode()
        if create and not self.local:
            try:
                self.fs.pipe_file(path, data, mode="create")
            except OSError:
                # s3fs reports a failed precondition as a bare EINVAL: tell it apart by looking.
                if self.fs.exists(path):
                    return False
                raise
            return True
        return self._durably(path, lambda f: f.write(data), create=create)

    def _durably(
        self, path: str, write: Callable[[BinaryIO], object], *, create: bool = False
    ) -> bool:
        """Local: a temporary name, fsync, rename (or, with ``create``, link) into place, fsync
        the folder. S3: one PUT, durable and atomic when it returns."""
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if not self.local:
            with self.fs.open(path, "wb") as f:
                write(f)
            return True
        local_path = self.fs._strip_protocol(path)
        temporary = f"{local_path}.{uuid.uuid4().hex}.tmp"
        with open(temporary, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        crash_point("staging.temporary_written")
        if create:
            try:
                os.link(temporary, local_path)
            except FileExistsError:
                return False
            finally:
                os.unlink(temporary)
        else:
            os.replace(temporary, local_path)
        _fsync_dir(os.path.dirname(local_path))
        return True

    def remove(self, paths: Iterable[str]) -> None:
        for path in paths:
            if self.fs.exists(path):
                self.fs.rm(path)

    # -- in-flight manifests ------------------------------------------------------------------

    def _manifest_path(self, batch_first_lsn: int, part: int | None) -> str:
        suffix = "" if part is None else f".part{part:04d}"
        return f"{self.base}/_inflight/{lsn_hex(batch_first_lsn)}{suffix}.json"

    def announce(
        self, batch_first_lsn: int, end_lsn: int, rows: Mapping[str, int], part: int | None = None
    ) -> str:
        """Record, before writing, which files a batch will write (with their rows) and where
        it ends."""
        path = self._manifest_path(batch_first_lsn, part)
        body = {"end_lsn": end_lsn, "paths": sorted(rows), "rows": dict(rows)}
        self.write_json(path, body)
        crash_point("staging.announced")
        return path

    def settle(self, manifests: list[str]) -> PendingBatch | None:
        """The slot has confirmed these batches: their files join the pending ledger as one
        entry (a transaction staged in parts is enriched together with its last part), then the
        manifests go. A crash in between leaves the manifests, and ``recover`` settles them."""
        if not manifests:
            return None
        paths: set[str] = set()
        rows: dict[str, int] = {}
        for manifest in manifests:
            body = self.read_json(manifest)
            paths.update(body["paths"])
            rows.update(body.get("rows", {}))
        name = manifests[-1].rsplit("/", 1)[1].removesuffix(".json")
        entry = self._write_pending(name, {"staged": sorted(paths), "rows": rows})
        crash_point("staging.pending_written")
        for manifest in manifests:
            self.fs.rm(manifest)
        return entry

    def recover(self, confirmed_lsn: int) -> list[str]:
        """Undo batches that were staged but never confirmed in the slot; they will be re-read.

        A batch whose end the slot has confirmed stays and joins the pending ledger (the crash
        came after the advance). An unreadable manifest can only be one whose write was cut
        short: its batch was never confirmed, and its files are found by their LSN range and
        removed. Returns the files removed.
        """
        removed: list[str] = []
        confirmed: list[str] = []
        for manifest in self.glob(f"{self.base}/_inflight/*.json"):
            try:
                entry = self.read_json(manifest)
            except ValueError:
                entry = {"end_lsn": confirmed_lsn + 1, "paths": self._unconfirmed(manifest)}
            if entry["end_lsn"] <= confirmed_lsn:
                confirmed.append(manifest)
                continue
            for path in entry["paths"]:
                if self.fs.exists(path):
                    self.fs.rm(path)
                    removed.append(path)
            self.fs.rm(manifest)
        self.settle(confirmed)
        return removed

    def _unconfirmed(self, manifest: str) -> list[str]:
        """Staged files at or after the LSN an unreadable manifest is named for.

        LSNs grow with commit time, so hours are searched newest first, down to the first hour
        whose files all end before that LSN: the search costs the batch's hours, not the
        retention period's.
        """
        first = int(manifest.rsplit("/", 1)[1].split(".")[0], 16)
        found: list[str] = []
        raw = [
            (hour, folder)
            for hour, folder in self.hour_folders()
            if folder.rsplit("/", 3)[-3] in RAW_DATASETS
        ]
        for hour in sorted({hour for hour, _ in raw}, reverse=True):
            paths = [p for dataset in RAW_DATASETS for p in self.hour_files(dataset, hour)]
            later = [path for path in paths if lsn_range(path)[1] >= first]
            found.extend(later)
            if paths and not later:
                break
        return found

    # -- the pending ledger -------------------------------------------------------------------

    def _write_pending(self, name: str, body: dict) -> PendingBatch:
        path = f"{self.base}/_pending/{name}.json"
        self.write_json(path, body)
        return _pending_entry(name, path, body)

    def pending(self) -> list[PendingBatch]:
        """Entries not yet indexed, oldest first (names sort in LSN order)."""
        entries = []
        for path in self.glob(f"{self.base}/_pending/*.json"):
            name = path.rsplit("/", 1)[1].removesuffix(".json")
            entries.append(_pending_entry(name, path, self.read_json(path)))
        return entries

    def backlog(self) -> tuple[dict[str, int], int]:
        """Staged changes not indexed yet: what the source's pipeline still owes (a snapshot
        paces itself by it, ``capture.snapshot_pace``), from the ledger's and the in-flight
        manifests' own counts. The ledger's entries by path, each with its changes (an entry
        leaves the ledger once indexed, and only then), and the changes of batches still in
        flight. Contexts are not counted: any role may write those (``audit.set_context``),
        and they are not what a turn's time goes to."""
        prefix = f"{self.base}/changes/"
        pending, inflight = {}, 0
        for folder in ("_pending", "_inflight"):
            for path in self.glob(f"{self.base}/{folder}/*.json"):
                try:  # read by another process than the ledger's writer: it may go meanwhile
                    body = self.read_json(path)
                except (FileNotFoundError, ValueError):
                    body = {}
                counts = body.get("rows", {})
                staged = [
                    p for p in body.get("staged", body.get("paths", ())) if p.startswith(prefix)
                ]
                rows = sum(counts[p] if p in counts else file_rows(self, p) for p in staged)
                if folder == "_pending":
                    pending[path] = rows  # listed, so not gone, even if it could not be read
                else:
                    inflight += rows
        return pending, inflight

    def mark_enriched(
        self, entry: PendingBatch, records: Iterable[str], rows: Mapping[str, int]
    ) -> PendingBatch:
        """Enrichment of the entry is done: ``records`` are its records files, ``rows`` what
        they hold (the ones it knows)."""
        records = sorted(records)
        known = {**entry.rows, **{path: rows[path] for path in records if path in rows}}
        body = {"staged": list(entry.staged), "records": records, "rows": known}
        return self._write_pending(entry.name, body)

    def add_reindex(self, records: dict[str, list[str]]) -> PendingBatch:
        """Some records of some files changed (a quarantine resolution): index just those."""
        ids = sorted(i for found in records.values() for i in found)
        name = f"~resolved-{datetime.now(UTC):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}"
        return self._write_pending(name, {"staged": [], "records": sorted(records), "ids": ids})

    def done(self, entry: PendingBatch) -> None:
        self.fs.rm(entry.path)

    def glob(self, pattern: str) -> list[str]:
        """Paths matching ``pattern``, sorted, in the form this store writes them: fsspec drops
        the ``s3://`` of an object store's matches, and paths are compared and derived by text
        (``derived_path``, ledger entries), so it is put back."""
        if self.local:  # the standard library's: cheaper than fsspec's for a folder (no ``**``)
            return sorted(glob.glob(self.fs._strip_protocol(pattern), include_hidden=True))
        found = self.fs.glob(pattern)
        return sorted(self.fs.unstrip_protocol(p) for p in found)

    def read_json(self, path: str) -> dict:
        return json.loads(self.fs.cat_file(path))

    # -- reading ------------------------------------------------------------------------------

    def files_by_hour(self, dataset: str) -> list[StagedFile]:
        """Every staged file of a dataset, with its hour and LSN range (rows unknown: -1)."""
        found = []
        for path in self.files(dataset):
            first, last = lsn_range(path)
            found.append(StagedFile(dataset, hour_from_path(path), path, -1, first, last))
        return found

    def hours(self, dataset: str) -> list[datetime]:
        """The hours a dataset has files for, in order."""
        return sorted({hour_from_path(path) for path in self.files(dataset)})

    def hour_folders(self) -> list[tuple[datetime, str]]:
        """(hour, folder) for every dataset of this environment and source."""
        folders = self.glob(f"{self.base}/*/date=*/hour=*")
        return sorted((hour_from_path(folder + "/"), folder) for folder in folders)

    def files(self, dataset: str) -> list[str]:
        return self.glob(f"{self.base}/{dataset}/date=*/hour=*/*.parquet")

    def hour_files(self, dataset: str, hour: datetime) -> list[str]:
        return self.glob(f"{self.hour_dir(dataset, hour)}/*.parquet")

    def files_holding(self, dataset: str, hour: datetime, lsns: Iterable[int]) -> list[str]:
        """The files of an hour whose LSN range holds any of ``lsns`` (a batch, or the parts of
        one transaction): one listing of the hour, found by name, without reading any file."""
        paths = self.hour_files(dataset, hour)
        if not paths:
            return []
        ranges = pl.DataFrame(
            [(path, *lsn_range(path)) for path in paths],
            schema={"path": pl.String, "first": pl.Int64, "last": pl.Int64},
            orient="row",
        )
        wanted = pl.DataFrame({"lsn": list(lsns)}, schema={"lsn": pl.Int64})
        found = ranges.join_where(
            wanted, pl.col("first") <= pl.col("lsn"), pl.col("lsn") <= pl.col("last")
        )
        return sorted(set(found["path"].to_list()))

    def read(
        self, paths: Iterable[str], dataset: str | None = None, columns: list[str] | None = None
    ) -> pl.DataFrame:
        """Rows of several files in one frame (only ``columns``, where given), each row with the
        ``file`` it came from; a missing file reads as no rows (retention or a recovery may have
        removed it)."""
        frames = []
        for path in paths:
            try:
                with self.fs.open(path, "rb") as f:
                    frame = pl.read_parquet(f, columns=columns)
            except FileNotFoundError:
                continue
            frames.append(frame.with_columns(pl.lit(path).alias(FILE)))
        if frames:
            return pl.concat(frames, how="diagonal_relaxed")
        schema = STAGED_SCHEMAS.get(dataset or "", pl.Schema())
        return pl.DataFrame(schema=pl.Schema({**schema, FILE: pl.String()}))

    def count_rows(self, paths: Iterable[str]) -> int:
        """Rows in files, from their Parquet footers (no data pages are read)."""
        total = 0
        for path in paths:
            with self.fs.open(path, "rb") as f:
                total += pl.scan_parquet(f).select(pl.len()).collect().item()
        return total

    def read_all(self, dataset: str) -> pl.DataFrame | None:
        paths = self.files(dataset)
        return self.read(paths, dataset).drop(FILE) if paths else None


def _lsn_bounds(rows: pl.DataFrame) -> tuple[int, int]:
    """The first and last LSN of a non-empty frame of staged rows."""
    first, last = rows.select(pl.col("lsn").min(), pl.col("lsn").max().alias("last")).row(0)
    return first, last


def coalesced(
    store: StagingStore,
    entries: list[PendingBatch],
    paths: Callable[[PendingBatch], list[str]],
    most: int = COALESCE,
) -> Iterator[list[PendingBatch]]:
    """``entries`` in order, in groups of at most ``most`` whose later entries hold at most
    ``COALESCE_ROWS`` rows in their ``paths`` together (counted by the ledger, else read from
    Parquet footers, and only when there is more than one entry to take)."""
    group: list[PendingBatch] = []
    rows = 0
    for entry in entries:
        if group:
            added = entry.rows_in(store, paths(entry))
            if len(group) >= most or rows + added > COALESCE_ROWS:
                yield group
                group, rows = [], 0
            else:
                rows += added
        group.append(entry)
    if group:
        yield group


def file_rows(store: StagingStore, path: str) -> int:
    try:
        return store.count_rows([path])
    except FileNotFoundError:  # read as no rows, as ``StagingStore.read`` does
        return 0


def _pending_entry(name: str, path: str, body: dict) -> PendingBatch:
    records = body.get("records")
    ids = body.get("ids")
    return PendingBatch(
        name,
        path,
        tuple(body.get("staged", ())),
        None if records is None else tuple(records),
        None if ids is None else tuple(ids),
        body.get("rows", {}),
    )


def lsn_range(path: str) -> tuple[int, int]:
    """The first and last commit LSN a staged (or derived) file's name says it holds."""
    first, last = path.rsplit("/", 1)[1].split(".")[0].split("-")
    return int(first, 16), int(last, 16)


def hour_from_path(path: str) -> datetime:
    """The hour a staged path's ``date=``/``hour=`` folders name."""
    date = path.rsplit("/date=", 1)[1][:10]
    hour = path.rsplit("/hour=", 1)[1][:2]
    return datetime.strptime(f"{date} {hour}", "%Y-%m-%d %H").replace(tzinfo=UTC)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
