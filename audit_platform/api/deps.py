"""What every request needs: the servers, and the caller's key and scope.

Every endpoint except health depends on :func:`scope`, which turns the request's API key into the
:class:`~audit_platform.api_keys.Scope` that the query layer applies; no key, no answer. Only a
key that authenticated names the request in the read log; a failed authentication goes to
:mod:`audit_platform.api.refusals` instead.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from typing import Annotated

from cachetools import TTLCache
from elasticsearch import Elasticsearch
from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import ConnectionPool

from audit_platform.api.refusals import FailedAuthentications
from audit_platform.api_keys import ApiKey, Scope, key_id_of, verify_key
from audit_platform.environment import load_environment
from audit_platform.policy import SourcePolicy, load_policy, policy_path
from audit_platform.query.filters import EventFilter, check_value_filters
from audit_platform.query.reads import Limits
from audit_platform.settings import Settings


@dataclass
class Services:
    settings: Settings
    es: Elasticsearch
    pool: ConnectionPool
    keys: TTLCache[str, ApiKey] | None
    lock: threading.Lock = field(default_factory=threading.Lock)
    failed: FailedAuthentications = field(default_factory=FailedAuthentications)

    @property
    def limits(self) -> Limits:
        return Limits(
            default_range=timedelta(days=self.settings.api.default_range_days),
            max_range=timedelta(days=self.settings.api.max_range_days),
        )

    @cached_property
    def policies(self) -> dict[str, SourcePolicy]:
        """The tracking policy of each source of this environment (for value filters)."""
        resources = self.settings.resources_dir
        sources = load_environment(resources, self.settings.env).sources
        return {name: load_policy(policy_path(resources, name)) for name in sources}

    def checked(self, f: EventFilter, scope: Scope) -> EventFilter:
        """``f``, once its value filters are known to name columns records can hold."""
        check_value_filters(f, self.policies, scope)
        return f

    def verify(self, text: str) -> ApiKey | None:
        if self.keys is not None:
            with self.lock:
                if text in self.keys:
                    return self.keys[text]
        with self.pool.connection() as conn:
            key = verify_key(conn, self.settings.env, text)
        if key is not None and self.keys is not None:
            with self.lock:
                self.keys[text] = key
        return key


def services(request: Request) -> Services:
    return request.app.state.services


_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key.")
_bearer = HTTPBearer(auto_error=False, description="The same key as a bearer token.")

UNAUTHORIZED = HTTPException(
    status_code=401,
    detail="a valid API key of this environment is required: send it as 'X-API-Key: <key>' or "
    "'Authorization: Bearer <key>' (create one with `audit-platform keys create`)",
    headers={"WWW-Authenticate": "Bearer"},
)


def scope(
    request: Request,
    svc: Annotated[Services, Depends(services)],
    header: Annotated[str | None, Security(_header)] = None,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None,
) -> Scope:
    text = header or (bearer.credentials if bearer else None)
    claimed = key_id_of(text) if text else None
    key = svc.verify(text) if text and claimed else None
    if key is None:
        reason = "missing" if not text else "malformed" if claimed is None else "unknown"
        _refused(request, svc, reason, claimed)
        raise UNAUTHORIZED
    # Set only now: what names a request in the read log is a key that proved itself.
    request.state.key_id = key.key_id
    return key.scope


def _refused(request: Request, svc: Services, reason: str, claimed: str | None) -> None:
    route = getattr(request.scope.get("route"), "path", "(no route)")
    client = request.client.host if request.client else "-"
    svc.failed.record(reason, claimed, client, route)
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.failed_authentications.labels(reason).inc()


ScopeDep = Annotated[Scope, Depends(scope)]
ServicesDep = Annotated[Services, Depends(services)]


def require(role: str):
    """A dependency refusing keys below ``role`` (403 says which role is needed)."""

    def check(scope: Annotated[Scope, Depends(scope)]) -> Scope:
        if not scope.has_role(role):
            raise HTTPException(
                403,
                f"this needs a key with role {role} or above; this key is "
                f"a {scope.role} (`audit-platform keys create --role "
                f"{role}`)",
            )
        return scope

    return check


AuditorDep = Annotated[Scope, Depends(require("auditor"))]
AdminDep = Annotated[Scope, Depends(require("admin"))]
