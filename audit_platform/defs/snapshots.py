"""Snapshots from the Dagster UI: the launchpad's form says which source, which tables and why,
or which snapshot to resume (docs/design.md, "Snapshots"; the same work as
``audit-platform source snapshot``)."""

import time

import dagster as dg
from pydantic import Field

from audit_platform.capture.snapshot import TableProgress, new_snapshot_id, run_snapshot
from audit_platform.defs.capture.assets import source_url
from audit_platform.defs.resources import AuditPlatform
from audit_platform.environment import EnvironmentConfig


class SnapshotConfig(dg.Config):
    source: str = Field(description="The source, as this environment's file names it.")
    tables: list[str] = Field(
        default=[], description="Tracked tables to snapshot (schema.table); empty: every one."
    )
    snapshot_id: str = Field(
        default="",
        description="Resume this snapshot from its last committed chunk (the id a stopped run "
        "reported); empty: a new snapshot.",
    )
    reason: str = Field(default="", description="Why: recorded in the records' context.")


def snapshot_job(environment: EnvironmentConfig) -> dg.JobDefinition:
    @dg.op(name="snapshot", description=__doc__.split("\n\n")[0].replace("\n", " "))
    def op(
        context: dg.OpExecutionContext, config: SnapshotConfig, platform: AuditPlatform
    ) -> dg.Output[None]:
        source = environment.sources.get(config.source)
        if source is None:
            raise dg.Failure(
                f"source {config.source!r} is not in this environment's file; its sources: "
                f"{', '.join(sorted(environment.sources)) or 'none'}"
            )
        snapshot_id = config.snapshot_id or new_snapshot_id()
        context.log.info(f"snapshot {snapshot_id} of source {config.source}")
        shown = [time.monotonic()]

        def progress(table: TableProgress) -> None:
            if table.done or time.monotonic() - shown[0] >= 10:
                shown[0] = time.monotonic()
                context.log.info(
                    f"{table.table}: {table.rows:,} rows in {table.chunks:,} chunks"
                    + (", done" if table.done else "")
                )

        try:
            tables = run_snapshot(
                source_url(config.source, source),
                platform.policy(config.source),
                snapshot_id,
                tables=config.tables,
                reason=config.reason or None,
                on_chunk=progress,
            )
        except Exception as exc:
            raise dg.Failure(
                f"snapshot {snapshot_id} stopped: {exc}; launch the job again with "
                f"snapshot_id: {snapshot_id} to resume it from its last committed chunk",
                metadata={"snapshot_id": snapshot_id},
            ) from exc
        return dg.Output(
            None,
            metadata={
                "snapshot_id": snapshot_id,
                "rows": sum(t.rows for t in tables),
                **{t.table: t.rows for t in tables},
            },
        )

    @dg.job(
        name="snapshot_job",
        description="Record a source's existing rows once each (an initial snapshot, or a new "
        "baseline after a gap), in commit order with the live changes.",
        executor_def=dg.in_process_executor,
    )
    def job() -> None:
        op()

    return job
