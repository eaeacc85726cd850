"""Offline model loading: packaged SmolLM2 / MiniLM, local HF dirs, GGUF, tiny test models."""

from dpray.models.loader import (
    DEFAULT_ENCODER,
    DEFAULT_GENERATOR,
    ModelSpecError,
    convert_gguf_cached,
    default_cache_dir,
    existing_model_dir,
    gguf_fingerprint,
    load_causal_lm,
    load_sentence_encoder,
    make_tiny_causal_lm,
    make_tiny_sentence_encoder,
    packaged_minilm_dir,
    packaged_smollm2_gguf,
    resolve_causal_lm,
    resolve_sentence_encoder,
)

__all__ = [
    "DEFAULT_ENCODER",
    "DEFAULT_GENERATOR",
    "ModelSpecError",
    "convert_gguf_cached",
    "default_cache_dir",
    "existing_model_dir",
    "gguf_fingerprint",
    "load_causal_lm",
    "load_sentence_encoder",
    "make_tiny_causal_lm",
    "make_tiny_sentence_encoder",
    "packaged_minilm_dir",
    "packaged_smollm2_gguf",
    "resolve_causal_lm",
    "resolve_sentence_encoder",
]
