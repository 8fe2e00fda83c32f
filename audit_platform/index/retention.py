"""Retention: what has outlived its environment's retention period, and deleting it.

Where the cluster has index lifecycle management, the lifecycle policy in
``resources/elasticsearch/ilm-policy.json`` deletes old indices; where it does not (the
integ-test-zip distribution used in tests has no ILM), this module does, and it also removes what
ILM never could: expired staged hours and settled quarantine entries. Everything is scoped by
name to one environment, and nothing inside the retention period is ever touched: an index is
deleted only when its whole month is older than the period.
"""

from __future__ import annotations

import calendar
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from elasticsearch import Elasticsearch

from audit_platform.clients import es_from_settings, pg_url_from_settings
from audit_platform.environment import EnvironmentConfig
from audit_platform.holds import Hold, list_holds
from audit_platform.naming import check_identifier
from audit_platform.settings import Settings
from audit_platform.staging import StagingStore

_INDEX = re.compile(
    r"^audit-(?P<env>[a-z][a-z0-9_]*)-(?P<source>[a-z][a-z0-9_]*)-(?P<y>\d{4})\.(?P<m>\d{2})$"
)


@dataclass
class RetentionReport:
    dry_run: bool
    cutoff: datetime
    indices: list[str] = field(default_factory=list)
    staged_hours: list[str] = field(default_factory=list)
    quarantine_entries: int = 0
    #: What each active legal hold kept from deletion: hold id -> {"indices": [...],
    #: "staged_hours": [...]} (expired, so deleted but for the hold).
    held: dict[int, dict[str, list[str]]] = field(default_factory=dict)

    def as_metadata(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "cutoff": self.cutoff.isoformat(),
            "indices": self.indices,
            "staged_hours": len(self.staged_hours),
            "staged_hours_list": self.staged_hours[:200],
            "quarantine_entries": self.quarantine_entries,
            "held": {
                str(k): {what: v[:200] for what, v in kept.items()} for k, kept in self.held.items()
            },
        }


def _holding(client: Elasticsearch | None, holds: list[Hold], source: str,
             index: str | None) -> list[Hold]:  # fmt: skip
    """The holds that keep an expired index (any record they cover in it) or, with no index,
    a staged hour of ``source`` (every hold on the source: staged files mix its tables)."""
    found = [h for h in holds if h.source == source]
    if index is None or client is None:
        return found
    return [
        h for h in found if h.table is None or client.count(index=index, query=h.query())["count"]
    ]


def ilm_policy(resources_dir: Path, retention_days: int) -> dict[str, Any]:
    """The lifecycle policy body for clusters that have ILM (tested as data everywhere)."""
    text = (resources_dir / "elasticsearch" / "ilm-policy.json").read_text()
    warm = max(1, min(30, retention_days // 4))
    return json.loads(
        text.replace("{warm_days}", str(warm)).replace("{retention_days}", str(retention_days))
    )


def cluster_has_ilm(client: Elasticsearch) -> bool:
    try:
        client.ilm.get_status()
    except Exception:
        return False
    return True


def month_end(year: int, month: int) -> datetime:
    last_day = calendar.monthrange(year, month)[1]
    return datetime(year, month, last_day, tzinfo=UTC) + timedelta(days=1)


def expired_indices(client: Elasticsearch, env: str, cutoff: datetime) -> list[str]:
    """This environment's indices whose whole month ended before the cutoff."""
    check_identifier("environment", env)
    found = client.options(ignore_status=404).indices.get(
        index=f"audit-{env}-*", expand_wildcards="open,closed"
    )
    expired = []
    for name in sorted(found):
        match = _INDEX.match(name)
        if not match or match["env"] != env:
            continue
        if month_end(int(match["y"]), int(match["m"])) <= cutoff:
            expired.append(name)
    return expired


def expired_hours(store: StagingStore, cutoff: datetime) -> list[str]:
    """Hour folders of every dataset of this environment and source that ended before the cutoff."""
    return [folder for hour, folder in store.hour_folders() if hour + timedelta(hours=1) <= cutoff]


def run_retention(
    *,
    env: str,
    retention_days: int,
    client: Elasticsearch | None,
    stores: list[StagingStore],
    state: psycopg.Connection | None,
    now: datetime,
    dry_run: bool,
    holds: list[Hold] = (),  # type: ignore[assignment]
) -> RetentionReport:
    cutoff = now - timedelta(days=retention_days)
    report = RetentionReport(dry_run=dry_run, cutoff=cutoff)

    def kept(kind: str, what: str, by: list[Hold]) -> bool:
        for hold in by:
            report.held.setdefault(hold.id, {"indices": [], "staged_hours": []})[kind].append(what)
        return bool(by)

    if client is not None:
        for name in expired_indices(client, env, cutoff):
            source = _INDEX.match(name)["source"]  # type: ignore[index]
            if not kept("indices", name, _holding(client, holds, source, name)):
                report.indices.append(name)
        if not dry_run and report.indices:
            client.indices.delete(index=",".join(report.indices))
    for store in stores:
        if store.env != env:
            raise ValueError(f"staging of environment {store.env!r} given to retention of {env!r}")
        by = _holding(None, holds, store.source, None)
        hours = [h for h in expired_hours(store, cutoff) if not kept("staged_hours", h, by)]
        report.staged_hours.extend(hours)
        if not dry_run:
            for folder in hours:
                store.fs.rm(folder, recursive=True)
    if state is not None:
        query = (
            "FROM audit_platform.quarantine WHERE env = %s AND status <> 'waiting'"
            " AND commit_time < %s"
        )
        if dry_run:
            report.quarantine_entries = state.execute(
                f"SELECT count(*) {query}", (env, cutoff)
            ).fetchone()[0]
        else:
            report.quarantine_entries = state.execute(f"DELETE {query}", (env, cutoff)).rowcount
            state.execute(
                "DELETE FROM audit_platform.late_contexts WHERE env = %s AND attached_at < %s",
                (env, cutoff),
            )
    return report


def run_for_environment(
    settings: Settings, environment: EnvironmentConfig, *, now: datetime, dry_run: bool
) -> RetentionReport:
    """Retention of one environment with its configured servers: what the daily job and
    ``audit-platform retention run`` both do."""
    stores = [
        StagingStore(settings.staging_root, settings.env, source)
        for source in sorted(environment.sources)
    ]
    with (
        es_from_settings(settings) as client,
        psycopg.connect(pg_url_from_settings(settings), autocommit=True) as state,
    ):
        holds = list_holds(state, settings.env, active_only=True)
        ilm = cluster_has_ilm(client)
        if ilm and holds and not dry_run:
            _detach_held_indices(client, settings.env, holds)
        # Where the cluster has ILM, its lifecycle policy deletes indices; we do the rest.
        return run_retention(
            env=settings.env,
            retention_days=environment.retention_days,
            client=None if ilm else client,
            stores=stores,
            state=state,
            now=now,
            dry_run=dry_run,
            holds=holds,
        )


def _detach_held_indices(client: Elasticsearch, env: str, holds: list[Hold]) -> None:
    """Where ILM deletes indices, a held index leaves its lifecycle policy (ILM would delete
    it regardless of the hold). Not exercised by the tests: the integ-test-zip distribution
    has no ILM."""
    found = client.options(ignore_status=404).indices.get(index=f"audit-{env}-*")
    for name in sorted(found):
        match = _INDEX.match(name)
        if match and _holding(client, holds, match["source"], name):
            client.ilm.remove_policy(index=name)
