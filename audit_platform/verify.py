"""Verifying a source's trail: the log against its signed checkpoints, and Elasticsearch and
staging against the log.

1. **The log.** Leaves numbered without gap or overlap, in commit order; each checkpoint signed
   by the environment's key, chained to the one before (no checkpoint removed or replaced), and
   its root equal to the root of the leaves it covered, recomputed (no leaf changed since).
2. **Elasticsearch.** Every document of the range yields the leaves it claims
   (``trust.leaves.document_leaves``): its change must be the logged change of the same id, and
   its context the logged context (attributed) or latest attachment (late); every logged change
   of the range must have its document. Fields derived from the facts are derived again
   (``index.documents.document_frame``) and must be what the document holds, in the index its
   commit month names.
3. **Staging.** The staged changes of each hour, enriched again, and the records files, must
   give the logged leaves.

A change the log holds but Elasticsearch does not is *removed*, unless it is waiting for its
context in the quarantine, too recent to be indexed, or older than the retention period; a
document the log does not hold is *inserted*; a document whose leaf differs is *altered*.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import polars as pl
import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from elasticsearch import Elasticsearch
from elasticsearch.helpers import scan

from audit_platform import signing
from audit_platform.clients import es_from_settings, pg_url_from_settings
from audit_platform.enrich.join import enrich
from audit_platform.environment import load_environment
from audit_platform.index.documents import EVENTS, free_text
from audit_platform.lsn import lsn_text, parse_lsn
from audit_platform.naming import (
    STANDARD_CLASS,
    index_name,
    parse_index_name,
    read_alias,
)
from audit_platform.policy import SourcePolicy, load_policy, policy_path
from audit_platform.read_log import read_leaf, read_rows
from audit_platform.record import RECORD_SCHEMA, record_id
from audit_platform.settings import Settings
from audit_platform.staging.store import StagingStore, hour_from_path, lsn_range
from audit_platform.trust import erasures
from audit_platform.trust.commitments import Commitments, all_keys
from audit_platform.trust.leaves import (
    KINDS,
    canonical,
    context_name,
    document_leaves,
    record_leaves,
)
from audit_platform.trust.log import TrustLog, checkpoint_hash
from audit_platform.trust.merkle import Frontier, leaf_hash

#: Problems: what makes verification fail.
PROBLEMS = (
    "leaves_missing",
    "leaves_overlap",
    "out_of_order",
    "checkpoint_forged",
    "checkpoint_missing",
    "checkpoint_root",
    "removed",
    "altered",
    "inserted",
    "context_altered",
    "derived_altered",
    "staged_altered",
    "unverifiable",
    "erased_unlogged",
    "not_erased",
    "erasure_forged",
    "erasure_missing",
)
#: Explained: logged changes without a document, for a reason that is not tampering.
EXPLAINED = (
    "waiting",
    "not_indexed_yet",
    "expired",
    "before_log",
    "attribution_pending",
    "erasure_running",
)


@dataclass(frozen=True)
class Finding:
    kind: str
    subject: str  # a record id, a position, a checkpoint, a file
    detail: str


@dataclass
class VerifyReport:
    env: str
    source: str
    since: datetime | None
    until: datetime | None
    log_size: int = 0
    checkpoints: int = 0
    documents: int = 0
    logged_changes: int = 0
    staged_changes: int = 0
    findings: list[Finding] = field(default_factory=list)

    def add(self, kind: str, subject: str, detail: str) -> None:
        self.findings.append(Finding(kind, subject, detail))

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.kind in PROBLEMS]

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for finding in self.findings:
            counts[finding.kind] = counts.get(finding.kind, 0) + 1
        return counts


def report_json(report: VerifyReport) -> dict[str, Any]:
    return {
        "env": report.env,
        "source": report.source,
        "ok": report.ok,
        "since": report.since.isoformat() if report.since else None,
        "until": report.until.isoformat() if report.until else None,
        "log_size": report.log_size,
        "checkpoints": report.checkpoints,
        "documents": report.documents,
        "logged_changes": report.logged_changes,
        "staged_changes": report.staged_changes,
        "counts": report.counts(),
        "findings": [vars(f) for f in report.findings],
    }


@dataclass(frozen=True)
class Window:
    """What verification accepts as not yet done or already gone."""

    now: datetime
    #: A late context this recent may not have re-attributed its record yet.
    indexing_lag: timedelta = timedelta(minutes=5)
    retention: timedelta | None = None


@contextmanager
def _without_cyclic_gc() -> Iterator[None]:
    """Verification builds millions of small objects (parsed documents, leaves) and no
    reference cycles: the cyclic collector, walking everything at each generation threshold,
    took three quarters of the time spent parsing Elasticsearch's answers."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def verify_source(
    store: StagingStore,
    es: Elasticsearch,
    policy: SourcePolicy,
    key: Ed25519PublicKey | None,
    *,
    since: datetime | None,
    until: datetime | None,
    window: Window,
    waiting: set[tuple[int, int]] = frozenset(),  # type: ignore[assignment]
    staging: bool = True,
    retention_class: str = STANDARD_CLASS,
    keys: dict[str, bytes] | None = None,
    erasing: set[int] | None = None,
) -> VerifyReport:
    """One source's trail over commit times [since, until) (the log and its checkpoints are
    always checked whole); ``waiting`` holds the quarantine's (commit LSN, change index);
    ``retention_class`` is the source's, naming the indices its documents must be in; ``keys``
    the environment's persons' keys (``trust.commitments.all_keys``); ``erasing`` the
    erasure requests started and not done (``erasure_requests``)."""
    report = VerifyReport(store.env, store.source, since, until)
    log = TrustLog(store)
    with _without_cyclic_gc():
        state = log.state()
        leaves = log.leaves()
        report.log_size = state.size
        _check_log(report, leaves, state.size)
        _check_checkpoints(report, log, leaves, key, state.checkpoint)
        commitments = _check_erasures(report, log, leaves, state.size, keys or {}, erasing or set())
        in_range = _in_range(leaves.filter(pl.col("position") < state.size), since, until)
        changes = in_range.filter(pl.col("kind") == "change")
        report.logged_changes = changes.height
        _check_documents(
            report,
            es,
            store,
            leaves,
            changes,
            since,
            until,
            window,
            waiting,
            state.first_lsn,
            retention_class,
            commitments,
        )
        if staging:
            _check_staging(report, store, policy, changes, since, until, commitments)
    return report


def _in_range(frame: pl.DataFrame, since: datetime | None, until: datetime | None):
    if since is not None:
        frame = frame.filter(pl.col("time") >= since)
    if until is not None:
        frame = frame.filter(pl.col("time") < until)
    return frame


# --- 1. the log ---------------------------------------------------------------------------


def _check_log(report: VerifyReport, leaves: pl.DataFrame, size: int) -> None:
    positions = leaves["position"]
    duplicated = leaves.filter(positions.is_duplicated())
    for position, files in duplicated.group_by("position").agg("file").sort("position").rows():
        report.add("leaves_overlap", f"position {position}", f"claimed by {sorted(files)}")
    present = set(positions.to_list())
    missing = [p for p in range(size) if p not in present] if len(present) < size else []
    for first, last in _runs(missing):
        report.add(
            "leaves_missing",
            f"positions {first}-{last}",
            "a leaves file of the log is gone: its checkpoints cannot be recomputed",
        )
    rank = {kind: i for i, kind in enumerate(KINDS)}
    previous: tuple[int, int, int] | None = None
    for position, kind, lsn, seq, record in (
        leaves.unique("position", keep="first")
        .sort("position")
        .select("position", "kind", "lsn", "seq", "record_id")
        .iter_rows()
    ):
        order = (lsn, rank.get(kind, 9), seq)
        if previous is not None and order < previous:
            report.add(
                "out_of_order",
                f"position {position}",
                f"{kind} {record or ''} at LSN {lsn_text(lsn)} comes after a later "
                "commit: leaves were reordered",
            )
        previous = order


def _runs(values: list[int]) -> Iterator[tuple[int, int]]:
    if not values:
        return
    start = prev = values[0]
    for value in values[1:]:
        if value == prev + 1:
            prev = value
        else:
            yield start, prev
            start = prev = value
    yield start, prev


def _check_checkpoints(
    report: VerifyReport,
    log: TrustLog,
    leaves: pl.DataFrame,
    key: Ed25519PublicKey | None,
    latest: dict[str, Any] | None,
) -> None:
    found = log.checkpoints()
    report.checkpoints = len(found)
    if key is None:
        report.add(
            "unverifiable",
            "checkpoints",
            "no verify key: set AUDIT_VERIFY_KEY (or "
            "AUDIT_SIGNING_KEY) to check the checkpoints' signatures",
        )
    hashes = leaves.unique("position", keep="first").sort("position")["hash"].to_list()
    frontier, expected_seq, previous = Frontier(), 0, None
    for path, signed in found:
        body, signature = signed.get("checkpoint") or {}, signed.get("signature", "")
        seq, name = body.get("seq"), f"checkpoint {body.get('seq')} ({path.rsplit('/', 1)[-1]})"
        if key is not None and not signing.signature_valid(key, canonical(body), signature):
            report.add(
                "checkpoint_forged",
                name,
                "its signature does not verify with the "
                "environment's key: it was altered or not signed by this deployment",
            )
        if seq != expected_seq:
            report.add(
                "checkpoint_missing",
                f"checkpoint {expected_seq}",
                f"the next checkpoint file is {seq}: checkpoints were removed",
            )
        if previous is not None and body.get("previous") != checkpoint_hash(previous):
            report.add(
                "checkpoint_missing",
                name,
                "its 'previous' is not the hash of the "
                "checkpoint before it: one was replaced or removed",
            )
        size = body.get("tree_size", 0)
        if size < frontier.size or size > len(hashes):
            report.add(
                "checkpoint_root",
                name,
                f"covers {size} leaves; the log holds {len(hashes)}: leaves were removed",
            )
        else:
            frontier.extend(hashes[frontier.size : size])
            if frontier.root().hex() != body.get("root"):
                report.add(
                    "checkpoint_root",
                    name,
                    f"the root of the first {size} leaves is "
                    "not the signed root: leaves were changed after it was signed",
                )
        expected_seq, previous = (seq if isinstance(seq, int) else expected_seq) + 1, body
    if latest is not None and latest["seq"] >= expected_seq:
        report.add(
            "checkpoint_missing",
            f"checkpoints {expected_seq}-{latest['seq']}",
            "the log's state names them but their files are gone",
        )


def _check_erasures(
    report: VerifyReport,
    log: TrustLog,
    leaves: pl.DataFrame,
    size: int,
    keys: dict[str, bytes],
    in_progress: set[int],
) -> Commitments:
    """The erasure leaves kept beside the log against the log's erasure leaves; what the
    logged ones replaced is what the records' leaves are rebuilt from."""
    logged = erasures.logged_hashes(leaves, size)
    unreadable: list[str] = []
    kept = {int(leaf["request"]): leaf for leaf in erasures.read_leaves(log, unreadable)}
    for path in unreadable:
        report.add("erasure_forged", path, "a file beside the log's erasure leaves that is none")
    valid = []
    for request, leaf in sorted(kept.items()):
        if logged.get(request) == leaf_hash(canonical(leaf)):
            valid.append(leaf)
        elif request not in logged and request in in_progress:
            report.add("erasure_running", f"erasure {request}", "planned, not logged yet")
        else:
            report.add(
                "erasure_forged",
                f"erasure {request}",
                "an erasure leaf kept beside the log that the log does not hold: it was "
                "written or edited afterwards, and excuses no replaced value",
            )
    for request in sorted(set(logged) - set(kept)):
        report.add(
            "erasure_missing",
            f"erasure {request}",
            "the log holds an erasure leaf whose content is gone: the values it replaced "
            "cannot be checked",
        )
    return Commitments(keys, erasures.erased_records(valid), strict=False)


def _report_sealing(
    report: VerifyReport, commitments: Commitments, where: str = "", record: str | None = None
) -> None:
    """What sealing found, each under its record (``record``: all under one document's, the
    findings of its context too, which name the context leaf)."""
    for kind, rid, detail in commitments.findings:
        report.add(kind, record or rid, where + detail)
    commitments.findings.clear()


# --- 2. Elasticsearch ---------------------------------------------------------------------


def _documents(es: Elasticsearch, env: str, source: str, since, until) -> Iterator[dict]:
    bounds = {k: v.isoformat() for k, v in (("gte", since), ("lt", until)) if v is not None}
    clauses: list[dict] = [{"term": {"env": env}}, {"term": {"source.service": source}}]
    if bounds:
        clauses.append({"range": {"@timestamp": bounds}})
    yield from scan(
        es,
        index=read_alias(env),
        query={"query": {"bool": {"filter": clauses}}},
        size=5_000,
        ignore_unavailable=True,
    )


def _check_documents(
    report: VerifyReport,
    es: Elasticsearch,
    store: StagingStore,
    leaves: pl.DataFrame,
    changes: pl.DataFrame,
    since,
    until,
    window: Window,
    waiting: set[tuple[int, int]],
    first_lsn: int | None,
    retention_class: str,
    commitments: Commitments,
) -> None:
    logged = {
        rid: (h, lsn, seq, t)
        for rid, h, lsn, seq, t in changes.select(
            "record_id", "hash", "lsn", "seq", "time"
        ).iter_rows()
    }
    contexts = {
        lsn: h
        for lsn, h in leaves.filter(pl.col("kind") == "context").select("lsn", "hash").iter_rows()
    }
    attached: dict[int, tuple[datetime, bytes]] = {}
    for xid, time, h in (
        leaves.filter(pl.col("kind") == "attach")
        .sort("time")
        .select("xid", "time", "hash")
        .iter_rows()
    ):
        attached[xid] = (time, h)
    seen: set[str] = set()
    checked: set[bytes] = set()
    for hit in _documents(es, store.env, store.source, since, until):
        doc_id, doc = hit["_id"], hit["_source"]
        report.documents += 1
        seen.add(doc_id)
        try:
            # A transaction's changes carry one context: once a document's context leaf is
            # the logged one, another document claiming the very same one is not rebuilt.
            carried = _carried_key(doc, logged.get(doc_id))
            claimed = document_leaves(
                doc_id, doc, commitments, context=carried is None or carried not in checked
            )
            derived = derived_mismatches(hit["_index"], doc_id, doc, retention_class)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            commitments.findings.clear()
            report.add("altered", doc_id, f"the document is not a record any more: {exc!r}")
            continue
        _report_sealing(report, commitments, record=doc_id)
        if derived:
            report.add("derived_altered", doc_id, _derived_text(derived, hit["_index"]))
        _, change = claimed[0]
        found = logged.get(doc_id)
        lsn = change["commit_lsn"]
        if found is None:
            if first_lsn is not None and parse_lsn(lsn) < first_lsn:
                report.add("before_log", doc_id, "committed before the log began")
            else:
                report.add(
                    "inserted",
                    doc_id,
                    "in Elasticsearch but not in the log: a forged or copied document",
                )
            continue
        if leaf_hash(canonical(change)) != found[0]:
            if doc_id in commitments.suspects:
                report.add(
                    "erased_unlogged",
                    doc_id,
                    "a personal value reads as erased, and no erasure leaf of the log names it: "
                    "a value was removed without an erasure",
                )
            else:
                report.add(
                    "altered",
                    doc_id,
                    "its change differs from the logged one (values, "
                    "columns, operation, time or place)",
                )
        commitments.suspects.discard(doc_id)
        status = (doc.get("attribution") or {}).get("status")
        xid = int(change["xid"])
        if status in ("attributed", "late") and len(claimed) == 1:
            pass  # the same context as a document's before, which matched the log
        elif status in ("attributed", "late"):
            _, context = claimed[1]
            expected = (
                contexts.get(found[1])
                if status == "attributed"
                else (attached[xid][1] if xid in attached else None)
            )
            matches = leaf_hash(canonical(context)) == expected
            if matches and carried is not None:
                checked.add(carried)
            if not matches:
                if context_name(context) in commitments.suspects:
                    report.add(
                        "erased_unlogged",
                        doc_id,
                        "a personal field of its context reads as erased, and no erasure leaf "
                        "of the log names it: a value was removed without an erasure",
                    )
                else:
                    report.add(
                        "context_altered",
                        doc_id,
                        f"says {status} with a context the log "
                        "does not hold for its transaction (who, why or when was changed)",
                    )
            commitments.suspects.discard(context_name(context))
        elif found[1] in contexts:
            report.add(
                "context_altered",
                doc_id,
                "says unattributed, but the log holds the "
                "context its transaction recorded: the context was removed",
            )
        elif xid in attached:
            late = attached[xid][0] > window.now - window.indexing_lag
            report.add(
                "attribution_pending" if late else "context_altered",
                doc_id,
                "a context was attached later and the record still says unattributed",
            )
    cutoff = window.now - window.retention if window.retention else None
    pending = _pending(store)
    for rid, (_, lsn, seq, time) in logged.items():
        if rid in seen:
            continue
        if (lsn, seq) in waiting:
            report.add("waiting", rid, "in the quarantine, waiting for its context")
        elif rid in pending.ids or any(first <= lsn <= last for first, last in pending.ranges):
            report.add("not_indexed_yet", rid, "its batch is staged and not indexed yet")
        elif cutoff is not None and time < cutoff:
            report.add("expired", rid, "older than the retention period")
        else:
            report.add(
                "removed",
                rid,
                f"logged (commit {lsn_text(lsn)}, change {seq}) but "
                "not in Elasticsearch: the document was deleted",
            )


def _carried_key(doc: dict[str, Any], logged: tuple | None) -> bytes | None:
    """Everything a document's context leaf is built from (and the logged LSN it is compared
    at), or None where it carries no context: equal keys build equal leaves."""
    attribution = doc.get("attribution") or {}
    if logged is None or attribution.get("status") not in ("attributed", "late"):
        return None
    txn = doc["transaction"]
    return orjson.dumps(
        [
            logged[1],
            doc["env"],
            doc["source"]["service"],
            txn["commit_lsn"],
            txn["xid"],
            doc["@timestamp"],
            attribution,
            doc.get("context"),
            doc.get("context_personal"),
        ],
        option=orjson.OPT_SORT_KEYS,
    )


def _derived_text(derived: list[str], index: str) -> str:
    text = f"fields {', '.join(derived)} are not what its own facts give"
    parsed = parse_index_name(index)
    if "index" in derived and parsed is not None and parsed.source is not None:
        text += (
            f" (it is in {index}, of the layout before retention classes: run "
            "audit-platform index migrate)"
        )
    return text


@dataclass
class _Pending:
    ranges: list[tuple[int, int]]
    ids: set[str]


def _pending(store: StagingStore) -> _Pending:
    """What the pending ledger still owes the index: staged batches and records to re-send."""
    found = _Pending([], set())
    for entry in store.pending():
        if entry.ids is not None:
            found.ids.update(entry.ids)
        else:
            found.ranges.extend(lsn_range(path) for path in entry.staged_paths("changes"))
    return found


def derived_mismatches(
    index: str, doc_id: str, doc: dict[str, Any], retention_class: str = STANDARD_CLASS
) -> list[str]:
    """Fields of a document that do not follow from its own facts (its id, index, event,
    free text, and the user, organization, service, trace and client its context names), as
    the indexing code derives them (``index.documents``; a test holds the two to the same
    answers).
    The index follows from the commit month and the source's ``retention_class``: a document
    copied into another class's index, or another month's, is caught here."""
    txn, context = doc["transaction"], doc.get("context") or {}
    actor, organization = context.get("actor"), context.get("organization")
    if not isinstance(actor, dict):
        actor = {}
    if not isinstance(organization, dict):
        organization = {}
    lsn = parse_lsn(txn["commit_lsn"])
    committed = datetime.fromisoformat(doc["@timestamp"])
    expected = {
        "id": record_id(doc["env"], doc["source"]["service"], lsn, txn["change_index"]),
        "index": index_name(doc["env"], retention_class, committed.year, committed.month),
        "event": EVENTS.get(doc.get("operation", "")),
        "values_text": free_text(doc.get("before"), doc.get("after")),
        "user": {"id": _text_of(actor.get("id")), "name": _text_of(actor.get("name"))},
        "organization": _organization_of(doc, organization),
        "service": {"name": _text_of(context.get("service"))},
        "trace": {"id": _text_of(context.get("trace_id"))},
        "client": {"ip": _text_of(context.get("client_addr"))},
        "transaction.lsn": lsn,
    }
    if "organization" not in doc and not organization:
        # Indexed before records named their organization, from a context that names none.
        del expected["organization"]
    found = {**doc, "id": doc_id, "index": index, "transaction.lsn": txn.get("lsn")}
    return [name for name, value in expected.items() if found.get(name) != value]


def _organization_of(doc: dict[str, Any], named: dict[str, Any]) -> dict[str, str | None]:
    """The organization a document follows from: its row's (committed by its change leaf),
    else its context's; the context's name only where the two name the same one."""
    row = doc.get("row") or {}
    in_context = _text_of(named.get("id"))
    # The row's: "" where its table names an organization column and it names none.
    by_row = row.get("organization")
    found = in_context if by_row is None else (by_row or None)
    name = _text_of(named.get("name")) if in_context is not None and in_context == found else None
    return {"id": found, "name": name}


def _text_of(value: Any) -> str | None:
    """A context value as the document holds it: text, whatever JSON type it was."""
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


# --- 3. staging ---------------------------------------------------------------------------


def _check_staging(
    report: VerifyReport,
    store: StagingStore,
    policy: SourcePolicy,
    changes: pl.DataFrame,
    since,
    until,
    commitments: Commitments,
) -> None:
    logged = dict(changes.select("record_id", "hash").iter_rows())
    far = datetime(9999, 1, 1, tzinfo=UTC)
    for hour in store.hours("changes"):
        if (since is not None and hour + timedelta(hours=1) <= since) or (
            until is not None and hour >= until
        ):
            continue
        paths = store.hour_files("changes", hour)
        staged = store.read(paths, "changes")
        contexts = store.read(store.hour_files("contexts", hour), "contexts")
        # Every change as a record (no grace): the change's leaf does not depend on its context.
        result = enrich(staged, contexts, policy, now=far, grace=timedelta(0))
        leaves = record_leaves(result.records, commitments)
        _report_sealing(report, commitments, f"staged {hour:%Y-%m-%d %H}:00: ")
        report.staged_changes += leaves.height
        _compare_staged(report, leaves, logged, "changes", hour_from_path(paths[0]))
        records_paths = [
            p for p in (store.derived_path(p, "records") for p in paths) if store.fs.exists(p)
        ]
        records = store.read(records_paths)
        if records.height:
            _compare_records(report, records.drop("file"), result.records, hour)


#: The records columns a change's leaf covers (the context is covered by its own leaves).
_COVERED = (
    "env",
    "source",
    "lsn",
    "xid",
    "change_index",
    "commit_time",
    "schema",
    "table",
    "operation",
    "key_columns",
    "column_types",
    "object_id",
    "changed_columns",
    "before",
    "after",
    "policy_version",
    "txn_changes",
    "txn_ignored",
    "row_organization",
    "personal",
)


def _compare_records(
    report: VerifyReport, records: pl.DataFrame, enriched: pl.DataFrame, hour: datetime
) -> None:
    """The records files against the staged changes enriched again (whose leaves were just
    compared with the log): a column join, no hashing, so the records files cost little.
    A column a records file written by an earlier version lacks reads as null."""
    records = records.with_columns(
        pl.lit(None, RECORD_SCHEMA[c]).alias(c) for c in _COVERED if c not in records.columns
    )
    joined = records.join(enriched.select("id", *_COVERED), on="id", how="inner", suffix="_")
    differs = pl.any_horizontal(pl.col(c).ne_missing(pl.col(f"{c}_")) for c in _COVERED)
    for rid in joined.filter(differs)["id"].to_list():
        report.add(
            "staged_altered",
            rid,
            f"the staged records of {hour:%Y-%m-%d %H}:00 "
            "give a different change than the log holds",
        )


def _compare_staged(
    report: VerifyReport,
    leaves: pl.DataFrame,
    logged: dict[str, bytes],
    dataset: str,
    hour: datetime,
) -> None:
    for rid, h in leaves.select("record_id", "hash").iter_rows():
        expected = logged.get(rid)
        if expected is not None and expected != h:
            report.add(
                "staged_altered",
                rid,
                f"the staged {dataset} of {hour:%Y-%m-%d %H}:00 "
                "give a different change than the log holds",
            )


def erasures_running(state: psycopg.Connection, env: str) -> set[int]:
    """Erasure requests started and not done: their leaves may be kept and not logged yet."""
    rows = state.execute(
        "SELECT id FROM audit_platform.erasure_requests WHERE env = %s"
        " AND started_at IS NOT NULL AND done_at IS NULL",
        (env,),
    ).fetchall()
    return {int(row[0]) for row in rows}


def waiting_changes(state: psycopg.Connection, env: str, source: str) -> set[tuple[int, int]]:
    """(commit LSN, change index) of the changes waiting in the quarantine."""
    rows = state.execute(
        "SELECT commit_lsn, change_index FROM audit_platform.quarantine"
        " WHERE env = %s AND source = %s AND status = 'waiting'",
        (env, source),
    ).fetchall()
    return {(int(lsn), int(index)) for lsn, index in rows}


def verify_environment(
    settings: Settings,
    sources: list[str],
    *,
    since: datetime | None,
    until: datetime | None,
    now: datetime,
    staging: bool = True,
) -> list[VerifyReport]:
    """Verify each source of this environment with its configured servers: what
    ``audit-platform verify`` and the hourly Dagster check both do."""
    environment = load_environment(settings.resources_dir, settings.env)
    unknown = sorted(set(sources) - set(environment.sources))
    if unknown:
        raise ValueError(
            f"environment {settings.env} has no source {', '.join(unknown)}; "
            f"it has {', '.join(sorted(environment.sources))}"
        )
    reports = []
    with (
        es_from_settings(settings) as es,
        psycopg.connect(pg_url_from_settings(settings), autocommit=True) as state,
    ):
        keys, erasing = all_keys(state, settings.env), erasures_running(state, settings.env)
        for source in sources or sorted(environment.sources):
            store = StagingStore(settings.staging_root, settings.env, source)
            policy = load_policy(policy_path(settings.resources_dir, source))
            days = environment.retention_days_of(source)
            reports.append(
                verify_source(
                    store,
                    es,
                    policy,
                    settings.verifier(),
                    since=since,
                    until=until,
                    window=Window(now, retention=timedelta(days=days)),
                    waiting=waiting_changes(state, settings.env, source),
                    staging=staging,
                    retention_class=environment.retention_class_of(source),
                    keys=keys,
                    erasing=erasing,
                )
            )
    return reports


def verify_reads(
    state: psycopg.Connection, log: TrustLog, env: str, key: Ed25519PublicKey | None
) -> VerifyReport:
    """The read log's rows against its trail: each logged row still there, unedited, and no row
    slipped in among the logged ones."""
    report = VerifyReport(env, "_reads", None, None)
    found = log.state()
    leaves = log.leaves()
    report.log_size = found.size
    _check_log(report, leaves, found.size)
    _check_checkpoints(report, log, leaves, key, found.checkpoint)
    logged = {
        int(rid): h
        for rid, h in leaves.filter(pl.col("position") < found.size)
        .select("record_id", "hash")
        .iter_rows()
    }
    seen, after = set(), 0
    while True:
        rows = read_rows(state, env, after_id=after, limit=50_000)
        rows = [r for r in rows if r["id"] <= found.last_lsn]
        if not rows:
            break
        for row in rows:
            seen.add(row["id"])
            expected = logged.get(row["id"])
            if expected is None:
                report.add("inserted", f"read {row['id']}", "a read-log row the trail never held")
            elif leaf_hash(canonical(read_leaf(row))) != expected:
                report.add("altered", f"read {row['id']}", "edited after it was logged")
        after = rows[-1]["id"]
    report.documents = len(seen)
    for rid in sorted(set(logged) - seen):
        report.add("removed", f"read {rid}", "logged, but no longer in the read log")
    return report
