"""Per source: the staged datasets as hourly assets (the live capture run fills them).

No ``from __future__ import annotations`` in defs/: Dagster reads config annotations at runtime.
"""

import os

import dagster as dg

from audit_platform.environment import SourceConfig


def staged_key(source: str, dataset: str) -> dg.AssetKey:
    return dg.AssetKey([source, f"staged_{dataset}"])


def staged_asset_specs(
    source: str, partitions: dg.HourlyPartitionsDefinition
) -> list[dg.AssetSpec]:
    return [
        dg.AssetSpec(
            staged_key(source, dataset),
            description=f"Raw {dataset} of source {source}, staged as Parquet by commit hour. "
            "Written by the live capture run of the source's shard, batch by batch.",
            partitions_def=partitions,
            group_name="capture",
            kinds={"postgres", "parquet"},
            owners=["team:platform"],
        )
        for dataset in ("changes", "contexts")
    ]


def source_url(source: str, config: SourceConfig) -> str:
    url = os.environ.get(config.url_env)
    if not url:
        raise RuntimeError(
            f"source {source!r}: variable {config.url_env} is not set in this deployment; "
            "set it to the source database's libpq URL"
        )
    return url
