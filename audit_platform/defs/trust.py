"""The trail's hourly duties, run by ``trust_job`` at ten past each hour:

- ``trail_verified`` (an asset check on each source's indexed asset): sign what the log gained
  since its last checkpoint (capture runs sign at most every ``checkpoint_every_seconds``, so
  a burst's tail would otherwise wait for the next change), then ``verify`` the last 70
  minutes (overlapping the previous run's), where a change too recent to be indexed yet or a
  re-attribution still pending is explained, not failed. Fails (ERROR) naming what was
  removed, altered or inserted.
- ``read_log_verified`` (on the same asset of the first source, one per environment): append
  the read log's new rows to the read trail, sign it, and verify the whole read trail.
"""

from datetime import UTC, datetime, timedelta

import dagster as dg

from audit_platform.defs.index.assets import indexed_key
from audit_platform.defs.resources import AuditPlatform
from audit_platform.policy import load_policy, policy_path
from audit_platform.read_log import append_reads, read_trail
from audit_platform.trust.commitments import all_keys
from audit_platform.trust.log import TrustLog
from audit_platform.verify import (
    Window,
    erasures_running,
    report_json,
    verify_reads,
    verify_source,
    waiting_changes,
)

TRUST_CRON = "10 * * * *"
#: How far back each hourly check verifies: an hour, and ten minutes of overlap.
VERIFIED = timedelta(minutes=70)


def _result(report, what: str) -> dg.AssetCheckResult:
    summary = report_json(report)
    problems = [f"{f.kind} {f.subject}: {f.detail}" for f in report.problems]
    return dg.AssetCheckResult(
        passed=report.ok,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "counts": summary["counts"],
            "log_size": report.log_size,
            "checkpoints": report.checkpoints,
            "documents": report.documents,
            "problems": problems[:50],
        },
        description=None
        if report.ok
        else f"{len(problems)} problem(s) in {what}; "
        "run `audit-platform verify` for the whole list",
    )


def trail_check(source: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=indexed_key(source),
        name="trail_verified",
        blocking=False,
        description=f"Source {source}'s trail: checkpoints signed and chained, and the last "
        "70 minutes in Elasticsearch and staging equal to the log.",
    )
    def trail_verified(platform: AuditPlatform) -> dg.AssetCheckResult:
        settings, now = platform.settings, datetime.now(UTC)
        store = platform.store(source)
        signer = settings.signer()
        if signer is not None:
            TrustLog(store).checkpoint(signer, now)
        since = now - VERIFIED
        environment = platform.environment()
        window = Window(now, retention=timedelta(days=environment.retention_days_of(source)))
        with platform.elasticsearch() as es, platform.state() as state:
            report = verify_source(
                store,
                es,
                load_policy(policy_path(settings.resources_dir, source)),
                settings.verifier(),
                since=since,
                until=None,
                window=window,
                waiting=waiting_changes(state, settings.env, source),
                retention_class=environment.retention_class_of(source),
                keys=all_keys(state, settings.env),
                erasing=erasures_running(state, settings.env),
            )
        return _result(report, f"{source}'s changes since {since:%H:%M} UTC")

    return trail_verified


def reads_check(first_source: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=indexed_key(first_source),
        name="read_log_verified",
        blocking=False,
        description="The environment's read log: new rows appended to its trail and signed, "
        "and every logged row still there, unedited.",
    )
    def read_log_verified(platform: AuditPlatform) -> dg.AssetCheckResult:
        settings = platform.settings
        log = read_trail(settings.staging_root, settings.env)
        with platform.state() as state:
            append_reads(state, log, settings.env)
            signer = settings.signer()
            if signer is not None:
                log.checkpoint(signer, datetime.now(UTC))
            report = verify_reads(state, log, settings.env, settings.verifier())
        return _result(report, "the read log")

    return read_log_verified
