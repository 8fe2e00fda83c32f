"""Streams, managed by admins: records delivered to a webhook or a bucket as they are indexed
(docs/design.md, "Streams").

Only keys of the whole environment with role admin manage streams here, as operators do with
``audit-platform streams``. A stream makes the platform send records to a URL of the caller's
choosing; a key limited to sources, tables or organizations could otherwise make the platform
reach hosts its holder cannot, and receive records beyond what its key reads through a filter
it alone chose.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field

from audit_platform.api.deps import AdminDep, ServicesDep
from audit_platform.api_keys import Scope
from audit_platform.streams.definitions import (
    Stream,
    StreamError,
    create_stream,
    delete_stream,
    list_streams,
)
from audit_platform.streams.progress import status

router = APIRouter(prefix="/v1/streams", tags=["streams"])


class StreamIn(BaseModel):
    name: str = Field(description="1 to 63 lowercase letters, digits, '-' and '_'.")
    kind: Literal["webhook", "bucket"]
    target: str = Field(
        description="An https:// URL (webhook; http:// to localhost only) or an s3:// URL "
        "(bucket).",
        max_length=2048,
    )
    filter: str = Field("", description="Only records this query matches.", max_length=4096)
    organizations: list[str] | None = Field(
        None, description="Only records of these organizations.", max_length=100
    )


class SourceProgress(BaseModel):
    source: str
    delivered: int
    behind: int = Field(description="Indexed batches not delivered yet.")
    lag_seconds: float
    attempts: int = Field(description="Failed attempts of the message now due; 0: not failing.")
    last_error: str | None
    dead_letters: int


class StreamOut(BaseModel):
    name: str
    kind: str
    target: str
    filter: str
    organizations: list[str] | None
    created_by: str
    created_at: datetime
    sources: list[SourceProgress] = []


class NewStreamOut(StreamOut):
    secret: str | None = Field(
        description="The webhook's signing secret (Standard Webhooks), shown this once."
    )


def _operator(scope: Scope) -> None:
    if not scope.whole_environment:
        raise HTTPException(
            403,
            "streams are managed with a key of the whole environment (no sources, tables or "
            "organizations): a stream sends records wherever its target says",
        )


def _out(stream: Stream) -> StreamOut:
    return StreamOut(
        name=stream.name,
        kind=stream.kind,
        target=stream.target,
        filter=stream.filter,
        organizations=sorted(stream.organizations) if stream.organizations else None,
        created_by=stream.created_by,
        created_at=stream.created_at,
    )


@router.get("", response_model=list[StreamOut])
def streams(scope: AdminDep, svc: ServicesDep) -> list[StreamOut]:
    """The environment's streams and, per source, what each delivered and how far behind it is."""
    _operator(scope)
    with svc.pool.connection() as conn:
        found = list_streams(conn, scope.env)
        progress = status(conn, scope.env)
    out = []
    for stream in found:
        item = _out(stream)
        item.sources = [
            SourceProgress(
                source=p.source,
                delivered=p.delivered,
                behind=p.behind,
                lag_seconds=round(p.lag_seconds, 3),
                attempts=p.attempts,
                last_error=p.last_error,
                dead_letters=p.dead_letters,
            )
            for p in progress
            if p.stream == stream.name
        ]
        out.append(item)
    return out


@router.post("", response_model=NewStreamOut, status_code=201)
def create(body: StreamIn, request: Request, scope: AdminDep, svc: ServicesDep) -> NewStreamOut:
    """Create a stream: it delivers what is indexed from now on. A webhook's secret is in this
    answer only."""
    _operator(scope)
    with svc.pool.connection() as conn:
        try:
            new = create_stream(
                conn,
                scope.env,
                body.name,
                body.kind,
                body.target,
                created_by=f"key {request.state.key_id}",
                filter=body.filter,
                organizations=body.organizations,
                can_sign=svc.settings.signer() is not None,
                loopback_http=False,
            )
        except StreamError as exc:
            raise HTTPException(422, str(exc)) from exc
    return NewStreamOut(**_out(new.stream).model_dump(), secret=new.secret)


@router.delete("/{name}", status_code=204)
def delete(name: str, request: Request, scope: AdminDep, svc: ServicesDep) -> None:
    """Stop a stream: no message is sent after this answer but the one in flight."""
    _operator(scope)
    with svc.pool.connection() as conn:
        try:
            delete_stream(conn, scope.env, name, deleted_by=f"key {request.state.key_id}")
        except StreamError as exc:
            raise HTTPException(404, str(exc)) from exc
