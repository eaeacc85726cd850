"""Batched transformers sampling backend (CPU, or one GPU), for machines without vLLM.

Why it is shaped this way (``benchmarks/sample.py`` measures batching against a naive loop):

* the LoRA adapter is merged into the base weights once (``merge_and_unload``), so a forward pass
  costs what the base model costs instead of adding two low-rank matmuls per projection;
* rows are generated in batches with the KV cache: on CPU a one-prompt decode step is bound by
  reading the weights, so a batch of 64 rows costs little more than one row;
* prompts are LEFT-padded so every row's next token sits in the last column, which is what
  ``generate`` expects for decoder-only models; prompts of different lengths are grouped by
  length first so little padding is computed (the generator's prompts are all the same, so there
  a bucket is simply a run of equal rows);
* top-p filtering sorts only the head of each row's distribution (:class:`NucleusFilter`): the
  built-in warper's full-vocabulary sort of every row costs about as much as the forward pass;
* every batch is seeded from ``(shard seed, batch index)`` so a shard is reproducible.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from dpray.stages.sample.backends import Completion, SamplingSettings, derive_seed

log = logging.getLogger(__name__)


def length_buckets(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices of ``prompts`` grouped into batches of similar length (stable within a length)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int):
    """``(input_ids, attention_mask)`` tensors with the prompts right-aligned."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
    return ids, mask


class NucleusFilter:
    """Top-p (nucleus) filtering that sorts only the head of the distribution.

    transformers' ``TopPLogitsWarper`` sorts the whole vocabulary of every row at every step; for
    a 49k vocabulary and 64 rows that sort costs about as much as the forward pass on a CPU.  The
    nucleus almost always lies within the top few hundred tokens, so this takes the top ``k``
    (a partial sort), keeps a token when the probability mass strictly above it is below
    ``top_p`` (the same rule as the warper's), and falls back to a larger ``k`` and finally a full
    sort for rows whose nucleus is wider.  Used as a ``generate`` logits processor after the
    temperature and top-k warpers, exactly where the built-in top-p warper would run.
    """

    def __init__(self, top_p: float, candidates: tuple[int, ...] = (512, 4096)) -> None:
        self.top_p = top_p
        self.candidates = candidates

    def __call__(self, input_ids, scores):
        import torch

        probs = scores.float().softmax(dim=-1)
        remove = torch.ones_like(scores, dtype=torch.bool)
        rows = torch.arange(scores.shape[0], device=scores.device)
        for k in (*self.candidates, scores.shape[-1]):
            k = min(k, scores.shape[-1])
            top, index = probs[rows].topk(k, dim=-1)  # sorted, descending
            above = top.cumsum(dim=-1) - top  # mass strictly above each candidate
            covered = (above[:, -1] + top[:, -1] >= self.top_p) | (k == scores.shape[-1])
            sub = remove[rows[covered]]
            sub.scatter_(1, index[covered], above[covered] >= self.top_p)
            remove[rows[covered]] = sub
            rows = rows[~covered]
            if rows.numel() == 0:
                break
        return scores.masked_fill(remove, float("-inf"))


def load_merged_model(base_path: str, adapter_dir: str | None, device: str, dtype=None):
    """``(model, tokenizer)``: base model with the LoRA adapter merged in, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path, local_files_only=True)
    if dtype is None:
        dtype = torch.float32
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, local_files_only=True)
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    model.to(device).eval()
    return model, tokenizer


class HFSampler:
    """The hf :class:`~dpray.stages.sample.backends.Sampler`."""

    name = "hf"

    def __init__(
        self, spec, settings: SamplingSettings, device: str | None = None, model=None
    ) -> None:
        import torch
        from transformers import GenerationConfig

        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.settings = settings
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if model is None:
            model, tokenizer = load_merged_model(spec.base_path, spec.adapter_dir, self.device)
        else:  # benchmarks pass an already loaded (model, tokenizer)
            model, tokenizer = model
        self.model, self.tokenizer = model, tokenizer
        eos = tokenizer.eos_token_id
        stops = [int(t) for t in getattr(spec, "stop_ids", ()) or ()]
        if not stops and eos is None:
            raise ValueError("the generator's tokenizer has no EOS token")
        self.stop_ids = stops or [int(eos)]
        self.eos_id = self.stop_ids[0]
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_id)
        sampling = settings.temperature > 0
        # top_p=1.0 switches the built-in (full-sort) warper off; NucleusFilter does its job.
        extra = (
            {"temperature": settings.temperature, "top_p": 1.0, "top_k": settings.top_k}
            if sampling
            else {}
        )
        self.logits_processor = []
        if sampling and settings.top_p < 1.0:
            self.logits_processor = [NucleusFilter(settings.top_p)]
        # A fresh GenerationConfig: the model's own may carry defaults (top_k=50, repetition
        # penalty...) that would silently change the distribution the generator was trained for.
        self.generation_config = GenerationConfig(
            do_sample=sampling,
            max_new_tokens=settings.max_new_tokens,
            eos_token_id=self.stop_ids if len(self.stop_ids) > 1 else self.eos_id,
            pad_token_id=self.pad_id,
            use_cache=True,
            **extra,
        )

    def sample(self, prompt_ids: list[int], count: int, seed: int) -> list[Completion]:
        """``count`` continuations of one prompt, batch ``j`` seeded by ``(seed, j)``."""
        return self.generate_many([prompt_ids] * count, seed)

    def sample_prompts(self, prompts: Sequence[Sequence[int]], seed: int) -> list[Completion]:
        """One continuation of each prompt, in their order (length buckets seeded by ``seed``)."""
        return self.generate_many(prompts, seed)

    def generate_many(self, prompts: Sequence[Sequence[int]], seed: int) -> list[Completion]:
        """Continuations of ``prompts`` (in their order), generated in length buckets."""
        results: list[Completion | None] = [None] * len(prompts)
        for j, bucket in enumerate(length_buckets(prompts, self.settings.batch_size)):
            batch = self.generate_batch([prompts[i] for i in bucket], derive_seed(seed, j))
            for i, completion in zip(bucket, batch, strict=True):
                results[i] = completion
        return results  # type: ignore[return-value]

    def generate_batch(self, prompts: Sequence[Sequence[int]], seed: int) -> list[Completion]:
        """One ``generate`` call over left-padded prompts, with the global RNG set to ``seed``."""
        import torch
        from transformers import LogitsProcessorList

        ids, mask = left_pad(prompts, self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        torch.manual_seed(seed)  # generate() samples from the global generator (CUDA too)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=self.generation_config,
                logits_processor=LogitsProcessorList(self.logits_processor),
            )
        new = out[:, ids.shape[1] :].tolist()
        return [self._decode(row, seed) for row in new]

    def _decode(self, tokens: list[int], seed: int) -> Completion:
        ends = [tokens.index(t) for t in self.stop_ids if t in tokens]
        if ends:
            tokens, truncated = tokens[: min(ends)], False
        else:
            truncated = len(tokens) >= self.settings.max_new_tokens
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return Completion(text=text, truncated=truncated, seed=seed)
