"""``dpray embed``: sentence embeddings of the real (private) and synthetic (public) instructions.

Reads the synthetic candidates ``RUN_DIR/sample/*.parquet`` (text, sample_id) and the private
``private/ingest/instructions.parquet`` / ``heldout.parquet``.  Writes

* ``embed/synthetic.{npy,parquet}`` -- public: vectors + (sample_id, text_hash), rows in the
  order of the sorted sample shards (the filter reads the texts from the shards themselves, so
  generated text lives only where the leak scan expects generations);
* ``private/embed/real.{npy,parquet}`` and ``private/embed/heldout.{npy,parquet}`` -- vectors +
  (id, user_id, text_hash); no text, and nothing of it outside ``private/``;
* ``embed/report.json`` (synthetic counts and speed only) and ``private/embed/report.json``.

Every missing vector of all three sets is computed in one Ray Data pass (one actor pool start),
then stored in the content-hash cache of its zone (``embed_cache/``, ``private/embed_cache/``), so
a rerun embeds only new texts.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dpray.config import DprayConfig
from dpray.io.readers import SourceError
from dpray.rundir import RunDir, write_json
from dpray.stages.base import StageResult
from dpray.stages.embed.encode import embed_texts
from dpray.stages.embed.store import EmbeddingCache, model_fingerprint, text_hash, write_set

log = logging.getLogger(__name__)

SIDES = ("synthetic", "real", "heldout")


def sample_shards(run_dir: RunDir) -> list[Path]:
    return sorted((run_dir.root / "sample").glob("*.parquet"))


def read_synthetic(run_dir: RunDir) -> pa.Table:
    """All sample shards' (sample_id, text), in shard order."""
    shards = sample_shards(run_dir)
    if not shards:
        raise SourceError(f"{run_dir.root / 'sample'}: no synthetic shards (run `dpray sample`)")
    tables = [pq.read_table(p, columns=["sample_id", "text"]) for p in shards]
    return pa.concat_tables(tables, promote_options="default")


def read_real(run_dir: RunDir, name: str) -> pa.Table | None:
    path = run_dir.private("ingest") / f"{name}.parquet"
    if not path.exists():
        if name == "instructions":
            raise SourceError(f"{path}: missing (run `dpray ingest`)")
        return None
    return pq.read_table(path, columns=["id", "text", "user_id"])


CACHE_DIR = "embed_cache"


def cache_root(run_dir: RunDir, side: str) -> Path:
    """The content-hash cache of a zone: ``embed_cache/`` (synthetic texts) or
    ``private/embed_cache/`` (real ones).  A folder of its own, not under ``embed/``, so
    ``embed/`` holds Parquet files of one schema; an older run's ``embed/cache/`` is moved."""
    zone = run_dir.root if side == "synthetic" else run_dir.private_root
    legacy = zone / "embed" / "cache"
    if legacy.is_dir() and not (zone / CACHE_DIR).exists():
        os.replace(legacy, zone / CACHE_DIR)
    if side == "synthetic":
        return run_dir.public(CACHE_DIR)
    return run_dir.private(CACHE_DIR)


def _cache(run_dir: RunDir, side: str, key: str) -> EmbeddingCache:
    return EmbeddingCache(cache_root(run_dir, side) / key)


def run(config: DprayConfig, run_dir: RunDir) -> StageResult:
    """Embed what is not cached yet, in one Ray Data pass; write the aligned sets."""
    from dpray.models import resolve_sentence_encoder

    ec = config.embed
    start = time.monotonic()
    model_path = resolve_sentence_encoder(ec.model)
    key = model_fingerprint(model_path)
    tables = {
        "synthetic": read_synthetic(run_dir),
        "real": read_real(run_dir, "instructions"),
        "heldout": read_real(run_dir, "heldout"),
    }
    texts = {s: t.column("text").to_pylist() for s, t in tables.items() if t is not None}
    hashes = {s: [text_hash(x) for x in texts[s]] for s in texts}
    caches = {s: _cache(run_dir, s, key) for s in texts}

    # Everything missing from any zone's cache, embedded together (one actor pool).
    todo: list[tuple[str, str]] = []  # (side, hash) in the order sent
    batch_texts: list[str] = []
    for side in texts:
        first_text = dict(zip(hashes[side], texts[side], strict=True))
        for digest in caches[side].missing(hashes[side]):
            todo.append((side, digest))
            batch_texts.append(first_text[digest])
    encode_start = time.monotonic()
    if batch_texts:
        vectors = embed_texts(
            batch_texts,
            model_path,
            ec.batch_size,
            ec.num_actors,
            ec.use_gpu,
            backend=ec.backend,
        )
        for side in texts:
            rows = [i for i, (s, _) in enumerate(todo) if s == side]
            caches[side].add([todo[i][1] for i in rows], vectors[rows])
    encode_seconds = time.monotonic() - encode_start

    dims = {caches[s].dim() for s in texts if caches[s].dim()}
    if len(dims) != 1:
        raise RuntimeError(f"embed: inconsistent embedding sizes {sorted(dims)}")
    dim = dims.pop()
    outputs = {}
    for side in texts:
        vectors = caches[side].gather(hashes[side], dim)
        table = tables[side]
        if side == "synthetic":
            ids = pa.table(
                {
                    "sample_id": table.column("sample_id"),
                    "text_hash": pa.array(hashes[side], pa.string()),
                }
            )
            prefix = run_dir.public("embed") / "synthetic"
        else:
            ids = pa.table(
                {
                    "id": table.column("id"),
                    "user_id": table.column("user_id"),
                    "text_hash": pa.array(hashes[side], pa.string()),
                }
            )
            prefix = run_dir.private("embed") / side
        npy, parquet = write_set(prefix, ids, vectors)
        outputs[f"{side}_vectors"] = str(npy)
        outputs[f"{side}_ids"] = str(parquet)

    new = {s: sum(1 for side, _ in todo if side == s) for s in texts}
    seconds = time.monotonic() - start
    public = {
        "model": ec.model,
        "model_key": key,
        "dim": int(dim),
        "synthetic_rows": len(texts["synthetic"]),
        "synthetic_embedded_now": new["synthetic"],
        "synthetic_from_cache": len(set(hashes["synthetic"])) - new["synthetic"],
        "seconds": round(seconds, 3),
    }
    private = {
        **public,
        "embedded_now": new,
        "rows": {s: len(texts[s]) for s in texts},
        "encode_seconds": round(encode_seconds, 3),
        "texts_per_second": round(len(batch_texts) / encode_seconds, 1) if batch_texts else None,
    }
    outputs["report"] = str(write_json(run_dir.public("embed") / "report.json", public))
    write_json(run_dir.private("embed") / "report.json", private)
    log.info(
        "embed: %d synthetic rows (%d new), dim %d, %.1f s",
        public["synthetic_rows"],
        new["synthetic"],
        dim,
        seconds,
    )
    return StageResult(outputs=outputs, summary=public)


def inputs(config: DprayConfig, run_dir: RunDir) -> list[Path]:
    """Files this stage reads (their content is part of its completion marker)."""
    private = run_dir.private_root / "ingest"
    return [*sample_shards(run_dir), private / "instructions.parquet", private / "heldout.parquet"]
