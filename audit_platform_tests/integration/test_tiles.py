"""Proofs from tiles against the O(n) reference (``merkle.inclusion_proof`` and
``consistency_proof``, RFC 9162's recursion word for word): the same bytes for every size tried,
around the 256-leaf tile and 65,536-leaf second-level boundaries included, each checked by the
offline checker's own code; tiles healed after a crash at each tile write, on both stores; and
a log written before tiles existed made provable by its next append."""

from __future__ import annotations

import importlib.util
import json
import random
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from audit_platform.faults import SimulatedCrash, armed
from audit_platform.staging import StagingStore
from audit_platform.trust import log as log_module
from audit_platform.trust import merkle
from audit_platform.trust.leaves import LEAF_SCHEMA
from audit_platform.trust.log import TrustLog
from audit_platform.trust.proofs import NotProvable, consistency, inclusion
from audit_platform_tests.helpers import ON_BOTH_STORES

NOW = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)
BIG = 65_536 + 600


def _checker():
    """docs/verify_record.py, the script auditors run (standard library only)."""
    path = Path(__file__).parents[2] / "docs" / "verify_record.py"
    spec = importlib.util.spec_from_file_location("verify_record", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hashes(first: int, count: int, salt: str = "") -> list[bytes]:
    return [merkle.leaf_hash(f"{salt}{i}".encode()) for i in range(first, first + count)]


def leaves(first: int, count: int, salt: str = "") -> pl.DataFrame:
    """``count`` change leaves, one transaction each, LSNs after ``first``'s."""
    lsns = list(range(first + 1, first + count + 1))
    return pl.DataFrame(
        {
            "position": [None] * count,
            "kind": ["change"] * count,
            "lsn": lsns,
            "seq": [0] * count,
            "xid": lsns,
            "time": [NOW] * count,
            "record_id": [f"r{lsn}" for lsn in lsns],
            "hash": hashes(first, count, salt),
        },
        schema=LEAF_SCHEMA,
    )


def build(root: str, batches: list[int]) -> tuple[TrustLog, list[bytes]]:
    """A log appended in batches of these sizes, and its leaf hashes."""
    log, size = TrustLog(StagingStore(root, "test", "shop")), 0
    for count in batches:
        assert log.append(leaves(size, count)) == count
        size += count
    return log, hashes(0, size)


def tile_files(log: TrustLog) -> dict[str, bytes]:
    store = log.store
    return {
        p.rsplit("/tiles/", 1)[1]: store.fs.cat_file(p) for p in store.glob(f"{log.dir}/tiles/*/*")
    }


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A log of 65,536 + 600 leaves, appended in uneven batches (some cut inside a tile)."""
    rng, batches, total = random.Random(24), [], 0
    while total < BIG:
        count = min(BIG - total, rng.choice([1, 7, 255, 256, 257, 1000, 4096, 9000]))
        batches.append(count)
        total += count
    return build(str(tmp_path_factory.mktemp("big")), batches)


def _check_sizes(log: TrustLog, all_hashes: list[bytes], sizes, indices, olds) -> int:
    """Every proof for these sizes, from tiles and from the reference, compared and verified."""
    checker, tiles, checked = _checker(), log.tiles.reader(), 0
    for size in sizes:
        top = merkle.root(all_hashes[:size])
        assert tiles.root(size) == top, size
        for index in sorted({i for i in indices(size) if 0 <= i < size}):
            path = inclusion(log, index, size)
            reference = merkle.inclusion_proof(all_hashes, index, size)
            assert path == [h.hex() for h in reference], (index, size)
            as_bytes = [bytes.fromhex(h) for h in path]
            assert checker.root_from_path(all_hashes[index], index, size, as_bytes) == top
            checked += 1
        for old in sorted({o for o in olds(size) if 1 <= o <= size}):
            proof = consistency(log, old, size)
            reference = merkle.consistency_proof(all_hashes, old, size)
            assert proof == [h.hex() for h in reference], (old, size)
            old_root = merkle.root(all_hashes[:old])
            assert merkle.verify_consistency(old, size, old_root, top, reference)
            checked += 1
    return checked


def test_every_proof_of_small_trees_is_the_reference_byte_for_byte(big):
    log, all_hashes = big
    checked = _check_sizes(log, all_hashes, range(1, 70), range, lambda n: range(1, n + 1))
    assert checked == sum(2 * n for n in range(1, 70))


def test_proofs_around_tile_boundaries_are_the_reference_byte_for_byte(big):
    log, all_hashes = big
    sizes = [n + d for n in (256, 512, 768, 256 * 255) for d in (-2, -1, 0, 1, 2)]
    sizes += [65_535, 65_536, 65_537, 65_536 + 257, BIG]

    def indices(n):
        return [0, 1, 127, 255, 256, 257, 511, 512, n // 2, 65_535, 65_536, n - 257, n - 2, n - 1]

    def olds(n):
        return [1, 2, 255, 256, 257, 1000, 65_535, 65_536, 65_537, n // 3, n - 256, n - 1, n]

    assert _check_sizes(log, all_hashes, sizes, indices, olds) == 469


def test_tiles_are_256_hashes_per_level_written_as_leaves_arrive(big):
    log, all_hashes = big
    files = tile_files(log)
    level0 = [n for n in files if n.startswith("0/")]
    assert len(level0) == (BIG + 255) // 256
    assert all(len(files[n]) == 256 * 32 for n in level0[:-1])
    assert files[level0[-1]] == b"".join(all_hashes[(BIG // 256) * 256 :])  # the partial one
    assert files["1/000000000000"][:32] == merkle.root(all_hashes[:256])
    assert files["2/000000000000"] == merkle.root(all_hashes[:65_536])
    assert log.state().tiled == BIG


@ON_BOTH_STORES
def test_a_crash_at_each_tile_write_then_a_rerun_rewrites_the_same_tiles(staging_root):
    """An append of 300 leaves onto 250 writes four tiles (three of level 0, one of level 1);
    it is cut after each. The next append, with other leaves (a crashed attempt's must not
    survive past the log's size), leaves the tiles a log that never crashed has."""
    clean, _ = build(f"{staging_root}/clean", [250, 300])
    expected = tile_files(clean)
    for nth in range(1, 5):
        log, _ = build(f"{staging_root}/crash{nth}", [250])
        with armed("trust.tile_written", nth=nth), pytest.raises(SimulatedCrash):
            log.append(leaves(250, 300, salt="lost"))
        assert log.state().size == log.state().tiled == 250
        assert log.append(leaves(250, 300)) == 300
        assert tile_files(log) == expected, nth
        all_hashes = hashes(0, 550)
        for index in (0, 249, 255, 256, 549):
            assert inclusion(log, index, 550) == [
                h.hex() for h in merkle.inclusion_proof(all_hashes, index, 550)
            ]


@ON_BOTH_STORES
def test_a_log_from_before_tiles_is_tiled_once_by_its_next_append(staging_root, monkeypatch):
    log, all_hashes = build(staging_root, [3, 300, 1, 500])
    state = json.loads(log.store.fs.cat_file(f"{log.dir}/log.json"))
    del state["tiled"]  # log.json as the code before tiles wrote it, and no tiles
    log.store.write_json(f"{log.dir}/log.json", state)
    log.store.fs.rm(f"{log.dir}/tiles", recursive=True)
    assert log.state().tiled == 0
    with pytest.raises(NotProvable, match="tiled once by its next append"):
        inclusion(log, 5, 804)
    monkeypatch.setattr(log_module, "TILE_CHUNK", 100)  # several chunks, cut inside files
    assert log.append(leaves(0, 804)) == 0  # nothing new (a rerun), but the tiles are built
    assert log.state().tiled == 804
    clean, _ = build(f"{staging_root}/clean", [804])
    assert tile_files(log) == tile_files(clean)
    assert consistency(log, 5, 804) == [
        h.hex() for h in merkle.consistency_proof(all_hashes, 5, 804)
    ]
    assert log.append(leaves(804, 10)) == 10  # and appends carry on tiling
    assert log.state().tiled == 814
    assert log.tiles.reader().root(814) == log.state().frontier.root()
