"""Erasures run on a schedule: every request approved by a second admin, or past its waiting
period, is carried out within a quarter of an hour (docs/design.md, "Erasure").

A request that cannot run yet (a legal hold placed since, a source whose staged changes wait
for enrichment) is reported and tried again at the next pass; the run fails, so the UI shows
it, without keeping the other requests from running.
"""

from datetime import UTC, datetime

import dagster as dg

from audit_platform.defs.resources import AuditPlatform
from audit_platform.erasure.run import run_due

ERASURES_CRON = "*/15 * * * *"


def erasures_job() -> dg.JobDefinition:
    @dg.op(name="erasures", description=__doc__.split("\n\n")[0].replace("\n", " "))
    def op(context: dg.OpExecutionContext, platform: AuditPlatform) -> dg.Output[None]:
        found = run_due(platform.settings, datetime.now(UTC))
        for outcome in found.done:
            context.log.info(
                f"erasure request {outcome.request} done: {outcome.subject}, "
                f"{outcome.records} records in {outcome.seconds:.1f} s"
            )
        if found.not_done:
            raise dg.Failure(
                description="erasure requests not done: "
                + "; ".join(f"{r}: {why}" for r, why in found.not_done.items())
            )
        waiting = {str(r): f"{at:%Y-%m-%d %H:%M} UTC" for r, at in found.waiting.items()}
        if waiting:
            # Admins see what will run unless approved first or cancelled.
            context.log.warning(f"erasure requests waiting (runs from): {waiting}")
        return dg.Output(
            None,
            metadata={
                "done": len(found.done),
                "records": sum(o.records for o in found.done),
                "waiting": dg.MetadataValue.json(waiting),
            },
        )

    @dg.job(
        name="erasures_job",
        description="Carry out the erasure requests that are due.",
        executor_def=dg.in_process_executor,
    )
    def job() -> None:
        op()

    return job


def erasures_schedule(job: dg.JobDefinition) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name="erasures_schedule",
        job=job,
        cron_schedule=ERASURES_CRON,
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )
