"""The current transaction context, carried by a contextvar.

A contextvar (not a thread-local) because it is right for both worlds: each thread starts empty,
and each asyncio task gets a copy of its parent's context, so a context set while handling one
request can never be seen by another request running concurrently.
"""

from __future__ import annotations

import functools
import inspect
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

from pydantic import ConfigDict

from audit_platform_context.model import Actor, Job, Organization, TransactionContext, merge_fields

F = TypeVar("F", bound=Callable[..., Any])

_current: ContextVar[dict[str, Any] | None] = ContextVar("audit_platform_context", default=None)


class _Fields(TransactionContext):
    """The fields one scope sets: like the contract, but the actor may come from an outer scope."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    actor: Actor | None = None  # type: ignore[assignment]


@contextmanager
def _scope(fields: dict[str, Any]) -> Iterator[None]:
    token = _current.set(merge_fields(_current.get() or {}, fields))
    try:
        yield
    finally:
        _current.reset(token)


class audit_context:
    """Set context fields for the enclosed code; nest freely, inner fields win.

    Use as ``with audit_context(actor=Actor(type="user", id="42"), reason="refund"):`` or as a
    decorator on sync or async functions. Fields are validated here, so a bad value fails where
    it is written rather than at commit.
    """

    def __init__(
        self,
        *,
        actor: Actor | dict[str, Any] | None = None,
        organization: Organization | dict[str, Any] | None = None,
        service: str | None = None,
        request_id: str | None = None,
        job: Job | dict[str, Any] | None = None,
        trace_id: str | None = None,
        reason: str | None = None,
        client_addr: str | None = None,
        attributes: dict[str, Any] | None = None,
    ) -> None:
        given = {
            "actor": actor,
            "organization": organization,
            "service": service,
            "request_id": request_id,
            "job": job,
            "trace_id": trace_id,
            "reason": reason,
            "client_addr": client_addr,
            "attributes": attributes,
        }
        validated = _Fields.model_validate({k: v for k, v in given.items() if v is not None})
        self._fields = validated.model_dump(exclude_none=True)
        self._active: list[Any] = []

    def _fields_for_call(self) -> dict[str, Any]:
        return self._fields

    def __enter__(self) -> None:
        manager = _scope(self._fields_for_call())
        manager.__enter__()
        self._active.append(manager)

    def __exit__(self, *exc: object) -> None:
        self._active.pop().__exit__(*exc)

    def __call__(self, func: F) -> F:
        # Each call opens its own scope, so one decorated function is safe to run concurrently.
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                with _scope(self._fields_for_call()):
                    return await func(*args, **kwargs)

            return run_async  # type: ignore[return-value]

        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> Any:
            with _scope(self._fields_for_call()):
                return func(*args, **kwargs)

        return run  # type: ignore[return-value]


class audit_job(audit_context):
    """Context for a background or scheduled job: the job is the actor, each run has an id.

    Used as a decorator, every call is a new run with a fresh ``run_id`` (unless one is given),
    so the transactions of one run can be found together.
    """

    def __init__(self, name: str, *, run_id: str | None = None, **fields: Any) -> None:
        fields.setdefault("actor", Actor(type="job", id=name))
        super().__init__(job=Job(name=name, run_id=run_id), **fields)
        self._fixed_run_id = run_id

    def _fields_for_call(self) -> dict[str, Any]:
        if self._fixed_run_id is not None:
            return self._fields
        return {**self._fields, "job": {**self._fields["job"], "run_id": uuid.uuid4().hex}}


def current_context() -> TransactionContext | None:
    """The complete context in force here, or None outside any scope.

    Raises pydantic's ValidationError when scopes are active but no actor was given: writing
    under a half-filled context is a caller bug that should fail loudly, not be stored.
    """
    fields = _current.get()
    if not fields:
        return None
    return TransactionContext.model_validate(fields)
