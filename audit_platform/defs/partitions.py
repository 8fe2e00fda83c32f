"""The one time partitioning of the data assets: hours of commit time, in UTC."""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg

#: Changes committed before this hour are not expected; the range starts early enough for any
#: source set up today, and a later start keeps the partition count far below Dagster's limits.
PARTITIONS_START = "2025-01-01-00:00"
PARTITION_KEY_FORMAT = "%Y-%m-%d-%H:%M"

#: ``end_offset=1``: the hour in progress is a partition too. Capture appends to it as changes
#: commit, and it can be rebuilt like any other hour.
hourly_partitions_def = dg.HourlyPartitionsDefinition(
    start_date=PARTITIONS_START, timezone="UTC", end_offset=1
)


def hour_key(hour: datetime) -> str:
    return hour.strftime(PARTITION_KEY_FORMAT)


def parse_hour_key(key: str) -> datetime:
    return datetime.strptime(key, PARTITION_KEY_FORMAT).replace(tzinfo=UTC)
