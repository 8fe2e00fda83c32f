"""A source database set up for capture, for the capture tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import psycopg
from elasticsearch import Elasticsearch

from audit_platform.capture.run import CaptureResult, capture
from audit_platform.enrich.batch import enrich_pending, resolve_quarantine
from audit_platform.index.batch import index_pending
from audit_platform.index.template import install_template
from audit_platform.naming import read_alias
from audit_platform.policy import SourcePolicy
from audit_platform.settings import Settings
from audit_platform.sources.setup import setup_source
from audit_platform.staging import StagingStore
from audit_platform.trust.log import TrustLog
from audit_platform.verify import Window, verify_source, waiting_changes

MASK_KEY = b"test-mask-key"


@dataclass
class CaptureSource:
    url: str
    env: str
    policy: SourcePolicy
    store: StagingStore

    def execute(self, statements: str, params=None) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(statements, params)

    def capture(self, **kwargs) -> CaptureResult:
        return capture(self.url, self.env, self.policy, self.store, mask_key=MASK_KEY, **kwargs)

    def staged(self, dataset: str = "changes") -> pl.DataFrame:
        frame = self.store.read_all(dataset)
        assert frame is not None, f"nothing staged in {dataset}"
        return frame.sort("lsn", "change_index" if dataset == "changes" else "seq")


def make_source(
    url: str, staging: Path | str, ddl: str, policy: SourcePolicy, env: str = "test"
) -> CaptureSource:
    """``staging``: a staging root URL, or a test's folder to stage under."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(ddl)
    setup_source(url, env, policy, Settings().resources_dir / "sql")
    root = str(staging / "staging") if isinstance(staging, Path) else staging
    store = StagingStore(root, env, policy.source)
    return CaptureSource(url, env, policy, store)


def images(frame: pl.DataFrame, column: str) -> list[dict | None]:
    return [None if v is None else json.loads(v) for v in frame[column]]


def capture_enrich_index(
    source: CaptureSource,
    state: psycopg.Connection,
    es: Elasticsearch,
    *,
    grace: timedelta = timedelta(minutes=10),
    database: str = "shopdb",
) -> int:
    """Run the pipeline's three steps on everything written so far, as a capture run does;
    returns records indexed.

    The template is installed first, as the Dagster template asset does before any index run.
    """
    install_template(es, Settings().resources_dir, source.env, replicas=0)
    source.capture()
    now = datetime.now(UTC)
    enrich_pending(source.store, state, source.policy, now=now, grace=grace)
    hours = index_pending(es, source.store, database=database, now=now, feed=state)
    assert not any(h.failed for h in hours), [h.metadata for h in hours]
    indexed = sum(h.indexed for h in hours)
    es.indices.refresh(index=read_alias(source.env))
    return indexed


@dataclass
class Trail:
    """A source and its signed trail, taken through the pipeline's steps as a capture run
    takes them (the trust and erasure tests)."""

    source: CaptureSource
    state: psycopg.Connection
    es: object
    key: object
    env: str

    def run(self) -> None:
        """One capture run: capture, enrich and log, resolve the quarantine, index (feeding
        the streams), sign."""
        self.source.capture()
        now = datetime.now(UTC)
        enrich_pending(
            self.source.store, self.state, self.source.policy, now=now, grace=timedelta(0)
        )
        resolve_quarantine(
            self.source.store, self.state, self.source.policy, now=now, grace=timedelta(0)
        )
        index_pending(self.es, self.source.store, database="shopdb", now=now, feed=self.state)
        self.es.indices.refresh(index=read_alias(self.env))
        TrustLog(self.source.store).checkpoint(self.key, now)

    def verify(self, **kwargs):
        window = Window(datetime.now(UTC) + timedelta(hours=1), indexing_lag=timedelta(0))
        return verify_source(
            self.source.store,
            self.es,
            self.source.policy,
            self.key.public_key(),
            since=None,
            until=None,
            window=window,
            waiting=waiting_changes(self.state, self.env, "shop"),
            **kwargs,
        )

    def write(self, sql: str, context: dict | None = None) -> int:
        with psycopg.connect(self.source.url) as conn:
            if context is not None:
                conn.execute("SELECT audit.set_context(%s::jsonb)", (json.dumps(context),))
            conn.execute(sql)
            return int(conn.execute("SELECT pg_current_xact_id()::text").fetchone()[0])

    def hits(self) -> list[dict]:
        found = self.es.search(index=read_alias(self.env), size=1000, sort=["_doc"])
        return found["hits"]["hits"]
