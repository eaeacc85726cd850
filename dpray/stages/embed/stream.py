"""Out-of-core embedding: texts queued on disk, vectors streamed back into the cache and outputs.

Why: at ten million candidates the texts and vectors of ``dpray embed`` (~15 GB of float32 at
384 dimensions, plus the texts) do not fit in the driver.  So nothing here holds more than a
chunk:

* :class:`TextQueue` -- the texts still to embed, written to a Parquet file window by window
  (one window = the cache misses of one input chunk), each window sorted by token count, longest
  first, and cut into row groups of one encoder batch.  Sorting within a window instead of over
  every text pads no more in practice: with tens of thousands of texts a window, neighbouring
  lengths are as close as in a global sort.
* :func:`encode_queues` -- Ray Data ``map_batches`` on the actor pool over *references* to the
  row groups (queue, group), several per block (:func:`groups_per_block`): each actor reads its
  batches' texts from the run directory itself
  (a volume every node mounts, as the filter's chunk tasks assume), so texts never pass through
  the driver or the object store, and the (hash, vector) results come back as a stream
  (``iter_batches``), at most :data:`GROUPS_PER_PASS` groups per Ray Data pass so the driver's
  block bookkeeping stays bounded too.
* :class:`CacheAppender` -- results appended to the content-hash cache every
  ``flush_rows`` vectors.
* :class:`SetWriter` -- an output ``<prefix>.parquet`` (ids) written chunk by chunk as the input
  is read, then ``<prefix>.npy`` written chunk by chunk from the cache (``np.save``'s header,
  then the rows in order); both at temp names, renamed together at the end, so a crash
  never leaves a mismatched pair (as ``store.write_set``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dpray.stages.embed.digests import pack
from dpray.stages.embed.encode import TASKS_IN_FLIGHT_PER_ACTOR, make_encoder, pool_settings
from dpray.stages.embed.store import EmbeddingCache, _tmp_path
from dpray.stages.embed.traced import encode_batch

log = logging.getLogger(__name__)

GROUPS_PER_PASS = 16384
"""Row groups (encoder batches) per Ray Data pass: ~1M texts at batch 64.  Each pass starts its
actor pool again (seconds, against the hours a million texts take on CPUs); without a bound the
driver would hold the block references of all ten million candidates at once."""


MAX_GROUPS_PER_BLOCK = 8
MIN_BLOCKS_PER_ACTOR = 32


def groups_per_block(groups: int, actors: int) -> int:
    """Row groups (encoder batches) per Ray Data block: up to :data:`MAX_GROUPS_PER_BLOCK`,
    keeping at least :data:`MIN_BLOCKS_PER_ACTOR` blocks per actor.

    Why not one batch a block: every block is a Ray task, with its scheduling, its output
    object and the driver's bookkeeping, all on the same cores as the encoders (at 100k texts,
    1,563 tasks).  Measured at 10k texts on 2 idle cores, alternating: 60.8 s against 62.1 s a
    stage run; most of the gap to the in-process traced loop (46 s) is elsewhere (Ray Data's
    stats, autoscaling and actor-location helpers and the dashboard agent took ~35% of a core
    beside the two encoder actors).
    Why not fewer, bigger blocks: the work goes heaviest first (:func:`heaviest_first`), so
    neighbouring batches cost about the same, and dozens of blocks per actor still even out the
    finish (the last block is at most eight short batches).  Small runs keep one batch a block.
    """
    return max(1, min(MAX_GROUPS_PER_BLOCK, groups // (max(1, actors) * MIN_BLOCKS_PER_ACTOR)))


CHARS_PER_TOKEN_CAP = 16
"""Sorting tokenises at most this many characters per token of the encoder's length limit: the
encoder truncates there anyway, and tokenising a 10,000-character prompt in full on the driver
(its whole length, before truncation) cost more than every short text together."""


def length_function(
    model_path: str, tokenizer_file: Path | None
) -> Callable[[list[str]], np.ndarray]:
    """``lengths(texts)`` -> token counts, capped at the encoder's length limit, with the
    encoder's fast tokenizer (loaded once), or characters when there is none (a fine proxy
    for sorting).  Only the order matters: texts past the limit all pad to it."""
    try:
        if tokenizer_file is not None:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(tokenizer_file))
            limit = int((tokenizer.truncation or {}).get("max_length") or 512)
            tokenizer.no_truncation()
            tokenizer.no_padding()

            def count(part: list[str]) -> list[int]:
                encoded = encode_batch(tokenizer, part, add_special_tokens=False)
                return [len(e.ids) for e in encoded]

        else:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
            limit = int(min(hf.model_max_length, 4096))

            def count(part: list[str]) -> list[int]:
                encoded = hf(part, add_special_tokens=False, truncation=False, verbose=False)
                return [len(ids) for ids in encoded["input_ids"]]

    except Exception:  # noqa: BLE001 (any tokenizer trouble: characters are a fine proxy)
        log.debug("embed: no tokenizer at the model path; sorting by characters")
        return lambda texts: np.fromiter((len(t) for t in texts), np.int64, len(texts))
    chars = CHARS_PER_TOKEN_CAP * limit

    def lengths(texts: list[str]) -> np.ndarray:
        out = np.zeros(len(texts), dtype=np.int64)
        for start in range(0, len(texts), TOKENIZE_ROWS):
            part = [t[:chars] for t in texts[start : start + TOKENIZE_ROWS]]
            out[start : start + len(part)] = count(part)
        return np.minimum(out, limit)

    return lengths


TOKENIZE_ROWS = 4096
"""Texts tokenised at once for sorting: a tokenizer's encodings cost kilobytes a text (ids,
offsets, masks), so a whole chunk at once would add hundreds of MB to the driver's peak."""


QUEUE_SCHEMA = pa.schema([("hash", pa.string()), ("text", pa.string())])


class TextQueue:
    """Texts to embed in a Parquet file: row groups of one batch, longest first per window."""

    def __init__(
        self, path: Path, batch_size: int, lengths: Callable[[list[str]], np.ndarray]
    ) -> None:
        self.path = path
        self.batch_size = batch_size
        self.lengths = lengths
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None

    def put(self, hashes: list[str], texts: list[str]) -> None:
        """Queue one window of (distinct, not yet cached) texts."""
        if not texts:
            return
        order = np.argsort(-self.lengths(texts), kind="stable")
        table = pa.table(
            {
                "hash": pa.array([hashes[i] for i in order], pa.string()),
                "text": pa.array([texts[i] for i in order], pa.string()),
            },
            schema=QUEUE_SCHEMA,
        )
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # No statistics: min/max texts of every row group would pile up in the footer.
            self._writer = pq.ParquetWriter(
                self.path, QUEUE_SCHEMA, compression="none", write_statistics=False
            )
        # Row groups never span two writes: each window's last batch is a group of its own.
        self._writer.write_table(table, row_group_size=self.batch_size)
        self.rows += len(table)

    def close(self) -> int:
        """Finish the file; the number of row groups (0 when nothing was queued)."""
        if self._writer is None:
            return 0
        self._writer.close()
        self._writer = None
        return pq.ParquetFile(self.path).metadata.num_row_groups


class QueueEncoderActor:
    """A Ray Data callable class: loads the encoder once; embeds the queue row groups it is
    handed, reading their texts from the queue files itself."""

    def __init__(
        self,
        queues: list[str],
        model_path: str,
        batch_size: int,
        threads: int,
        backend: str,
        precision: str = "float32",
    ) -> None:
        from dpray.resources import local_device

        self.queues = queues
        self.batch_size = batch_size
        self.encode = make_encoder(model_path, local_device("auto"), threads, backend, precision)
        self._files: dict[int, pq.ParquetFile] = {}
        import ray

        self.node = ray.get_runtime_context().get_node_id()  # reported: did every node help?

    def _file(self, queue: int) -> pq.ParquetFile:
        if queue not in self._files:
            self._files[queue] = pq.ParquetFile(self.queues[queue])
        return self._files[queue]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        queues, hashes, vectors = [], [], []
        for queue, group in zip(batch["queue"].tolist(), batch["group"].tolist(), strict=True):
            table = self._file(queue).read_row_group(group, columns=["hash", "text"])
            texts = table.column("text").to_pylist()
            vectors.append(np.asarray(self.encode(texts, self.batch_size), dtype=np.float32))
            hashes.extend(table.column("hash").to_pylist())
            queues.extend([queue] * len(texts))
        return {
            "node": np.asarray([self.node] * len(hashes), dtype=object),
            "queue": np.asarray(queues, dtype=np.int32),
            "hash": np.asarray(hashes, dtype=object),
            "embedding": np.concatenate(vectors),
        }


def encode_queues(
    queues: list[tuple[Path, int]],
    model_path: str,
    batch_size: int,
    num_actors: int | None = None,
    use_gpu: bool = False,
    backend: str = "auto",
    pool=None,
    nodes: Counter | None = None,
    precision: str = "float32",
) -> Iterator[tuple[int, list[str], np.ndarray]]:
    """Yield (queue index, hashes, vectors) as the actors finish batches, in no fixed order.

    ``queues``: (closed queue file, its row groups).  ``pool``: :func:`pool_settings`' result
    (computed here when None).  ``nodes``: counts texts per Ray node id of the actor that
    embedded them.  Needs a connected Ray.
    """
    import ray

    work = heaviest_first(queues)
    if not work:
        return
    if pool is None:
        rows = sum(pq.ParquetFile(path).metadata.num_rows for path, groups in queues if groups)
        pool = pool_settings(rows, model_path, batch_size, num_actors, use_gpu, backend, precision)
    files = [str(path) for path, _ in queues]
    for first in range(0, len(work), GROUPS_PER_PASS):
        part = work[first : first + GROUPS_PER_PASS]
        per_block = groups_per_block(len(part), pool.actors)
        blocks = [
            pa.table(
                {
                    "queue": pa.array([q for q, _ in part[i : i + per_block]], pa.int32()),
                    "group": pa.array([g for _, g in part[i : i + per_block]], pa.int32()),
                }
            )
            for i in range(0, len(part), per_block)
        ]
        dataset = ray.data.from_arrow(blocks).map_batches(
            QueueEncoderActor,
            fn_constructor_kwargs={
                "queues": files,
                "model_path": model_path,
                "batch_size": batch_size,
                "threads": pool.threads,
                "backend": pool.backend,
                "precision": pool.precision,
            },
            batch_size=None,  # one call per block
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(
                size=min(pool.actors, len(blocks)),
                max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT_PER_ACTOR,
            ),
            num_cpus=pool.shape.cpus,
            num_gpus=pool.shape.gpus,
        )
        for out in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            if nodes is not None:
                nodes.update(out["node"].tolist())
            queue_of = np.asarray(out["queue"], dtype=np.int64)
            vectors = np.asarray(out["embedding"], dtype=np.float32)
            hashes = list(out["hash"])
            for queue in np.unique(queue_of):
                rows = np.flatnonzero(queue_of == queue)
                yield int(queue), [hashes[i] for i in rows], vectors[rows]


def heaviest_first(queues: list[tuple[Path, int]]) -> list[tuple[int, int]]:
    """Every (queue, row group), the groups with the most text bytes first.

    Why: actors take blocks in this order as they free up (the longest-processing-time rule),
    so the costly batches start early and the run ends on short ones, and the actors finish
    together.  In queue order each window starts with its longest texts, and at 100k texts the
    last window's long batches came last: one actor ran an 18 s block while the other had
    finished (13 s of one core idle at the end).  The size is the row group's uncompressed
    bytes from the Parquet footer (the queue is stored without compression), read without
    touching the texts; ties keep queue order."""
    sizes: list[tuple[int, int, int]] = []
    for q, (path, groups) in enumerate(queues):
        if groups:
            meta = pq.ParquetFile(path).metadata
            sizes.extend((meta.row_group(g).total_byte_size, q, g) for g in range(groups))
    sizes.sort(key=lambda item: -item[0])  # stable
    return [(q, g) for _, q, g in sizes]


class CacheAppender:
    """Collects streamed (hash, vector) results and appends them to a cache per ``flush_rows``."""

    def __init__(self, cache: EmbeddingCache, flush_rows: int) -> None:
        self.cache = cache
        self.flush_rows = flush_rows
        self.rows = 0
        self._hashes: list[str] = []
        self._vectors: list[np.ndarray] = []
        self._pending = 0

    def add(self, hashes: list[str], vectors: np.ndarray) -> None:
        self._hashes.extend(hashes)
        self._vectors.append(vectors)
        self._pending += len(hashes)
        self.rows += len(hashes)
        if self._pending >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self.cache.add(self._hashes, np.concatenate(self._vectors))
        self._hashes, self._vectors, self._pending = [], [], 0


class SetWriter:
    """``<prefix>.{parquet,npy}`` written chunk by chunk, renamed together by :meth:`finish`."""

    def __init__(self, prefix: Path, schema: pa.Schema) -> None:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.schema = schema
        self.rows = 0
        self._tmp_parquet = _tmp_path(prefix.with_suffix(".parquet"))
        self._writer = pq.ParquetWriter(self._tmp_parquet, schema)

    def write(self, ids: pa.Table) -> None:
        """Append the ids (with ``text_hash``) of the next rows."""
        self._writer.write_table(ids.cast(self.schema))
        self.rows += len(ids)

    def finish(self, cache: EmbeddingCache, dim: int, chunk_rows: int) -> tuple[Path, Path]:
        """Fill ``.npy`` from ``cache`` in the ids' order, ``chunk_rows`` at a time; rename both."""
        self._writer.close()
        npy, parquet = self.prefix.with_suffix(".npy"), self.prefix.with_suffix(".parquet")
        tmp_npy = _tmp_path(npy)
        try:
            # The header np.save writes, then the rows in order: plain sequential writes, so the
            # driver holds one chunk (a memory map's dirty pages would count as its own).
            header = {"descr": "<f4", "fortran_order": False, "shape": (self.rows, dim)}
            with tmp_npy.open("wb") as handle:
                np.lib.format.write_array_header_1_0(handle, header)
                for batch in pq.ParquetFile(self._tmp_parquet).iter_batches(
                    batch_size=chunk_rows, columns=["text_hash"]
                ):
                    keys = pack(batch.column(0).to_pylist())
                    vectors = np.empty((len(keys), dim), dtype=np.float32)
                    cache.gather_into(keys, vectors)
                    handle.write(vectors.tobytes())
            os.replace(tmp_npy, npy)
            os.replace(self._tmp_parquet, parquet)
        except BaseException:
            for tmp in (tmp_npy, self._tmp_parquet):
                tmp.unlink(missing_ok=True)
            raise
        return npy, parquet

    def abort(self) -> None:
        """Drop the temp files (a failed run leaves the previous outputs as they were)."""
        with contextlib.suppress(Exception):  # already closed
            self._writer.close()
        self._tmp_parquet.unlink(missing_ok=True)
