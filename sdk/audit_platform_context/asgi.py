"""ASGI middleware: each HTTP request runs inside its own audit context.

Pure ASGI (no Starlette import), so it works with FastAPI, Starlette or any ASGI app, and the
contextvar it sets is visible to the endpoint's code and to the database hooks for exactly the
duration of that request.
"""

from __future__ import annotations

import inspect
import ipaddress
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from audit_platform_context.model import Actor, Organization
from audit_platform_context.scope import audit_context

ActorResolver = Callable[[dict[str, Any]], Actor | dict | Awaitable[Actor | dict | None] | None]
OrganizationResolver = Callable[
    [dict[str, Any]], Organization | dict | Awaitable[Organization | dict | None] | None
]

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


def trace_id_from_traceparent(value: str | None) -> str | None:
    """The trace-id of a W3C ``traceparent`` header, or None when absent or malformed."""
    if not value:
        return None
    match = _TRACEPARENT.match(value.strip().lower())
    if not match or set(match.group(1)) == {"0"}:
        return None
    return match.group(1)


class AuditContextMiddleware:
    """Fill the audit context from the request: actor, request id, trace id, client address.

    ``get_actor(scope)`` (sync or async) returns who is calling, typically from the request's
    credentials; when it returns None, the service itself is the actor. ``get_organization(scope)``
    likewise returns the tenant the request is authenticated for (a multi-tenant service's
    organization), or None for a request that acts for none. The request id is taken
    from ``X-Request-ID`` when it is a sane token, otherwise generated, and echoed back.
    """

    def __init__(
        self,
        app: Callable[..., Awaitable[None]],
        *,
        service: str,
        get_actor: ActorResolver | None = None,
        get_organization: OrganizationResolver | None = None,
        request_id_header: str = "x-request-id",
    ) -> None:
        self.app = app
        self.service = service
        self.get_actor = get_actor
        self.get_organization = get_organization
        self.header = request_id_header.lower().encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.lower(): value.decode("latin-1") for key, value in scope["headers"]}
        given = headers.get(self.header, "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        actor = await _resolved(self.get_actor, scope)
        organization = await _resolved(self.get_organization, scope)
        fields: dict[str, Any] = {
            "actor": actor or Actor(type="service", id=self.service),
            "service": self.service,
            "request_id": request_id,
        }
        if organization:
            fields["organization"] = organization
        if trace_id := trace_id_from_traceparent(headers.get(b"traceparent")):
            fields["trace_id"] = trace_id
        if (client := scope.get("client")) and _is_ip(client[0]):
            fields["client_addr"] = client[0]

        async def send_with_request_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (self.header, request_id.encode())]
            await send(message)

        with audit_context(**fields):
            await self.app(scope, receive, send_with_request_id)


async def _resolved(resolver: Callable[[dict[str, Any]], Any] | None, scope: dict[str, Any]) -> Any:
    """What a resolver (sync or async) returns for the request; None without one."""
    value = resolver(scope) if resolver else None
    return await value if inspect.isawaitable(value) else value


def _is_ip(host: str) -> bool:
    """Unix sockets and test clients report names, not addresses; those are left out."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
