"""The Merkle tree against RFC 6962's definition and Certificate Transparency's test vectors, and
every proof for every pair of sizes up to a few dozen leaves, valid and mutated."""

from __future__ import annotations

import hashlib
import json

import pytest

from audit_platform.trust.leaves import canonical
from audit_platform.trust.merkle import (
    EMPTY_ROOT,
    Frontier,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root,
    verify_consistency,
    verify_inclusion,
)

#: The leaves of the test tree in Certificate Transparency's merkle_tree_test, and its roots
#: for sizes 1 to 8.
CT_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    bytes(range(0x50, 0x58)),
    bytes(range(0x60, 0x70)),
]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
LEAVES = [leaf_hash(str(i).encode()) for i in range(70)]


def mth(leaves: list[bytes]) -> bytes:
    """RFC 6962 section 2.1, word for word (recursive): the reference."""
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return leaves[0]
    k = 1
    while k * 2 < n:
        k *= 2
    return node_hash(mth(leaves[:k]), mth(leaves[k:]))


def test_roots_are_certificate_transparencys():
    hashes = [leaf_hash(d) for d in CT_LEAVES]
    assert [root(hashes[: n + 1]).hex() for n in range(8)] == CT_ROOTS
    assert root([]) == EMPTY_ROOT


def test_the_frontier_gives_the_root_of_every_size_as_leaves_are_appended():
    frontier = Frontier()
    for n, leaf in enumerate(LEAVES, start=1):
        frontier.append(leaf)
        assert frontier.size == n
        assert frontier.root() == root(LEAVES[:n]) == mth(LEAVES[:n])
        assert Frontier.from_json(frontier.to_json()) == frontier


@pytest.mark.parametrize("size", range(1, 34))
def test_every_inclusion_proof_verifies_and_no_mutation_of_it_does(size):
    top = root(LEAVES[:size])
    for index in range(size):
        proof = inclusion_proof(LEAVES, index, size)
        assert verify_inclusion(LEAVES[index], index, size, proof, top)
        assert not verify_inclusion(LEAVES[index], index, size, proof, leaf_hash(b"wrong"))
        assert not verify_inclusion(LEAVES[-1], index, size, proof, top)
        if size > 1:
            assert not verify_inclusion(LEAVES[index], (index + 1) % size, size, proof, top)
            assert not verify_inclusion(LEAVES[index], index, size, proof[:-1], top)
            assert not verify_inclusion(LEAVES[index], index, size, [*proof, top], top)
            flipped = [bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:]]
            assert not verify_inclusion(LEAVES[index], index, size, flipped, top)


@pytest.mark.parametrize("new", range(1, 34))
def test_every_consistency_proof_verifies_and_no_mutation_of_it_does(new):
    new_root = root(LEAVES[:new])
    for old in range(1, new + 1):
        old_root = root(LEAVES[:old])
        proof = consistency_proof(LEAVES, old, new)
        assert verify_consistency(old, new, old_root, new_root, proof), (old, new)
        if old < new:
            wrong = leaf_hash(b"wrong")
            assert not verify_consistency(old, new, wrong, new_root, proof)
            assert not verify_consistency(old, new, old_root, wrong, proof)
            assert not verify_consistency(old, new, old_root, new_root, proof[:-1])
            # A tree whose first leaves were rewritten is not an extension of the old one.
            forged = [leaf_hash(b"forged"), *LEAVES[1:new]]
            forged_proof = consistency_proof(forged, old, new)
            assert not verify_consistency(old, new, old_root, root(forged), forged_proof)


def test_proofs_refuse_positions_outside_the_tree():
    with pytest.raises(ValueError):
        inclusion_proof(LEAVES, 5, 5)
    with pytest.raises(ValueError):
        consistency_proof(LEAVES, 0, 5)
    assert not verify_inclusion(LEAVES[0], 3, 3, [], LEAVES[0])


CHARACTERS = [chr(i) for i in range(0x250)] + [
    "\u2028",
    "\u2029",
    "\ud7ff",
    "\ue000",
    "\uffff",
    "\U0001f600",
    "\U0010ffff",
]


@pytest.mark.parametrize("character", CHARACTERS, ids=lambda c: f"U+{ord(c):04X}")
def test_leaves_are_serialized_as_the_documented_json_dumps_gives(character):
    """The offline checker (docs/verify_record.py) uses the standard library; the log uses
    orjson for speed: both must give the same bytes, escapes and key order included."""
    leaf = {
        "k" + character: "v" + character + '"\\',
        "a": [character, None],
        "z": {character: "x", "b": None},
        character: "",
    }
    documented = json.dumps(leaf, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    assert canonical(leaf) == documented.encode()
