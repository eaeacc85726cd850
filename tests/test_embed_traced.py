"""The traced (TorchScript) encoder that embedding actors start from, and the backend dispatch.

Oracle: ``SentenceTransformer.encode`` of the same directory.  No Ray here; the Ray pipeline runs
the traced backend in ``test_embed.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dpray.config import ConfigError, config_from_tree
from dpray.models import load_sentence_encoder, make_tiny_sentence_encoder
from dpray.stages.embed import traced
from dpray.stages.embed.encode import resolve_backend, token_lengths
from dpray.stages.embed.traced import TracedSentenceEncoder, ensure_traced_encoder

TEXTS = [
    "How do I bake sourdough bread at home?",
    "x",
    "",
    "Tell me a long story about a dragon. " * 60,  # past the tiny model's 128 tokens
    "ÉCRIS UN POÈME sur la mer, s'il te plaît",
    "Translate 'good morning' into Japanese: おはよう",
    "  spaces around  ",
] * 3


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    return make_tiny_sentence_encoder(tmp_path_factory.mktemp("enc") / "tiny", hidden_size=32)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DPRAY_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_trace_equals_sentence_transformers_and_is_made_once(tiny_encoder, cache):
    entry = ensure_traced_encoder(tiny_encoder)
    assert entry.verified, entry.reason
    assert entry.directory.parent == cache / "encoders"
    assert entry.max_abs_diff is not None and entry.max_abs_diff <= traced.TOLERANCE
    reference = load_sentence_encoder(str(tiny_encoder)).encode(
        TEXTS, batch_size=5, normalize_embeddings=True, show_progress_bar=False
    )
    for batch_size in (1, 4, 64):
        mine = TracedSentenceEncoder(entry).encode(TEXTS, batch_size=batch_size)
        assert mine.dtype == np.float32 and mine.shape == reference.shape
        assert np.abs(mine - reference).max() < 1e-5
    meta = entry.directory / "meta.json"
    stamp = meta.stat().st_mtime_ns
    again = ensure_traced_encoder(tiny_encoder)
    assert again == entry and meta.stat().st_mtime_ns == stamp  # a cache hit, not a re-trace
    assert resolve_backend("auto", str(tiny_encoder), use_gpu=False) == "traced"


@pytest.mark.parametrize("budget", [1, 40, 128, 1024, 10**6])
def test_token_budget_batches_give_the_same_vectors(tiny_encoder, cache, budget):
    """Cutting a call into budget-sized forward passes changes only float rounding."""
    entry = ensure_traced_encoder(tiny_encoder)
    encoder = TracedSentenceEncoder(entry)
    whole = encoder.encode(TEXTS, batch_size=64, token_budget=10**9)
    cut = encoder.encode(TEXTS, batch_size=64, token_budget=budget)
    assert cut.shape == whole.shape and np.abs(cut - whole).max() < 1e-5


def test_offset_free_tokenisation_gives_the_same_model_inputs(tiny_encoder, cache):
    """``encode_batch`` (offsets skipped where the library can) feeds the model exactly what the
    full encodings would, with and without special tokens, truncation and padding as saved."""
    from tokenizers import Tokenizer

    entry = ensure_traced_encoder(tiny_encoder)
    tokenizer = Tokenizer.from_file(str(entry.tokenizer_file))
    for special in (True, False):
        full = tokenizer.encode_batch(TEXTS, add_special_tokens=special)
        fast = traced.encode_batch(tokenizer, TEXTS, add_special_tokens=special)
        for a, b in zip(full, fast, strict=True):
            assert (a.ids, a.type_ids, a.attention_mask) == (b.ids, b.type_ids, b.attention_mask)

    class OldTokenizer:  # a tokenizers release without encode_batch_fast
        encode_batch = tokenizer.encode_batch

    old = traced.encode_batch(OldTokenizer(), TEXTS)
    assert [e.ids for e in old] == [e.ids for e in tokenizer.encode_batch(TEXTS)]


def test_token_batches_cover_every_row_once_within_rows_and_budget():
    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = np.sort(rng.integers(0, 300, rng.integers(0, 200)))[::-1]
        batch_size, budget = int(rng.integers(1, 80)), int(rng.integers(1, 3000))
        batches = traced.token_batches(lengths, batch_size, budget)
        covered = [i for start, stop in batches for i in range(start, stop)]
        assert covered == list(range(len(lengths)))
        for start, stop in batches:
            assert 1 <= stop - start <= batch_size
            # the longest row of a batch is its first; one row may exceed the budget alone
            assert stop - start == 1 or (stop - start) * max(1, lengths[start]) <= budget
            # greedy: the next row would not have fitted (or the batch is full / last)
            if stop < len(lengths) and stop - start < batch_size:
                assert (stop - start + 1) * max(1, lengths[start]) > budget


def test_bfloat16_trace_is_checked_against_float32_and_cached_apart(tiny_encoder, cache):
    entry32 = ensure_traced_encoder(tiny_encoder)
    entry16 = ensure_traced_encoder(tiny_encoder, precision="bfloat16")
    assert entry16.verified, entry16.reason
    assert entry16.directory != entry32.directory
    assert json.loads((entry16.directory / "meta.json").read_text())["precision"] == "bfloat16"
    assert 0 < entry16.max_abs_diff <= traced.BF16_TOLERANCE
    reference = TracedSentenceEncoder(entry32).encode(TEXTS)
    mine = TracedSentenceEncoder(entry16).encode(TEXTS)
    assert mine.dtype == np.float32 and mine.shape == reference.shape
    assert np.allclose(np.linalg.norm(mine, axis=1), 1.0, atol=1e-6)
    assert (mine * reference).sum(axis=1).min() > 0.99 and not np.array_equal(mine, reference)
    assert resolve_backend("auto", str(tiny_encoder), False, "bfloat16") == "traced"
    with pytest.raises(ValueError, match="precision"):
        ensure_traced_encoder(tiny_encoder, precision="float16")


def test_sentence_transformers_backend_in_bfloat16_returns_float32_unit_rows(tiny_encoder):
    from dpray.stages.embed.encode import make_encoder

    fp32 = make_encoder(str(tiny_encoder), "cpu", 1, "sentence-transformers")(TEXTS, 4)
    bf16 = make_encoder(str(tiny_encoder), "cpu", 1, "sentence-transformers", "bfloat16")(TEXTS, 4)
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    assert np.allclose(np.linalg.norm(bf16, axis=1), 1.0, atol=1e-6)
    assert (bf16 * fp32).sum(axis=1).min() > 0.99


def test_embedding_cache_keys_keep_float32_and_bfloat16_vectors_apart(tiny_encoder):
    from dpray.stages.embed.store import embedding_key, model_fingerprint

    assert embedding_key(tiny_encoder) == model_fingerprint(tiny_encoder)  # caches stay valid
    assert embedding_key(tiny_encoder, "bfloat16") != embedding_key(tiny_encoder)
    base = {"data": {"path": "demo://"}, "privacy": {"epsilon": 4.0, "delta": 1e-5}}
    tree = {**base, "embed": {"precision": "bfloat16"}}
    assert config_from_tree(tree).embed.precision == "bfloat16"
    with pytest.raises(ConfigError, match="precision"):
        config_from_tree({**base, "embed": {"precision": "float16"}})


def test_a_model_the_trace_cannot_reproduce_is_refused_and_auto_falls_back(tmp_path, cache):
    """A default prompt is text that sentence-transformers adds before tokenising; the traced
    graph never sees it, so the check must catch the difference and keep the model on
    sentence-transformers."""
    model = make_tiny_sentence_encoder(tmp_path / "prompted", hidden_size=32)
    config_file = model / "config_sentence_transformers.json"
    config = json.loads(config_file.read_text())
    config.update(prompts={"query": "query: ", "document": ""}, default_prompt_name="query")
    config_file.write_text(json.dumps(config))

    entry = ensure_traced_encoder(model)
    assert not entry.verified and "max |diff|" in entry.reason
    assert ensure_traced_encoder(model) == entry  # the verdict is cached too
    assert resolve_backend("auto", str(model), use_gpu=False) == "sentence-transformers"
    with pytest.raises(RuntimeError, match="not usable"):
        resolve_backend("traced", str(model), use_gpu=False)
    with pytest.raises(ValueError, match="not usable"):
        TracedSentenceEncoder(entry)


def test_backend_dispatch_table(tiny_encoder, cache):
    path = str(tiny_encoder)
    assert resolve_backend("sentence-transformers", path, use_gpu=False) == "sentence-transformers"
    assert resolve_backend("sentence-transformers", path, use_gpu=True) == "sentence-transformers"
    assert resolve_backend("auto", path, use_gpu=True) == "sentence-transformers"
    assert not (cache / "encoders").exists()  # none of those traced anything
    with pytest.raises(ValueError, match="CPU only"):
        resolve_backend("traced", path, use_gpu=True)
    with pytest.raises(ValueError, match="unknown embedding backend"):
        resolve_backend("onnx", path, use_gpu=False)


def test_config_rejects_a_traced_encoder_on_gpus():
    base = {"data": {"path": "demo://"}, "privacy": {"epsilon": 4.0, "delta": 1e-5}}
    with pytest.raises(ConfigError, match="embed"):
        config_from_tree({**base, "embed": {"backend": "traced", "use_gpu": True}})
    assert config_from_tree({**base, "embed": {"use_gpu": True}}).embed.backend == "auto"


def test_token_lengths_from_the_saved_tokenizer_match_the_models(tiny_encoder, cache):
    entry = ensure_traced_encoder(tiny_encoder)
    fast = token_lengths(TEXTS, str(tiny_encoder), entry.tokenizer_file)
    slow = token_lengths(TEXTS, str(tiny_encoder))
    assert fast.tolist() == slow.tolist()
    assert fast.max() > 128  # untruncated: the sort sees true lengths


def test_importing_the_embedding_actor_does_not_import_every_stage():
    """A Ray actor unpickles its class by importing its module; importing ``dpray.stages`` used
    to import every stage (torch, TRL, DeepSpeed): ~5 s per actor process."""
    code = (
        "import sys, dpray.stages.embed.encode, dpray.stages; "
        "heavy = [m for m in ('torch', 'trl', 'deepspeed', 'sentence_transformers') "
        "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    from dpray.stages import STAGE_ORDER, STAGES

    assert set(STAGE_ORDER) == set(STAGES)


def test_the_embedding_driver_looks_the_trace_up_without_importing_torch(tiny_encoder, cache):
    """The stage's driver resolves the model, finds the cached trace, picks the backend, keys
    the cache and sorts by token count; the actors encode.  None of that needs torch (~1.2 s and
    ~200 MB a standalone ``dpray embed`` driver used to spend importing it)."""
    entry = ensure_traced_encoder(tiny_encoder)  # traced here (that does need torch)
    code = (
        "import sys\n"
        "from dpray.models import resolve_sentence_encoder\n"
        "from dpray.stages.embed import stage\n"
        "from dpray.stages.embed.encode import resolve_backend\n"
        "from dpray.stages.embed.store import embedding_key\n"
        "from dpray.stages.embed.stream import length_function\n"
        "from dpray.stages.embed.traced import ensure_traced_encoder\n"
        f"path = resolve_sentence_encoder({str(tiny_encoder)!r})\n"
        "assert resolve_backend('auto', path, False) == 'traced'\n"
        "entry = ensure_traced_encoder(path)\n"
        "print(entry.directory, embedding_key(path, 'float32'))\n"
        "print(list(length_function(path, entry.tokenizer_file)(['one two', 'x'])))\n"
        "heavy = [m for m in ('torch', 'transformers', 'sentence_transformers') "
        "if m in sys.modules]\n"
        "print(heavy); sys.exit(1 if heavy else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0].startswith(str(entry.directory))  # the same cache entry
