"""Which sources an environment captures, from ``resources/environments/<env>.yaml``.

Each environment's deployment reads only its own file, so a dev deployment cannot even name a
production source. Connection URLs are never in the file: it names the variable holding each.
"""

from __future__ import annotations

from datetime import timedelta
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

from audit_platform.naming import STANDARD_CLASS, check_identifier
from audit_platform.policy import PolicyError


class SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    url_env: str = Field(description="Environment variable holding the source's libpq URL.")
    #: The retention class whose period this source's records are kept (one of the
    #: environment's ``retention_classes``); none: ``standard``, the environment's
    #: ``retention_days``.
    retention_class: str | None = None


class ErasureSettings(BaseModel):
    """When an erasure may run (``erasure:`` in an environment's file)."""

    model_config = ConfigDict(extra="forbid")

    waiting_hours: float = Field(
        72.0,
        ge=1,
        description="An erasure nobody else approved runs this long after it was requested, "
        "so a mistaken or malicious request can be cancelled first (at least an hour: no "
        "admin erases alone and at once).",
    )


class StreamSettings(BaseModel):
    """How streams deliver (``streams:`` in an environment's file)."""

    model_config = ConfigDict(extra="forbid")

    chunk_records: int = Field(100, ge=1, le=10_000, description="Records at most per message.")
    entries_per_pass: int = Field(200, ge=1, description="Feed entries a pass reads at most.")
    poll_seconds: float = Field(0.25, gt=0, description="Wait between passes that found nothing.")
    backoff_first_seconds: float = Field(1.0, gt=0)
    backoff_max_seconds: float = Field(
        60.0,
        gt=0,
        description="Longest wait between attempts, so how soon a receiver that "
        "comes back is served.",
    )
    lag_limit_seconds: float = Field(
        60.0, gt=0, description="The stream_lag check fails beyond this delivery lag."
    )
    dead_letter_attempts: int = Field(
        5,
        ge=1,
        description="Attempts of a message the receiver refuses as such (400, 413, 415, 422) "
        "before it is dead-lettered; a receiver that is down or refuses the signature is "
        "waited for instead, however long.",
    )
    max_message_bytes: int = Field(
        4 * 1024**2,
        ge=1024,
        description="Bytes of records per message at most (a larger record goes alone).",
    )


class EnvironmentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: dict[str, SourceConfig] = {}
    #: Long-lived capture (docs/design.md; README "The Dagster deployment"): a batch closes at
    #: the first commit after its first change is this old (or by size, before).
    capture_flush_seconds: float = Field(default=0.5, gt=0, le=60)
    #: The batches a capture run's busy sources close per second together: with more busy
    #: sources than this times capture_flush_seconds, each flushes less often (FlushPacer).
    capture_batches_per_second: float = Field(default=20, gt=0)
    #: Workers of a capture run that stage at once, and that enrich and index at once: the
    #: others wait their turn (their sources' changes wait in the slot's socket). More does
    #: not help on few cores: the workers share one interpreter (live.py, Lanes).
    capture_lanes: int = Field(default=2, ge=1, le=64)
    #: Sources are split over this many capture runs, by crc32 of the name: each shard is one
    #: long-lived run, kept alive by the capture keeper sensor.
    capture_shards: int = Field(default=1, ge=1, le=64)
    #: A live capture run ends after this long, and the next one takes over.
    capture_run_minutes: float = Field(default=30, gt=0)
    #: A live run reports its coalesced materializations this often (its heartbeat and status
    #: checks come six times per capture_stale_seconds): each event is a write to Dagster's
    #: database, so a fleet's event log grows with time and sources, not with batches.
    capture_report_seconds: int = Field(default=300, ge=1)
    #: A STARTED live run that reported nothing for this long is dead: the keeper fails it.
    capture_stale_seconds: int = Field(default=180, ge=10)
    #: The live run re-enriches due orphans and late contexts this often.
    quarantine_resolve_seconds: int = Field(default=30, ge=1)
    capture_batch_changes: int = Field(default=50_000, ge=100)
    #: A source with no change for this long closes its stream and looks for work through one
    #: query every few seconds (``live.py``, "parks"); 0: sources never park.
    capture_park_after_seconds: float = Field(default=120, ge=0)
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
    #: How streams deliver: message size, backoff, when a message is dead-lettered.
    streams: StreamSettings = Field(default_factory=StreamSettings)
    #: How long an unapproved erasure waits (docs/design.md, "Erasure").
    erasure: ErasureSettings = Field(default_factory=ErasureSettings)
    #: Days audit records, staged data and settled quarantine entries are kept: the period of
    #: the ``standard`` retention class, which every source that names no class is in.
    retention_days: int = Field(default=30, ge=1)
    #: Named retention periods in days (e.g. ``{standard: 30, long: 400}``); a source picks one
    #: with ``retention_class``. Indices are per class and month, so retention is per class:
    #: sources that must be kept for different periods need different classes.
    retention_classes: dict[str, int] = {}
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

    @field_validator("retention_classes")
    @classmethod
    def _class_names(cls, classes: dict[str, int]) -> dict[str, int]:
        for name, days in classes.items():
            check_identifier("retention class", name)
            if not isinstance(days, int) or isinstance(days, bool) or days < 1:
                raise ValueError(
                    f"retention class {name!r}: give its period as a whole number of days, "
                    f"at least 1 (got {days!r})"
                )
        return classes

    @model_validator(mode="after")
    def _classes_of_sources(self) -> EnvironmentConfig:
        given = self.retention_classes.get(STANDARD_CLASS)
        both = given is not None and "retention_days" in self.model_fields_set
        if both and given != self.retention_days:
            raise ValueError(
                f"retention_days ({self.retention_days}) and retention_classes.{STANDARD_CLASS}"
                f" ({given}) are both the period of class {STANDARD_CLASS!r} and disagree: "
                "give one of them"
            )
        classes = self.classes
        for name, source in sorted(self.sources.items()):
            if source.retention_class is not None and source.retention_class not in classes:
                raise ValueError(
                    f"source {name!r}: retention_class {source.retention_class!r} is not one "
                    f"of the environment's retention classes ({', '.join(sorted(classes))}); "
                    "add it under retention_classes"
                )
        return self

    @property
    def classes(self) -> dict[str, int]:
        """Every retention class and its days, ``standard`` always among them."""
        found = dict(self.retention_classes)
        found.setdefault(STANDARD_CLASS, self.retention_days)
        return dict(sorted(found.items()))

    @property
    def erasure_waiting(self) -> timedelta:
        """How long an erasure nobody else approved waits before it runs."""
        return timedelta(hours=self.erasure.waiting_hours)

    def retention_class_of(self, source: str) -> str:
        """The class of a source; a source this file does not list (any more) is standard."""
        config = self.sources.get(source)
        return (config.retention_class if config else None) or STANDARD_CLASS

    def retention_days_of(self, source: str) -> int:
        return self.classes[self.retention_class_of(source)]

    @property
    def longest_retention_days(self) -> int:
        """What environment-wide data (partitions, late contexts) must keep."""
        return max(self.classes.values())

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
