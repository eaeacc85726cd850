"""A sentence encoder traced to TorchScript once per machine, so embedding actors start fast.

Why: an embedding actor that loads a sentence-transformers model first imports
``sentence_transformers`` -- with torch, transformers, scikit-learn and scipy that is 7-8 s of CPU
per process on 2 cores, about half the time one actor spends encoding 1,000 instructions.  The traced module
needs only ``torch`` (1.3-1.5 s) and the ``tokenizers`` library (0.01 s): the same weights, the
same float32 kernels (measured here: 22-24 s per 2,000 instructions on one thread either way),
outputs equal up to float32 rounding (1.4e-7 on MiniLM: batches pad differently, so not bit for
bit; the embedding cache treats both backends as one model).

What is traced: the model's own ``forward`` (tokens in, the ``sentence_embedding`` out), so
whatever pooling / dense / normalise modules a sentence-transformers model declares are in the
graph.  The tokenizer saved next to it is the model's own backend tokenizer as
sentence-transformers configured it (lower-casing included), with its truncation length and
padding switched on.

Why check: tracing can freeze a shape or a branch (a mask dropped when the example had no
padding, a model that adds prompts).  Each trace is compared with ``SentenceTransformer.encode``
on :data:`PROBE_TEXTS` (public strings written here: one word to past the length limit, mixed
case, non-ASCII, code, empty) in batches of several shapes, and used only when every coordinate
agrees within :data:`TOLERANCE`; otherwise that verdict is cached and actors load the model
through sentence-transformers.

Precision: ``bfloat16`` traces the model cast to bfloat16 (on a CPU with AMX, one core, 1,500
instructions: sentence-transformers 7.5 s against 20.2 s in float32; the traced loop at 30k
texts, two cores: 50.2 s, ~2.6x float32's), checked against float32
sentence-transformers within :data:`BF16_TOLERANCE`.  Its vectors are not float32's, so the
embedding cache keys them apart (:func:`dpray.stages.embed.store.embedding_key`).

Cache: ``$DPRAY_CACHE_DIR/encoders/<name>-<key>/`` (``model.pt``, ``tokenizer.json``,
``meta.json``), keyed by the model directory's files and the torch / tokenizers versions; built
under a file lock, so the actors of one node trace at most once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bump when the trace or the meta format changes, so stale cache entries are not reused."""

TOLERANCE = 1e-5
"""Largest |traced - sentence-transformers| coordinate (unit-norm vectors) accepted."""

PRECISIONS = ("float32", "bfloat16")
"""Encoder weights and activations: float32, or bfloat16 (see :data:`BF16_TOLERANCE`)."""

BF16_TOLERANCE = 0.02
"""Largest |bfloat16 trace - float32 sentence-transformers| coordinate accepted.  Measured on
MiniLM-L6: 0.0025 on the probes; over 30k length-realistic instructions at most 0.0042 and
cosine >= 0.9997; on 6,000 real ones the same nearest k-means centre (fit on the float32 vectors)
for 99.92% at K = 50 and 99.97% at K = 200."""

PROBE_TEXTS: tuple[str, ...] = (
    "Write a haiku about autumn leaves.",
    "hi",
    "  Leading and trailing spaces should not matter.  ",
    "UPPER CASE and lower case and MiXeD cAsE words.",
    "Explique-moi la différence entre un crocodile et un alligator, s'il te plaît.",
    "如何用三句话解释量子纠缠？",
    "List 5 ideas 🚀 for a birthday party; include a budget in €.",
    "Summarise the following text in two sentences. " * 80,  # past most models' length limit
    "def add(a, b):\n    return a + b\n# explain this function",
    "",
)
"""Public probe inputs for the trace check (written for this project; nothing private)."""

_INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class Padding:
    """How sentence-transformers pads a batch for this model (to the batch's longest row)."""

    pad_id: int = 0
    pad_type_id: int = 0
    side: str = "right"


@dataclass(frozen=True)
class TracedEncoderEntry:
    """A cache entry: where the trace is, and what the check found."""

    directory: Path
    verified: bool
    reason: str
    input_names: tuple[str, ...]
    padding: Padding | None = None
    max_abs_diff: float | None = None

    @property
    def module_file(self) -> Path:
        return self.directory / "model.pt"

    @property
    def tokenizer_file(self) -> Path:
        return self.directory / "tokenizer.json"

    @classmethod
    def read(cls, directory: Path) -> TracedEncoderEntry | None:
        try:
            meta = json.loads((directory / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        if meta.get("format") != FORMAT_VERSION:
            return None
        entry = cls(
            directory=directory,
            verified=bool(meta.get("verified")),
            reason=str(meta.get("reason", "")),
            input_names=tuple(meta.get("input_names", ())),
            padding=Padding(**meta["padding"]) if meta.get("padding") else None,
            max_abs_diff=meta.get("max_abs_diff"),
        )
        if entry.verified and not (entry.module_file.is_file() and entry.tokenizer_file.is_file()):
            return None
        return entry


def _versions() -> dict[str, str]:
    """torch's and tokenizers' versions, from the installed distributions' metadata.

    Why not ``torch.__version__``: importing torch (~1.2 s, ~200 MB) only to read it would make
    every driver that looks the trace up (the embedding stage's, whose actors do the encoding)
    import torch.  The two agree (the metadata carries the local tag, e.g. ``+cpu``); an
    imported module's own version wins where one is loaded (a source build may differ)."""
    import sys
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "tokenizers"):
        module = sys.modules.get(name)
        try:
            out[name] = module.__version__ if module is not None else version(name)
        except PackageNotFoundError:  # a source tree on the path: import it after all
            out[name] = __import__(name).__version__
    return out


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a ``ValueError`` naming them."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown encoder precision {precision!r}; choose from {PRECISIONS}")
    return precision


def trace_key(model_path: str | Path, precision: str = "float32") -> str:
    """Cache key: the model directory's fingerprint (every file's name, size, mtime), versions,
    format, and the precision (float32 keys are those of before the precision existed)."""
    from dpray.stages.embed.store import model_fingerprint

    extra = f"{FORMAT_VERSION}|{sorted(_versions().items())}"
    if check_precision(precision) != "float32":
        extra += f"|{precision}"
    return model_fingerprint(model_path, extra=extra)


def trace_dir(
    model_path: str | Path, cache_dir: str | Path | None = None, precision: str = "float32"
) -> Path:
    from dpray.models import default_cache_dir

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = "".join(c if c.isalnum() else "-" for c in Path(model_path).name.lower())[:40]
    return root / "encoders" / f"{name}-{trace_key(model_path, precision)}"


def ensure_traced_encoder(
    model_path: str | Path, cache_dir: str | Path | None = None, precision: str = "float32"
) -> TracedEncoderEntry:
    """The checked trace of ``model_path`` at ``precision`` (built once per cache dir, under a
    file lock).

    Always returns an entry; ``entry.verified`` says whether it may be used (``reason`` says why
    not).  A failed check is cached as well: a model that cannot be traced costs the attempt
    once per machine, not once per run.
    """
    from dpray.models.loader import _file_lock

    final = trace_dir(model_path, cache_dir, precision)
    cached = TracedEncoderEntry.read(final)
    if cached is not None:
        return cached
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".{final.name}.lock"):
        cached = TracedEncoderEntry.read(final)
        if cached is not None:
            return cached
        for stale in final.parent.glob(f".tmp-{final.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            start = time.perf_counter()
            meta = _trace_and_check(str(model_path), tmp, precision)
            meta["seconds"] = round(time.perf_counter() - start, 2)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            for item in tmp.rglob("*"):
                item.chmod(0o644)
            tmp.chmod(0o755)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    entry = TracedEncoderEntry.read(final)
    assert entry is not None
    if entry.verified:
        log.info(
            "embed: encoder traced for fast actor start in %.1f s (max |diff| %.1e)",
            meta["seconds"],
            entry.max_abs_diff,
        )
    else:
        log.warning(
            "embed: traced encoder not usable, actors load sentence-transformers (%s)", entry.reason
        )
    return entry


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The tracer's warnings (shapes turned into constants it then checks) are expected."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _trace_and_check(model_path: str, out: Path, precision: str = "float32") -> dict[str, Any]:
    """Trace ``model_path``'s module stack at ``precision`` into ``out``; compare with
    sentence-transformers in float32."""
    import torch

    from dpray.models import load_sentence_encoder

    meta: dict[str, Any] = {"format": FORMAT_VERSION, **_versions(), "verified": False}
    meta["precision"] = check_precision(precision)
    model = load_sentence_encoder(model_path, device="cpu").eval()
    batch_sizes = (1, 3, len(PROBE_TEXTS))  # several batch shapes and paddings
    references = {  # float32, before any cast
        batch_size: model.encode(
            list(PROBE_TEXTS),
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        for batch_size in batch_sizes
    }
    if precision == "bfloat16":
        model = model.to(torch.bfloat16)
    hf_tokenizer = model.tokenizer
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        meta["reason"] = "the model has no fast (tokenizers) tokenizer"
        return meta
    max_length = int(model.max_seq_length or hf_tokenizer.model_max_length)
    tokenizer = backend.from_str(backend.to_str())  # a copy: leave the model's own untouched
    tokenizer.no_padding()  # padded per batch by pad_batch
    tokenizer.enable_truncation(max_length=max_length)
    padding = Padding(
        pad_id=int(hf_tokenizer.pad_token_id or 0),
        pad_type_id=int(getattr(hf_tokenizer, "pad_token_type_id", 0) or 0),
        side=str(getattr(hf_tokenizer, "padding_side", "right")),
    )
    reference_features = hf_tokenizer(["a", "b c d"], padding=True, return_tensors="pt")
    names = tuple(name for name in _INPUT_ORDER if name in reference_features)
    meta.update(input_names=list(names), max_length=max_length, padding=vars(padding))
    if set(reference_features) - set(names) or not {"input_ids", "attention_mask"} <= set(names):
        meta["reason"] = f"unsupported tokenizer outputs {sorted(reference_features)}"
        return meta

    class SentenceEmbedding(torch.nn.Module):
        """Positional tensors in, the model's ``sentence_embedding`` out."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return self.model(dict(zip(names, tensors, strict=True)))["sentence_embedding"]

    # The example must be padded: with an all-ones mask, transformers may skip masking and the
    # trace would then never mask.
    example = pad_batch(tokenizer.encode_batch([PROBE_TEXTS[1], PROBE_TEXTS[0]]), names, padding)
    try:
        with _quiet(), torch.no_grad():
            traced = torch.jit.trace(
                SentenceEmbedding().eval(),
                tuple(torch.from_numpy(example[name]) for name in names),
                check_trace=False,
            )
            traced = torch.jit.freeze(traced.eval())
        traced.save(str(out / "model.pt"))
        tokenizer.save(str(out / "tokenizer.json"))
    except Exception as err:  # noqa: BLE001 (any tracer failure: stay on sentence-transformers)
        # Tracer messages name ops and modules, never input text (the inputs are public probes).
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        meta["reason"] = f"trace failed: {type(err).__name__}: {first}"
        return meta

    entry = TracedEncoderEntry(out, True, "", names, padding)
    encoder = TracedSentenceEncoder(entry, threads=1)
    diff = 0.0
    for batch_size, reference in references.items():
        mine = encoder.encode(list(PROBE_TEXTS), batch_size=batch_size)
        if mine.shape != reference.shape:
            meta["reason"] = f"shape {mine.shape} != sentence-transformers {reference.shape}"
            return meta
        diff = max(diff, float(np.abs(mine - reference).max()))
    meta["max_abs_diff"] = diff
    tolerance = TOLERANCE if precision == "float32" else BF16_TOLERANCE
    if not diff <= tolerance:
        meta["reason"] = f"max |diff| to sentence-transformers {diff:.1e} > {tolerance:.0e}"
        return meta
    meta.update(verified=True, reason="ok", dim=int(mine.shape[1]))
    return meta


def encode_batch(tokenizer: Any, texts: list[str], add_special_tokens: bool = True) -> list[Any]:
    """``tokenizer.encode_batch`` without character offsets where the library can skip them.

    Why: nothing here reads offsets (ids, type ids and the mask are the same either way), and
    ``encode_batch_fast`` (``tokenizers`` >= 0.21) skips them: ~30% less tokenizer time, which
    is the driver's sort before the actors start and ~0.2% of an encoder's time per text.
    """
    fast = getattr(tokenizer, "encode_batch_fast", None)
    if fast is None:
        return tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
    return fast(texts, add_special_tokens=add_special_tokens)


def pad_batch(encodings: list[Any], names: tuple[str, ...], padding: Padding) -> dict[str, Any]:
    """int64 arrays ``names`` for a batch of (truncated, unpadded) ``tokenizers`` encodings,
    padded to the batch's longest row the way the model's tokenizer pads."""
    width = max(len(e.ids) for e in encodings)
    fills = {
        "input_ids": padding.pad_id,
        "attention_mask": 0,
        "token_type_ids": padding.pad_type_id,
    }
    fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
    out = {}
    for name in names:
        array = np.full((len(encodings), width), fills[name], dtype=np.int64)
        for row, encoding in enumerate(encodings):
            values = getattr(encoding, fields[name])
            if padding.side == "left":
                array[row, width - len(values) :] = values
            else:
                array[row, : len(values)] = values
        out[name] = array
    return out


class TracedSentenceEncoder:
    """``encode(texts, batch_size)`` like sentence-transformers', on the traced module.

    Tokenises once, sorts each call's texts by token count so batches pad little, cuts them to
    :data:`TOKEN_BUDGET` padded tokens, and returns L2-normalised float32 rows in input order.
    """

    def __init__(self, entry: TracedEncoderEntry, threads: int = 1) -> None:
        import torch
        from tokenizers import Tokenizer

        if not entry.verified or entry.padding is None:
            raise ValueError(f"traced encoder not usable: {entry.reason}")
        torch.set_num_threads(max(1, threads))
        self.module = torch.jit.load(str(entry.module_file), map_location="cpu")
        self.tokenizer = Tokenizer.from_file(str(entry.tokenizer_file))
        self.names = entry.input_names
        self.padding = entry.padding

    def encode(
        self, texts: list[str], batch_size: int = 64, token_budget: int | None = None
    ) -> np.ndarray:
        """L2-normalised float32 rows of ``texts``, in input order.

        ``batch_size`` bounds the rows of one forward pass, ``token_budget`` (default
        :data:`TOKEN_BUDGET`) its padded tokens (rows x longest row); see :func:`token_batches`.
        """
        import torch

        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        budget = TOKEN_BUDGET if token_budget is None else token_budget
        encodings = encode_batch(self.tokenizer, list(texts))
        lengths = np.fromiter((len(e.ids) for e in encodings), np.int64, len(encodings))
        order = np.argsort(-lengths, kind="stable")
        out: np.ndarray | None = None
        with torch.inference_mode():
            for start, stop in token_batches(lengths[order], batch_size, budget):
                rows = order[start:stop]
                features = pad_batch([encodings[i] for i in rows], self.names, self.padding)
                vectors = self.module(*(torch.from_numpy(features[n]) for n in self.names))
                vectors = vectors.float().numpy()
                if out is None:
                    out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
                out[rows] = vectors
        assert out is not None
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


TOKEN_BUDGET = 1024
"""Most padded tokens (rows x longest row) in one forward pass of the traced encoder on CPU.

Why: a forward pass over 64 long rows outgrows the core's caches (MiniLM's attention alone is
12 heads x 256 x 256 floats = 3 MB a row at the length limit), and its matrix products are
already at one core's peak (~150 GFLOP/s here), so the only time left to win is memory traffic.
Measured on 2 idle cores, 30k length-realistic instructions in the stage's 64-row groups (every
20th group timed): one thread 15.7 s for whole groups against 14.0 s at a budget of 1,024 tokens
(512: 14.1 s, 2,048: 14.1 s); two threads 8.3-8.5 s against 7.2-7.3 s (4,096: 8.0 s).  Short
rows still go 64 at a time (64 x 16 tokens), rows at the length limit 4 at a time."""


def token_batches(lengths: np.ndarray, batch_size: int, budget: int) -> list[tuple[int, int]]:
    """(start, stop) slices of ``lengths`` (sorted longest first) for one forward pass each.

    Each batch starts at its longest row and takes as many rows as fit ``budget`` padded tokens
    at that width, at least one and at most ``batch_size``."""
    out = []
    start, n = 0, len(lengths)
    while start < n:
        width = max(1, int(lengths[start]))
        stop = start + max(1, min(batch_size, budget // width))
        out.append((start, min(stop, n)))
        start = stop
    return out
