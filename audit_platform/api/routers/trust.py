"""The trail's evidence for auditors: a record's inclusion proof, the signed checkpoints with
consistency proofs between them, and the read log. Keys with role auditor or admin only."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query
from pydantic import BaseModel, Field

from audit_platform.api.deps import AuditorDep, Services, ServicesDep
from audit_platform.query import reads
from audit_platform.read_log import read_rows, read_trail
from audit_platform.record import AuditRecord
from audit_platform.staging.store import StagingStore
from audit_platform.trust import signing
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
    public_key: str | None = Field(description="Ed25519, base64; get it from a trusted place "
                                   "too (README), not only from here.")  # fmt: skip


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
    found = reads.get_event(svc.es, scope, event_id)
    if found is None:
        raise HTTPException(404, f"no event {event_id!r} in this environment and key's scope")
    doc = found.model_dump(by_alias=True, mode="json", exclude={"id"})
    try:
        proof = record_proof(_log(svc, found.source.service), event_id, doc)
    except NotProvable as exc:
        raise HTTPException(409, str(exc)) from exc
    return RecordProof(record=found, public_key=_public(svc)[0], **proof)


@router.get("/checkpoints", response_model=Checkpoints)
def checkpoints(
    scope: AuditorDep,
    svc: ServicesDep,
    source: Annotated[str, Query(max_length=64, description="A source, or _reads.")],
    limit: Annotated[int, Query(ge=1, le=1_000)] = 100,
    first: Annotated[
        int | None, Query(ge=1, description="Tree size of an older checkpoint.")
    ] = None,
    second: Annotated[int | None, Query(ge=1, description="Tree size of a newer one.")] = None,
) -> Checkpoints:
    """The source's signed checkpoints, newest first, and the public key; with ``first`` and
    ``second`` (two checkpoints' tree sizes), the proof that the second extends the first."""
    log = read_trail(svc.settings.staging_root, svc.settings.env) if source == "_reads" else (
        _log(svc, source))  # fmt: skip
    signed = [c for _, c in log.checkpoints()]
    proof = None
    if (first is None) != (second is None):
        raise HTTPException(422, "give both first and second (tree sizes), or neither")
    if first is not None and second is not None:
        sizes = {c["checkpoint"]["tree_size"] for c in signed}
        if first not in sizes or second not in sizes or first > second:
            raise HTTPException(422, "first and second must be tree sizes of checkpoints, "
                                     f"first <= second; sizes: {sorted(sizes)[-10:]}")  # fmt: skip
        try:
            proof = {"first": first, "second": second, "proof": consistency(log, first, second)}
        except NotProvable as exc:
            raise HTTPException(409, str(exc)) from exc
    public, key_id = _public(svc)
    return Checkpoints(source=source, public_key=public, key_id=key_id,
                       checkpoints=signed[::-1][:limit], consistency=proof)  # fmt: skip


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
    key_id: Annotated[str | None, Query(max_length=64)] = None,
    after: Annotated[int, Query(ge=0, description="Rows after this id (paging).")] = 0,
    limit: Annotated[int, Query(ge=1, le=1_000)] = 100,
) -> list[ReadRow]:
    """Who read what: every request for audit data, by key, route and filters, with how many
    records it returned; in id order (page with ``after``)."""
    with svc.pool.connection() as conn:
        rows = read_rows(conn, scope.env, after_id=after, since=since, until=until,
                         key_id=key_id, limit=limit)  # fmt: skip
    return [ReadRow(**{k: v for k, v in row.items() if k != "env"}) for row in rows]
