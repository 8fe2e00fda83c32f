"""The environment's streams in Dagster: one asset standing for what they deliver, and its
checks, which the health checks schedule evaluates (delivery itself runs in the live capture
run of shard 0, ``streams.delivery.delivering``).

Streams are made at run time by an operator (``audit-platform streams create``), not in code,
so they are not assets each: the checks name every stream and source that is behind, failing or
has dead letters, and their metadata carries the figures.

No ``from __future__ import annotations`` in defs/: Dagster reads annotations at runtime.
"""

import dagster as dg

from audit_platform.defs.resources import AuditPlatform
from audit_platform.environment import EnvironmentConfig
from audit_platform.streams.progress import StreamStatus, status

STREAMS_KEY = dg.AssetKey(["streams", "delivered"])


def streams_asset_spec() -> dg.AssetSpec:
    return dg.AssetSpec(
        STREAMS_KEY,
        description="Records delivered by the environment's streams (webhooks and buckets) as "
        "they are indexed; `audit-platform streams list` shows each. Delivered by the live "
        "capture run of shard 0.",
        group_name="streams",
        kinds={"webhook", "s3"},
        owners=["team:platform"],
    )


def _line(found: StreamStatus) -> str:
    line = f"- {found.stream} / {found.source}: {found.behind} batches behind"
    line += f" ({found.lag_seconds:.0f} s)"
    if found.attempts:
        line += f", failing ({found.attempts} attempts): {found.last_error}"
    return line


def streams_checks(environment: EnvironmentConfig) -> list[dg.AssetChecksDefinition]:
    limit = environment.streams.lag_limit_seconds

    @dg.asset_check(
        asset=STREAMS_KEY,
        name="stream_lag",
        blocking=False,
        description=f"Every stream delivers within {limit:g} s of indexing, and none is failing.",
    )
    def stream_lag(platform: AuditPlatform) -> dg.AssetCheckResult:
        with platform.state() as conn:
            found = status(conn, platform.settings.env)
        late = [s for s in found if s.lag_seconds > limit or s.attempts]
        return dg.AssetCheckResult(
            passed=not late,
            metadata={
                "streams": len({s.stream for s in found}),
                "max_lag_seconds": round(max((s.lag_seconds for s in found), default=0.0), 1),
                "failing": sum(1 for s in found if s.attempts),
                # Text, not Markdown: an error holds what a receiver answered.
                "late": dg.MetadataValue.text("\n".join(_line(s) for s in late) or "none"),
            },
            description=None
            if not late
            else "see `audit-platform streams list`: a failing stream's receiver refuses or is "
            "down; a lagging one is slower than indexing",
        )

    @dg.asset_check(
        asset=STREAMS_KEY,
        name="stream_dead_letters",
        blocking=False,
        description="No stream has given up on a message a receiver refused as such (after "
        "dead_letter_attempts attempts).",
    )
    def stream_dead_letters(platform: AuditPlatform) -> dg.AssetCheckResult:
        with platform.state() as conn:
            found = status(conn, platform.settings.env)
        dead = [s for s in found if s.dead_letters]
        return dg.AssetCheckResult(
            passed=not dead,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "dead_letters": sum(s.dead_letters for s in found),
                "where": dg.MetadataValue.text(
                    "\n".join(f"- {s.stream} / {s.source}: {s.dead_letters}" for s in dead)
                    or "none"
                ),
            },
        )

    return [stream_lag, stream_dead_letters]
