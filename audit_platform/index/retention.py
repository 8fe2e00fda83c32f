"""Retention: what has outlived its retention class's period, and deleting it.

A source's records are kept for the period of its retention class (``EnvironmentConfig``), and
each month of a class is one index that every source of the class shares, so an index expires
when its whole month is older than its class's period: then every record in it has expired.

Where the cluster has index lifecycle management, a lifecycle policy per class (from
``resources/elasticsearch/ilm-policy.json``) deletes old indices; where it does not (the
integ-test-zip distribution used in tests has no ILM), this module does, and it also removes what
ILM never could: expired staged hours and settled quarantine entries. Everything is scoped by
name to one environment, and nothing inside the retention period is ever touched.
"""

from __future__ import annotations

import calendar
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from elasticsearch import Elasticsearch

from audit_platform.clients import es_from_settings, pg_url_from_settings
from audit_platform.environment import EnvironmentConfig
from audit_platform.holds import Hold, list_holds
from audit_platform.naming import STANDARD_CLASS, check_identifier, index_pattern, parse_index_name
from audit_platform.platform_db import one
from audit_platform.settings import Settings
from audit_platform.staging import StagingStore


@dataclass
class RetentionReport:
    dry_run: bool
    #: Per retention class, the moment before which its records have expired.
    cutoffs: dict[str, datetime]
    indices: list[str] = field(default_factory=list)
    staged_hours: list[str] = field(default_factory=list)
    quarantine_entries: int = 0
    #: What each active legal hold kept from deletion: hold id -> {"indices": [...],
    #: "staged_hours": [...]} (expired, so deleted but for the hold).
    held: dict[int, dict[str, list[str]]] = field(default_factory=dict)
    #: Per held index, the documents in it that no hold covers (other sources, other tables of
    #: the class), kept past their period with it: an index is kept or deleted whole, never
    #: thinned by a delete-by-query (README, "Legal holds").
    kept_with_holds: dict[str, int] = field(default_factory=dict)
    #: Indices of a retention class the environment no longer has: never deleted, reported.
    unknown_class: list[str] = field(default_factory=list)

    def as_metadata(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "cutoffs": {name: cutoff.isoformat() for name, cutoff in self.cutoffs.items()},
            "indices": self.indices,
            "staged_hours": len(self.staged_hours),
            "staged_hours_list": self.staged_hours[:200],
            "quarantine_entries": self.quarantine_entries,
            "held": {
                str(k): {what: v[:200] for what, v in kept.items()} for k, kept in self.held.items()
            },
            "kept_with_holds": self.kept_with_holds,
            "unknown_class": self.unknown_class,
        }


def _holding(client: Elasticsearch, holds: list[Hold], index: str) -> list[Hold]:
    """The holds that cover a record in ``index`` (one count query each: an index of a class
    holds every source of the class, so a hold keeps it only if its records are there)."""
    return [h for h in holds if client.count(index=index, query=h.query())["count"]]


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


def expired_indices(
    client: Elasticsearch, env: str, environment: EnvironmentConfig, now: datetime
) -> tuple[list[str], list[str]]:
    """(this environment's indices whose whole month ended before their class's cutoff, indices
    of a class the environment does not have).

    An index of the current layout expires with its retention class; one of the layout before
    classes (``audit-<env>-<source>-<month>``, not migrated yet) with its source's class."""
    check_identifier("environment", env)
    found = client.options(ignore_status=404).indices.get(
        index=index_pattern(env), expand_wildcards="open,closed"
    )
    classes = environment.classes
    expired, unknown = [], []
    for name in sorted(found):
        parsed = parse_index_name(name)
        if parsed is None or parsed.env != env:
            continue
        retention_class: str | None = (
            environment.retention_class_of(parsed.source)
            if parsed.source is not None
            else parsed.retention_class
        )
        if retention_class is None or retention_class not in classes:
            unknown.append(name)
            continue
        cutoff = now - timedelta(days=classes[retention_class])
        if month_end(parsed.year, parsed.month) <= cutoff:
            expired.append(name)
    return expired, unknown


def expired_hours(store: StagingStore, cutoff: datetime) -> list[str]:
    """Hour folders of every dataset of this environment and source that ended before the cutoff."""
    return [folder for hour, folder in store.hour_folders() if hour + timedelta(hours=1) <= cutoff]


def run_retention(
    *,
    env: str,
    environment: EnvironmentConfig,
    client: Elasticsearch | None,
    stores: list[StagingStore],
    state: psycopg.Connection | None,
    now: datetime,
    dry_run: bool,
    holds: list[Hold] = (),  # type: ignore[assignment]
) -> RetentionReport:
    """Delete what expired, each source by its retention class's period (``environment``).

    An index is deleted whole or kept whole: one a hold covers a record of is kept with every
    other source's records in it, and how many those are is reported (``kept_with_holds``)."""
    cutoffs = {name: now - timedelta(days=days) for name, days in environment.classes.items()}
    report = RetentionReport(dry_run=dry_run, cutoffs=cutoffs)

    def kept(kind: str, what: str, by: list[Hold]) -> bool:
        for hold in by:
            report.held.setdefault(hold.id, {"indices": [], "staged_hours": []})[kind].append(what)
        return bool(by)

    if client is not None:
        expired, report.unknown_class = expired_indices(client, env, environment, now)
        for name in expired:
            by = _holding(client, holds, name)
            if kept("indices", name, by):
                uncovered = {"bool": {"must_not": [h.query() for h in by]}}
                report.kept_with_holds[name] = client.count(index=name, query=uncovered)["count"]
            else:
                report.indices.append(name)
        if not dry_run and report.indices:
            client.indices.delete(index=",".join(report.indices))
    for store in stores:
        if store.env != env:
            raise ValueError(f"staging of environment {store.env!r} given to retention of {env!r}")
        by = [h for h in holds if h.source == store.source]  # staged files mix its tables
        cutoff = cutoffs[environment.retention_class_of(store.source)]
        hours = [h for h in expired_hours(store, cutoff) if not kept("staged_hours", h, by)]
        report.staged_hours.extend(hours)
        if not dry_run:
            for folder in hours:
                store.fs.rm(folder, recursive=True)
    if state is not None:
        report.quarantine_entries = _expire_quarantine(state, env, environment, cutoffs, dry_run)
        if not dry_run:
            # Late contexts are per transaction, of any source: kept the longest period.
            state.execute(
                "DELETE FROM audit_platform.late_contexts WHERE env = %s AND attached_at < %s",
                (env, min(cutoffs.values())),
            )
    return report


def _expire_quarantine(
    state: psycopg.Connection,
    env: str,
    environment: EnvironmentConfig,
    cutoffs: dict[str, datetime],
    dry_run: bool,
) -> int:
    """Settled quarantine entries past their source's class's period; a source the environment
    does not list (any more) is in the standard class."""
    known = sorted(environment.sources)
    total = 0
    for name, cutoff in cutoffs.items():
        members = [s for s in known if environment.retention_class_of(s) == name]
        where = "source = ANY(%s)"
        params: tuple = (env, cutoff, members)
        if name == STANDARD_CLASS:
            where = "(source = ANY(%s) OR NOT source = ANY(%s))"
            params = (env, cutoff, members, known)
        query = (
            "FROM audit_platform.quarantine WHERE env = %s AND status <> 'waiting'"
            f" AND commit_time < %s AND {where}"
        )
        if dry_run:
            total += one(state.execute(f"SELECT count(*) {query}", params))[0]
        else:
            total += state.execute(f"DELETE {query}", params).rowcount
    return total


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
            environment=environment,
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
    found = client.options(ignore_status=404).indices.get(index=index_pattern(env))
    for name in sorted(found):
        parsed = parse_index_name(name)
        if parsed and parsed.env == env and _holding(client, holds, name):
            client.ilm.remove_policy(index=name)
