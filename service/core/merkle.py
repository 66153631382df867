"""Merkle trees as RFC 9162 (Certificate Transparency 2.0) defines them, section 2.1.

Hashing: a leaf is SHA-256(0x00 || entry), an inner node SHA-256(0x01 || left || right), and the
tree hash of n leaves, MTH(D[n]), splits at the largest power of two smaller than n. Proofs here
are lists of *ranges* [a, b) of leaves whose MTH the proof carries, so the store can fetch every
node a proof needs in one query: each range splits into perfect, aligned subtrees (``perfect``),
which are the nodes the sequencer keeps. Pure functions; nothing here touches the database.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()  # MTH({}) (RFC 9162 2.1.1)


def leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def split(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def perfect(a: int, b: int) -> list[tuple[int, int]]:
    """The perfect aligned subtrees covering [a, b) from the left, as (level, index): their MTH,
    folded from the right, is MTH(D[a:b]) for every range a proof or a root uses."""
    out = []
    while a < b:
        level = (a & -a).bit_length() - 1 if a else (b - a).bit_length() - 1
        while a + (1 << level) > b:
            level -= 1
        out.append((level, a >> level))
        a += 1 << level
    return out


def fold(hashes: Sequence[bytes]) -> bytes:
    """MTH of consecutive perfect subtrees (the largest first), as ``perfect`` lists them."""
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):
        acc = node_hash(h, acc)
    return acc


def inclusion_ranges(m: int, n: int) -> list[tuple[int, int]]:
    """PATH(m, D[n]) of RFC 9162 2.1.3.1, as leaf ranges, the leaf's sibling first."""
    out: list[tuple[int, int]] = []
    a, b = 0, n
    while b - a > 1:
        k = split(b - a)
        if m < a + k:
            out.append((a + k, b))
            b = a + k
        else:
            out.append((a, a + k))
            a = a + k
    return out[::-1]


def consistency_ranges(m: int, n: int) -> list[tuple[int, int]]:
    """PROOF(m, D[n]) of RFC 9162 2.1.4.1 (0 < m <= n), as leaf ranges."""
    out: list[tuple[int, int]] = []
    a, b, complete = 0, n, True
    while m != b:
        k = split(b - a)
        if m <= a + k:
            out.append((a + k, b))
            b = a + k
        else:
            out.append((a, a + k))
            a, complete = a + k, False
    if not complete:
        out.append((a, b))
    return out[::-1]


def nodes_for(ranges: Sequence[tuple[int, int]]) -> set[tuple[int, int]]:
    return {node for a, b in ranges for node in perfect(a, b)}


def range_hashes(ranges: Sequence[tuple[int, int]], node: Callable[[int, int], bytes]) -> list[bytes]:
    return [fold([node(level, index) for level, index in perfect(a, b)]) for a, b in ranges]


def root_from_inclusion(index: int, size: int, leaf: bytes, path: Sequence[bytes]) -> bytes | None:
    """The root that ``path`` proves ``leaf`` at ``index`` into, following RFC 9162 2.1.3.2;
    None when the path cannot be a proof for that index and size."""
    if index >= size:
        return None
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    return r if sn == 0 else None


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes,
                       proof: Sequence[bytes]) -> bool:
    """RFC 9162 2.1.4.2: does ``proof`` show that the tree of ``second`` leaves extends the tree
    of ``first`` leaves?"""
    if not 0 < first <= second:
        return False
    if first == second:
        return not proof and first_root == second_root
    if not proof:
        return False
    path = list(proof)
    if first & (first - 1) == 0:  # a power of two: the old root is the first node
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1
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
    return sn == 0 and fr == first_root and sr == second_root
