"""The log's hashes stored in tiles, so a proof reads ``O(log n)`` small files instead of every
leaf hash (the layout of C2SP tlog-tiles, as Tessera and Go's sumdb use it).

A tile holds up to 256 consecutive hashes of one *level*: level 0 holds leaf hashes, level
``L`` the roots of the perfect subtrees of ``256**L`` leaves (each the root of a full tile of the
level below). Tile ``(L, N)`` is ``<log>/tiles/<L>/<N, 12 digits>``: its hashes concatenated,
32 bytes each, for positions ``256 N`` onwards. Unlike tlog-tiles, a partial tile is not a
separate file: it is the same file, rewritten whole as it grows until it holds 256 hashes (a
write replaces a file atomically on both stores, and the tree only appends, so what a tile held
before it grew is still its prefix). Readers take the prefix they need and ignore the rest.

Any node of the tree is then a perfect subtree of height ``h = 8 L + r`` (``r < 8``): ``2**r``
consecutive hashes of one level-``L`` tile, hashed up ``r`` times (at most 255 hashes); and any
proof is ``O(log n)`` such nodes. A request's memory and time do not depend on the log's size.

Writing: :meth:`Tiles.append` adds the hashes of leaves ``size..`` to tiles that already hold
``[0, size)``, as the log appends them. It rereads only the one partial tile of each level it
extends, keeps its first ``size`` hashes and drops anything past them (what a crashed append
left), so a rerun after a crash rewrites the same tiles with the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

from audit_platform.faults import crash_point
from audit_platform.staging.store import StagingStore
from audit_platform.trust import merkle

WIDTH = 256
#: Tree levels per tile level: a full tile's 256 hashes are one node 8 levels up.
HEIGHT = 8
HASH = 32


class TilesMissing(LookupError):
    """A tile a proof needs is not written yet, or holds fewer hashes than it needs."""


class Tiles:
    """The tiles of one log, under ``folder`` (``<log>/tiles``) of ``store``."""

    def __init__(self, store: StagingStore, folder: str) -> None:
        self.store = store
        self.folder = folder

    def path(self, level: int, index: int) -> str:
        return f"{self.folder}/{level}/{index:012d}"

    def read(self, level: int, index: int) -> bytes:
        """The tile's bytes, or none if it is not written."""
        try:
            return self.store.fs.cat_file(self.path(level, index))
        except FileNotFoundError:
            return b""

    # -- writing ------------------------------------------------------------------------------

    def append(self, size: int, hashes: Sequence[bytes]) -> None:
        """Add ``hashes`` as leaves ``size, size + 1, ...`` to tiles holding leaves ``[0, size)``.

        Each level's new hashes fill its partial tile and then new tiles; every tile that
        becomes full gives one new hash to the level above.
        """
        level, start, new = 0, size, list(hashes)
        while new:
            first, offset = divmod(start, WIDTH)
            kept = self.read(level, first)[: offset * HASH] if offset else b""
            if len(kept) < offset * HASH:
                raise TilesMissing(
                    f"tile {level}/{first} holds {len(kept) // HASH} hashes, fewer than the "
                    f"{offset} before position {start} (tiles not built for this log?)"
                )
            row = [kept[i : i + HASH] for i in range(0, len(kept), HASH)] + new
            above = []
            for n in range(0, len(row), WIDTH):
                tile = row[n : n + WIDTH]
                self.store.write_bytes(self.path(level, first + n // WIDTH), b"".join(tile))
                crash_point("trust.tile_written")
                if len(tile) == WIDTH:  # full now (it held position ``start``, so was not before)
                    above.append(merkle.root(tile))
            level, start, new = level + 1, start // WIDTH, above

    # -- reading ------------------------------------------------------------------------------

    def reader(self) -> TileReader:
        return TileReader(self)


class TileReader:
    """Nodes and proofs from the tiles, for one request: tiles read are kept until it ends
    (a proof reads a few dozen tiles at most, and often the same one twice)."""

    def __init__(self, tiles: Tiles) -> None:
        self.tiles = tiles
        self._read: dict[tuple[int, int], bytes] = {}

    def _tile(self, level: int, index: int) -> bytes:
        key = (level, index)
        if key not in self._read:
            self._read[key] = self.tiles.read(level, index)
        return self._read[key]

    def perfect(self, start: int, height: int) -> bytes:
        """The root of the perfect subtree of ``2**height`` leaves from ``start`` (a multiple
        of ``2**height``)."""
        level, rest = divmod(height, HEIGHT)
        index, offset = divmod(start >> (HEIGHT * level), WIDTH)
        count = 1 << rest
        tile = self._tile(level, index)
        if len(tile) < (offset + count) * HASH:
            raise TilesMissing(
                f"tile {level}/{index} holds {len(tile) // HASH} hashes; a proof needs "
                f"{offset + count} (tiles not built this far yet)"
            )
        return merkle.root([tile[i * HASH : (i + 1) * HASH] for i in range(offset, offset + count)])

    def leaf(self, index: int) -> bytes:
        return self.perfect(index, 0)

    def subtree(self, start: int, end: int) -> bytes:
        """RFC 9162's MTH of leaves ``[start, end)``, for a range that is a node of the tree:
        ``start`` a multiple of the power of two at or above ``end - start``. Its perfect
        subtrees, largest first, folded from the right (as :class:`merkle.Frontier` does)."""
        peaks, at, count = [], start, end - start
        for height in reversed(range(count.bit_length())):
            if count >> height & 1:
                peaks.append(self.perfect(at, height))
                at += 1 << height
        node = peaks[-1]
        for left in reversed(peaks[:-1]):
            node = merkle.node_hash(left, node)
        return node

    def root(self, size: int) -> bytes:
        return merkle.EMPTY_ROOT if size == 0 else self.subtree(0, size)

    def _path(self, start: int, height: int, size: int) -> list[bytes]:
        """The siblings of the node ``(start, height)`` on its way to the root of ``size``
        leaves. The tree of ``size`` leaves is the perfect tree of the next power of two with
        every node past ``size`` cut and every node left with one child replaced by it; so at
        each height the sibling is the aligned block next to ours, cut at ``size``, and
        absent when it starts past it."""
        proof = []
        while (1 << height) < size:
            sibling = (start >> height << height) ^ (1 << height)
            if sibling < size:
                proof.append(self.subtree(sibling, min(sibling + (1 << height), size)))
            height += 1
        return proof

    def inclusion(self, index: int, size: int) -> list[bytes]:
        """RFC 9162 2.1.3.1's audit path of leaf ``index`` in the tree of ``size`` leaves."""
        if not 0 <= index < size:
            raise ValueError(f"leaf {index} is not in a tree of {size} leaves")
        return self._path(index, 0, size)

    def consistency(self, old: int, new: int) -> list[bytes]:
        """RFC 9162 2.1.4.1's proof that the tree of ``old`` leaves is a prefix of ``new``'s: the
        old tree's last perfect subtree (left out when it is the whole old tree, a power of
        two), then that subtree's audit path in the new tree."""
        if not 0 < old <= new:
            raise ValueError(f"no consistency proof from {old} to {new} leaves")
        if old == new:
            return []
        height = (old & -old).bit_length() - 1
        start = old - (1 << height)
        first = [self.perfect(start, height)] if start else []
        return first + self._path(start, height, new)
