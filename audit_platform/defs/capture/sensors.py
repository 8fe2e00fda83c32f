"""Per source: a sensor that peeks at the slot and starts a capture run when it holds changes."""

import dagster as dg

from audit_platform.capture.slot import peek
from audit_platform.defs.capture.assets import SLOT_TAG, source_url
from audit_platform.environment import SourceConfig
from audit_platform.naming import publication_name, slot_name
from audit_platform.staging import lsn_text

#: Marks a run requested only to confirm a quiet slot's position (no tracked change waiting).
HEARTBEAT_TAG = "audit/heartbeat"

#: A run in one of these states has not read the slot yet: another request would add nothing.
WAITING = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
]


def tick_spacing(interval: int) -> int:
    """The minimum spacing to declare so that ticks come every ``interval`` seconds.

    The sensor daemon looks every 5 s and skips a sensor whose last tick is less than its
    minimum interval ago. A tick is stamped a few milliseconds into its loop, so at exactly the
    interval the next look finds it just short and waits another loop: declared as is, ticks
    alternate between the interval and 5 s more (measured: 5/10 s for 5, 10/15 s for 10), and
    freshness pays for it. One second of slack lets each look that is due take its tick.
    """
    return max(1, interval - 1)


def capture_sensor(
    env: str,
    source: str,
    config: SourceConfig,
    job: dg.JobDefinition,
    interval: int,
    heartbeat_bytes: int,
) -> dg.SensorDefinition:
    slot, publication = slot_name(env, source), publication_name(env, source)

    @dg.sensor(
        name=f"capture_{source}_sensor",
        description=f"Peeks at slot {slot}; requests a capture run when it holds changes that "
        f"no run is about to read, or holds back {heartbeat_bytes:,} bytes of WAL without any "
        "(a heartbeat). Cursor: the WAL position seen at the last request.",
        job=job,
        minimum_interval_seconds=tick_spacing(interval),
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        # One run may wait behind a running one: it starts the moment the running one ends
        # (dagster.yaml allows one run in flight per slot), so changes committed while a run
        # enriches and indexes do not also wait for the next tick. A running capture step holds
        # the slot, and peek then reports nothing: no request while the slot is being read.
        waiting = context.instance.get_run_records(
            filters=dg.RunsFilter(tags={SLOT_TAG: slot}, statuses=WAITING), limit=1
        )
        if waiting:
            return dg.SkipReason(f"a capture run for {slot} is already queued")
        # An invalidated slot raises here: a failed tick is what an operator must see.
        seen = peek(source_url(source, config), slot, publication)
        heartbeat = not seen.has_changes and seen.state.lag_bytes >= heartbeat_bytes
        if not seen.has_changes and not heartbeat:
            return dg.SkipReason(f"{slot} holds no changes ({seen.state.lag_bytes} bytes behind)")
        # The run reads up to the WAL position at its own start, not this tick's: a queued run
        # then also takes what was committed while it waited. A heartbeat run finds nothing to
        # stage and confirms that position, so the server may recycle the WAL before it.
        target = lsn_text(seen.state.current_lsn)
        tags = {SLOT_TAG: slot, **({HEARTBEAT_TAG: "true"} if heartbeat else {})}
        return dg.SensorResult(
            run_requests=[dg.RunRequest(run_key=f"{slot}@{target}", tags=tags)],
            cursor=target,
        )

    return sensor
