"""A compact map from sha256 digests to int64 values: sorted numpy segments, no Python dict.

Why: the embedding cache and the stage's "already queued" set hold one entry per distinct text.
A Python dict of hex strings costs ~200 bytes an entry (2 GB at ten million candidates); raw
32-byte digests in sorted arrays cost 40 (digest + value), and a chunk of lookups is a handful
of vectorised ``searchsorted`` calls.

Each :meth:`DigestIndex.add` appends one sorted segment (duplicates inside it keep their first
value); a lookup asks the segments oldest first, so the first value ever added for a digest wins,
as ``dict.setdefault`` would.  The newest segment merges into the one before it while that one is
at most twice its size and the two hold at most :data:`SEGMENT_ROWS` (a binary counter, as in a
log-structured merge): lookups stay a few dozen binary searches, and a merge never needs more
temporary memory than a few times one segment, however many digests there are.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DIGEST = np.dtype("S32")

SEGMENT_ROWS = 1 << 18
"""Largest merged segment (10 MB of digests and values; a merge needs ~3x that for a moment);
ten million digests make ~40 segments, a lookup of a chunk ~40 binary searches."""


def pack(hex_digests: Sequence[str]) -> np.ndarray:
    """Hex sha256 digests (64 characters each) as a (n,) array of raw 32-byte digests."""
    if not len(hex_digests):
        return np.zeros(0, dtype=DIGEST)
    raw = bytes.fromhex("".join(hex_digests))
    if len(raw) != 32 * len(hex_digests):
        raise ValueError("digests must be 64 hex characters each")
    return np.frombuffer(raw, dtype=DIGEST)


def first_unique(keys: np.ndarray) -> np.ndarray:
    """Positions of the first occurrence of each distinct key, in order of appearance."""
    if not len(keys):
        return np.zeros(0, dtype=np.int64)
    _, first = np.unique(keys, return_index=True)
    return np.sort(first)


class DigestIndex:
    """digest -> int64 value, first value added wins; ``-1`` means absent."""

    def __init__(self) -> None:
        self._segments: list[tuple[np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        """Entries stored (a digest added to two segments counts twice until they merge)."""
        return sum(len(keys) for keys, _ in self._segments)

    def nbytes(self) -> int:
        return sum(keys.nbytes + values.nbytes for keys, values in self._segments)

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Add ``keys`` (packed digests) with ``values`` (int64, same length)."""
        if len(keys) != len(values):
            raise ValueError("keys and values must have the same length")
        if not len(keys):
            return
        unique, first = np.unique(keys, return_index=True)
        self._segments.append((unique, np.asarray(values, dtype=np.int64)[first]))
        while len(self._segments) > 1:
            (old_keys, old_values), (new_keys, new_values) = self._segments[-2:]
            if len(old_keys) > 2 * len(new_keys) or len(old_keys) + len(new_keys) > SEGMENT_ROWS:
                break
            keys = np.concatenate([old_keys, new_keys])
            unique, first = np.unique(keys, return_index=True)  # first = the older segment's
            self._segments[-2:] = [(unique, np.concatenate([old_values, new_values])[first])]

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The value of each key, ``-1`` where absent."""
        out = np.full(len(keys), -1, dtype=np.int64)
        todo = np.arange(len(keys))
        for seg_keys, seg_values in self._segments:
            if not len(todo):
                break
            wanted = keys[todo]
            pos = np.minimum(np.searchsorted(seg_keys, wanted), len(seg_keys) - 1)
            hit = seg_keys[pos] == wanted
            out[todo[hit]] = seg_values[pos[hit]]
            todo = todo[~hit]
        return out
