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

from dpray.stages.embed.digests import DigestIndex, first_unique, pack


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


def embedding_key(model_path: str | Path, precision: str = "float32") -> str:
    """Key of the vectors an encoder makes: :func:`model_fingerprint`, and the precision when it
    is not float32 (bfloat16 vectors differ from float32's in the third decimal; float32 keys are
    those of before the precision existed, so existing caches stay valid)."""
    return model_fingerprint(model_path, "" if precision == "float32" else precision)


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
    """Append-only shards ``part-NNNNN.{npy,parquet}`` mapping text hashes to vectors.

    The index in memory is a :class:`~dpray.stages.embed.digests.DigestIndex` (40 bytes a
    cached text, not a dict of hex strings), and every method works on a chunk of hashes at a
    time, so the embed stage can stream ten million candidates through it.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._index: DigestIndex | None = None
        self._shard_count = 0

    def _shards(self) -> list[Path]:
        return sorted(p.with_suffix("") for p in self.root.glob("part-*.parquet"))

    def index(self) -> DigestIndex:
        """digest -> shard number << 32 | row; built once from the shards' parquet files."""
        if self._index is None:
            self._index = DigestIndex()
            shards = self._shards()
            for number, shard in enumerate(shards):
                hashes = pq.read_table(shard.with_suffix(".parquet"), columns=["hash"])
                keys = pack(hashes.column("hash").to_pylist())
                self._index.add(keys, _locations(number, len(keys)))
            self._shard_count = len(shards)
        return self._index

    def dim(self) -> int | None:
        """Vector size of the cached shards (None while empty)."""
        shards = self._shards()
        if not shards:
            return None
        return int(np.load(shards[0].with_suffix(".npy"), mmap_mode="r").shape[1])

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Where each packed digest is cached (shard << 32 | row), ``-1`` where it is not."""
        return self.index().lookup(keys)

    def missing(self, hashes: list[str]) -> list[str]:
        """The distinct hashes not cached yet, in first-seen order."""
        keys = pack(hashes)
        absent = np.flatnonzero(self.lookup(keys) < 0)
        return [hashes[absent[i]] for i in first_unique(keys[absent])]

    def add(self, hashes: list[str], vectors: np.ndarray) -> None:
        """Store new vectors as one more shard."""
        if not hashes:
            return
        index = self.index()
        number = max(self._shard_count, len(self._shards()))  # never overwrite another's shard
        prefix = self.root / f"part-{number:05d}"
        write_set(prefix, pa.table({"hash": pa.array(hashes, pa.string())}), vectors)
        self._shard_count = number + 1
        index.add(pack(hashes), _locations(number, len(hashes)))

    def gather_into(self, keys: np.ndarray, out: np.ndarray) -> None:
        """Copy the vectors of ``keys`` (packed digests, all cached) into ``out`` row by row."""
        where = self.lookup(keys)
        if len(where) and where.min() < 0:
            raise KeyError(f"{int((where < 0).sum())} hash(es) not in the embedding cache")
        shard_of, row_of = where >> 32, where & 0xFFFFFFFF
        for number in np.unique(shard_of):
            rows = np.flatnonzero(shard_of == number)
            vectors = np.load(self.root / f"part-{number:05d}.npy", mmap_mode="r")
            out[rows] = vectors[row_of[rows]]

    def gather(self, hashes: list[str], dim: int) -> np.ndarray:
        """Vectors for ``hashes`` (all cached), in order, as one float32 array."""
        out = np.empty((len(hashes), dim), dtype=np.float32)
        self.gather_into(pack(hashes), out)
        return out


def _locations(shard: int, rows: int) -> np.ndarray:
    return (np.int64(shard) << 32) | np.arange(rows, dtype=np.int64)
