"""Carrying out an erasure: plan and retire the key, log, replace (docs/design.md, "Erasure").

The erasure holds the ledger lock of every source whose policy names the person's table, from
its plan to its end, so no capture turn enriches, appends or indexes in between, and no leaf is
sealed with the person's key between the plan that covers it and the key's deletion. Every step
can be repeated: until the key is retired, a rerun plans again; after, the plans are final (their
hashes are in the platform database, and the files kept beside the logs are checked against
them), each log is appended once, and replacing a value by the erasure's text twice writes the
same text. A crash anywhere and a rerun finish the erasure once.
"""

from __future__ import annotations

import json
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import polars as pl
import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from elasticsearch import Elasticsearch
from elasticsearch.helpers import bulk, scan

from audit_platform.clients import es_from_settings, pg_url_from_settings
from audit_platform.enrich.batch import enrich_pending
from audit_platform.enrich.join import changed_columns, personal_shape, transaction_contexts
from audit_platform.environment import load_environment
from audit_platform.erasure.requests import (
    ErasureError,
    ErasureRequest,
    Subject,
    declared_tables,
    get_request,
    list_requests,
    refuse_if_held,
    start,
)
from audit_platform.faults import crash_point
from audit_platform.index.documents import free_text
from audit_platform.lsn import lsn_text, parse_lsn
from audit_platform.naming import read_alias
from audit_platform.policy import SourcePolicy, load_policy, policy_path
from audit_platform.record import Operation, record_id
from audit_platform.settings import Settings
from audit_platform.staging.lock import ledger_lock
from audit_platform.staging.schemas import with_context_spec
from audit_platform.staging.store import StagingStore
from audit_platform.streams.definitions import Stream, list_streams
from audit_platform.streams.destinations import BucketDestination
from audit_platform.trust import erasures
from audit_platform.trust.commitments import (
    CONTEXT,
    SIDES,
    attach_ref,
    commit,
    context_field,
    context_ref,
    context_shape,
    destroy_key,
    erase_context,
    known_keys,
    marker,
)
from audit_platform.trust.leaves import canonical, erasure_leaf, moment
from audit_platform.trust.log import TrustLog
from audit_platform.trust.merkle import leaf_hash

#: record id -> side -> column -> commitment of the value replaced.
Plan = dict[str, dict[str, dict[str, str]]]
#: Documents asked of Elasticsearch at once.
ID_CHUNK = 1_000


@dataclass
class SourceErasure:
    source: str
    records: int
    values: int
    documents: int = 0
    staged_files: int = 0
    #: Context leaves (a transaction's own, or an attachment) whose actor was the person.
    contexts: int = 0
    #: Objects bucket streams wrote, rewritten with their digests signed again.
    objects: int = 0


@dataclass
class ErasureOutcome:
    request: int
    subject: str
    sources: list[SourceErasure] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def records(self) -> int:
        return sum(s.records for s in self.sources)


@dataclass
class DuePass:
    """What one pass over the due requests did: those done, and why others are not."""

    done: list[ErasureOutcome] = field(default_factory=list)
    #: request id -> why it did not run (a hold, a failure it will be retried after).
    not_done: dict[int, str] = field(default_factory=dict)
    #: request id -> when it runs unless another admin approves it first (or cancels it).
    waiting: dict[int, datetime] = field(default_factory=dict)


def run_due(settings: Settings, now: datetime) -> DuePass:
    """Every request of the environment that is approved or has waited its period; one that
    cannot run now does not keep the others from running."""
    with psycopg.connect(pg_url_from_settings(settings), autocommit=True) as state:
        requests = list_requests(state, settings.env)
    due = [r.id for r in requests if r.due(now)]
    found = DuePass(waiting={r.id: r.not_before for r in requests if r.state == "waiting"})
    for request in due:
        try:
            found.done.append(run_request(settings, request, now=now))
        except (ErasureError, psycopg.Error, OSError) as exc:
            found.not_done[request] = str(exc)
    return found


def run_request(settings: Settings, request_id: int, *, now: datetime) -> ErasureOutcome:
    """One request, with the environment's configured servers and sources."""
    environment = load_environment(settings.resources_dir, settings.env)
    sources = {
        source: (
            StagingStore(settings.staging_root, settings.env, source),
            load_policy(policy_path(settings.resources_dir, source)),
        )
        for source in sorted(environment.sources)
    }
    with (
        es_from_settings(settings) as es,
        psycopg.connect(pg_url_from_settings(settings), autocommit=True) as state,
    ):
        return carry_out(
            state,
            es,
            settings.env,
            request_id,
            sources=sources,
            now=now,
            grace=timedelta(minutes=environment.enrich_grace_minutes),
            signer=settings.signer(),
        )


def carry_out(
    state: psycopg.Connection,
    es: Elasticsearch,
    env: str,
    request_id: int,
    *,
    sources: dict[str, tuple[StagingStore, SourcePolicy]],
    now: datetime,
    grace: timedelta = timedelta(minutes=10),
    signer: Ed25519PrivateKey | None = None,
) -> ErasureOutcome:
    """Erase the request's person from every source whose policy names their table, if the
    request is due and no legal hold covers them when it starts (once started, it finishes: a
    half-done erasure is what must never be left). ``signer``, the trail's key, signs again
    the digests of the bucket streams' objects it rewrites."""
    began = time.monotonic()
    request = get_request(state, env, request_id)
    if request.state == "done":
        raise ErasureError(f"erasure request {request_id} is done already")
    if not request.due(now):
        raise ErasureError(
            f"erasure request {request_id} is {request.state}: it runs once another admin "
            "approves it (audit-platform erase approve) or after "
            f"{request.not_before:%Y-%m-%d %H:%M %Z}"
        )
    subject = Subject.parse(request.subject)
    if signer is None and _buckets(state, env):
        raise ErasureError(
            "bucket streams of this environment hold objects an erasure rewrites and signs "
            "again: set AUDIT_SIGNING_KEY where the erasure runs"
        )
    if request.started_at is None:
        refuse_if_held(state, es, env, subject)
    started = start(state, request.id)
    named = {
        source: found
        for source, found in sorted(sources.items())
        if subject.of in declared_tables([found[1]])
    }
    outcome = ErasureOutcome(request.id, subject.name)
    with ExitStack() as locks:
        for source in named:  # in one order, so two erasures never wait for each other
            locks.enter_context(ledger_lock(state, env, source))
        request = get_request(state, env, request.id)
        if request.key_retired_at is None:
            _plan_and_retire(state, es, request, subject, named, started, now, grace)
        planned = _planned_hashes(state, request.id)
        for source, (store, _) in named.items():
            if source in planned:
                outcome.sources.append(
                    _erase_in_source(state, store, es, request, subject, planned[source], signer)
                )
        state.execute(
            "UPDATE audit_platform.erasure_requests SET done_at = now(), records = %s"
            " WHERE id = %s",
            (outcome.records, request.id),
        )
    outcome.seconds = time.monotonic() - began
    return outcome


def _plan_and_retire(
    state: psycopg.Connection,
    es: Elasticsearch,
    request: ErasureRequest,
    subject: Subject,
    named: dict[str, tuple[StagingStore, SourcePolicy]],
    started: datetime,
    now: datetime,
    grace: timedelta,
) -> None:
    """Plan every source (what is staged enriched and logged first, so the plan covers every
    change of the person captured so far), keep the plans beside the logs, then delete the key
    and record the plans' hashes in one transaction. Until then a rerun plans again."""
    key = known_keys(state, request.env, {subject.name}).get(subject.name)
    leaves = {}
    for source, (store, policy) in named.items():
        enrich_pending(store, state, policy, now=now, grace=grace)
        leaf = _plan(state, store, es, request, subject, key, started)
        erasures.write_leaf(TrustLog(store), leaf, replace=True)
        leaves[source] = leaf
    crash_point("erasure.planned")
    with state.transaction():
        destroy_key(state, request.env, subject.name)
        for source, leaf in leaves.items():
            state.execute(
                "INSERT INTO audit_platform.erasure_leaves (request, source, hash)"
                " VALUES (%s, %s, %s)"
                " ON CONFLICT (request, source) DO UPDATE SET hash = excluded.hash",
                (request.id, source, leaf_hash(canonical(leaf))),
            )
        state.execute(
            "UPDATE audit_platform.erasure_requests SET key_retired_at = now() WHERE id = %s",
            (request.id,),
        )
    crash_point("erasure.retired")


def _planned_hashes(state: psycopg.Connection, request: int) -> dict[str, bytes]:
    rows = state.execute(
        "SELECT source, hash FROM audit_platform.erasure_leaves WHERE request = %s", (request,)
    ).fetchall()
    return {source: bytes(h) for source, h in rows}


def _erase_in_source(
    state: psycopg.Connection,
    store: StagingStore,
    es: Elasticsearch,
    request: ErasureRequest,
    subject: Subject,
    planned: bytes,
    signer: Ed25519PrivateKey | None,
) -> SourceErasure:
    """One source's part once the plans are final; the caller holds the source's lock."""
    log = TrustLog(store)
    leaf = erasures.read_leaf(log, request.id)
    if leaf is None or leaf_hash(canonical(leaf)) != planned:
        raise ErasureError(
            f"{store.source}: the erasure leaf kept beside the log ({request.id}) is "
            f"{'gone' if leaf is None else 'not the one planned'}: the staging root was "
            "changed. Restore it from a backup; nothing more is erased until then"
        )
    at = log.state()
    logged_now = request.id in erasures.logged_hashes(log.leaves(), at.size)
    if not logged_now and log.append(erasures.leaf_frame(leaf, at)) != 1:
        raise ErasureError(
            f"{store.source}: the log did not take the erasure leaf after its last leaf "
            f"{at.last_key}; run audit-platform verify"
        )
    crash_point("erasure.logged")
    logged = set(log.leaves(columns=["position", "record_id"])["record_id"].drop_nulls())
    files = _replace_staged(store, leaf, subject, logged)
    acted = set(leaf.get("contexts") or {})
    if acted:
        files += _replace_staged_contexts(store, subject, acted, leaf["text"])
        _replace_late_contexts(state, store, subject, acted, leaf["text"])
    crash_point("erasure.staged")
    documents = _replace_indexed(es, store.env, leaf)
    if acted:
        documents += _replace_indexed_contexts(es, store, subject, acted, leaf["text"])
    crash_point("erasure.indexed")
    objects = _replace_exported(state, store, request, leaf, signer)
    crash_point("erasure.exported")
    records, contexts = leaf["records"], leaf.get("contexts") or {}
    values = sum(len(columns) for sides in records.values() for columns in sides.values())
    values += sum(len(fields) for fields in contexts.values())
    return SourceErasure(
        store.source, len(records), values, documents, files, len(contexts), objects
    )


# --- plan ---------------------------------------------------------------------------------


def _plan(
    platform: psycopg.Connection,
    store: StagingStore,
    es: Elasticsearch,
    request: ErasureRequest,
    subject: Subject,
    key: bytes | None,
    started: datetime,
) -> dict[str, Any]:
    """The erasure leaf of one source: every logged record holding the person's values, from
    the staged changes and from Elasticsearch (records whose staged hours retention removed),
    less the values earlier erasures (logged ones) replaced already."""
    log = TrustLog(store)
    state = log.state()
    leaves = log.leaves(columns=["position", "kind", "record_id", "lsn", "xid", "time", "hash"])
    logged = set(leaves.filter(pl.col("kind") == "change")["record_id"].to_list())
    planned: Plan = {}
    acted: dict[str, dict[str, str]] = {}
    if key is not None:  # without a key, no value of this person was ever committed
        for rid, found in _person_in_staging(store, subject, logged):
            sides = _commitments(rid, found, subject, key)
            if sides:
                planned[rid] = sides
        for rid, sides in _plan_indexed(es, store, subject, key, logged).items():
            planned.setdefault(rid, sides)
        refs = _logged_contexts(store.source, leaves)
        for ref, values in _actor_in_staging(store, subject):
            if ref in refs and (fields := _context_commitments(ref, values, key)):
                acted[ref] = fields
        for ref, values in _actor_indexed(es, store, subject):
            if ref in refs and (fields := _context_commitments(ref, values, key)):
                acted.setdefault(ref, fields)
        # Late contexts outlive their staged hours (kept for the longest retention class).
        for _, _, ref, text, shape in _late_of(platform, store, subject):
            context = json.loads(text)
            values = {f: context_field(context, f) for f in shape["fields"]}
            if ref in refs and (fields := _context_commitments(ref, values, key)):
                acted.setdefault(ref, fields)
    in_log = erasures.logged_hashes(leaves, state.size)
    earlier = [
        leaf
        for leaf in erasures.read_leaves(log)
        if in_log.get(int(leaf["request"])) == leaf_hash(canonical(leaf))
    ]
    done = erasures.erased_records(earlier)
    final: Plan = {}
    for rid, sides in sorted(planned.items()):
        previous = done.get(rid)
        kept = {
            side: {
                c: v
                for c, v in columns.items()
                if previous is None or c not in previous.values.get(side, {})
            }
            for side, columns in sides.items()
        }
        kept = {side: columns for side, columns in kept.items() if columns}
        if kept:
            final[rid] = kept
    contexts = {}
    for ref, fields in sorted(acted.items()):
        previous = done.get(ref)
        gone = previous.values.get(CONTEXT, {}) if previous is not None else {}
        if left := {f: c for f, c in fields.items() if f not in gone}:
            contexts[ref] = left
    return erasure_leaf(
        env=store.env,
        source=store.source,
        request=request.id,
        subject=subject.name,
        reason=request.reason,
        requested_by=request.requested_by,
        approved_by=request.approved_by,
        time=started,
        text=marker(request.id, started),
        records=final,
        contexts=contexts,
    )


@dataclass(frozen=True)
class _Found:
    """One staged change holding the person's values: its row in its file, its images, and
    the personal columns of each side that is the person's."""

    row: int
    images: tuple[Any, Any]
    sides: dict[str, list[str]]


def _commitments(
    rid: str, found: _Found, subject: Subject, key: bytes
) -> dict[str, dict[str, str]]:
    """The commitment of each of the person's non-null values in a record, by side and column."""
    out: dict[str, dict[str, str]] = {}
    for side, image in zip(SIDES, found.images, strict=True):
        columns = {
            c: commit(key, rid, side, c, image[c])
            for c in found.sides.get(side, [])
            if image is not None and image.get(c) is not None
        }
        if columns:
            out[side] = columns
    return out


def _patterns(frame: pl.DataFrame, subject: Subject) -> list[str]:
    """How the person's id can appear in an image's JSON text under its table's subject column
    (capture writes compact JSON; text or number; escaped or not): a prefilter, so only rows
    that may be the person's are parsed."""
    columns = {
        json.loads(spec)["subject"]
        for spec in frame["personal_spec"].drop_nulls().unique().to_list()
        if json.loads(spec)["of"] == subject.of
    }
    values = {
        json.dumps(subject.id, ensure_ascii=False),
        json.dumps(subject.id),
        subject.id,
    }
    return [f"{json.dumps(c)}{sep}{v}" for c in columns for v in values for sep in (":", ": ")]


def _person_rows(frame: pl.DataFrame, subject: Subject) -> Iterator[_Found]:
    """The rows of a staged changes frame holding the person's values (``row`` is the row's
    position in ``frame``)."""
    if "personal_spec" not in frame.columns:
        return  # staged before personal data was declared
    patterns = _patterns(frame, subject)
    if not patterns:
        return
    candidates = frame.with_row_index("_row").filter(
        pl.col("personal_spec").str.json_path_match("$.of") == subject.of,
        pl.any_horizontal(
            pl.col(side).str.contains(p, literal=True) for side in SIDES for p in patterns
        ),
    )
    for row, op, before_text, after_text, spec in candidates.select(
        "_row", "operation", "before", "after", "personal_spec"
    ).iter_rows():
        before = _parsed(before_text)
        after = _parsed(after_text)
        shape_text = personal_shape(spec, Operation(op), before, after)
        if shape_text is None:
            continue
        shape = json.loads(shape_text)
        sides = {side: shape["columns"] for side in SIDES if shape.get(side) == subject.id}
        if sides:
            yield _Found(row, (before, after), sides)


def _changes_files(store: StagingStore) -> Iterator[tuple[str, pl.DataFrame]]:
    for path in store.files("changes"):
        with store.fs.open(path, "rb") as f:
            yield path, pl.read_parquet(f)


def _person_in_staging(
    store: StagingStore, subject: Subject, logged: set[str]
) -> Iterator[tuple[str, _Found]]:
    """(record id, found) of each logged record whose staged change holds the person's values
    (every record of them: indexed, waiting in the quarantine or dead-lettered)."""
    for _, frame in _changes_files(store):
        if "personal_spec" not in frame.columns:
            continue
        for found in _person_rows(frame, subject):
            rid = record_id(
                store.env, store.source, frame["lsn"][found.row], frame["change_index"][found.row]
            )
            if rid in logged:
                yield rid, found


def _plan_indexed(
    es: Elasticsearch, store: StagingStore, subject: Subject, key: bytes, logged: set[str]
) -> Plan:
    """The person's values in Elasticsearch: records whose staged hours retention removed."""
    plan: Plan = {}
    query = _in_source(store, subject.rows_query())
    for hit in scan(
        es,
        index=read_alias(store.env),
        query={"query": query, "_source": ["before", "after", "row.personal"]},
        size=1_000,
        ignore_unavailable=True,
    ):
        rid, doc = hit["_id"], hit["_source"]
        shape = (doc.get("row") or {}).get("personal")
        if rid not in logged or shape is None:
            continue
        sides = {side: shape["columns"] for side in SIDES if shape.get(side) == subject.id}
        found = _Found(-1, (doc.get("before"), doc.get("after")), sides)
        if sides and (commitments := _commitments(rid, found, subject, key)):
            plan[rid] = commitments
    return plan


def _logged_contexts(source: str, leaves: pl.DataFrame) -> set[str]:
    """The names (``context_ref``, ``attach_ref``) of a log's context and attach leaves."""
    found = set()
    for kind, lsn, xid, at in (
        leaves.filter(pl.col("kind").is_in(["context", "attach"]))
        .select("kind", "lsn", "xid", "time")
        .iter_rows()
    ):
        if kind == "context":
            found.add(context_ref(source, lsn_text(lsn)))
        else:
            found.add(attach_ref(source, xid, moment(at)))
    return found


def _context_commitments(ref: str, values: dict[str, Any], key: bytes) -> dict[str, str]:
    return {f: commit(key, ref, CONTEXT, f, v) for f, v in values.items() if v is not None}


def _is_actor(spec: str | None, text: str | None, subject: Subject) -> dict[str, Any] | None:
    """The context's ``context_personal`` where its actor is the person, else None."""
    found = context_shape(spec, text)
    if found is None:
        return None
    shape = json.loads(found)
    return shape if (shape["of"], shape["subject"]) == (subject.of, subject.id) else None


@dataclass(frozen=True)
class _Acted:
    """A staged context whose actor is the person: a transaction's own (``where``: its
    LSN) or an attachment (``where``: target xid and commit time), with the context's text
    (a transaction's calls merged) and its ``context_personal``."""

    kind: str
    where: Any
    text: str
    shape: dict[str, Any]


def _person_contexts(frame: pl.DataFrame, subject: Subject) -> Iterator[_Acted]:
    """The contexts of a staged contexts frame whose actor is the person: a transaction's own
    as its calls merged (an actor named by one call, an address by another), and each
    attachment."""
    frame = with_context_spec(frame).filter(pl.col("personal_spec").is_not_null())
    if frame.is_empty():
        return
    for lsn, text, spec in (
        transaction_contexts(frame).select("lsn", "context", "context_spec").iter_rows()
    ):
        if (shape := _is_actor(spec, text, subject)) is not None:
            yield _Acted("context", lsn, text, shape)
    attached = frame.filter(pl.col("kind") == "attach")
    for xid, at, text, spec in attached.select(
        "target_xid", "commit_time", "context", "personal_spec"
    ).iter_rows():
        if (shape := _is_actor(spec, text, subject)) is not None:
            yield _Acted("attach", (xid, at), text, shape)


def _contexts_files(store: StagingStore) -> Iterator[tuple[str, pl.DataFrame]]:
    for path in store.files("contexts"):
        with store.fs.open(path, "rb") as f:
            yield path, pl.read_parquet(f)


def _actor_in_staging(
    store: StagingStore, subject: Subject
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(context leaf's name, field -> value) of each staged context whose actor is the person."""
    for _, frame in _contexts_files(store):
        for acted in _person_contexts(frame, subject):
            context = json.loads(acted.text)
            yield (
                _staged_name(store.source, acted),
                {f: context_field(context, f) for f in acted.shape["fields"]},
            )


def _actor_indexed(
    es: Elasticsearch, store: StagingStore, subject: Subject
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The same from Elasticsearch: the contexts records carry whose staged hours retention
    removed."""
    for _, ref, context, shape in _acted_documents(es, store, subject):
        yield ref, {f: context_field(context, f) for f in shape["fields"]}


def _acted_documents(
    es: Elasticsearch, store: StagingStore, subject: Subject
) -> Iterator[tuple[dict[str, Any], str, dict[str, Any], dict[str, Any]]]:
    """(hit, context leaf's name, context, ``context_personal``) of each document of the
    source whose context's actor is the person (each names the leaf of the context it
    carries: its own, or the attachment that made it late)."""
    for hit in scan(
        es,
        index=read_alias(store.env),
        query={
            "query": _in_source(store, subject.contexts_query()),
            "_source": ["@timestamp", "transaction", "attribution", "context", "context_personal"],
        },
        size=1_000,
        ignore_unavailable=True,
    ):
        doc = hit["_source"]
        ref = _carried_context(store.source, doc)
        context, shape = doc.get("context"), doc.get("context_personal")
        if ref is not None and context is not None and shape is not None:
            yield hit, ref, context, shape


def _in_source(store: StagingStore, clause: dict[str, Any]) -> dict[str, Any]:
    """An Elasticsearch filter: ``clause`` among one source's records of the environment."""
    return {
        "bool": {
            "filter": [
                {"term": {"env": store.env}},
                {"term": {"source.service": store.source}},
                clause,
            ]
        }
    }


def _carried_context(source: str, doc: dict[str, Any]) -> str | None:
    """The name of the context leaf a record document carries (None: unattributed)."""
    status = (doc.get("attribution") or {}).get("status")
    txn = doc["transaction"]
    if status == "attributed":
        return context_ref(source, txn["commit_lsn"])
    if status == "late":
        committed = datetime.fromisoformat(doc["@timestamp"].replace("Z", "+00:00"))
        lag = timedelta(seconds=doc["attribution"].get("lag_seconds") or 0)
        return attach_ref(source, txn["xid"], moment(committed + lag))
    return None


# --- replace ------------------------------------------------------------------------------


def _replaced(image: Any, columns: Any, text: str) -> Any:
    if image is None:
        return None
    return {c: (text if c in columns and v is not None else v) for c, v in image.items()}


def _chunks(values: list[str], size: int) -> Iterator[list[str]]:
    for at in range(0, len(values), size):
        yield values[at : at + size]


def _replace_indexed(es: Elasticsearch, env: str, leaf: dict[str, Any]) -> int:
    """Each erased value of the leaf's records, in Elasticsearch, becomes the erasure's text;
    the free text is derived again. Returns the documents rewritten."""
    return _updated(es, _record_updates(es, env, leaf))


def _record_updates(es: Elasticsearch, env: str, leaf: dict[str, Any]) -> Iterator[dict[str, Any]]:
    records, text = leaf["records"], leaf["text"]
    for ids in _chunks(sorted(records), ID_CHUNK):
        found = es.search(
            index=read_alias(env),
            query={"ids": {"values": ids}},
            source_includes=["before", "after"],
            size=2 * len(ids),  # a record in an index of the layout before classes, too
            ignore_unavailable=True,
        )["hits"]["hits"]
        for hit in found:
            sides = records[hit["_id"]]
            doc = hit["_source"]
            before = _replaced(doc.get("before"), sides.get("before", {}), text)
            after = _replaced(doc.get("after"), sides.get("after", {}), text)
            replaced = {"before": before, "after": after, "values_text": free_text(before, after)}
            yield {
                "_op_type": "update",
                "_index": hit["_index"],
                "_id": hit["_id"],
                "doc": replaced,
            }


def _updated(es: Elasticsearch, actions: Iterable[dict[str, Any]]) -> int:
    """Send partial updates as they are made (the bulk helper's chunks: memory stays flat
    however many documents a person has), then flush their indices and expunge the old
    versions."""
    touched: set[str] = set()

    def sent() -> Iterator[dict[str, Any]]:
        for action in actions:
            touched.add(action["_index"])
            yield action

    done, _ = bulk(es, sent(), raise_on_error=True, max_retries=3)
    if touched:
        indices = ",".join(sorted(touched))
        es.indices.refresh(index=indices)
        # An updated document's old version stays in its segment until a merge: ask for it to
        # be expunged now (in the background; Elasticsearch runs one merge at a time).
        es.indices.flush(index=indices)
        es.indices.forcemerge(index=indices, only_expunge_deletes=True, wait_for_completion=False)
    return done


def _replace_indexed_contexts(
    es: Elasticsearch, store: StagingStore, subject: Subject, acted: set[str], text: str
) -> int:
    """Each personal field of the contexts the erasure leaf names (``acted``), in
    Elasticsearch, becomes the erasure's text, and so do the fields derived from them
    (``user.name``, ``client.ip``). Returns the documents rewritten."""
    return _updated(es, _context_updates(es, store, subject, acted, text))


def _context_updates(
    es: Elasticsearch, store: StagingStore, subject: Subject, acted: set[str], text: str
) -> Iterator[dict[str, Any]]:
    for hit, ref, found, shape in _acted_documents(es, store, subject):
        if ref not in acted:
            continue  # a later context of the same person, under a new key: not this erasure's
        context = erase_context(found, shape["fields"], text)
        replaced: dict[str, Any] = {"context": context}
        if (name := context_field(context, "actor.name")) is not None:
            replaced["user"] = {"name": name}
        if (address := context.get("client_addr")) is not None:
            replaced["client"] = {"ip": address}
        yield {"_op_type": "update", "_index": hit["_index"], "_id": hit["_id"], "doc": replaced}


def _parsed(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _dumped(image: Any) -> str:
    return json.dumps(image, ensure_ascii=False, separators=(",", ":"))


def _rewrite(frame: pl.DataFrame, replace: dict[int, dict[str, Any]], text: str) -> pl.DataFrame:
    """A staged file's rows with values replaced: ``replace`` is row -> side -> its columns.
    A changes file also keeps, in ``erased_changed``, which columns each rewritten change
    changed: enrichment derives them from the values, which no longer tell (two different
    emails both read as erased)."""
    kept = frame["erased_changed"].to_list() if "erased_changed" in frame.columns else None
    images = {side: frame[side].to_list() for side in SIDES}
    for row, sides in replace.items():
        before, after = (_parsed(images[side][row]) for side in SIDES)
        if kept is not None and kept[row] is None:
            unchanged = set(json.loads(frame["unchanged_toast"][row] or "[]"))
            operation = Operation(frame["operation"][row])
            kept[row] = json.dumps(changed_columns(operation, before, after, unchanged))
        for side, image in zip(SIDES, (before, after), strict=True):
            if image is not None and side in sides:
                images[side][row] = _dumped(_replaced(image, sides[side], text))
    columns = [pl.Series(side, images[side], dtype=pl.String) for side in SIDES]
    if kept is not None:
        columns.append(pl.Series("erased_changed", kept, dtype=pl.String))
    return frame.with_columns(columns)


def _replace_staged(
    store: StagingStore, leaf: dict[str, Any], subject: Subject, logged: set[str]
) -> int:
    """The staged changes files holding the leaf's records, or changes of the person no record
    was made of (an update the policy ignores, a change enrichment refused: their images hold
    the values all the same), and the records files beside them, rewritten with the values
    replaced. Returns the files rewritten."""
    records, text = leaf["records"], leaf["text"]
    rewritten = 0
    for path, frame in _changes_files(store):
        ids = [
            record_id(store.env, store.source, lsn, i)
            for lsn, i in frame.select("lsn", "change_index").iter_rows()
        ]
        replace: dict[int, dict[str, Any]] = {
            row: records[rid] for row, rid in enumerate(ids) if rid in records
        }
        for found in _person_rows(frame, subject):
            if ids[found.row] not in logged:
                replace[found.row] = found.sides
        if not replace:
            continue
        if "erased_changed" not in frame.columns:
            frame = frame.with_columns(pl.lit(None, pl.String).alias("erased_changed"))
        store.write_file(path, _rewrite(frame, replace, text))
        rewritten += 1
        records_path = store.derived_path(path, "records")
        if store.fs.exists(records_path):
            with store.fs.open(records_path, "rb") as f:
                derived = pl.read_parquet(f)
            rows = {
                row: records[rid]
                for row, rid in enumerate(derived["id"].to_list())
                if rid in records
            }
            if rows:
                store.write_file(records_path, _rewrite(derived, rows, text))
                rewritten += 1
    return rewritten


def _replace_staged_contexts(
    store: StagingStore, subject: Subject, acted: set[str], text: str
) -> int:
    """The staged contexts the erasure leaf names (``acted``: every call of such a
    transaction, and each such attachment), and the ``context`` of the records carrying them,
    rewritten with the personal fields replaced. Returns the files rewritten."""
    rewritten = 0
    for path, frame in _contexts_files(store):
        own: dict[int, list[str]] = {}
        attached: dict[tuple[int, Any], list[str]] = {}
        for found in _person_contexts(frame, subject):
            if _staged_name(store.source, found) in acted:
                fields = found.shape["fields"]
                (own if found.kind == "context" else attached)[found.where] = fields
        if not own and not attached:
            continue
        texts = frame["context"].to_list()
        rows = frame.select("kind", "lsn", "target_xid", "commit_time").iter_rows()
        for row, (kind, lsn, xid, at) in enumerate(rows):
            fields = own.get(lsn) if kind == "context" else attached.get((xid, at))
            if fields is not None and texts[row] is not None:
                texts[row] = _dumped(erase_context(json.loads(texts[row]), fields, text))
        store.write_file(path, frame.with_columns(pl.Series("context", texts, dtype=pl.String)))
        rewritten += 1
    needle = json.dumps(subject.id)  # as context_shape writes it
    for path in store.files("records"):
        with store.fs.open(path, "rb") as f:
            if "context_personal" not in pl.read_parquet_schema(f):
                continue
            f.seek(0)
            named = pl.read_parquet(f, columns=["context_personal"])["context_personal"]
            if not named.str.contains(needle, literal=True).any():
                continue  # a prefilter: only files that may hold the person's are read whole
            f.seek(0)
            frame = pl.read_parquet(f)
        texts = frame["context"].to_list()
        changed = False
        carried = frame.select(
            "context_personal",
            "lsn",
            "xid",
            "commit_time",
            "attribution_status",
            "attribution_lag_seconds",
        ).iter_rows()
        for row, (shape_text, lsn, xid, committed, status, lag) in enumerate(carried):
            if shape_text is None or texts[row] is None:
                continue
            shape = json.loads(shape_text)
            if (shape["of"], shape["subject"]) != (subject.of, subject.id):
                continue
            if status == "late":
                name = attach_ref(
                    store.source, xid, moment(committed + timedelta(seconds=lag or 0))
                )
            else:
                name = context_ref(store.source, lsn_text(lsn))
            if name in acted:
                texts[row] = _dumped(erase_context(json.loads(texts[row]), shape["fields"], text))
                changed = True
        if changed:
            store.write_file(path, frame.with_columns(pl.Series("context", texts, dtype=pl.String)))
            rewritten += 1
    return rewritten


def _replace_late_contexts(
    state: psycopg.Connection, store: StagingStore, subject: Subject, acted: set[str], text: str
) -> int:
    """The late contexts kept in the platform database (what re-attributes a change in any
    hour) that the erasure leaf names, rewritten likewise."""
    replaced = [
        (_dumped(erase_context(json.loads(context), shape["fields"], text)), xid, lsn)
        for xid, lsn, name, context, shape in _late_of(state, store, subject)
        if name in acted
    ]
    with state.cursor() as cur:
        cur.executemany(
            "UPDATE audit_platform.late_contexts SET context = %s WHERE env = %s AND source = %s"
            " AND target_xid = %s AND lsn = %s",
            [(context, store.env, store.source, xid, lsn) for context, xid, lsn in replaced],
        )
    return len(replaced)


def _late_of(
    state: psycopg.Connection, store: StagingStore, subject: Subject
) -> Iterator[tuple[int, int, str, str, dict[str, Any]]]:
    """(target xid, lsn, attach leaf's name, context, shape) of each late context kept in the
    platform database whose actor is the person."""
    rows = state.execute(
        "SELECT target_xid, lsn, attached_at, context, personal_spec"
        " FROM audit_platform.late_contexts"
        " WHERE env = %s AND source = %s AND personal_spec IS NOT NULL",
        (store.env, store.source),
    ).fetchall()
    for xid, lsn, attached_at, context, spec in rows:
        if (shape := _is_actor(spec, context, subject)) is not None:
            yield xid, lsn, attach_ref(store.source, xid, moment(attached_at)), context, shape


def _staged_name(source: str, found: _Acted) -> str:
    """The name of the context or attach leaf a staged context is."""
    if found.kind == "context":
        return context_ref(source, lsn_text(found.where))
    xid, at = found.where
    return attach_ref(source, xid, moment(at))


# --- exports ------------------------------------------------------------------------------


def _buckets(state: psycopg.Connection, env: str) -> list[Stream]:
    """The environment's bucket streams, deleted ones too: their objects stay in the bucket."""
    return [s for s in list_streams(state, env, include_deleted=True) if s.kind == "bucket"]


def _replace_exported(
    state: psycopg.Connection,
    store: StagingStore,
    request: ErasureRequest,
    leaf: dict[str, Any],
    signer: Ed25519PrivateKey | None,
) -> int:
    """The person's values in the objects bucket streams wrote (each record as a search
    returned it), replaced as in Elasticsearch, each object's digest signed again naming the
    request. Only objects whose records' commit range may hold an erased record are read,
    unless an attached context was erased (its transaction's LSN is not in its name).
    Returns the objects rewritten."""
    buckets = _buckets(state, store.env)
    records, acted = leaf["records"], set(leaf.get("contexts") or {})
    if not buckets or not (records or acted) or signer is None:
        return 0
    lsns = sorted(
        {_id_lsn(rid) for rid in records}
        | {parse_lsn(ref.rsplit(":", 1)[1]) for ref in acted if ref.startswith("context:")}
    )
    every = any(ref.startswith("attach:") for ref in acted)

    def wanted(digest: dict[str, Any]) -> bool:
        if every:
            return True
        first, last = _id_lsn(digest["first_record"]), _id_lsn(digest["last_record"])
        at = bisect_left(lsns, first)
        return at < len(lsns) and lsns[at] <= last

    def change(found: list[dict[str, Any]]) -> bool:
        return _erase_exported(found, leaf, acted, store.source)

    return sum(
        BucketDestination(stream.target, signer).rewrite(
            store.env, stream.name, store.source, wanted, change, request.id, leaf["text"]
        )
        for stream in buckets
    )


def _id_lsn(record: str) -> int:
    """A record id's commit LSN (``env:source:LSN:index``, ``record.record_id``)."""
    return int(record.rsplit(":", 2)[1], 16)


def _erase_exported(
    found: list[dict[str, Any]], leaf: dict[str, Any], acted: set[str], source: str
) -> bool:
    """Each exported record's erased values replaced, in place; True if any was."""
    text, changed = leaf["text"], False
    for record in found:
        sides = leaf["records"].get(record.get("id"))
        if sides:
            before = _replaced(record.get("before"), sides.get("before", {}), text)
            after = _replaced(record.get("after"), sides.get("after", {}), text)
            if (before, after) != (record.get("before"), record.get("after")):
                record.update(before=before, after=after, values_text=free_text(before, after))
                changed = True
        shape, context = record.get("context_personal"), record.get("context")
        if shape and context and _carried_context(source, record) in acted:
            erased = erase_context(context, shape["fields"], text)
            if erased != context:
                record["context"] = erased
                if (name := context_field(erased, "actor.name")) is not None:
                    record.setdefault("user", {})["name"] = name
                if (address := erased.get("client_addr")) is not None:
                    record.setdefault("client", {})["ip"] = address
                changed = True
    return changed
