"""Query parameters of each endpoint, as models: unknown parameters are refused (a misspelt
filter must not silently widen a search), and the limits are in the OpenAPI document."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from audit_platform.query.filters import EventFilter

MAX_PAGE_SIZE = 500
MAX_TRANSACTION_PAGE = 1_000
MAX_HISTORY_PAGE = 1_000


class _FilterParams(EventFilter):
    def filter(self) -> EventFilter:
        """The filters alone, without this endpoint's own parameters."""
        return EventFilter.model_validate(self.model_dump(include=set(EventFilter.model_fields)))


class SearchParams(_FilterParams):
    order: Literal["asc", "desc"] = Field(default="desc", description="By commit time.")
    limit: int = Field(default=50, ge=1, le=MAX_PAGE_SIZE, description="Page size.")
    cursor: str | None = Field(
        default=None, max_length=1024, description="`next_cursor` of the previous page."
    )


class StatsParams(_FilterParams):
    interval: Literal["minute", "hour", "day", "week"] = "hour"


ExportFormat = Literal["ndjson", "csv"]


class ExportParams(_FilterParams):
    format: ExportFormat = "ndjson"
    order: Literal["asc", "desc"] = "asc"
