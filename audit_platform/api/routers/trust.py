"""The trail's evidence for auditors: a record's inclusion proof, the signed checkpoints with
consistency proofs between them, and the read log. Keys with role auditor or admin only.

Within a key's scope, like every answer: a source's checkpoints and proofs go to keys that may
read every table of that source (a leaf carries its transaction's change count and a checkpoint
the size of the source's log, figures about the tables a table-limited key may not read); the
read trail's checkpoints, which count every key's reads, to keys of the whole environment; and
the read log shows the rows of keys that could read nothing the asking key cannot
(:func:`audit_platform.read_log.read_rows`).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query
from pydantic import AfterValidator, BaseModel, Field

from audit_platform import signing
from audit_platform.api.deps import AuditorDep, Services, ServicesDep
from audit_platform.api_keys import Scope
from audit_platform.query import reads
from audit_platform.query.filters import no_nul
from audit_platform.read_log import read_rows, read_trail
from audit_platform.record import AuditRecord
from audit_platform.staging.store import StagingStore
from audit_platform.trust.commitments import (
    CONTEXT,
    MARKER_REQUEST,
    Commitments,
    context_salt,
    image_salts,
    known_keys,
    subjects_in,
)
from audit_platform.trust.erasures import erased_records, read_leaf
from audit_platform.trust.leaves import context_name
from audit_platform.trust.log import TrustLog
from audit_platform.trust.proofs import NotProvable, consistency, record_proof

router = APIRouter(prefix="/v1", tags=["trust"])


class LeafProof(BaseModel):
    kind: str = Field(description="change, context (attributed) or attach (late).")
    leaf: dict[str, Any] = Field(
        description="The leaf as the record gives it (README: 'Verifying the trail'); its "
        "RFC 8785 bytes are hashed."
    )
    leaf_hash: str
    leaf_index: int
    audit_path: list[str] = Field(description="RFC 9162 inclusion proof, hex, leaf to root.")


class RecordProof(BaseModel):
    record: AuditRecord
    tree_size: int
    leaves: list[LeafProof]
    checkpoint: dict[str, Any] = Field(description="The signed checkpoint the proof is against.")
    public_key: str | None = Field(
        description="Ed25519, base64; get it from a trusted place too (README), not only from here."
    )
    salts: dict[str, str] = Field(
        default_factory=dict,
        description="Per image (before, after) of a record with personal values, and for its "
        "context (context) where the actor's fields are personal, the salt of their "
        "commitments (hex), where the person's key exists: with it, the values the record "
        "shows are checked against the leaf's commitments (docs/verify_record.py). Erased "
        "values have none.",
    )


class Checkpoints(BaseModel):
    source: str
    public_key: str | None
    key_id: str | None
    checkpoints: list[dict[str, Any]] = Field(description="Newest first.")
    consistency: dict[str, Any] | None = Field(
        default=None, description="With first and second: the RFC 9162 consistency proof."
    )


def _public(svc: Services) -> tuple[str | None, str | None]:
    key = svc.settings.verifier()
    return (signing.public_text(key), signing.key_id(key)) if key else (None, None)


WHOLE_SOURCES = (
    "proofs and checkpoints cover every table of a source (a leaf holds its transaction's change "
    "count, a checkpoint the size of the source's log): they need a key not limited to tables "
    "(`audit-platform keys create --role auditor` without --table)"
)
WHOLE_ENVIRONMENT = (
    "the read trail's checkpoints count every key's reads: they need a key of the whole "
    "environment (`audit-platform keys create --role auditor` without --source or --table)"
)


def _whole_tables(scope: Scope) -> None:
    if not scope.whole_sources:
        raise HTTPException(403, WHOLE_SOURCES)


def _log(svc: Services, source: str) -> TrustLog:
    try:
        return TrustLog(StagingStore(svc.settings.staging_root, svc.settings.env, source))
    except ValueError as exc:
        raise HTTPException(404, f"no source {source!r}: {exc}") from exc


@router.get("/events/{event_id}/proof", response_model=RecordProof)
def event_proof(
    event_id: Annotated[str, Path(max_length=256)], scope: AuditorDep, svc: ServicesDep
) -> RecordProof:
    """The proof that this record, as stored, is in its source's signed log: one leaf for the
    change and, when attributed or late, one for its context, each with its audit path to the
    root of the latest checkpoint."""
    _whole_tables(scope)
    found = reads.get_event(svc.es, scope, event_id)
    if found is None:
        raise HTTPException(404, f"no event {event_id!r} in this environment and key's scope")
    doc = found.model_dump(by_alias=True, mode="json", exclude={"id"})
    log = _log(svc, found.source.service)
    commitments = Commitments(strict=False)
    personal = found.row.personal if found.row is not None else None
    shapes = [json.dumps(p) for p in (personal, found.context_personal) if p is not None]
    if shapes:
        with svc.pool.connection() as conn:
            commitments.keys = known_keys(conn, svc.settings.env, subjects_in(shapes))
        # The erasures its values name: a forged one gives a leaf the checkpoint does not
        # hold, which the proof shows to whoever checks it.
        text = json.dumps([found.before, found.after, found.context])
        named = set(MARKER_REQUEST.findall(text))
        kept = [leaf for r in sorted(named) if (leaf := read_leaf(log, int(r)))]
        commitments.erased = erased_records(kept)
    try:
        proof = record_proof(log, event_id, doc, commitments)
    except NotProvable as exc:
        raise HTTPException(409, str(exc)) from exc
    salts = image_salts(commitments, event_id, personal)
    for entry in proof["leaves"]:
        if entry["kind"] in ("context", "attach") and found.context_personal is not None:
            name = context_name(entry["leaf"])
            if (found_salt := context_salt(commitments, name, found.context_personal)) is not None:
                salts[CONTEXT] = found_salt
    return RecordProof(record=found, public_key=_public(svc)[0], salts=salts, **proof)


@router.get("/checkpoints", response_model=Checkpoints)
def checkpoints(
    scope: AuditorDep,
    svc: ServicesDep,
    source: Annotated[
        str, Query(max_length=64, description="A source, or _reads."), AfterValidator(no_nul)
    ],
    limit: Annotated[int, Query(ge=1, le=1_000)] = 100,
    first: Annotated[
        int | None, Query(ge=1, description="Tree size of an older checkpoint.")
    ] = None,
    second: Annotated[int | None, Query(ge=1, description="Tree size of a newer one.")] = None,
) -> Checkpoints:
    """The source's signed checkpoints, newest first, and the public key; with ``first`` and
    ``second`` (two checkpoints' tree sizes), the proof that the second extends the first.
    A source needs a key that may read all of it; `_reads`, a key of the whole environment."""
    if source == "_reads":
        if not scope.whole_environment:
            raise HTTPException(403, WHOLE_ENVIRONMENT)
        log = read_trail(svc.settings.staging_root, svc.settings.env)
    else:
        if not scope.allows_source(source):
            raise HTTPException(404, f"no source {source!r} among those this key may read")
        _whole_tables(scope)
        log = _log(svc, source)
    signed = [c for _, c in log.checkpoints()]
    proof = None
    if (first is None) != (second is None):
        raise HTTPException(422, "give both first and second (tree sizes), or neither")
    if first is not None and second is not None:
        sizes = {c["checkpoint"]["tree_size"] for c in signed}
        if first not in sizes or second not in sizes or first > second:
            raise HTTPException(
                422,
                "first and second must be tree sizes of checkpoints, "
                f"first <= second; sizes: {sorted(sizes)[-10:]}",
            )
        try:
            proof = {"first": first, "second": second, "proof": consistency(log, first, second)}
        except NotProvable as exc:
            raise HTTPException(409, str(exc)) from exc
    public, key_id = _public(svc)
    return Checkpoints(
        source=source,
        public_key=public,
        key_id=key_id,
        checkpoints=signed[::-1][:limit],
        consistency=proof,
    )


class ReadRow(BaseModel):
    id: int
    at: datetime
    key_id: str
    method: str
    route: str
    params: dict[str, Any]
    status: int
    returned: int | None


@router.get("/reads", response_model=list[ReadRow])
def read_log(
    scope: AuditorDep,
    svc: ServicesDep,
    since: datetime | None = None,
    until: datetime | None = None,
    key_id: Annotated[str | None, Query(max_length=64), AfterValidator(no_nul)] = None,
    after: Annotated[int, Query(ge=0, description="Rows after this id (paging).")] = 0,
    limit: Annotated[int, Query(ge=1, le=1_000)] = 100,
) -> list[ReadRow]:
    """Who read what: every request for audit data made with a key, by key, route and
    filters, with how many records it returned; in id order (page with ``after``).

    A key limited to sources or tables sees the reads of keys limited to the same or fewer:
    only those keys' filters and counts are sure to be about what it may read itself. Failed
    authentications are not reads (they are counted at /metrics)."""
    with svc.pool.connection() as conn:
        rows = read_rows(
            conn,
            scope.env,
            after_id=after,
            since=since,
            until=until,
            key_id=key_id,
            limit=limit,
            within=scope,
        )
    return [ReadRow(**{k: v for k, v in row.items() if k != "env"}) for row in rows]
