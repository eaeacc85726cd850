"""Embedding files: aligned ``.npy`` + ``.parquet`` pairs, and a content-hash cache of shards.

An embedding set is two files with one prefix: ``<prefix>.npy`` (float32, (n, d), opened
memory-mapped so a million rows need not fit in RAM twice) and ``<prefix>.parquet`` (the ids of
the same rows, in the same order).  Both are written to temp names and renamed, so a crash never
leaves a mismatched pair.

The cache maps ``sha256(text)`` to a vector, in append-only shards under a folder keyed by the
encoder's fingerprint: a rerun embeds only texts it has not seen with this encoder.  The cache of
real texts lives under ``private/`` (the hash of a private text is private); the synthetic cache
is public like the synthetic texts.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def text_hash(text: str) -> str:
    """Content key of a text (sha256, hex)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def model_fingerprint(model_path: str | Path, extra: str = "") -> str:
    """Key of an encoder directory: its path and every file's name, size and mtime (cheap; a
    changed model file changes the key, so stale vectors are never reused)."""
    root = Path(model_path)
    digest = hashlib.sha256(f"{root.resolve()}|{extra}".encode())
    for item in sorted(root.rglob("*")):
        if item.is_file():
            stat = item.stat()
            digest.update(f"{item.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def write_set(prefix: Path, ids: pa.Table, vectors: np.ndarray) -> tuple[Path, Path]:
    """Write ``<prefix>.npy`` and ``<prefix>.parquet`` atomically (rows aligned)."""
    if len(ids) != len(vectors):
        raise ValueError("ids and vectors must have the same number of rows")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    npy, parquet = prefix.with_suffix(".npy"), prefix.with_suffix(".parquet")
    tmp_npy = _tmp_path(npy)
    tmp_parquet = _tmp_path(parquet)
    np.save(tmp_npy, np.ascontiguousarray(vectors, dtype=np.float32))
    pq.write_table(ids, tmp_parquet)
    os.replace(tmp_npy, npy)
    os.replace(tmp_parquet, parquet)
    return npy, parquet


def read_set(prefix: Path, mmap: bool = True) -> tuple[pa.Table, np.ndarray]:
    """The ids table and the (memory-mapped) vectors of an embedding set."""
    vectors = np.load(prefix.with_suffix(".npy"), mmap_mode="r" if mmap else None)
    ids = pq.read_table(prefix.with_suffix(".parquet"))
    if len(ids) != len(vectors):
        raise ValueError(f"{prefix}: ids and vectors disagree in length")
    return ids, vectors


def _tmp_path(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    return Path(tmp)


class EmbeddingCache:
    """Append-only shards ``part-NNNNN.{npy,parquet}`` mapping text hashes to vectors."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, tuple[int, int]] | None = None

    def _shards(self) -> list[Path]:
        return sorted(p.with_suffix("") for p in self.root.glob("part-*.parquet"))

    def index(self) -> dict[str, tuple[int, int]]:
        """hash -> (shard number, row); built once from the shards' parquet files."""
        if self._index is None:
            self._index = {}
            for number, shard in enumerate(self._shards()):
                hashes = pq.read_table(shard.with_suffix(".parquet"), columns=["hash"])
                for row, key in enumerate(hashes.column("hash").to_pylist()):
                    self._index.setdefault(key, (number, row))
        return self._index

    def dim(self) -> int | None:
        """Vector size of the cached shards (None while empty)."""
        shards = self._shards()
        if not shards:
            return None
        return int(np.load(shards[0].with_suffix(".npy"), mmap_mode="r").shape[1])

    def missing(self, hashes: list[str]) -> list[str]:
        """The distinct hashes not cached yet, in first-seen order."""
        index = self.index()
        return [key for key in dict.fromkeys(hashes) if key not in index]

    def add(self, hashes: list[str], vectors: np.ndarray) -> None:
        """Store new vectors as one more shard."""
        if not hashes:
            return
        number = len(self._shards())
        prefix = self.root / f"part-{number:05d}"
        write_set(prefix, pa.table({"hash": pa.array(hashes, pa.string())}), vectors)
        if self._index is not None:
            for row, key in enumerate(hashes):
                self._index.setdefault(key, (number, row))

    def gather(self, hashes: list[str], dim: int) -> np.ndarray:
        """Vectors for ``hashes`` (all cached), in order, as one float32 array."""
        index = self.index()
        where = np.array([index[key] for key in hashes], dtype=np.int64).reshape(-1, 2)
        out = np.empty((len(hashes), dim), dtype=np.float32)
        shards = self._shards()
        for number in np.unique(where[:, 0]):
            rows = np.flatnonzero(where[:, 0] == number)
            vectors = np.load(shards[number].with_suffix(".npy"), mmap_mode="r")
            out[rows] = vectors[where[rows, 1]]
        return out
