"""Proofs an auditor checks without trusting us: a record's leaves are in the signed log
(inclusion), and a later checkpoint extends an earlier one (consistency).

Proofs are read from the log's tiles (``trust.tiles``): each reads ``O(log n)`` tiles of at
most 8 KiB and hashes at most a few thousand nodes, whatever the size of the log, so a request's
memory and time stay flat as the log grows (``benchmarks/results/proofs.md``). They were
computed from every leaf hash held in memory, ``O(n)`` per request, which at 1,000 changes a
second outgrows the API pod's memory limit within weeks. The answers are the same bytes:
``merkle.inclusion_proof`` and ``merkle.consistency_proof`` are kept as the reference they are
tested against.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from audit_platform.trust.commitments import Commitments
from audit_platform.trust.leaves import document_leaves
from audit_platform.trust.log import TrustLog
from audit_platform.trust.tiles import TileReader, TilesMissing


class NotProvable(LookupError):
    """The log cannot prove this (yet): the message says why."""


def latest_checkpoint(log: TrustLog) -> dict[str, Any] | None:
    """The checkpoint the log records as its latest: one file read, however many there are."""
    recorded = log.state().checkpoint
    if recorded is None:
        return None
    return log.store.read_json(f"{log.dir}/checkpoints/{recorded['seq']:012d}.json")


def _tiles(log: TrustLog, size: int, root: str | None = None) -> TileReader:
    """A reader of the log's tiles that hold at least ``size`` leaves; with ``root``, one
    whose tree of ``size`` leaves has that root (a proof from tiles that disagree with the
    signed checkpoint would not verify: better to say so here)."""
    tiles = log.tiles.reader()
    try:
        if root is not None and tiles.root(size).hex() != root:
            raise NotProvable(
                f"the log's tiles do not give the root of its checkpoint of {size} "
                "leaves; run verify"
            )
    except TilesMissing as exc:
        raise _untiled(log, size) from exc
    return tiles


def _untiled(log: TrustLog, size: int) -> NotProvable:
    return NotProvable(
        f"the log's tiles do not hold its first {size} leaves yet ({log.state().tiled} tiled): a "
        "log from before tiles is tiled once by its next append"
    )


def _last_attach(log: TrustLog, xid: int) -> int | None:
    """The position of the latest ``attach`` leaf for transaction ``xid`` (a late record
    carries the last context attached to it). Its file is not known from the record, so every
    leaves file is read, one at a time and four columns only: memory stays bounded, time grows
    with the log."""
    best: tuple[Any, int] | None = None
    for path in log.leaf_files():
        with log.store.fs.open(path, "rb") as f:
            found = pl.read_parquet(f, columns=["kind", "xid", "time", "position"])
        found = found.filter((pl.col("kind") == "attach") & (pl.col("xid") == xid))
        for time, position in found.select("time", "position").iter_rows():
            if best is None or (time, position) > best:
                best = (time, position)
    return None if best is None else best[1]


def record_proof(
    log: TrustLog, doc_id: str, doc: dict[str, Any], commitments: Commitments | None = None
) -> dict[str, Any]:
    """The proof that a stored record's change (and its context, if it has one) are leaves of
    the latest checkpoint; raises :class:`NotProvable` when they are not (yet). A record with
    personal values needs its persons' keys, or its erasures, in ``commitments``: the proof's
    leaf holds their commitments, never the values."""
    checkpoint = latest_checkpoint(log)
    if checkpoint is None:
        raise NotProvable("the source's log has no checkpoint yet")
    size = checkpoint["checkpoint"]["tree_size"]
    commitments = commitments or Commitments(strict=False)
    claimed = document_leaves(doc_id, doc, commitments)
    if commitments.findings:
        raise NotProvable(f"{doc_id}: " + "; ".join(d for _, _, d in commitments.findings))
    lsn, xid = int(doc["transaction"]["lsn"]), int(doc["transaction"]["xid"])
    rows = log.leaves(columns=["position", "kind", "lsn", "record_id"], lsn=lsn)
    wanted = {
        "change": pl.col("record_id") == doc_id,
        "context": (pl.col("kind") == "context") & (pl.col("lsn") == lsn),
    }
    tiles = _tiles(log, size, checkpoint["checkpoint"]["root"])
    proofs = []
    for kind, leaf in claimed:
        if kind == "attach":
            position = _last_attach(log, xid)
        else:
            found = rows.filter(wanted[kind])
            position = None if found.is_empty() else found["position"][0]
        if position is None:
            raise NotProvable(f"the log holds no {kind} leaf for {doc_id}")
        if position >= size:
            raise NotProvable(
                f"{doc_id} is logged after the latest checkpoint (tree size "
                f"{size}); the next checkpoint will cover it"
            )
        try:
            proofs.append(
                {
                    "kind": kind,
                    "leaf": leaf,
                    "leaf_hash": tiles.leaf(position).hex(),
                    "leaf_index": position,
                    "audit_path": [h.hex() for h in tiles.inclusion(position, size)],
                }
            )
        except TilesMissing as exc:
            raise _untiled(log, size) from exc
    return {"tree_size": size, "leaves": proofs, "checkpoint": checkpoint}


def inclusion(log: TrustLog, index: int, size: int) -> list[str]:
    """The audit path of leaf ``index`` in the tree of ``size`` leaves, hex."""
    try:
        return [h.hex() for h in _tiles(log, size).inclusion(index, size)]
    except TilesMissing as exc:
        raise _untiled(log, size) from exc


def consistency(log: TrustLog, first: int, second: int) -> list[str]:
    """The proof that the tree of ``first`` leaves is a prefix of the tree of ``second``, hex."""
    try:
        return [h.hex() for h in _tiles(log, second).consistency(first, second)]
    except TilesMissing as exc:
        raise _untiled(log, second) from exc
