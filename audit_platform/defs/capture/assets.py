"""Per source: the staged datasets as hourly assets, and the job whose runs fill them.

No ``from __future__ import annotations`` in defs/: Dagster reads config annotations at runtime.
"""

import os

import dagster as dg
from pydantic import Field

from audit_platform.capture.run import capture
from audit_platform.defs.partitions import hour_key
from audit_platform.defs.resources import AuditPlatform
from audit_platform.environment import SourceConfig
from audit_platform.naming import slot_name
from audit_platform.staging import lsn_text, parse_lsn

SLOT_TAG = "audit/slot"


def staged_key(source: str, dataset: str) -> dg.AssetKey:
    return dg.AssetKey([source, f"staged_{dataset}"])


def staged_asset_specs(
    source: str, partitions: dg.HourlyPartitionsDefinition
) -> list[dg.AssetSpec]:
    return [
        dg.AssetSpec(
            staged_key(source, dataset),
            description=f"Raw {dataset} of source {source}, staged as Parquet by commit hour. "
            "Written by the capture job, which the capture sensor runs when the slot has data.",
            partitions_def=partitions,
            group_name="capture",
            kinds={"postgres", "parquet"},
            owners=["team:platform"],
        )
        for dataset in ("changes", "contexts")
    ]


class CaptureConfig(dg.Config):
    target_lsn: str = Field(
        default="", description="Capture up to this LSN (X/Y); empty: the current WAL position."
    )


def source_url(source: str, config: SourceConfig) -> str:
    url = os.environ.get(config.url_env)
    if not url:
        raise RuntimeError(
            f"source {source!r}: variable {config.url_env} is not set in this deployment; "
            "set it to the source database's libpq URL"
        )
    return url


def capture_job(
    env: str,
    source: str,
    config: SourceConfig,
    batch_changes: int,
    then: list[dg.OpDefinition],
    retry: dg.RetryPolicy,
) -> dg.JobDefinition:
    """Capture, then each op of ``then`` (enrich, index) on the hours it touched, in one run.

    One run, not a chain of runs, because every run launch costs seconds that a change would
    otherwise wait before it is searchable.
    """
    slot = slot_name(env, source)

    @dg.op(
        name=f"capture_{source}",
        description=f"Stage everything source {source} committed up to the target LSN.",
        retry_policy=retry,
    )
    def capture_op(
        context: dg.OpExecutionContext, platform: AuditPlatform, config: CaptureConfig
    ) -> dg.Output[list[str]]:
        result = capture(
            source_url(source, config_of_source),
            platform.env,
            platform.policy(source),
            platform.store(source),
            mask_key=platform.mask_key(),
            target_lsn=parse_lsn(config.target_lsn) if config.target_lsn else None,
            batch_changes=batch_changes,
        )
        for file in result.files:
            context.log_event(
                dg.AssetMaterialization(
                    asset_key=staged_key(source, file.dataset),
                    partition=hour_key(file.hour),
                    metadata={"path": file.path, "rows": file.rows},
                )
            )
        return dg.Output(
            [hour_key(h) for h in result.hours],
            metadata={
                "slot": slot,
                "lsn_from": lsn_text(result.start_lsn),
                "lsn_to": lsn_text(result.confirmed_lsn),
                "changes": result.changes,
                "contexts": result.contexts,
                "transactions": result.transactions,
                "staged_bytes": result.staged_bytes,
                "hours": [hour_key(h) for h in result.hours],
                "slot_lag_bytes_after": result.lag_bytes_after,
                "seconds": round(result.seconds, 3),
            },
        )

    config_of_source = config

    @dg.job(
        name=f"capture_{source}_job",
        description=f"Capture from source {source} into staging (one run per slot at a time).",
        tags={SLOT_TAG: slot},
        # The steps run one after another anyway; one process per run instead of one per step
        # saves two interpreter start-ups (seconds each) on the path from commit to searchable.
        executor_def=dg.in_process_executor,
    )
    def job() -> None:
        hours = capture_op()
        for step in then:
            hours = step(hours)

    return job
