"""The erasure leaves of a source's trail, kept beside its log (docs/design.md, "Erasure").

The log's files hold leaf hashes only; an erasure leaf's content (who, why, which records and
the commitments of the values it replaced) is what verification needs to rebuild the leaves
of erased records, so it is kept whole in ``_trust/erasures/<request>.json``, written once
before the erasure changes anything. The log holds its hash as a leaf of kind ``erasure``
whose ``xid`` is the request's id.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import polars as pl

from audit_platform.trust.commitments import CONTEXT, ErasedRecord
from audit_platform.trust.leaves import KINDS, LEAF_SCHEMA, canonical
from audit_platform.trust.log import LogState, TrustLog
from audit_platform.trust.merkle import leaf_hash


def _path(log: TrustLog, request: int) -> str:
    return f"{log.dir}/erasures/{request:012d}.json"


def write_leaf(log: TrustLog, leaf: dict[str, Any], *, replace: bool = False) -> None:
    """Keep an erasure's leaf; ``replace`` while its plan is not final (a rerun plans again)."""
    log.store.write_json(_path(log, int(leaf["request"])), leaf, create=not replace)


def read_leaf(log: TrustLog, request: int) -> dict[str, Any] | None:
    path = _path(log, request)
    try:
        return log.store.read_json(path)
    except FileNotFoundError:
        return None
    except ValueError:  # not JSON any more: nobody may act on it
        return {}


def read_leaves(log: TrustLog, unreadable: list[str] | None = None) -> list[dict[str, Any]]:
    """Every erasure leaf kept beside the log, by request; files that are not JSON objects with
    a request are left out (and named in ``unreadable``)."""
    found = []
    for path in log.store.glob(f"{log.dir}/erasures/*.json"):
        try:
            leaf = log.store.read_json(path)
            int(leaf["request"])
        except (ValueError, KeyError, TypeError):
            if unreadable is not None:
                unreadable.append(path)
            continue
        found.append(leaf)
    return found


def leaf_frame(leaf: dict[str, Any], state: LogState) -> pl.DataFrame:
    """The leaf as the log appends it: after the log's last leaf, at its commit LSN (an
    erasure's kind ranks after every other kind there, and a second erasure's ``seq`` after
    the first's), its request in ``xid``."""
    lsn = max(state.last_lsn, 0)
    last_lsn, last_rank, last_seq = state.last_key
    seq = last_seq + 1 if (last_lsn, last_rank) == (lsn, KINDS.index("erasure")) else 0
    return pl.DataFrame(
        [
            {
                "position": None,
                "kind": "erasure",
                "lsn": lsn,
                "seq": seq,
                "xid": int(leaf["request"]),
                "time": datetime.fromisoformat(leaf["time"].replace("Z", "+00:00")),
                "record_id": None,
                "hash": leaf_hash(canonical(leaf)),
            }
        ],
        schema=LEAF_SCHEMA,
    )


def logged_hashes(leaves: pl.DataFrame, size: int) -> dict[int, bytes]:
    """Request -> hash of each erasure leaf of a log's leaves frame that the log counts (a
    leaves file written before a crash, past ``size``, is not in the tree)."""
    found = leaves.filter((pl.col("kind") == "erasure") & (pl.col("position") < size))
    return {int(request): bytes(h) for request, h in found.select("xid", "hash").iter_rows()}


def erased_records(leaves: list[dict[str, Any]]) -> dict[str, ErasedRecord]:
    """Record id (or context leaf's name, ``trust.commitments.context_ref``) -> what erasures
    replaced in it (a record erased for two persons, before and after a move between them, is
    in two leaves)."""
    found: dict[str, ErasedRecord] = {}
    for leaf in leaves:
        text = leaf["text"]
        contexts = {ref: {CONTEXT: fields} for ref, fields in (leaf.get("contexts") or {}).items()}
        for rid, sides in [*leaf["records"].items(), *contexts.items()]:
            record = found.setdefault(rid, ErasedRecord({}))
            for side, columns in sides.items():
                kept = record.values.setdefault(side, {})
                kept.update((column, (text, c)) for column, c in columns.items())
    return found
