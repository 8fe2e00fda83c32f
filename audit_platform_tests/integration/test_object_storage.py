"""What object storage changes: no rename, so no temporary files; create-only writes for what must
never be replaced; listings that come back in the form the store writes. The pipeline's own
tests (capture, crash points, enrichment, indexing, retention, backfill, the trust job) run on
both stores through ``ON_BOTH_STORES``; these cover the store's primitives directly."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from audit_platform.faults import SimulatedCrash, armed
from audit_platform.signing import new_private_key, private_key
from audit_platform.staging import StagingStore
from audit_platform.trust.leaves import LEAF_SCHEMA
from audit_platform.trust.log import TrustLog, checkpoint_hash
from audit_platform_tests.helpers import ON_BOTH_STORES

NOW = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)


def _leaves(lsns: list[int]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "position": [0] * len(lsns),
            "kind": ["change"] * len(lsns),
            "lsn": lsns,
            "seq": [0] * len(lsns),
            "xid": lsns,
            "time": [NOW] * len(lsns),
            "record_id": [f"r{lsn}" for lsn in lsns],
            "hash": [hashlib.sha256(str(lsn).encode()).digest() for lsn in lsns],
        },
        schema=LEAF_SCHEMA,
    )


@ON_BOTH_STORES
def test_a_create_only_write_never_replaces_what_is_there(staging_root):
    store = StagingStore(staging_root, "test", "shop")
    path = f"{store.base}/_trust/checkpoints/000000000000.json"
    assert store.write_json(path, {"first": True}, create=True)
    assert not store.write_json(path, {"second": True}, create=True)
    assert store.read_json(path) == {"first": True}
    assert store.glob(f"{store.base}/_trust/checkpoints/*") == [path]  # no temporary left
    store.write_json(path, {"replaced": True})  # an ordinary write still replaces
    assert store.read_json(path) == {"replaced": True}


@ON_BOTH_STORES
def test_listings_name_files_as_the_store_wrote_them(staging_root):
    store = StagingStore(staging_root, "test", "shop")
    frame = pl.DataFrame({"lsn": [5, 9], "commit_time": [NOW, NOW + timedelta(hours=1)]})
    written = [f.path for f in store.write("changes", frame)]
    assert store.files("changes") == sorted(written)
    assert all(p.startswith(staging_root) for p in written)
    assert store.derived_path(written[0], "records").startswith(f"{store.base}/records/")
    assert [h for h, _ in store.hour_folders()] == [NOW, NOW + timedelta(hours=1)]


@ON_BOTH_STORES
def test_a_checkpoint_published_before_a_crash_is_adopted_not_signed_again(staging_root):
    """The signed checkpoint may already be in an auditor's hands: the rerun keeps it."""
    log = TrustLog(StagingStore(staging_root, "test", "shop"))
    key = private_key(new_private_key())
    log.append(_leaves([10, 20]))
    with armed("trust.checkpoint_published"), pytest.raises(SimulatedCrash):
        log.checkpoint(key, NOW)
    [(path, published)] = log.checkpoints()
    assert log.state().checkpoint is None  # the crash came before the log recorded it

    log.checkpoint(key, NOW + timedelta(minutes=5))
    assert log.checkpoints() == [(path, published)]
    assert log.state().checkpoint["hash"] == checkpoint_hash(published["checkpoint"])

    log.append(_leaves([30]))
    nxt = log.checkpoint(key, NOW + timedelta(minutes=10))
    assert nxt["checkpoint"]["seq"] == 1 and nxt["checkpoint"]["tree_size"] == 3
    assert nxt["checkpoint"]["previous"] == checkpoint_hash(published["checkpoint"])
