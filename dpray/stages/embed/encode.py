"""Sentence embeddings through Ray Data: an actor pool, one model per actor, length-sorted rows.

Why sort by tokens: Ray Data's batches are cut in row order and pad every row to the batch's
longest, so rows are sorted by token count first and each batch pads little.  (Fed in file order
the pipeline ran at 0.64-0.68x a bare ``encode`` loop.)  ``SentenceTransformer.encode`` sorts by
*characters*, which pads much more: on 2,000 real instructions in batches of 64 it pads to 169k
tokens where token-count sorting pads to 92k, and one thread takes 46 s instead of 25 s.
Longest rows go first, one batch per block, at most two blocks queued per actor: blocks differ
a lot in cost, and only then do the actors finish together (with long blocks of sorted rows the
first actor up took all the short ones and idled while the other worked 4x longer).  Each result
carries its row number, so the output order never depends on Ray's scheduling.

Why actors: loading the model costs seconds; an actor loads it once and keeps it for every batch.
On CPUs one single-threaded actor per core beats one process using every core.

Why a traced encoder (``backend``): an actor that loads the model through sentence-transformers
spends 7-8 s importing it before its first batch; the same model traced to TorchScript once per
machine (``traced``) starts in ~1.5 s with identical outputs.  GPU actors use
sentence-transformers.  (ONNX Runtime was tried as well: 34-35 s per 2,000 instructions on one
thread against PyTorch's 24-25 s with the same token-sorted batches, so it is not used.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from dpray.stages.embed.traced import encode_batch

log = logging.getLogger(__name__)

BATCHES_PER_BLOCK = 1
"""Rows per Ray block = this many batches.  One: blocks differ a lot in cost (sorted rows, and
attention grows with length), and only small blocks let the pool even out the actors' work."""

TASKS_IN_FLIGHT_PER_ACTOR = 2
"""Blocks queued on an actor at once: two keep it busy between blocks; more would let the first
actor to start claim a long run of blocks before the others are up."""


def token_lengths(
    texts: list[str], model_path: str, tokenizer_file: Path | None = None
) -> np.ndarray:
    """Token count of each text with the encoder's own (fast) tokenizer; characters if absent.

    ``tokenizer_file``: a saved ``tokenizers`` tokenizer (the traced encoder's), which loads in
    milliseconds where ``AutoTokenizer`` first imports transformers (~1 s).
    """
    try:
        if tokenizer_file is not None:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(tokenizer_file))
            tokenizer.no_truncation()
            tokenizer.no_padding()
            encoded = encode_batch(tokenizer, texts, add_special_tokens=False)
            return np.fromiter((len(e.ids) for e in encoded), np.int64, len(texts))
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        encoded = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)
        return np.fromiter((len(ids) for ids in encoded["input_ids"]), np.int64, len(texts))
    except Exception:  # noqa: BLE001 (any tokenizer trouble: characters are a fine proxy)
        log.debug("embed: no tokenizer at the model path; sorting by characters")
        return np.fromiter((len(t) for t in texts), np.int64, len(texts))


class EncoderActor:
    """A Ray Data callable class: loads the encoder once, embeds batches of ``text``."""

    def __init__(
        self,
        model_path: str,
        batch_size: int,
        device: str,
        threads: int,
        backend: str = "sentence-transformers",
        precision: str = "float32",
    ) -> None:
        from dpray.resources import local_device

        self.batch_size = batch_size
        self.encode = make_encoder(model_path, local_device(device), threads, backend, precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vectors = self.encode(list(batch["text"]), self.batch_size)
        return {"row": batch["row"], "embedding": np.asarray(vectors, dtype=np.float32)}


BACKENDS = ("auto", "traced", "sentence-transformers")


def make_encoder(
    model_path: str, device: str, threads: int, backend: str, precision: str = "float32"
) -> Callable[[list[str], int], np.ndarray]:
    """``encode(texts, batch_size)`` -> L2-normalised float32 rows, on a resolved backend, with
    the encoder's weights and activations at ``precision`` (float32 or bfloat16)."""
    from dpray.stages.embed.traced import check_precision

    check_precision(precision)
    if backend == "traced":
        from dpray.stages.embed.traced import TracedSentenceEncoder, ensure_traced_encoder

        # A cache hit on the driver's node; on another node of a cluster, traced there once.
        entry = ensure_traced_encoder(model_path, precision=precision)
        return TracedSentenceEncoder(entry, threads).encode
    if backend != "sentence-transformers":
        raise ValueError(f"unresolved embedding backend {backend!r}")
    import torch

    from dpray.models import load_sentence_encoder

    if device == "cpu":
        torch.set_num_threads(max(1, threads))
    model = load_sentence_encoder(model_path, device=device)
    if precision == "bfloat16":
        model = model.to(torch.bfloat16)

        def encode_bf16(texts: list[str], batch_size: int) -> np.ndarray:
            vectors = model.encode(
                texts,
                batch_size=batch_size,
                normalize_embeddings=True,
                convert_to_tensor=True,
                show_progress_bar=False,
            )
            vectors = vectors.float().cpu()  # numpy has no bfloat16; normalised again in float32
            return torch.nn.functional.normalize(vectors, dim=-1).numpy()

        return encode_bf16

    def encode(texts: list[str], batch_size: int) -> np.ndarray:
        return model.encode(
            texts,
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )

    return encode


def resolve_backend(
    backend: str, model_path: str, use_gpu: bool, precision: str = "float32"
) -> str:
    """``traced`` or ``sentence-transformers``: the dispatch table of (backend, device).

    =========================  =============================================  =====================
    requested                  CPU                                            GPU
    =========================  =============================================  =====================
    ``sentence-transformers``  sentence-transformers                          sentence-transformers
    ``traced``                 traced (error if the trace fails its check)    error
    ``auto``                   traced if the trace checks out, else s-t       sentence-transformers
    =========================  =============================================  =====================
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown embedding backend {backend!r}; choose from {BACKENDS}")
    if backend == "sentence-transformers" or (backend == "auto" and use_gpu):
        return "sentence-transformers"
    if use_gpu:
        raise ValueError("embedding backend 'traced' runs on CPU only; use 'auto' with GPUs")
    from dpray.stages.embed.traced import ensure_traced_encoder

    entry = ensure_traced_encoder(model_path, precision=precision)
    if entry.verified:
        return "traced"
    if backend == "traced":
        raise RuntimeError(f"embedding backend 'traced' is not usable here: {entry.reason}")
    return "sentence-transformers"


def default_num_actors(use_gpu: bool, nodes=None) -> int:
    """One actor per CPU (per GPU with ``use_gpu``) of the alive Ray nodes."""
    from dpray.resources import alive_nodes, total_slots

    return max(1, total_slots(alive_nodes(nodes), 0 if use_gpu else 1, 1 if use_gpu else 0))


def actor_shape(actors: int, use_gpu: bool, nodes=None):
    """Each actor's CPUs/GPUs, fitted to the alive nodes (a clear error if none fits)."""
    from dpray.resources import fit_workers

    if use_gpu:  # the GPU does the work: no CPU reserved, as before
        return fit_workers("embed", actors, gpus=1, cpus=0, nodes=nodes)
    return fit_workers("embed", actors, nodes=nodes)


@dataclass(frozen=True)
class PoolSettings:
    """How an embedding pass runs: actors, each actor's shape and threads, resolved backend."""

    actors: int
    shape: object  # dpray.resources.WorkerShape
    threads: int
    backend: str
    tokenizer_file: Path | None
    precision: str = "float32"


def pool_settings(
    texts: int,
    model_path: str,
    batch_size: int,
    num_actors: int | None,
    use_gpu: bool,
    backend: str,
    precision: str = "float32",
) -> PoolSettings:
    """Actors for ``texts`` texts (one per CPU or GPU of the alive nodes, at most one per batch),
    their shape, and the backend (with the traced tokenizer, for sorting by token count)."""
    actors = num_actors or default_num_actors(use_gpu)
    actors = max(1, min(actors, math.ceil(texts / batch_size)))
    shape = actor_shape(actors, use_gpu)
    backend = resolve_backend(backend, model_path, use_gpu, precision)
    tokenizer_file = None
    if backend == "traced":
        from dpray.stages.embed.traced import ensure_traced_encoder

        tokenizer_file = ensure_traced_encoder(model_path, precision=precision).tokenizer_file
    threads = 1 if use_gpu else shape.cpus
    return PoolSettings(actors, shape, threads, backend, tokenizer_file, precision)


def embed_texts(
    texts: list[str],
    model_path: str,
    batch_size: int,
    num_actors: int | None = None,
    use_gpu: bool = False,
    sort_by_length: bool = True,
    backend: str = "auto",
    precision: str = "float32",
) -> np.ndarray:
    """(n, d) float32 L2-normalised embeddings of ``texts``, in input order, on Ray Data.

    Needs a connected Ray (the pipeline calls ``ensure_ray``).  ``sort_by_length=False`` exists
    for the benchmark's file-order comparison only; ``backend`` as in :func:`resolve_backend`;
    ``precision``: the encoder's float32 or bfloat16 (vectors are float32 either way).
    """
    import ray

    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    pool = pool_settings(
        len(texts), model_path, batch_size, num_actors, use_gpu, backend, precision
    )
    actors, shape, threads, backend = pool.actors, pool.shape, pool.threads, pool.backend
    tokenizer_file = pool.tokenizer_file
    if sort_by_length:
        # Longest first: the costly blocks are spread over the actors while all are busy, and
        # the cheap tail evens out the finish (longest-processing-time-first scheduling).
        order = np.argsort(-token_lengths(texts, model_path, tokenizer_file), kind="stable")
    else:
        order = np.arange(len(texts))
    block = batch_size * BATCHES_PER_BLOCK
    tables = [
        pa.table(
            {
                "row": pa.array(order[start : start + block], pa.int64()),
                "text": pa.array([texts[i] for i in order[start : start + block]], pa.string()),
            }
        )
        for start in range(0, len(texts), block)
    ]
    dataset = ray.data.from_arrow(tables).map_batches(
        EncoderActor,
        fn_constructor_kwargs={
            "model_path": model_path,
            "batch_size": batch_size,
            "device": "auto",  # resolved in the actor, from the GPU Ray gave it
            "threads": threads,
            "backend": backend,
            "precision": pool.precision,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(
            size=actors, max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT_PER_ACTOR
        ),
        num_cpus=shape.cpus,
        num_gpus=shape.gpus,
    )
    out: np.ndarray | None = None
    done = 0
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        vectors = np.asarray(batch["embedding"], dtype=np.float32)
        if out is None:
            out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
        out[np.asarray(batch["row"], dtype=np.int64)] = vectors
        done += len(vectors)
    if out is None or done != len(texts):
        raise RuntimeError(f"embedding returned {done} of {len(texts)} rows")
    log.info(
        "embed: %d texts with %d %s actor(s), %d thread(s) each",
        len(texts),
        actors,
        backend,
        threads,
    )
    return out
