"""Staged raw batches: immutable Parquet files laid out by commit hour, local or on S3.

Layout: ``<root>/<env>/<source>/<dataset>/date=YYYY-MM-DD/hour=HH/<first-lsn>-<last-lsn>.parquet``
with LSNs as 16 hex digits (so names sort in LSN order). The same LSN range always gives the
same name, so re-staging a range replaces its file instead of adding a second copy.

Durability before the slot moves (DESIGN.md, invariant 1): a local file is written to a temporary
name, fsynced, renamed into place and its folder fsynced; an S3 PUT is durable when it returns.
A batch announces its files in an in-flight manifest before writing them; a capture that starts
after a crash removes the files of any manifest the slot never confirmed (see ``recover``).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import fsspec
import polars as pl

from audit_platform.naming import check_identifier

DATASETS = ("changes", "contexts")


def lsn_hex(lsn: int) -> str:
    return f"{lsn:016X}"


def lsn_text(lsn: int) -> str:
    """PostgreSQL's own notation, X/Y, for people and SQL."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


@dataclass(frozen=True)
class StagedFile:
    dataset: str
    hour: datetime
    path: str
    rows: int
    first_lsn: int
    last_lsn: int


class StagingStore:
    """One environment's and source's staged data under a root folder or URL."""

    def __init__(self, root: str, env: str, source: str) -> None:
        self.root = root.rstrip("/")
        self.env = check_identifier("environment", env)
        self.source = check_identifier("source", source)
        self.fs, _ = fsspec.core.url_to_fs(self.root)
        self.local = "file" in _protocols(self.fs)

    @property
    def base(self) -> str:
        return f"{self.root}/{self.env}/{self.source}"

    def hour_dir(self, dataset: str, hour: datetime) -> str:
        return f"{self.base}/{dataset}/date={hour:%Y-%m-%d}/hour={hour:%H}"

    def hour_glob(self, dataset: str, hour: datetime) -> str:
        return f"{self.hour_dir(dataset, hour)}/*.parquet"

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
            first, last = rows["lsn"].min(), rows["lsn"].max()
            name = f"{lsn_hex(first)}-{lsn_hex(last)}{suffix}.parquet"
            planned.append((hour, f"{self.hour_dir(dataset, hour)}/{name}", rows))
        return planned

    def write(self, dataset: str, frame: pl.DataFrame, part: int | None = None) -> list[StagedFile]:
        written = []
        for hour, path, rows in self.plan(dataset, frame, part):
            self._write_durably(path, rows)
            written.append(
                StagedFile(dataset, hour, path, rows.height, rows["lsn"].min(), rows["lsn"].max())
            )
        return written

    def replace_hour(self, dataset: str, hour: datetime, frame: pl.DataFrame) -> str:
        """Write a derived dataset's one file for an hour, replacing the previous version.

        Derived datasets (records, rejected) are rebuilt whole from the staged hour, so an hour
        has exactly one file and rebuilding it is idempotent.
        """
        path = f"{self.hour_dir(dataset, hour)}/{dataset}.parquet"
        self._write_durably(path, frame)
        return path

    def _write_durably(self, path: str, frame: pl.DataFrame) -> None:
        directory = path.rsplit("/", 1)[0]
        self.fs.makedirs(directory, exist_ok=True)
        if not self.local:
            with self.fs.open(path, "wb") as f:
                frame.write_parquet(f, compression="zstd", statistics=True)
            return
        local_path = self.fs._strip_protocol(path)
        temporary = f"{local_path}.{uuid.uuid4().hex}.tmp"
        with open(temporary, "wb") as f:
            frame.write_parquet(f, compression="zstd", statistics=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, local_path)
        _fsync_dir(os.path.dirname(local_path))

    # -- in-flight manifests ------------------------------------------------------------------

    def _manifest_path(self, batch_first_lsn: int, part: int | None) -> str:
        suffix = "" if part is None else f".part{part:04d}"
        return f"{self.base}/_inflight/{lsn_hex(batch_first_lsn)}{suffix}.json"

    def announce(
        self, batch_first_lsn: int, end_lsn: int, paths: Iterable[str], part: int | None = None
    ) -> str:
        """Record, before writing, which files a batch will write and where it ends."""
        path = self._manifest_path(batch_first_lsn, part)
        body = json.dumps({"end_lsn": end_lsn, "paths": sorted(paths)}).encode()
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if self.local:
            local_path = self.fs._strip_protocol(path)
            with open(local_path, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(os.path.dirname(local_path))
        else:
            self.fs.pipe_file(path, body)
        return path

    def settle(self, manifest: str) -> None:
        """The batch's position is confirmed in the slot: its files are now simply staged."""
        self.fs.rm(manifest)

    def recover(self, confirmed_lsn: int) -> list[str]:
        """Undo batches that were staged but never confirmed in the slot; they will be re-read.

        A batch whose end the slot has confirmed stays (the crash came after the advance).
        Returns the files removed.
        """
        removed: list[str] = []
        pattern = f"{self.base}/_inflight/*.json"
        for manifest in sorted(self.fs.glob(pattern)):
            entry = json.loads(self.fs.cat_file(manifest))
            if entry["end_lsn"] > confirmed_lsn:
                for path in entry["paths"]:
                    if self.fs.exists(path):
                        self.fs.rm(path)
                        removed.append(path)
            self.fs.rm(manifest)
        return removed

    # -- reading ------------------------------------------------------------------------------

    def files_by_hour(self, dataset: str) -> list[StagedFile]:
        """Every staged file of a raw dataset, with its hour and LSN range (rows unknown: -1)."""
        found = []
        for path in self.files(dataset):
            first, last = path.rsplit("/", 1)[1].split(".")[0].split("-")
            found.append(
                StagedFile(dataset, hour_from_path(path), path, -1, int(first, 16), int(last, 16))
            )
        return found

    def hours(self, dataset: str) -> list[datetime]:
        """The hours a dataset has files for, in order."""
        return sorted({hour_from_path(path) for path in self.files(dataset)})

    def hour_folders(self) -> list[tuple[datetime, str]]:
        """(hour, folder) for every dataset of this environment and source."""
        folders = self.fs.glob(f"{self.base}/*/date=*/hour=*")
        return sorted((hour_from_path(folder + "/"), folder) for folder in folders)

    def files(self, dataset: str) -> list[str]:
        return sorted(self.fs.glob(f"{self.base}/{dataset}/date=*/hour=*/*.parquet"))

    def read_hour(self, dataset: str, hour: datetime) -> pl.DataFrame | None:
        paths = sorted(self.fs.glob(self.hour_glob(dataset, hour)))
        if not paths:
            return None
        frames = []
        for path in paths:
            with self.fs.open(path, "rb") as f:
                frames.append(pl.read_parquet(f))
        return pl.concat(frames, how="diagonal_relaxed")

    def read_all(self, dataset: str) -> pl.DataFrame | None:
        frames = []
        for path in self.files(dataset):
            with self.fs.open(path, "rb") as f:
                frames.append(pl.read_parquet(f))
        return pl.concat(frames, how="diagonal_relaxed") if frames else None


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
