"""The API's own settings (``AUDIT_API_*``); servers and environment come from ``AUDIT_*``."""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from audit_platform.query.reads import Limits


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AUDIT_API_", env_file=".env", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    default_range_days: int = Field(default=7, ge=1, description="Search range when no since.")
    max_range_days: int = Field(default=400, ge=1, description="Longest range one request asks.")
    key_cache_seconds: float = Field(
        default=5.0, ge=0, description="How long a verified key is trusted before it is looked "
        "up again: a revoked key stops working within this time.",
    )  # fmt: skip
    es_timeout_seconds: float = Field(default=10.0, gt=0)
    retry_after_seconds: int = Field(
        default=5, ge=1, description="Retry-After sent with a 503 when a server is unavailable."
    )

    @property
    def limits(self) -> Limits:
        return Limits(
            default_range=timedelta(days=self.default_range_days),
            max_range=timedelta(days=self.max_range_days),
        )
