"""Carrying out an erasure: plan, log, replace, destroy (docs/design.md, "Erasure").

Each source whose policy names the person's table is erased under its ledger lock, so no
capture turn enriches, appends or indexes in between. Every step can be repeated: the plan is
kept before anything changes and read back by a rerun, the log is appended once, and replacing
a value by the erasure's text twice writes the same text. A crash anywhere and a rerun finish
the erasure once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import polars as pl
import psycopg
from elasticsearch import Elasticsearch
from elasticsearch.helpers import bulk, scan

from audit_platform.clients import es_from_settings, pg_url_from_settings
from audit_platform.enrich.join import changed_columns, personal_shape
from audit_platform.environment import load_environment
from audit_platform.erasure.requests import (
    ErasureError,
    ErasureRequest,
    Subject,
    get_request,
    list_requests,
    refuse_if_held,
    start,
)
from audit_platform.faults import crash_point
from audit_platform.index.documents import free_text
from audit_platform.naming import read_alias
from audit_platform.policy import SourcePolicy, load_policy, policy_path
from audit_platform.record import Operation, record_id
from audit_platform.settings import Settings
from audit_platform.staging.lock import ledger_lock
from audit_platform.staging.store import StagingStore
from audit_platform.trust import erasures
from audit_platform.trust.commitments import SIDES, commit, marker
from audit_platform.trust.leaves import erasure_leaf
from audit_platform.trust.log import TrustLog

#: record id -> side -> column -> commitment of the value replaced.
Plan = dict[str, dict[str, dict[str, str]]]
#: Documents asked of Elasticsearch at once.
ID_CHUNK = 1_000


class NotReady(ErasureError):
    """Staged changes of the source are not enriched yet: run the erasure again shortly."""


@dataclass
class SourceErasure:
    source: str
    records: int
    values: int
    documents: int = 0
    staged_files: int = 0


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
    #: request id -> why it did not run (a hold, staged changes not enriched yet).
    not_done: dict[int, str] = field(default_factory=dict)


def run_due(settings: Settings, now: datetime) -> DuePass:
    """Every request of the environment that is approved or has waited its period; one that
    cannot run now (a legal hold, a source not ready) does not keep the others from running."""
    with psycopg.connect(pg_url_from_settings(settings), autocommit=True) as state:
        due = [r.id for r in list_requests(state, settings.env) if r.due(now)]
    found = DuePass()
    for request in due:
        try:
            found.done.append(run_request(settings, request, now=now))
        except ErasureError as exc:
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
        return carry_out(state, es, settings.env, request_id, sources=sources, now=now)


def carry_out(
    state: psycopg.Connection,
    es: Elasticsearch,
    env: str,
    request_id: int,
    *,
    sources: dict[str, tuple[StagingStore, SourcePolicy]],
    now: datetime,
) -> ErasureOutcome:
    """Erase the request's person from every source whose policy names their table, if the
    request is due and no legal hold covers them; then destroy their key."""
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
    refuse_if_held(state, es, env, subject)
    started = start(state, request.id)
    key = _key(state, env, subject.name)
    outcome = ErasureOutcome(request.id, subject.name)
    for source, (store, policy) in sorted(sources.items()):
        if not _declares(policy, subject.of):
            continue
        with ledger_lock(state, env, source):
            outcome.sources.append(erase_in_source(store, es, request, subject, key, started))
    with state.transaction():
        state.execute(
            "DELETE FROM audit_platform.subject_keys WHERE env = %s AND subject = %s",
            (env, subject.name),
        )
        state.execute(
            "UPDATE audit_platform.erasure_requests SET done_at = now(), records = %s"
            " WHERE id = %s",
            (outcome.records, request.id),
        )
    outcome.seconds = time.monotonic() - began
    return outcome


def _declares(policy: SourcePolicy, of: str) -> bool:
    return any(t.personal and (t.personal.of or name) == of for name, t in policy.tables.items())


def _key(state: psycopg.Connection, env: str, subject: str) -> bytes | None:
    row = state.execute(
        "SELECT key FROM audit_platform.subject_keys WHERE env = %s AND subject = %s",
        (env, subject),
    ).fetchone()
    return None if row is None else bytes(row[0])


def erase_in_source(
    store: StagingStore,
    es: Elasticsearch,
    request: ErasureRequest,
    subject: Subject,
    key: bytes | None,
    started: datetime,
) -> SourceErasure:
    """One source's part of an erasure; the caller holds the source's ledger lock."""
    if any(entry.records is None for entry in store.pending()):
        raise NotReady(
            f"{store.source}: staged changes wait for enrichment; the erasure runs once they "
            "are enriched (run it again in a minute, or let the erasures schedule do it)"
        )
    log = TrustLog(store)
    leaf = erasures.read_leaf(log, request.id)
    if leaf is None:
        logged = log.leaves(columns=["position", "kind", "record_id"])
        ids = set(logged.filter(pl.col("kind") == "change")["record_id"].to_list())
        done = erasures.erased_records(erasures.read_leaves(log))
        planned = _plan_staged(store, subject, key, ids)
        for rid, sides in _plan_indexed(es, store, subject, key, ids).items():
            planned.setdefault(rid, sides)
        for rid in list(planned):
            previous = done.get(rid)
            if previous is None:
                continue
            for side, columns in list(planned[rid].items()):
                kept = {c: v for c, v in columns.items() if c not in previous.values.get(side, {})}
                planned[rid][side] = kept
        planned = {
            rid: {side: columns for side, columns in sides.items() if columns}
            for rid, sides in planned.items()
        }
        planned = {rid: sides for rid, sides in sorted(planned.items()) if sides}
        leaf = erasures.write_leaf(
            log,
            erasure_leaf(
                env=store.env,
                source=store.source,
                request=request.id,
                subject=subject.name,
                reason=request.reason,
                requested_by=request.requested_by,
                approved_by=request.approved_by,
                time=started,
                text=marker(request.id, started),
                records=planned,
            ),
        )
    crash_point("erasure.planned")
    in_log = erasures.logged_hashes(log.leaves(columns=["position", "kind", "xid", "hash"]))
    if request.id not in in_log:
        log.append(erasures.leaf_frame(leaf, log.state()))
    crash_point("erasure.logged")
    documents = _replace_indexed(es, store.env, leaf)
    crash_point("erasure.indexed")
    files = _replace_staged(store, leaf)
    crash_point("erasure.staged")
    records = leaf["records"]
    values = sum(len(columns) for sides in records.values() for columns in sides.values())
    return SourceErasure(store.source, len(records), values, documents, files)


# --- plan ---------------------------------------------------------------------------------


def _commitments(
    rid: str, shape: dict[str, Any], images: tuple[Any, Any], subject: Subject, key: bytes
) -> dict[str, dict[str, str]]:
    """The commitment of each of the person's values in a record, by side and column."""
    found: dict[str, dict[str, str]] = {}
    for side, image in zip(SIDES, images, strict=True):
        if image is None or shape.get(side) != subject.id:
            continue
        columns = {
            column: commit(key, rid, side, column, image[column])
            for column in shape["columns"]
            if image.get(column) is not None
        }
        if columns:
            found[side] = columns
    return found


def _plan_staged(
    store: StagingStore, subject: Subject, key: bytes | None, logged: set[str]
) -> Plan:
    """The person's values in the staged changes the log holds (every record of them,
    whether indexed, waiting in the quarantine or dead-lettered)."""
    plan: Plan = {}
    if key is None:  # no value of this person was ever committed
        return plan
    for path in store.files("changes"):
        with store.fs.open(path, "rb") as f:
            names = pl.read_parquet_schema(f)
        if "personal_spec" not in names:
            continue  # staged before personal data was declared
        with store.fs.open(path, "rb") as f:
            frame = pl.read_parquet(
                f,
                columns=["lsn", "change_index", "operation", "before", "after", "personal_spec"],
            )
        # Only rows whose images hold the id as it is or as JSON escapes it are parsed.
        spellings = {subject.id, json.dumps(subject.id)[1:-1]}
        frame = frame.filter(
            pl.col("personal_spec").str.json_path_match("$.of") == subject.of,
            pl.any_horizontal(
                pl.col(side).str.contains(spelling, literal=True)
                for side in SIDES
                for spelling in spellings
            ),
        )
        for lsn, index, op, before_text, after_text, spec in frame.iter_rows():
            rid = record_id(store.env, store.source, lsn, index)
            if rid not in logged:
                continue  # ignored by the policy, or refused: no record, no leaf
            before = None if before_text is None else json.loads(before_text)
            after = None if after_text is None else json.loads(after_text)
            text = personal_shape(spec, Operation(op), before, after)
            if text is None:
                continue
            found = _commitments(rid, json.loads(text), (before, after), subject, key)
            if found:
                plan[rid] = found
    return plan


def _plan_indexed(
    es: Elasticsearch, store: StagingStore, subject: Subject, key: bytes | None, logged: set[str]
) -> Plan:
    """The person's values in Elasticsearch: records whose staged hours retention removed."""
    plan: Plan = {}
    if key is None:
        return plan
    query = {
        "bool": {
            "filter": [
                {"term": {"env": store.env}},
                {"term": {"source.service": store.source}},
                subject.query(),
            ]
        }
    }
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
        found = _commitments(rid, shape, (doc.get("before"), doc.get("after")), subject, key)
        if found:
            plan[rid] = found
    return plan


# --- replace ------------------------------------------------------------------------------


def _replaced(image: Any, columns: dict[str, str], text: str) -> Any:
    if image is None:
        return None
    return {c: (text if c in columns and v is not None else v) for c, v in image.items()}


def _chunks(values: list[str], size: int) -> Iterator[list[str]]:
    for at in range(0, len(values), size):
        yield values[at : at + size]


def _replace_indexed(es: Elasticsearch, env: str, leaf: dict[str, Any]) -> int:
    """Each erased value of the leaf's records, in Elasticsearch, becomes the erasure's text;
    the free text is derived again. Returns the documents rewritten."""
    records, text = leaf["records"], leaf["text"]
    touched: set[str] = set()
    actions = []
    for ids in _chunks(sorted(records), ID_CHUNK):
        found = es.search(
            index=read_alias(env),
            query={"ids": {"values": ids}},
            source_includes=["before", "after"],
            size=len(ids),
            ignore_unavailable=True,
        )["hits"]["hits"]
        for hit in found:
            sides = records[hit["_id"]]
            doc = hit["_source"]
            before = _replaced(doc.get("before"), sides.get("before", {}), text)
            after = _replaced(doc.get("after"), sides.get("after", {}), text)
            replaced = {"before": before, "after": after, "values_text": free_text(before, after)}
            actions.append(
                {"_op_type": "update", "_index": hit["_index"], "_id": hit["_id"], "doc": replaced}
            )
            touched.add(hit["_index"])
    if actions:
        bulk(es, actions, refresh=True, raise_on_error=True, max_retries=3)
        indices = ",".join(sorted(touched))
        # An updated document's old version stays in its segment until a merge: ask for it to
        # be expunged now (in the background; Elasticsearch runs one merge at a time).
        es.indices.flush(index=indices)
        es.indices.forcemerge(index=indices, only_expunge_deletes=True, wait_for_completion=False)
    return len(actions)


def _rewrite_images(frame: pl.DataFrame, ids: list[str], leaf: dict[str, Any]) -> pl.DataFrame:
    """A staged file's rows with the leaf's values replaced. A changes file also keeps, in
    ``erased_changed``, which columns each rewritten change changed: enrichment derives them
    from the values, which no longer tell (two different emails both read as erased)."""
    records, text = leaf["records"], leaf["text"]
    kept = frame["erased_changed"].to_list() if "erased_changed" in frame.columns else None
    images = {side: frame[side].to_list() for side in SIDES}
    for row, rid in enumerate(ids):
        sides = records.get(rid)
        if sides is None:
            continue
        before, after = (_parsed(images[side][row]) for side in SIDES)
        if kept is not None and kept[row] is None:
            unchanged = set(json.loads(frame["unchanged_toast"][row] or "[]"))
            operation = Operation(frame["operation"][row])
            kept[row] = json.dumps(changed_columns(operation, before, after, unchanged))
        for side, image in zip(SIDES, (before, after), strict=True):
            if image is not None and side in sides:
                replaced = _replaced(image, sides[side], text)
                images[side][row] = json.dumps(replaced, ensure_ascii=False, separators=(",", ":"))
    columns = [pl.Series(side, images[side], dtype=pl.String) for side in SIDES]
    if kept is not None:
        columns.append(pl.Series("erased_changed", kept, dtype=pl.String))
    return frame.with_columns(columns)


def _parsed(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _replace_staged(store: StagingStore, leaf: dict[str, Any]) -> int:
    """The staged changes files holding the leaf's records, and their records files, rewritten
    with the erased values replaced. Returns the files rewritten."""
    wanted = set(leaf["records"])
    if not wanted:
        return 0
    rewritten = 0
    for path in store.files("changes"):
        with store.fs.open(path, "rb") as f:
            keys = pl.read_parquet(f, columns=["lsn", "change_index"])
        ids = [record_id(store.env, store.source, lsn, i) for lsn, i in keys.iter_rows()]
        if wanted.isdisjoint(ids):
            continue
        with store.fs.open(path, "rb") as f:
            staged = pl.read_parquet(f)
        if "erased_changed" not in staged.columns:
            staged = staged.with_columns(pl.lit(None, pl.String).alias("erased_changed"))
        store.write_file(path, _rewrite_images(staged, ids, leaf))
        rewritten += 1
        records_path = store.derived_path(path, "records")
        if store.fs.exists(records_path):
            with store.fs.open(records_path, "rb") as f:
                records = pl.read_parquet(f)
            store.write_file(records_path, _rewrite_images(records, records["id"].to_list(), leaf))
            rewritten += 1
    return rewritten
