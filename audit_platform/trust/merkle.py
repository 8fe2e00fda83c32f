"""Merkle trees as RFC 6962 and RFC 9162 (Certificate Transparency) define them, and their proofs.

``leaf_hash(d) = SHA-256(0x00 || d)``, ``node_hash(l, r) = SHA-256(0x01 || l || r)``; the tree of
``n`` leaves splits at the largest power of two below ``n``. Inclusion and consistency proofs are
RFC 9162's (sections 2.1.3 and 2.1.4), and so are the verifiers, so an auditor's own
implementation of the RFC checks what this module produces.

The log only ever appends, so its root is kept as a :class:`Frontier`: the roots of the perfect
subtrees that make up the tree (one per 1-bit of its size). Appending ``k`` leaves costs
``O(k log n)``, whatever the size of the log.

:func:`inclusion_proof` and :func:`consistency_proof` take every leaf hash and cost ``O(n)``:
they are RFC 9162's recursion word for word, the reference that the proofs the API serves
(``trust.tiles``, ``O(log n)`` from stored tiles) are tested against byte for byte.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root(leaves: Sequence[bytes]) -> bytes:
    """The root of a tree of these leaf hashes (RFC 9162 MTH), computed level by level."""
    if not leaves:
        return EMPTY_ROOT
    level = list(leaves)
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])  # an odd node is promoted, as the split rule implies
        level = paired
    return level[0]


@dataclass
class Frontier:
    """The append-only tree as the roots of its perfect subtrees, largest (leftmost) first."""

    size: int = 0
    #: (height, hash) of each perfect subtree: the binary decomposition of ``size``.
    peaks: list[tuple[int, bytes]] = field(default_factory=list)

    def append(self, leaf: bytes) -> None:
        height, node = 0, leaf
        while self.peaks and self.peaks[-1][0] == height:
            _, left = self.peaks.pop()
            node, height = node_hash(left, node), height + 1
        self.peaks.append((height, node))
        self.size += 1

    def extend(self, leaves: Iterable[bytes]) -> None:
        for leaf in leaves:
            self.append(leaf)

    def root(self) -> bytes:
        if not self.peaks:
            return EMPTY_ROOT
        node = self.peaks[-1][1]
        for _, left in reversed(self.peaks[:-1]):
            node = node_hash(left, node)
        return node

    def to_json(self) -> dict:
        return {"size": self.size, "peaks": [[h, node.hex()] for h, node in self.peaks]}

    @classmethod
    def from_json(cls, body: dict) -> Frontier:
        return cls(body["size"], [(h, bytes.fromhex(node)) for h, node in body["peaks"]])


def inclusion_proof(leaves: Sequence[bytes], index: int, size: int) -> list[bytes]:
    """The audit path of leaf ``index`` in the tree of the first ``size`` leaves (RFC 9162
    2.1.3.1 PATH)."""
    if not 0 <= index < size <= len(leaves):
        raise ValueError(f"leaf {index} is not in a tree of {size} leaves")

    def path(m: int, lo: int, hi: int) -> list[bytes]:
        n = hi - lo
        if n == 1:
            return []
        k = _split(n)
        if m < k:
            return [*path(m, lo, lo + k), root(leaves[lo + k : hi])]
        return [*path(m - k, lo + k, hi), root(leaves[lo : lo + k])]

    return path(index, 0, size)


def consistency_proof(leaves: Sequence[bytes], old: int, new: int) -> list[bytes]:
    """The proof that the tree of ``old`` leaves is a prefix of the tree of ``new`` leaves
    (RFC 9162 2.1.4.1 PROOF)."""
    if not 0 < old <= new <= len(leaves):
        raise ValueError(f"no consistency proof from {old} to {new} leaves")

    def subproof(m: int, lo: int, hi: int, complete: bool) -> list[bytes]:
        n = hi - lo
        if m == n:
            return [] if complete else [root(leaves[lo:hi])]
        k = _split(n)
        if m <= k:
            return [*subproof(m, lo, lo + k, complete), root(leaves[lo + k : hi])]
        return [*subproof(m - k, lo + k, hi, False), root(leaves[lo : lo + k])]

    return subproof(old, 0, new, True)


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root_: bytes
) -> bool:
    """RFC 9162 2.1.3.2: does ``proof`` show ``leaf`` at ``index`` of the tree with ``root_``?"""
    if index >= size:
        return False
    fn, sn, node = index, size - 1, leaf
    for sibling in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            node = node_hash(sibling, node)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            node = node_hash(node, sibling)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and node == root_


def verify_consistency(
    old: int, new: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 2.1.4.2: is the tree (``old``, ``old_root``) a prefix of (``new``, ``new_root``)?"""
    if old == new:
        return not proof and old_root == new_root
    if not 0 < old < new or not proof:
        return False
    path = list(proof)
    if old & (old - 1) == 0:  # a power of two: the old root is the first node
        path.insert(0, old_root)
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and fr == old_root and sr == new_root
