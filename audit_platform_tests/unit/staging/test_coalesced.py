"""How many waiting batches a downstream step takes together (pure logic on local Parquet)."""

from __future__ import annotations

import polars as pl

from audit_platform.staging.store import COALESCE_ROWS, PendingBatch, StagingStore, coalesced


def _entry(store: StagingStore, name: str, rows: int) -> PendingBatch:
    path = f"{store.base}/contexts/{name}.parquet"
    store.write_file(path, pl.DataFrame({"context": ["x" * 100] * rows}))
    return PendingBatch(name, f"{store.base}/_pending/{name}.json", (path,))


def test_later_batches_join_a_group_only_within_the_row_bound(tmp_path):
    """A role that may call ``audit.set_context`` can fill batches with contexts: a group is
    its first batch (bounded as any) plus at most ``COALESCE_ROWS`` rows, never sixteen full
    batches; small batches still go together, up to ``most``."""
    store = StagingStore(str(tmp_path), "test", "shop")
    big = [_entry(store, f"big{n}", COALESCE_ROWS * 6 // 10) for n in range(3)]
    groups = list(coalesced(store, big, lambda e: list(e.staged)))
    assert [[e.name for e in g] for g in groups] == [["big0", "big1"], ["big2"]]
    small = [_entry(store, f"small{n:02d}", 10) for n in range(20)]
    assert [len(g) for g in coalesced(store, small, lambda e: list(e.staged), most=16)] == [16, 4]
    gone = PendingBatch("gone", "x", (f"{store.base}/contexts/missing.parquet",))
    assert [len(g) for g in coalesced(store, [small[0], gone], lambda e: list(e.staged))] == [2]
