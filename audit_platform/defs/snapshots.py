"""Snapshots from the Dagster UI: the launchpad's form says which source, which tables and why,
or which snapshot to resume (docs/design.md, "Snapshots"; the same work as
``audit-platform source snapshot``)."""

import time

import dagster as dg
from pydantic import Field

from audit_platform.capture.gaps import rebaseline_gaps
from audit_platform.capture.snapshot import (
    TableProgress,
    baseline_lsn,
    new_snapshot_id,
    run_snapshot,
)
from audit_platform.capture.snapshot_pace import pipeline_pace
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
    where: str = Field(
        default="",
        description="Only the rows that meet this condition, of the one table named: its "
        "columns compared with constants, e.g. created_at >= '2026-01-01'. Empty: every row.",
    )
    pace: bool = Field(
        default=True,
        description="Write each chunk once this environment's capture has nearly caught up, so "
        "the live changes are not held up behind the snapshot; off: as fast as the source can.",
    )


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

        policy = platform.policy(config.source)
        settings = platform.settings
        pace = pipeline_pace(settings.staging_root, settings.env, config.source)
        pace.report = lambda found, staged: context.log.info(
            f"waiting for capture: {pace.describe(found, staged)}"
        )
        try:
            tables = run_snapshot(
                source_url(config.source, source),
                policy,
                snapshot_id,
                tables=config.tables,
                reason=config.reason or None,
                where=config.where or None,
                on_chunk=progress,
                env=settings.env,
                pace=pace if config.pace else None,
            )
        except Exception as exc:
            raise dg.Failure(
                f"snapshot {snapshot_id} stopped: {exc}; launch the job again with "
                f"snapshot_id: {snapshot_id} to resume it from its last committed chunk",
                metadata={"snapshot_id": snapshot_id},
            ) from exc
        gaps = []
        if (started := baseline_lsn(tables, policy)) is not None:
            try:
                with platform.state() as conn:
                    gaps = rebaseline_gaps(
                        conn, platform.settings.env, config.source, snapshot_id, started
                    )
            except Exception as exc:  # the snapshot is done; only the gaps' pointer waits
                context.log.warning(
                    f"snapshot {snapshot_id} is done, but its gaps could not be marked ({exc}); "
                    f"launch the job again with snapshot_id: {snapshot_id} to mark them"
                )
        for gap in gaps:
            context.log.info(f"gap re-baselined: {gap.describe()}")
        return dg.Output(
            None,
            metadata={
                "snapshot_id": snapshot_id,
                "rows": sum(t.rows for t in tables),
                "gaps_rebaselined": len(gaps),
                "seconds_waiting_for_capture": round(pace.waited, 1),
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
