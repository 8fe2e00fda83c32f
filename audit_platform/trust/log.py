"""The append-only Merkle log of one environment's source, and its signed checkpoints, kept
under the staging root (``<root>/<env>/<source>/_trust/``): a place the Elasticsearch writer
cannot reach, which retention never prunes (it removes ``<dataset>/date=*/hour=*`` folders only).

- ``leaves/<first-lsn>-<last-lsn>.parquet``: the leaves of one enriched batch, in commit order,
  numbered from where the log stood (``trust.leaves.LEAF_SCHEMA``).
- ``tiles/<level>/<index>``: the tree's hashes in tiles of 256 (``trust.tiles``), written by
  each append before ``log.json`` counts it, so a proof reads ``O(log n)`` tiles.
- ``log.json``: how far the log goes: its size, the last commit LSN it holds, the roots of its
  perfect subtrees (so appending never rereads old leaves), how many leaves its tiles hold
  (``tiled``; a log from before tiles has none and is tiled once, see
  :meth:`TrustLog.build_tiles`), and its latest checkpoint.
- ``checkpoints/<seq>.json``: ``{"checkpoint": body, "signature": ...}``; the body holds the
  tree size, the root, the hash of the previous checkpoint's body, the time and the key id, and
  the signature is Ed25519 over the body's canonical JSON (as leaves are serialized).

One writer per source: the enrich step of the capture job, whose runs never overlap (one per
slot). A batch is appended once: a rerun after a crash finds its LSNs already logged and skips
them; a leaves file written before a crash but not yet counted in ``log.json`` is rewritten,
and so are the tiles it reached.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import polars as pl
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from audit_platform import signing
from audit_platform.faults import crash_point
from audit_platform.lsn import lsn_hex, lsn_text
from audit_platform.staging.store import StagingStore, lsn_range
from audit_platform.trust.leaves import LEAF_SCHEMA, canonical, in_log_order, kind_rank, moment
from audit_platform.trust.merkle import Frontier
from audit_platform.trust.tiles import Tiles

#: Leaf hashes handed to the tiles at once while tiling an existing log: about 6 MB of them.
TILE_CHUNK = 65_536


@dataclass
class LogState:
    size: int = 0
    first_lsn: int | None = None
    last_lsn: int = -1
    frontier: Frontier = field(default_factory=Frontier)
    checkpoint: dict[str, Any] | None = None  # {"seq", "hash", "tree_size", "time"}
    #: (commit LSN, kind rank, seq) of the last leaf: where an append resumes.
    last_key: tuple[int, int, int] = (-1, 0, 0)
    #: Leaves the tiles hold: ``size`` once appends write tiles, 0 for a log from before.
    tiled: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "first_lsn": self.first_lsn,
            "last_lsn": self.last_lsn,
            "last_key": list(self.last_key),
            "frontier": self.frontier.to_json(),
            "checkpoint": self.checkpoint,
            "tiled": self.tiled,
        }


def checkpoint_hash(body: dict[str, Any]) -> str:
    """What the next checkpoint names as its ``previous``."""
    return hashlib.sha256(canonical(body)).hexdigest()


class TrustLog:
    """A source's log (``folder`` and ``name`` default to its staging folder and name), or the
    environment's read log (see ``audit_platform.read_log``)."""

    def __init__(
        self, store: StagingStore, folder: str | None = None, name: str | None = None
    ) -> None:
        self.store = store
        self.dir = folder or f"{store.base}/_trust"
        self.name = name or store.source
        self.tiles = Tiles(store, f"{self.dir}/tiles")

    @property
    def _state_path(self) -> str:
        return f"{self.dir}/log.json"

    def state(self) -> LogState:
        if not self.store.fs.exists(self._state_path):
            return LogState()
        body = self.store.read_json(self._state_path)
        return LogState(
            body["size"],
            body["first_lsn"],
            body["last_lsn"],
            Frontier.from_json(body["frontier"]),
            body["checkpoint"],
            tuple(body.get("last_key") or (body["last_lsn"], 9, 2**31)),
            body.get("tiled", 0),
        )

    def append(self, leaves: pl.DataFrame) -> int:
        """Append the leaves the log does not hold yet (those after its last leaf in commit
        order: a rerun of a batch appends nothing twice); returns how many. A leaf given twice
        is appended once: batches enriched together may overlap, as two ledger entries of one
        transaction staged in parts can after a crash (``StagingStore.settle``)."""
        state = self.state()
        tiled = self.build_tiles(state)
        lsn, rank, seq = state.last_key
        ordered = (
            in_log_order(leaves)
            .unique(["kind", "lsn", "seq"], keep="first", maintain_order=True)
            .with_columns(kind_rank().alias("_rank"))
        )
        same_lsn, same_rank = pl.col("lsn") == lsn, pl.col("_rank") == rank
        later_in_txn = (pl.col("_rank") > rank) | (same_rank & (pl.col("seq") > seq))
        after = (pl.col("lsn") > lsn) | (same_lsn & later_in_txn)
        new = ordered.filter(after)
        if new.is_empty():
            if tiled:
                self.store.write_json(self._state_path, state.to_json())
            return 0
        last_row = new.row(-1, named=True)
        new = new.drop("_rank").with_columns(
            (pl.int_range(pl.len(), dtype=pl.Int64) + state.size).alias("position")
        )
        first, last = new["lsn"].min(), new["lsn"].max()
        assert isinstance(first, int) and isinstance(last, int)  # not empty, and no leaf lacks one
        # Named by LSN range (proofs find a record's file by it) and first position (a
        # transaction continued in the next append gets a file of its own).
        name = f"{lsn_hex(first)}-{lsn_hex(last)}.{state.size:012d}.parquet"
        self.store.write_file(f"{self.dir}/leaves/{name}", new)
        hashes = new["hash"].to_list()
        self.tiles.append(state.size, hashes)
        state.frontier.extend(hashes)
        state.size = state.tiled = state.frontier.size
        state.first_lsn = first if state.first_lsn is None else state.first_lsn
        state.last_lsn = last
        state.last_key = (last, last_row["_rank"], last_row["seq"])
        self.store.write_json(self._state_path, state.to_json())
        return new.height

    def checkpoint(
        self, key: Ed25519PrivateKey, now: datetime, every: timedelta = timedelta(0)
    ) -> dict[str, Any] | None:
        """Sign the log as it stands, unless nothing was appended since the last checkpoint
        or it is younger than ``every``; returns the stored checkpoint."""
        state = self.state()
        last = state.checkpoint
        if state.size == 0 or (
            last is not None
            and (
                last["tree_size"] == state.size
                or now - datetime.fromisoformat(last["time"]) < every
            )
        ):
            return None
        seq = 0 if last is None else last["seq"] + 1
        body: dict[str, Any] = {
            "v": "1",
            "env": self.store.env,
            "source": self.name,
            "seq": seq,
            "tree_size": state.size,
            "root": state.frontier.root().hex(),
            "last_lsn": lsn_text(state.last_lsn),
            "time": moment(now),
            "previous": None if last is None else last["hash"],
            "key_id": signing.key_id(key.public_key()),
        }
        signed: dict[str, Any] = {
            "checkpoint": body,
            "signature": signing.sign(key, canonical(body)),
        }
        path = f"{self.dir}/checkpoints/{seq:012d}.json"
        if not self.store.write_json(path, signed, create=True):
            # A run that crashed after publishing this checkpoint but before recording it
            # (or a second writer): a signed checkpoint is never replaced; adopt it instead.
            signed = self.store.read_json(path)
            body = signed["checkpoint"]
        crash_point("trust.checkpoint_published")
        state.checkpoint = {
            "seq": seq,
            "hash": checkpoint_hash(body),
            "tree_size": body["tree_size"],
            "time": datetime.fromisoformat(body["time"]).isoformat(),
        }
        self.store.write_json(self._state_path, state.to_json())
        return signed

    def build_tiles(self, state: LogState) -> bool:
        """Tile the leaves ``state`` counts that its tiles do not hold yet (a log written before
        tiles existed, all of it, once), reading the leaves files one at a time and handing
        their hashes to the tiles :data:`TILE_CHUNK` at a time: memory stays bounded whatever
        the log's size. Sets ``state.tiled``; the caller records it. Returns whether it tiled
        anything. Only the log's one writer calls it, from :meth:`append` (a checkpoint, signed
        by the hourly job too, may run beside an append, and two writers of a tile could leave
        it shorter than ``log.json`` says); a crash midway leaves ``tiled`` as it was, and the
        next call rewrites the same tiles."""
        if state.tiled >= state.size:
            return False
        at = state.tiled
        chunk: list[bytes] = []
        for path in self.leaf_files():
            with self.store.fs.open(path, "rb") as f:
                frame = pl.read_parquet(f, columns=["position", "hash"])
            frame = frame.filter(pl.col("position").is_between(at + len(chunk), state.size - 1))
            if frame.is_empty():
                continue
            positions = frame["position"].sort()
            if positions[0] != at + len(chunk) or positions[-1] - positions[0] + 1 != len(frame):
                raise ValueError(
                    f"{path}: leaves from position {positions[0]} are not the "
                    f"next ones ({at + len(chunk)}); run verify"
                )
            chunk.extend(frame.sort("position")["hash"].to_list())
            if len(chunk) >= TILE_CHUNK:
                self.tiles.append(at, chunk)
                at, chunk = at + len(chunk), []
        self.tiles.append(at, chunk)
        at += len(chunk)
        if at != state.size:
            raise ValueError(f"the leaves files hold {at} of the log's {state.size} leaves")
        state.tiled = at
        return True

    # -- reading ------------------------------------------------------------------------------

    def leaf_files(self) -> list[str]:
        return self.store.glob(f"{self.dir}/leaves/*.parquet")

    def leaves(self, columns: list[str] | None = None, lsn: int | None = None) -> pl.DataFrame:
        """The leaves the files hold, by position, each with its ``file`` (what verification
        checks, as found): all of them, or those of the files whose LSN range holds ``lsn``;
        all columns, or ``columns`` only."""
        frames = []
        for path in self.leaf_files():
            first, last = lsn_range(path)
            if lsn is not None and not first <= lsn <= last:
                continue
            with self.store.fs.open(path, "rb") as f:
                frame = pl.read_parquet(f, columns=columns)
            frames.append(frame.with_columns(pl.lit(path).alias("file")))
        if not frames:
            schema = {k: v for k, v in LEAF_SCHEMA.items() if columns is None or k in columns}
            return pl.DataFrame(schema={**schema, "file": pl.String})
        return pl.concat(frames).sort("position")

    def checkpoints(self) -> list[tuple[str, dict[str, Any]]]:
        """(file, signed checkpoint) of every checkpoint file, by name."""
        paths = self.store.glob(f"{self.dir}/checkpoints/*.json")
        return [(path, self.store.read_json(path)) for path in paths]
