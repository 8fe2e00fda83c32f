"""Proofs an auditor checks without trusting us: a record's leaves are in the signed log
(inclusion), and a later checkpoint extends an earlier one (consistency).

Proving needs the leaf hashes of the whole tree (RFC 9162 paths reach across it). They are read
from the log's files once per tree size and kept for the next proof; a proof then costs
``O(n)`` hashing of subtrees, about a second per million leaves here.
"""

from __future__ import annotations

import threading
from typing import Any

import polars as pl

from audit_platform.trust import merkle
from audit_platform.trust.leaves import document_leaves
from audit_platform.trust.log import TrustLog

_cache: dict[str, tuple[int, list[bytes]]] = {}
_lock = threading.Lock()


class NotProvable(LookupError):
    """The log cannot prove this (yet): the message says why."""


def leaf_hashes(log: TrustLog, size: int) -> list[bytes]:
    """The first ``size`` leaf hashes, by position."""
    with _lock:
        cached = _cache.get(log.dir)
        if cached is not None and cached[0] >= size:
            return cached[1][:size]
    hashes = log.leaves(columns=["position", "hash"])["hash"].to_list()
    if len(hashes) < size:
        raise NotProvable(f"the log holds {len(hashes)} leaves, fewer than its {size}")
    with _lock:
        _cache[log.dir] = (len(hashes), hashes)
    return hashes[:size]


def latest_checkpoint(log: TrustLog) -> dict[str, Any] | None:
    found = log.checkpoints()
    return found[-1][1] if found else None


def record_proof(log: TrustLog, doc_id: str, doc: dict[str, Any]) -> dict[str, Any]:
    """The proof that a stored record's change (and its context, if it has one) are leaves of
    the latest checkpoint; raises :class:`NotProvable` when they are not (yet)."""
    checkpoint = latest_checkpoint(log)
    if checkpoint is None:
        raise NotProvable("the source's log has no checkpoint yet")
    size = checkpoint["checkpoint"]["tree_size"]
    claimed = document_leaves(doc_id, doc)
    lsn, xid = int(doc["transaction"]["lsn"]), int(doc["transaction"]["xid"])
    rows = log.leaves(lsn=lsn)
    wanted = {"change": pl.col("record_id") == doc_id,
              "context": (pl.col("kind") == "context") & (pl.col("lsn") == lsn)}  # fmt: skip
    proofs = []
    for kind, leaf in claimed:
        if kind == "attach":
            found = log.leaves().filter((pl.col("kind") == "attach") & (pl.col("xid") == xid))
            found = found.sort("time").tail(1)
        else:
            found = rows.filter(wanted[kind])
        if found.is_empty():
            raise NotProvable(f"the log holds no {kind} leaf for {doc_id}")
        position = found["position"][0]
        if position >= size:
            raise NotProvable(f"{doc_id} is logged after the latest checkpoint (tree size "
                              f"{size}); the next checkpoint will cover it")  # fmt: skip
        hashes = leaf_hashes(log, size)
        proofs.append({
            "kind": kind, "leaf": leaf, "leaf_hash": hashes[position].hex(),
            "leaf_index": position,
            "audit_path": [h.hex() for h in merkle.inclusion_proof(hashes, position, size)],
        })  # fmt: skip
    return {"tree_size": size, "leaves": proofs, "checkpoint": checkpoint}


def consistency(log: TrustLog, first: int, second: int) -> list[str]:
    hashes = leaf_hashes(log, second)
    return [h.hex() for h in merkle.consistency_proof(hashes, first, second)]
