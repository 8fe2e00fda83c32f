"""Per source: a sensor that peeks at the slot and starts a capture run when it holds changes."""

import dagster as dg

from audit_platform.capture.slot import peek
from audit_platform.defs.capture.assets import SLOT_TAG, source_url
from audit_platform.environment import SourceConfig
from audit_platform.naming import publication_name, slot_name
from audit_platform.settings import Settings
from audit_platform.staging import lsn_text

IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def capture_sensor(
    source: str, config: SourceConfig, job: dg.JobDefinition, interval: int
) -> dg.SensorDefinition:
    env = Settings().env
    slot, publication = slot_name(env, source), publication_name(env, source)

    @dg.sensor(
        name=f"capture_{source}_sensor",
        description=f"Peeks at slot {slot}; requests a capture run when it holds changes. "
        "Cursor: the WAL position the last run was asked to reach.",
        job=job,
        minimum_interval_seconds=interval,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        in_flight = context.instance.get_run_records(
            filters=dg.RunsFilter(tags={SLOT_TAG: slot}, statuses=IN_FLIGHT), limit=1
        )
        if in_flight:
            return dg.SkipReason(f"a capture run for {slot} is already queued or running")
        seen = peek(source_url(source, config), slot, publication)
        if not seen.has_changes:
            return dg.SkipReason(f"{slot} holds no changes ({seen.state.lag_bytes} bytes behind)")
        target = lsn_text(seen.state.current_lsn)
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=f"{slot}@{target}",
                    run_config={"ops": {f"capture_{source}": {"config": {"target_lsn": target}}}},
                    tags={SLOT_TAG: slot},
                )
            ],
            cursor=target,
        )

    return sensor
