"""Which sources an environment captures, from ``resources/environments/<env>.yaml``.

Each environment's deployment reads only its own file, so a dev deployment cannot even name a
production source. Connection URLs are never in the file: it names the variable holding each.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from audit_platform.naming import check_identifier
from audit_platform.policy import PolicyError


class SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    url_env: str = Field(description="Environment variable holding the source's libpq URL.")


class EnvironmentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: dict[str, SourceConfig] = {}
    #: Long-lived capture (docs/design.md; README "The Dagster deployment"): a batch closes at
    #: the first commit after its first change is this old (or by size, before).
    capture_flush_seconds: float = Field(default=0.5, gt=0, le=60)
    #: Sources are split over this many capture runs, by crc32 of the name: each shard is one
    #: long-lived run, kept alive by the capture keeper sensor.
    capture_shards: int = Field(default=1, ge=1, le=64)
    #: A live capture run ends after this long, and the next one takes over.
    capture_run_minutes: float = Field(default=30, gt=0)
    #: A live run reports (coalesced materializations, a heartbeat) this often.
    capture_report_seconds: int = Field(default=30, ge=1)
    #: A STARTED live run that reported nothing for this long is dead: the keeper fails it.
    capture_stale_seconds: int = Field(default=180, ge=10)
    #: The live run re-enriches due orphans and late contexts this often.
    quarantine_resolve_seconds: int = Field(default=30, ge=1)
    capture_batch_changes: int = Field(default=50_000, ge=100)
    #: How long an orphan waits for a late context before it is indexed as unattributed.
    enrich_grace_minutes: int = Field(default=10, ge=0)
    #: WAL a slot may hold back before the slot_lag check warns, and before it fails (the
    #: source keeps that WAL; at its max_slot_wal_keep_size PostgreSQL invalidates the slot).
    slot_lag_warn_bytes: int = Field(default=256 * 1024**2, ge=1)
    slot_lag_error_bytes: int = Field(default=1024**3, ge=1)
    #: WAL a slot may hold back while no tracked table changes before a capture run confirms
    #: it anyway (a heartbeat): a quiet source on a busy server would otherwise keep WAL without
    #: bound until PostgreSQL invalidates the slot.
    slot_heartbeat_bytes: int = Field(default=16 * 1024**2, ge=1)
    #: Retries of a capture, enrich or index step, the first after this many seconds, each
    #: later one after twice as long (with jitter).
    step_retries: int = Field(default=4, ge=0)
    step_retry_delay_seconds: float = Field(default=5, ge=0)
    #: Replicas of each audit index (0 on a single-node development cluster).
    index_replicas: int = Field(default=0, ge=0)
    #: Days audit records, staged data and settled quarantine entries are kept.
    retention_days: int = Field(default=30, ge=1)
    #: The first hour of the hourly partitions (where the environment started); when unset, the
    #: first day retention still keeps.
    partitions_start: AwareDatetime | None = None
    #: Days Dagster keeps the runs of this environment's deployment: successful ones (a capture
    #: run every few seconds adds thousands a day per source), and failed ones, kept longer for
    #: whoever investigates them.
    dagster_runs_keep_days: int = Field(default=7, ge=1)
    #: The trail's log is signed at most this often (after a capture run that added to it): a
    #: record is provable from the first checkpoint after it.
    checkpoint_every_seconds: int = Field(default=60, ge=0)
    #: Whether the enrich step appends to the trail's log at all: off only to measure what
    #: the log costs (benchmarks/sustained_load.py --no-trail); verify fails without it.
    trail: bool = True
    dagster_failed_runs_keep_days: int = Field(default=30, ge=1)

    @model_validator(mode="after")
    def _thresholds_in_order(self) -> EnvironmentConfig:
        if not self.slot_heartbeat_bytes < self.slot_lag_warn_bytes <= self.slot_lag_error_bytes:
            raise ValueError(
                "slot thresholds must satisfy slot_heartbeat_bytes < slot_lag_warn_bytes <= "
                f"slot_lag_error_bytes (got {self.slot_heartbeat_bytes:,} < "
                f"{self.slot_lag_warn_bytes:,} <= {self.slot_lag_error_bytes:,})"
            )
        return self

    @field_validator("sources")
    @classmethod
    def _source_names(cls, sources: dict[str, SourceConfig]) -> dict[str, SourceConfig]:
        for name in sources:
            check_identifier("source", name)
        return sources


def environment_path(resources_dir: Path, env: str) -> Path:
    return resources_dir / "environments" / f"{check_identifier('environment', env)}.yaml"


def load_environment(resources_dir: Path, env: str) -> EnvironmentConfig:
    """The environment's configuration; an environment without a file captures nothing."""
    path = environment_path(resources_dir, env)
    if not path.exists():
        return EnvironmentConfig()
    try:
        return EnvironmentConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    except (ValidationError, yaml.YAMLError) as exc:
        raise PolicyError(f"{path}: {exc}") from exc
