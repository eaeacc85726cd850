"""``dpray embed``: sentence embeddings of the real (private) and synthetic (public) instructions.

Reads the synthetic candidates ``RUN_DIR/sample/*.parquet`` (text, sample_id) and the private
``private/ingest/instructions.parquet`` / ``heldout.parquet``.  Writes

* ``embed/synthetic.{npy,parquet}`` -- public: vectors + (sample_id, text_hash), rows in the
  order of the sorted sample shards (the filter reads the texts from the shards themselves, so
  generated text lives only where the leak scan expects generations);
* ``private/embed/real.{npy,parquet}`` and ``private/embed/heldout.{npy,parquet}`` -- vectors +
  (id, user_id, text_hash); no text, and nothing of it outside ``private/``;
* ``embed/report.json`` (synthetic counts and speed only) and ``private/embed/report.json``.

Every missing vector of all three sets is computed in one Ray Data pass (one actor pool start)
and stored in the content-hash cache of its zone (``embed_cache/``, ``private/embed_cache/``), so
a rerun embeds only new texts.  Out of core (:mod:`~dpray.stages.embed.stream`): each side is read
:data:`CHUNK_ROWS` rows at a time, its ids written as they come, its cache misses queued on disk
(the synthetic queue with the public cache, the real ones under ``private/``, both deleted at the
end); the actors read their batches from the queues and the vectors stream back into the caches;
each ``.npy`` is then written chunk by chunk from its cache.  The driver holds a chunk and a
40-byte digest per distinct text, not the texts or vectors of every candidate.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dpray.config import DprayConfig
from dpray.io.readers import SourceError
from dpray.rundir import RunDir, write_json
from dpray.stages.base import StageResult
from dpray.stages.embed.digests import DigestIndex, first_unique, pack
from dpray.stages.embed.encode import pool_settings, resolve_backend
from dpray.stages.embed.store import EmbeddingCache, _tmp_path, embedding_key, text_hash
from dpray.stages.embed.stream import (
    CacheAppender,
    SetWriter,
    TextQueue,
    encode_queues,
    length_function,
)
from dpray.stages.embed.traced import ensure_traced_encoder

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


CHUNK_ROWS = 16384
"""Input rows read, hashed, looked up and queued (sorted) at once; also the rows per cache shard
and per output write.  The driver holds about this many texts and vectors (~25 MB of float32 at
384 dimensions), never every candidate; a window of 16k texts sorts as well as all of them."""


def _synthetic_chunks(shards: list[Path], chunk_rows: int) -> Iterator[pa.Table]:
    """(sample_id, text) of every sample shard, in shard order, ``chunk_rows`` at a time."""
    for path in shards:
        for batch in pq.ParquetFile(path).iter_batches(
            batch_size=chunk_rows, columns=["sample_id", "text"]
        ):
            yield pa.Table.from_batches([batch])


def _id_schema(side: str, shards: list[Path], table: pa.Table | None) -> pa.Schema:
    """The output ids' schema: the input's id columns (types unified over shards) + text_hash."""
    if side == "synthetic":
        field = pa.unify_schemas(
            [pa.schema([pq.read_schema(p).field("sample_id")]) for p in shards],
            promote_options="default",
        ).field("sample_id")
        return pa.schema([field, pa.field("text_hash", pa.string())])
    assert table is not None
    return pa.schema(
        [table.schema.field("id"), table.schema.field("user_id"), ("text_hash", pa.string())]
    )


def run(config: DprayConfig, run_dir: RunDir) -> StageResult:
    """Embed what is not cached yet, in one streamed Ray Data pass; write the aligned sets."""
    return embed_sets(config, run_dir, CHUNK_ROWS)


def embed_sets(config: DprayConfig, run_dir: RunDir, chunk_rows: int) -> StageResult:
    """:func:`run` with the chunk size as an argument (tests use small chunks)."""
    from dpray.models import resolve_sentence_encoder

    ec = config.embed
    start = time.monotonic()
    model_path = resolve_sentence_encoder(ec.model)
    key = embedding_key(model_path, ec.precision)
    shards = sample_shards(run_dir)
    if not shards:
        raise SourceError(f"{run_dir.root / 'sample'}: no synthetic shards (run `dpray sample`)")
    real = {"real": read_real(run_dir, "instructions"), "heldout": read_real(run_dir, "heldout")}
    sides = ["synthetic", *(s for s in ("real", "heldout") if real[s] is not None)]
    zones: dict[Path, EmbeddingCache] = {}  # real and heldout share private/'s cache
    caches = {s: zones.setdefault(cache_root(run_dir, s), _cache(run_dir, s, key)) for s in sides}
    # Texts to embed wait in files: synthetic ones with the public cache, real ones in private/.
    queue_dir = {s: cache_root(run_dir, s) / key for s in sides}
    backend = resolve_backend(ec.backend, str(model_path), ec.use_gpu, ec.precision)
    tokenizer_file = None
    if backend == "traced":
        entry = ensure_traced_encoder(str(model_path), precision=ec.precision)
        tokenizer_file = entry.tokenizer_file
    lengths = length_function(str(model_path), tokenizer_file)
    queues = {
        s: TextQueue(_tmp_path(queue_dir[s] / f"queue-{s}.parquet"), ec.batch_size, lengths)
        for s in sides
    }
    writers: dict[str, SetWriter] = {}
    rows = dict.fromkeys(sides, 0)
    distinct = dict.fromkeys(sides, 0)
    try:
        # Pass 1: read each side in chunks; write its ids; queue the texts no cache holds.
        for side in sides:
            table = real.get(side)
            schema = _id_schema(side, shards, table)
            if side == "synthetic":
                prefix = run_dir.public("embed") / "synthetic"
                chunks = _synthetic_chunks(shards, chunk_rows)
            else:
                prefix = run_dir.private("embed") / side
                chunks = (table.slice(i, chunk_rows) for i in range(0, len(table), chunk_rows))
            writers[side] = writer = SetWriter(prefix, schema)
            seen = DigestIndex()  # this side's distinct texts so far
            # Cache misses gather across input chunks (small sample shards too) into windows
            # of chunk_rows, each sorted once: wider windows pad less.
            window: tuple[list[str], list[str]] = ([], [])
            for chunk in chunks:
                texts = chunk.column("text").to_pylist()
                hashes = [text_hash(t) for t in texts]
                ids = chunk.drop_columns(["text"]).append_column(
                    "text_hash", pa.array(hashes, pa.string())
                )
                writer.write(ids.select(schema.names))
                rows[side] += len(texts)
                keys = pack(hashes)
                fresh = first_unique(keys)
                fresh = fresh[seen.lookup(keys[fresh]) < 0]
                seen.add(keys[fresh], np.zeros(len(fresh), dtype=np.int64))
                distinct[side] += len(fresh)
                new = fresh[caches[side].lookup(keys[fresh]) < 0]
                window[0].extend(hashes[i] for i in new)
                window[1].extend(texts[i] for i in new)
                if len(window[0]) >= chunk_rows:
                    queues[side].put(window[0][:chunk_rows], window[1][:chunk_rows])
                    del window[0][:chunk_rows], window[1][:chunk_rows]
            queues[side].put(*window)
            del seen, window
        new_rows = {s: queues[s].rows for s in sides}
        closed = [(queues[s].path, queues[s].close()) for s in sides]
        prepare_seconds = time.monotonic() - start

        # Pass 2: one streamed Ray Data pass over every queue (one actor pool start).
        encode_start = time.monotonic()
        appenders = {s: CacheAppender(caches[s], chunk_rows) for s in sides}
        nodes: Counter = Counter()
        if sum(new_rows.values()):
            todo = sum(new_rows.values())
            pool = pool_settings(
                todo,
                str(model_path),
                ec.batch_size,
                ec.num_actors,
                ec.use_gpu,
                backend,
                ec.precision,
            )
            for queue, hashes, vectors in encode_queues(
                closed, str(model_path), ec.batch_size, pool=pool, nodes=nodes
            ):
                appenders[sides[queue]].add(hashes, vectors)
            for appender in appenders.values():
                appender.flush()
            log.info(
                "embed: %d texts with %d %s actor(s) (%s) on %d node(s), %d thread(s) each",
                todo,
                pool.actors,
                pool.backend,
                pool.precision,
                len(nodes),
                pool.threads,
            )
        for side in sides:
            if appenders[side].rows != new_rows[side]:
                raise RuntimeError(
                    f"embedding returned {appenders[side].rows} of {new_rows[side]} rows"
                )
        encode_seconds = time.monotonic() - encode_start

        # Pass 3: each side's vectors, in its rows' order, from its cache.
        dims = {caches[s].dim() for s in sides if caches[s].dim()}
        if len(dims) != 1:
            raise RuntimeError(f"embed: inconsistent embedding sizes {sorted(dims)}")
        dim = dims.pop()
        outputs = {}
        for side in sides:
            npy, parquet = writers.pop(side).finish(caches[side], dim, chunk_rows)
            outputs[f"{side}_vectors"] = str(npy)
            outputs[f"{side}_ids"] = str(parquet)
    finally:
        for writer in writers.values():
            writer.abort()
        for queue in queues.values():
            queue.close()
            queue.path.unlink(missing_ok=True)

    new = new_rows
    seconds = time.monotonic() - start
    public = {
        "model": ec.model,
        "model_key": key,
        "precision": ec.precision,
        "dim": int(dim),
        "synthetic_rows": rows["synthetic"],
        "synthetic_embedded_now": new["synthetic"],
        "synthetic_from_cache": distinct["synthetic"] - new["synthetic"],
        "seconds": round(seconds, 3),
    }
    todo = sum(new.values())
    private = {
        **public,
        "embedded_now": new,
        "rows": rows,
        "actor_nodes": len(nodes),
        "prepare_seconds": round(prepare_seconds, 3),
        "encode_seconds": round(encode_seconds, 3),
        "texts_per_second": round(todo / encode_seconds, 1) if todo else None,
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
