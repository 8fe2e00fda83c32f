"""The local stack's own settings (``AUDIT_STACK_*``): where its servers live and listen.

They belong to development, not to a deployment, so they live here and not in the platform's
``Settings``: a production install neither has nor reads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict

from audit_platform.settings import PROJECT_ROOT


class StackSettings(BaseSettings):
    """Its ports lie below Linux's ephemeral range (32768-60999), where an outgoing
    connection's local end could take them."""

    model_config = SettingsConfigDict(env_prefix="AUDIT_STACK_", env_file=".env", extra="ignore")

    dir: Path = PROJECT_ROOT / ".stack"
    pg_port: int = 25432
    es_port: int = 29200
    es_transport_port: int = 29300
    es_heap: str = "1g"
    s3_port: int = 29400
    #: auto: docker when an engine answers, else local.
    backend: Literal["auto", "local", "docker"] = "auto"
