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
from audit_platform.enrich.batch import enrich_pending
from audit_platform.index.batch import index_pending
from audit_platform.index.template import install_template
from audit_platform.naming import read_alias
from audit_platform.policy import SourcePolicy
from audit_platform.settings import Settings
from audit_platform.sources.setup import setup_source
from audit_platform.staging import StagingStore

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
