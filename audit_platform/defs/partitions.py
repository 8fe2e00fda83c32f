"""The one time partitioning of the data assets: hours of commit time, in UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg

from audit_platform.environment import EnvironmentConfig

PARTITION_KEY_FORMAT = "%Y-%m-%d-%H:%M"


def partitions_start(environment: EnvironmentConfig, now: datetime) -> datetime:
    """Where an environment's hours begin: its ``partitions_start``, else the first day its
    longest retention class still keeps. Nothing older can be staged or rebuilt, and every
    hour before it would be one more partition for Dagster to list, check and show (an hour a
    partition since a fixed date in the past grows without end)."""
    if environment.partitions_start is not None:
        start = environment.partitions_start.astimezone(UTC)
    else:
        start = now.astimezone(UTC) - timedelta(days=environment.longest_retention_days)
        start = start.replace(hour=0)
    return start.replace(minute=0, second=0, microsecond=0)


def hourly_partitions(start: datetime) -> dg.HourlyPartitionsDefinition:
    """``end_offset=1``: the hour in progress is a partition too. Capture appends to it as
    changes commit, and it can be rebuilt like any other hour."""
    return dg.HourlyPartitionsDefinition(
        start_date=hour_key(start), timezone="UTC", end_offset=1, fmt=PARTITION_KEY_FORMAT
    )


def hour_key(hour: datetime) -> str:
    return hour.strftime(PARTITION_KEY_FORMAT)


def parse_hour_key(key: str) -> datetime:
    return datetime.strptime(key, PARTITION_KEY_FORMAT).replace(tzinfo=UTC)
