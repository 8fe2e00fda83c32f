"""Named crash points: the places where a process can die between two durable steps.

docs/design.md's invariant 1 says a crash anywhere ends, after a rerun, in the same indexed result.
A random SIGKILL lands wherever it lands; these points let a test stop the pipeline exactly at
each place where what is on disk, in the slot and in Elasticsearch disagree for a moment, and
then check that the next run heals it. Disarmed (always, outside tests) a point costs one set
lookup.

:class:`SimulatedCrash` derives from ``BaseException``: no ``except Exception`` (a retry
policy, a cleanup that carries on) may treat a crash as an error it can handle.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: Every crash point, in the order a capture run passes them, and what is true when it fires.
POINTS: dict[str, str] = {
    "capture.decoded": "a batch is decoded; nothing of it is written",
    "staging.announced": "the batch's in-flight manifest is written; none of its files",
    "staging.temporary_written": "a durable write's temporary file is complete, not renamed",
    "capture.staged": "the batch's files are durable; the slot has not confirmed it",
    "capture.confirmed": "the slot confirmed the batch; its manifest is not settled",
    "staging.pending_written": "the ledger entry is written; the manifests are not removed",
    "enrich.records_written": "records files are durable; the trail's log is not appended",
    "trust.tile_written": "one tile of an append is rewritten; its other tiles and log.json not",
    "enrich.logged": "the batch's leaves are in the trail's log; the ledger entry is not marked",
    "index.chunk_sent": "one bulk request is in; the rest of the documents are not",
    "index.documents_sent": "every document is in; the ledger entry is not removed",
    "streams.fed": "the streams' feed names the entry; the ledger entry is not removed",
    "trust.checkpoint_published": "a signed checkpoint is written; the log does not record it",
}
#: A stream's delivery (``streams.delivery``), which runs beside the pipeline, not in it.
DELIVERY_POINTS: dict[str, str] = {
    "streams.sent": "a stream's message is delivered; its cursor has not moved",
}
#: An erasure (``erasure.run``), which runs beside the pipeline under its source's lock.
ERASURE_POINTS: dict[str, str] = {
    "erasure.planned": "every source's erasure leaf is kept beside its log; the key is not retired",
    "erasure.retired": "the key is deleted and the plans are final; no log holds its leaf yet",
    "erasure.logged": "a source's log holds its erasure leaf; none of its values is replaced",
    "erasure.staged": "a source's staged files are rewritten; Elasticsearch is not",
    "erasure.indexed": "a source's values in Elasticsearch are replaced; its exports are not",
    "erasure.exported": "a source's bucket objects are rewritten; the request is not done",
}
_KNOWN = {**POINTS, **DELIVERY_POINTS, **ERASURE_POINTS}
#: Points on the local filesystem's write path only (object storage has no temporary file).
LOCAL_ONLY_POINTS = frozenset({"staging.temporary_written"})

_armed: dict[str, int] = {}
_lock = threading.Lock()


class SimulatedCrash(BaseException):
    """The process 'died' at a crash point (tests only)."""


def crash_point(name: str) -> None:
    """Die here if a test armed this point (and this is the pass it armed it for)."""
    if not _armed:
        return
    with _lock:
        if name not in _armed:
            return
        _armed[name] -= 1
        if _armed[name] > 0:
            return
        del _armed[name]
    raise SimulatedCrash(f"simulated crash at {name}: {_KNOWN[name]}")


@contextmanager
def armed(name: str, *, nth: int = 1) -> Iterator[None]:
    """Crash at the ``nth`` pass through ``name`` within the block."""
    if name not in _KNOWN:
        raise ValueError(f"unknown crash point {name!r}; known: {', '.join(_KNOWN)}")
    with _lock:
        _armed[name] = nth
    try:
        yield
    finally:
        with _lock:
            _armed.pop(name, None)
