"""The live capture run: per shard of the environment one job whose op runs the supervisor of
audit_platform/live.py for its lifetime, and the keeper sensor that keeps one such run
alive per shard.

What the run reports, coalesced (a busy source stages a batch a second; an event per batch would
fill the event log, and each event is a connection to Dagster's database): every
``capture_report_seconds``, and at the end, one materialization per source, asset and hour of
what it staged, enriched and indexed since the last report (with the orphan-rate check) and the
quarantine of every source whose quarantine changed or is not empty. Six times per
``capture_stale_seconds`` it writes the ``capture_live`` check of every source whose status
changed (or is failing) and one log line of every source's status. That line is the run's
heartbeat: the keeper treats a STARTED run whose last event is older than
``capture_stale_seconds`` as dead.

No ``from __future__ import annotations`` in defs/: Dagster reads config annotations at runtime.
"""

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from datetime import timedelta

import dagster as dg
import psycopg
from elasticsearch import Elasticsearch
from psycopg_pool import ConnectionPool
from pydantic import Field

from audit_platform.capture.slot import SlotLost, SlotMissing, parked_pid, usable_slot_state
from audit_platform.clients import connect_source, pg_url_from_settings
from audit_platform.defs.capture.assets import source_url, staged_key
from audit_platform.defs.enrich.assets import hour_events, quarantine_key, quarantine_metadata
from audit_platform.defs.index.assets import indexed_key
from audit_platform.defs.partitions import hour_key
from audit_platform.defs.resources import AuditPlatform
from audit_platform.enrich import quarantine
from audit_platform.enrich.batch import merge_hours
from audit_platform.environment import EnvironmentConfig, SourceConfig
from audit_platform.index.batch import merge_indexed
from audit_platform.live import (
    FlushPacer,
    Lanes,
    LiveReport,
    LiveSettings,
    LiveSource,
    SourceStatus,
    SourceWorker,
    Supervisor,
    shard_of,
)
from audit_platform.lsn import lsn_text
from audit_platform.naming import slot_name
from audit_platform.streams.delivery import Deliverer, delivering

#: The live capture run of a shard carries its number here; dagster.yaml runs one per shard.
SHARD_TAG = "audit/capture-shard"
CHECK = "capture_live"
#: Run states in which a run holds (or is about to hold) its shard.
ALIVE = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def shard_sources(environment: EnvironmentConfig, shard: int) -> dict[str, SourceConfig]:
    n = environment.capture_shards
    return {s: c for s, c in sorted(environment.sources.items()) if shard_of(s, n) == shard}


def live_settings(environment: EnvironmentConfig) -> LiveSettings:
    return LiveSettings(
        flush_seconds=environment.capture_flush_seconds,
        batches_per_second=environment.capture_batches_per_second,
        lanes=environment.capture_lanes,
        batch_changes=environment.capture_batch_changes,
        heartbeat_bytes=environment.slot_heartbeat_bytes,
        park_after_seconds=environment.capture_park_after_seconds,
        grace=timedelta(minutes=environment.enrich_grace_minutes),
        trail=environment.trail,
        checkpoint_every=timedelta(seconds=environment.checkpoint_every_seconds),
        resolve_every_seconds=environment.quarantine_resolve_seconds,
    )


class LiveRunConfig(dg.Config):
    lifetime_minutes: float = Field(
        default=0, description="Stop after this long (0: the environment's capture_run_minutes)."
    )
    until_caught_up: bool = Field(
        default=False,
        description="Stop as soon as every source has caught up with what was committed when "
        "the run started (a one-off catch-up).",
    )


def job_name(shard: int) -> str:
    return f"capture_shard_{shard}_job"


def live_capture_job(environment: EnvironmentConfig, shard: int) -> dg.JobDefinition:
    @dg.op(
        name=f"capture_live_{shard}",
        description=f"Capture, enrich and index the sources of shard {shard} continuously, until "
        "the run's lifetime ends; each source on its own (one that fails is retried and "
        "reported, the others go on).",
    )
    def op(context: dg.OpExecutionContext, platform: AuditPlatform, config: LiveRunConfig) -> None:
        with ExitStack() as stack:
            _run(context, platform, config, stack)

    def _run(context, platform: AuditPlatform, config: LiveRunConfig, stack: ExitStack) -> None:
        started = platform.environment()
        report = LiveReport()
        workers: dict[str, SourceWorker] = {}
        settings = live_settings(started)
        pacer = FlushPacer(settings.flush_seconds, settings.batches_per_second)
        lanes = Lanes(settings.lanes, settings.lanes)

        def sources() -> dict[str, SourceWorker]:
            """The environment file, read again: sources added or removed are picked up."""
            current = platform.environment()
            found = {}
            for name, source_config in shard_sources(current, shard).items():
                found[name] = workers.get(name) or _worker(
                    platform, current, name, source_config, report, shared
                )
            workers.clear()
            workers.update(found)
            return found

        minutes = config.lifetime_minutes or started.capture_run_minutes
        # Shared by the run's workers: a few connections to the platform database, taken for a
        # downstream step only, and one Elasticsearch client (it pools its own connections).
        # A source's own connections are its worker's: its slot's stream and one for queries.
        state = ConnectionPool(
            _state_url(platform),
            min_size=1,
            max_size=STATE_CONNECTIONS,
            kwargs={"autocommit": True},
            name=f"capture-shard-{shard}",
        )
        client = stack.enter_context(platform.elasticsearch())
        stack.enter_context(state)
        shared = Shared(state.connection, client, pacer, lanes)
        if shard == 0:  # the environment's streams, delivered by one run
            state_url = _state_url(platform)
            deliverer = Deliverer(
                platform.settings.env,
                # A connection per stream, not the workers' pool: a stream waiting on its
                # receiver holds its own.
                lambda: psycopg.connect(state_url, autocommit=True),
                client,
                platform.store,
                signer=platform.settings.signer(),
                settings=started.streams,
            )
            stack.enter_context(delivering(deliverer))
            context.log.info("delivering the environment's streams in this run")
        supervisor = Supervisor(
            sources,
            lifetime=timedelta(minutes=minutes),
            report=report,
            refresh_seconds=60,
            until_caught_up=config.until_caught_up,
        )
        reported: dict[str, tuple] = {}  # per source: its last reported status
        quarantined: dict[str, tuple] = {}  # per source: its last reported quarantine
        every = started.capture_report_seconds
        heartbeat = min(every, started.capture_stale_seconds / 6)
        context.log.info(f"live capture of shard {shard} for {minutes:g} min")
        last = beat = time.monotonic()
        try:
            for _ in supervisor.ticks(every=min(1.0, heartbeat)):
                if time.monotonic() - last >= every:
                    _materializations(context, platform, report, quarantined)
                    last = time.monotonic()
                if time.monotonic() - beat >= heartbeat:
                    _statuses(context, report, reported, shard)
                    beat = time.monotonic()
        finally:
            _materializations(context, platform, report, quarantined)
            _statuses(context, report, reported, shard, final=True)
        failing = sorted(s for s, st in report.statuses().items() if st.state == "crashed")
        if failing:
            raise dg.Failure(f"capture workers ended by a crash: {', '.join(failing)}")

    @dg.job(
        name=job_name(shard),
        description=f"Live capture of shard {shard} of {environment.capture_shards}: one run "
        "at a time, kept alive by capture_keeper_sensor.",
        # One run per shard (dagster.yaml); no run retries: the keeper starts the next run.
        tags={SHARD_TAG: str(shard), "dagster/max_retries": "0"},
        executor_def=dg.in_process_executor,
    )
    def job() -> None:
        op()

    return job


#: Connections to the platform database a live run's workers share (``Shared``).
STATE_CONNECTIONS = 8


@dataclass(frozen=True)
class Shared:
    state: Callable[[], AbstractContextManager[psycopg.Connection]]
    client: Elasticsearch
    pacer: FlushPacer
    lanes: Lanes


def _worker(platform, environment, name, config, report, shared: Shared) -> SourceWorker:
    live = LiveSource(
        name,
        lambda: source_url(name, config),
        lambda: platform.policy(name),
        platform.store(name),
        retention_class=environment.retention_class_of(name),
    )
    return SourceWorker(
        platform.settings.env,
        live,
        state=shared.state,
        elasticsearch=lambda: platform.elasticsearch(environment, shared.client),
        mask_key=platform.mask_key(),
        signer=platform.settings.signer(),
        settings=live_settings(environment),
        report=report,
        pacer=shared.pacer,
        lanes=shared.lanes,
    )


def _state_url(platform: AuditPlatform) -> str:
    platform.state().close()  # installs the platform's tables on first use
    return pg_url_from_settings(platform.settings)


def _status_key(status: SourceStatus) -> tuple:
    # Parked and live are one state to Dagster: a quiet source parks and wakes every few
    # minutes, and each change of key is an event in its history.
    return ("live" if status.state == "parked" else status.state, status.problem)


def status_check(status: SourceStatus, shard: int, run_id: str) -> dg.AssetCheckEvaluation:
    return dg.AssetCheckEvaluation(
        asset_key=staged_key(status.source, "changes"),
        check_name=CHECK,
        passed=status.healthy,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "state": status.state,
            "error": status.error or "",
            "schema_problems": dg.MetadataValue.json(status.schema_problems),
            "failures": status.failures,
            "attempts": status.attempts,
            "changes_this_attempt": status.changes,
            "records_indexed": status.records_indexed,
            "confirmed_lsn": lsn_text(status.confirmed_lsn),
            "last_batch_at": status.last_batch_at.isoformat() if status.last_batch_at else "",
            "shard": shard,
            "run_id": run_id,
        },
        description=status.problem,
    )


def _materializations(
    context, platform: AuditPlatform, report: LiveReport, quarantined: dict
) -> None:
    """What happened since the last report, coalesced per source, asset and hour; the
    quarantines that changed or are not empty."""
    staged, enriched, indexed = report.drain()
    for (source, dataset, hour), counts in sorted(staged.items()):
        context.log_event(
            dg.AssetMaterialization(
                asset_key=staged_key(source, dataset), partition=hour_key(hour), metadata=counts
            )
        )
    for source in sorted({s for s, _ in enriched}):
        for result in merge_hours(h for s, h in enriched if s == source):
            for event in hour_events(source, result):
                context.log_event(event)
    for source in sorted({s for s, _ in indexed}):
        for merged in merge_indexed([h for s, h in indexed if s == source]):
            context.log_event(
                dg.AssetMaterialization(
                    asset_key=indexed_key(source),
                    partition=hour_key(merged.hour),
                    metadata=merged.metadata,
                )
            )
    sources = sorted(report.statuses())
    with platform.state() as state:
        found = quarantine.stats_by_source(state, platform.settings.env, sources)
    for source, current in found.items():
        counts = (current.waiting, current.released)
        if current.waiting or quarantined.get(source, (0, 0)) != counts:
            context.log_event(
                dg.AssetMaterialization(
                    asset_key=quarantine_key(source), metadata=quarantine_metadata(current)
                )
            )
            quarantined[source] = counts


def _statuses(context, report: LiveReport, reported: dict, shard: int, final: bool = False) -> None:
    """The statuses that changed or fail, and the heartbeat line."""
    statuses = report.statuses()
    for source, status in sorted(statuses.items()):
        if final or not status.healthy or reported.get(source) != _status_key(status):
            context.log_event(status_check(status, shard, context.run_id))
            reported[source] = _status_key(status)
    summary = ", ".join(f"{s}: {st.state}" for s, st in sorted(statuses.items())) or "no sources"
    context.log.info(f"live capture of shard {shard}: {summary}")  # the heartbeat


def capture_live_checks(env: str, source: str, config: SourceConfig) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=staged_key(source, "changes"),
        name=CHECK,
        blocking=False,
        description=f"Source {source} is captured live: evaluated by the live capture run of "
        "its shard (its worker's state, failures and last error). Run on its own, it checks "
        "that a consumer holds the slot, or that a parked worker watches it.",
    )
    def check() -> dg.AssetCheckResult:
        slot = slot_name(env, source)
        try:
            with connect_source(source_url(source, config)) as conn:
                state = usable_slot_state(conn, slot)
                parked = parked_pid(conn, slot) if state.active_pid is None else None
        except (SlotLost, SlotMissing, psycopg.OperationalError) as exc:
            return dg.AssetCheckResult(passed=False, description=str(exc))
        return dg.AssetCheckResult(
            passed=state.active_pid is not None or parked is not None,
            metadata={
                "slot": slot,
                "consumer_pid": state.active_pid or 0,
                "parked_pid": parked or 0,
            },
        )

    return check


def _last_event_time(instance: dg.DagsterInstance, run_id: str) -> float | None:
    found = instance.event_log_storage.get_records_for_run(run_id, ascending=False, limit=1)
    return found.records[0].event_log_entry.timestamp if found.records else None


def keeper_sensor(environment: EnvironmentConfig, jobs: dict[int, dg.JobDefinition]):
    stale = environment.capture_stale_seconds
    lifetime = environment.capture_run_minutes * 60

    @dg.sensor(
        name="capture_keeper_sensor",
        description="Keeps one live capture run per shard: starts one when none is queued or "
        "running; fails a STARTED run whose last event is older than "
        f"{stale} s (its process is gone) and starts another; queues the successor of a run "
        "near the end of its lifetime, so it starts the moment that one ends.",
        jobs=list(jobs.values()),
        minimum_interval_seconds=10,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        requests, notes = [], []
        now = time.time()
        for shard, job in sorted(jobs.items()):
            records = context.instance.get_run_records(
                filters=dg.RunsFilter(job_name=job.name, statuses=ALIVE)
            )
            alive = []
            for record in records:
                run = record.dagster_run
                if run.status == dg.DagsterRunStatus.STARTED:
                    last = _last_event_time(context.instance, run.run_id) or record.start_time
                    if last is not None and now - last > stale:
                        context.instance.report_run_failed(
                            run,
                            message=f"no event for {now - last:.0f} s (more than {stale} s): "
                            "its process is gone; the capture keeper starts another run",
                        )
                        notes.append(f"shard {shard}: failed stale run {run.run_id}")
                        continue
                alive.append(record)
            waiting = [r for r in alive if r.dagster_run.status != dg.DagsterRunStatus.STARTED]
            ending = [
                r
                for r in alive
                if r.dagster_run.status == dg.DagsterRunStatus.STARTED
                and r.start_time
                and now - r.start_time > lifetime - 60
            ]
            if not alive or (ending and not waiting and len(alive) == 1):
                requests.append(dg.RunRequest(job_name=job.name, tags={SHARD_TAG: str(shard)}))
                notes.append(f"shard {shard}: run requested")
        if not requests:
            return dg.SensorResult(skip_reason="; ".join(notes) or "every shard has its run")
        return dg.SensorResult(run_requests=requests)

    return sensor
