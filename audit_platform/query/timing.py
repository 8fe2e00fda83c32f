"""Time spent in Elasticsearch while answering one request, so the API can say where its time
goes (the ``Server-Timing`` header) without a profiler."""

from __future__ import annotations

from contextvars import ContextVar

_elasticsearch: ContextVar[list[float] | None] = ContextVar("elasticsearch_seconds", default=None)


def start() -> list[float]:
    """Begin counting for the current request; returns the list durations are added to."""
    spent: list[float] = []
    _elasticsearch.set(spent)
    return spent


def record(seconds: float) -> None:
    spent = _elasticsearch.get()
    if spent is not None:
        spent.append(seconds)


#: Audit records one request returned (for the read log): added up as records are read.
_returned: ContextVar[list[int] | None] = ContextVar("records_returned", default=None)


def start_count() -> list[int]:
    count = [0]
    _returned.set(count)
    return count


def returned(records: int) -> None:
    count = _returned.get()
    if count is not None:
        count[0] += records
