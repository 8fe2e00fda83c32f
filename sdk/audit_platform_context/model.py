"""The transaction context contract: who and why behind a transaction's writes.

The database validates the same contract in ``audit.validate_context`` (resources/sql/source);
``resources/context.schema.json`` is generated from these models and a test keeps the three in
step. Python callers get the error before a round trip; other languages get it from the database.
"""

from __future__ import annotations

import ipaddress
import json
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: Serialized size limit, enforced identically by audit.validate_context.
MAX_CONTEXT_BYTES = 8192


class ActorType(StrEnum):
    user = "user"
    service = "service"
    job = "job"
    system = "system"


class Actor(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: ActorType
    id: str = Field(min_length=1, description="Stable identifier (user id, service name, ...).")
    name: str | None = Field(default=None, description="Display name, for people reading.")


class Job(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    run_id: str | None = None


class Organization(BaseModel):
    """The tenant the transaction acts for, in a multi-tenant service: what keys and Explorer
    sessions limited to organizations are limited by (ECS ``organization.*``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=256, description="The tenant's stable id.")
    name: str | None = Field(default=None, description="Display name, for people reading.")


class TransactionContext(BaseModel):
    """What a service records once per transaction, in that transaction."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    actor: Actor
    organization: Organization | None = None
    service: str | None = None
    request_id: str | None = None
    job: Job | None = None
    trace_id: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{32}$",
        description="W3C trace-id: 32 lowercase hex digits, not all zero.",
    )
    reason: str | None = Field(default=None, description="Business process or reason.")
    client_addr: str | None = Field(default=None, description="Client IP address.")
    attributes: dict[str, Any] | None = Field(default=None, description="Free-form.")

    @field_validator("trace_id")
    @classmethod
    def _trace_id_not_zero(cls, value: str | None) -> str | None:
        if value is not None and set(value) == {"0"}:
            raise ValueError("an all-zero trace-id is invalid (W3C trace context)")
        return value

    @field_validator("client_addr")
    @classmethod
    def _client_addr_is_ip(cls, value: str | None) -> str | None:
        if value is not None and not _is_inet(value):
            raise ValueError("client_addr must be an IP address")
        return value

    @model_validator(mode="after")
    def _within_size_limit(self) -> TransactionContext:
        # Counted in UTF-8 without escapes, as audit.set_context counts the jsonb it is given
        # (which adds spaces, so whatever the database accepts passes here too).
        size = len(
            json.dumps(
                self.model_dump(mode="json", exclude_none=True),
                ensure_ascii=False,
                separators=(",", ":"),
            ).encode()
        )
        if size > MAX_CONTEXT_BYTES:
            raise ValueError(f"context is {size} bytes; the limit is {MAX_CONTEXT_BYTES}")
        return self

    def to_json(self) -> str:
        """Compact JSON without unset fields: what audit.set_context receives."""
        return json.dumps(
            self.model_dump(mode="json", exclude_none=True), separators=(",", ":"), sort_keys=True
        )


def _is_inet(value: str) -> bool:
    """What audit.set_context accepts as a client address: anything PostgreSQL's inet reads
    (an address, or one with a prefix length), and dotted IPv4 with leading zeros, which its
    fast path lets through."""
    try:
        ipaddress.ip_interface(value)
        return True
    except ValueError:
        octets = value.split(".")
        return len(octets) == 4 and all(
            o.isascii() and o.isdigit() and len(o) <= 3 and int(o) <= 255 for o in octets
        )


def merge_fields(outer: dict[str, Any], inner: dict[str, Any]) -> dict[str, Any]:
    """Combine two contexts' fields: inner fields replace outer ones, attributes merge by key.

    The one rule for nested ``audit_context`` scopes and for a transaction that calls
    ``audit.set_context`` more than once.
    """
    merged = dict(outer)
    for key, value in inner.items():
        if key == "attributes" and merged.get("attributes") and isinstance(value, dict):
            merged["attributes"] = {**merged["attributes"], **value}
        else:
            merged[key] = value
    return merged
