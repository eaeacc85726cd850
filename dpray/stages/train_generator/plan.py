"""What the driver hands every Ray Train worker: one typed, frozen :class:`TrainPlan`.

The driver plans (counts, σ, where each worker finds its partition, where outputs go); the
workers load the model, train, and rank 0 saves and verifies the adapter.  A frozen dataclass
rather than a dict: a typo is an error at the driver, not a ``KeyError`` on a worker after Ray
has scheduled it, and nothing on a worker can change the plan the others follow.  The plan
carries no private record: folders, counts and public ids only.

:func:`trainable_parameter_count` is how the driver learns the LoRA size (the secure mechanism's
dimension, the summary) without weights: the model is built from its config on the ``meta``
device, where tensors have shapes but no storage.

The rest of what the driver shares with the workers lives here too, in a module that imports
neither torch nor opacus: :func:`event_for` (the ledger event of a run, which the driver checks
before launching and the workers record), :func:`resolve_scheme`, and the names of the files the
workers leave for the driver.  Every ``dpray`` command loads this stage's module; the worker and
adapter modules (torch, opacus, peft) are imported only where training or re-saving runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpray.privacy.mechanisms.gaussian import subsampled_gaussian_event
from dpray.privacy.mechanisms.skellam import subsampled_skellam_event

STATE_FILE = "state.json"
"""A worker's checkpointed training state (``worker`` writes it, the driver looks for it)."""

CHECK_FILE = "adapter_check.json"
"""Rank 0's record that the saved adapter reloads to the trained one (``adapter`` writes it)."""


@dataclass(frozen=True)
class LoraLayout:
    """The LoRA adapter's layout and init seed: the same on every rank and in every rebuild."""

    init_seed: int
    r: int
    alpha: int | float
    dropout: float
    targets: tuple[str, ...]

    @classmethod
    def from_config(cls, config) -> LoraLayout:
        tc = config.train
        return cls(config.seed, tc.lora_r, tc.lora_alpha, tc.lora_dropout, tuple(tc.lora_targets))

    def lora_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.targets),
            task_type="CAUSAL_LM",
        )


@dataclass(frozen=True)
class TrainPlan:
    """One DP fine-tuning run, as every worker executes it (built by the stage driver)."""

    run_id: str
    session: str  # hex; the secure aggregation's session id
    model_path: str
    lora: LoraLayout
    # optimisation and DP-SGD
    learning_rate: float
    weight_decay: float
    clip_norm: float
    noise_multiplier: float
    sampling_rate: float
    expected_batch_size: float
    steps: int
    planned_steps: int  # steps + restart headroom: the ledger's bound for this run
    micro_batch_size: int
    grad_sample_mode: str
    noise: str  # "central" or "secure"
    num_workers: int
    min_honest_workers: int | None
    secure_bits: int
    checkpoint_every: int
    threads_per_worker: int
    # data: where each worker finds its own partition (a folder and a count, never a record)
    partitions_dir: str
    partition_count: int
    partition_labels: tuple[dict, ...] | None
    unit: str
    num_units: int
    max_tokens: int
    prompt_ids: tuple[int, ...]
    prompt_len: int
    pad_id: int
    stop_id: int
    # outputs
    private_dir: str
    public_metrics: str
    private_metrics: str
    adapter_dir: str
    ledger_path: str | None
    fail_at_step: int | None = None
    progress: bool = False  # rank 0 draws a step bar on the driver (dpray.worker_progress)


def trainable_parameter_count(model_path: str, layout: LoraLayout) -> int:
    """Trainable (LoRA) parameters of ``layout`` on ``model_path``, from its config alone."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
        model = get_peft_model(base, layout.lora_config())
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def event_for(plan: TrainPlan, steps: int, secure_fields: dict | None):
    """The ledger event of ``steps`` executed steps: the central or the secure mechanism's."""
    common = {
        "noise_multiplier": plan.noise_multiplier,
        "sampling_rate": plan.sampling_rate,
        "steps": steps,
        "run_id": plan.run_id,
    }
    if secure_fields is None:
        return subsampled_gaussian_event("train-generator", **common)
    return subsampled_skellam_event(
        "train-generator", clip_norm=plan.clip_norm, **common, **secure_fields
    )


def resolve_scheme(requested: str, num_workers: int) -> str:
    """``auto`` → secure with more than one worker, central with one."""
    if requested == "auto":
        return "secure" if num_workers > 1 else "central"
    return requested
