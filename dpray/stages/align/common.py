"""Ray Train and DeepSpeed glue shared by the SFT, reward and PPO stages.

Each trainer runs as a Ray Train ``TorchTrainer`` job: one process per worker, with the process
group set up by Ray (gloo on CPU, NCCL on GPU) and the usual ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
environment, which is all a TRL trainer (through accelerate) needs to run DDP -- or DeepSpeed
ZeRO when the section names a stage (``TrainingArguments(deepspeed=<dict>)``).  Rank 0 saves the
result and reports it as a Ray Train checkpoint; the driver copies that into the run directory,
which works the same on one machine and on a cluster with shared storage.

A stage module provides ``build_plan`` (driver side: paths and data, plain picklable values),
``train(plan) -> (trainer, metrics)`` (any process: tests call it directly) and uses
:func:`worker_loop` / :func:`fit` here to run it on Ray.

On GPUs a worker builds its trainer's arguments *before* it loads a model (under ZeRO-3 the
arguments switch on ``deepspeed.zero.Init``, so ``from_pretrained`` partitions the weights as it
reads them instead of holding a full copy per rank), loads in the dtype :func:`model_dtype`
picks for the device, and scores the loss before training only once the trainer has prepared
its model (:func:`loss_before_training`): under DeepSpeed the model stays on the CPU until then.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from dpray.config import AlignTrainerConfig
from dpray.resources import WorkerShape, fit_workers
from dpray.rundir import RunDir, write_json

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
_CACHE_ENV = ("TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR", "HF_HUB_DISABLE_TELEMETRY")


# ------------------------------------------------------------------------------------ DeepSpeed


def shipped_deepspeed_config(stage: int) -> dict:
    """The packaged ZeRO config for ``stage`` (0-2 share ``zero2.json``, 3 has its own)."""
    name = "zero3.json" if stage == 3 else "zero2.json"
    ref = resources.files("dpray") / "configs" / "deepspeed" / name
    config = json.loads(ref.read_text())
    config["zero_optimization"]["stage"] = stage
    return config


def deepspeed_config(section: AlignTrainerConfig) -> dict | None:
    """The DeepSpeed dict for ``TrainingArguments(deepspeed=...)``, or None for plain DDP.

    ``"auto"`` values are filled in by transformers from the training arguments, so one file
    serves every batch size and precision.
    """
    if section.deepspeed_config:
        config = json.loads(Path(section.deepspeed_config).expanduser().read_text())
        if section.deepspeed is not None:
            config.setdefault("zero_optimization", {})["stage"] = section.deepspeed
        return config
    if section.deepspeed is None:
        return None
    return shipped_deepspeed_config(section.deepspeed)


# ------------------------------------------------------------------------------- trainer inputs


def use_bf16(precision: str, use_gpu: bool) -> bool:
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    import torch

    return bool(use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def model_dtype(plan: dict, trained: bool = False):
    """The dtype a worker loads a model in: bf16 where the trainer computes in bf16, else fp32.

    The trainer computes in bf16 on GPUs that support it (``precision: auto``) or when asked
    (``precision: bf16``); on CPU, ``auto`` stays fp32, where bf16 matmuls are slow or emulated.
    In bf16 mode a model whose weights no plain optimiser updates loads in bf16: a frozen one
    (reward model, KL reference, the base under LoRA) or one whose fp32 master copy DeepSpeed
    keeps.  ``trained`` weights that a torch optimiser updates directly (full fine-tuning without
    DeepSpeed) stay fp32 under autocast: bf16 AdamW updates lose small steps.
    """
    import torch

    s = plan["section"]
    if not use_bf16(s["precision"], s["use_gpu"]):
        return torch.float32
    if not trained or s["lora"] or _deepspeed_bf16(plan.get("deepspeed")):
        return torch.bfloat16
    return torch.float32


def _deepspeed_bf16(config: dict | None) -> bool:
    """Whether a DeepSpeed config trains in bf16 (``"auto"`` follows the trainer's bf16 flag,
    which :func:`model_dtype` has already found on)."""
    if config is None:
        return False
    return config.get("bf16", {}).get("enabled", False) in (True, "auto")


def checkpointing_argument() -> str:
    """``TrainingArguments``' name for recomputing activations in the backward pass.

    transformers renamed ``gradient_checkpointing`` to ``activation_checkpointing`` during 5.x
    (5.24 has the new name, 5.17 only the old one: SFT crashed there with a ``TypeError`` on a
    GPU machine whose image ships 5.17), so the name is read off the installed class.
    """
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return (
        "activation_checkpointing"
        if "activation_checkpointing" in names
        else "gradient_checkpointing"
    )


def training_kwargs(plan: dict, output_dir: str) -> dict:
    """Arguments every TRL config here shares (a ``transformers.TrainingArguments`` subset)."""
    s = plan["section"]
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": s["batch_size"],
        "per_device_eval_batch_size": s["batch_size"],
        "gradient_accumulation_steps": s["gradient_accumulation_steps"],
        "num_train_epochs": s["epochs"],
        "max_steps": s["max_steps"] or -1,
        "learning_rate": s["learning_rate"],
        "weight_decay": s["weight_decay"],
        "lr_scheduler_type": "linear",
        "logging_steps": s["logging_steps"],
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": not s["use_gpu"],
        "bf16": use_bf16(s["precision"], s["use_gpu"]),
        checkpointing_argument(): (
            s["use_gpu"] if s["activation_checkpointing"] is None else s["activation_checkpointing"]
        ),
        "deepspeed": copy.deepcopy(plan["deepspeed"]),
        "disable_tqdm": True,
        "seed": plan["seed"],
        "data_seed": plan["seed"],
        "dataloader_num_workers": 0,
        "ddp_find_unused_parameters": False,
    }


def lora_config(section: dict, task_type: str):
    """The peft LoRA config of a section (``task_type``: CAUSAL_LM or SEQ_CLS)."""
    from peft import LoraConfig

    return LoraConfig(
        r=section["lora_r"],
        lora_alpha=section["lora_alpha"],
        lora_dropout=section["lora_dropout"],
        target_modules=list(section["lora_targets"]),
        task_type=task_type,
    )


def base_plan(stage: str, section: AlignTrainerConfig, seed: int, progress: bool = False) -> dict:
    """What every worker needs to know apart from the stage's own data and model paths.

    ``progress``: rank 0 draws its optimiser steps on the driver (:func:`dpray.worker_progress.trainer_progress_callback`).
    """
    return {
        "stage": stage,
        "progress": progress,
        "run_id": secrets.token_hex(6),
        "seed": seed,
        "section": section.model_dump(mode="json"),
        "deepspeed": deepspeed_config(section),
        "env": {k: os.environ[k] for k in _CACHE_ENV if k in os.environ},
    }


def loss_history(trainer: Any, key: str = "loss") -> list[float]:
    return [float(h[key]) for h in trainer.state.log_history if key in h]


def rows_of(plan: dict, key: str = "rows") -> list:
    """The plan's data: inline in tests, an object-store reference on Ray."""
    rows = plan[key]
    if isinstance(rows, list):
        return rows
    import ray

    return ray.get(rows)


# ---------------------------------------------------------------------------- worker side


def setup_worker(plan: dict) -> None:
    """Threads, cache directories and stdout hygiene of a training process."""
    import torch

    for key, value in plan.get("env", {}).items():
        os.environ.setdefault(key, value)
    threads = plan.get("threads")
    if threads:
        torch.set_num_threads(threads)
    _unpatch_print()


def _unpatch_print() -> None:
    """Undo Ray Train's ``print`` patch in this worker.

    Ray Train routes every ``print`` to its logger even while ``sys.stdout`` is redirected.
    ``datasets`` fingerprints each ``map`` function with dill, which runs ``dis.dis`` under a
    redirected stdout to find globals: with the patch, thousands of bytecode lines per dataset
    land in the logs.
    """
    import builtins

    with contextlib.suppress(ImportError, AttributeError):
        from ray.train.v2._internal.logging import patch_print

        builtins.print = patch_print._original_print


def probe_loss(trainer: Any) -> float:
    """Mean loss on the trainer's eval set with the model as the trainer prepared it.

    Runs from :func:`loss_before_training` at ``on_train_begin``, i.e. after ``prepare``: the
    model is the DDP wrapper or DeepSpeed engine (``trainer.model_wrapped``) on the trainer's own
    device, where ``_prepare_inputs`` puts each batch.  Before ``prepare`` DeepSpeed leaves the
    model on the CPU while the batches go to the GPU, and ``trainer.evaluate()`` would start a
    ZeRO *inference* engine, which only ZeRO-3 supports.  The loss comes from the trainer's own
    eval batches and loss function, summed over ranks.
    """
    import torch
    import torch.distributed as dist

    if getattr(trainer, "is_deepspeed_enabled", False) and trainer.model_wrapped is trainer.model:
        raise RuntimeError("probe_loss: DeepSpeed has not prepared the model yet (run in train())")
    model = trainer.model_wrapped
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=trainer.args.device)
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            batch = trainer._prepare_inputs(batch)
            loss = trainer.compute_loss(model, batch)
            rows = next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
            total += torch.tensor(
                [float(loss) * rows, rows], dtype=torch.float64, device=total.device
            )
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    model.train(was_training)
    # TRL trainers collect per-batch eval statistics (accuracy, entropy) in ``_metrics``; drop
    # the probe's, or the next evaluate() would average them into the after-training figures.
    side_metrics = getattr(trainer, "_metrics", None)
    if isinstance(side_metrics, dict) and "eval" in side_metrics:
        side_metrics["eval"].clear()
    return float(total[0] / total[1])


def loss_before_training(trainer: Any) -> dict:
    """Register a callback that runs :func:`probe_loss` when training begins (after ``prepare``).

    Returns the dict the loss lands in (``"loss"``) once ``trainer.train()`` has started.
    """
    from transformers import TrainerCallback

    result: dict = {}

    class ProbeLoss(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            result["loss"] = probe_loss(trainer)

    trainer.add_callback(ProbeLoss())
    return result


def save_trained(trainer: Any, out_dir: str | Path, metrics: dict, tokenizer: Any) -> None:
    """Save the model (every rank must call: ZeRO-3 gathers shards), tokenizer and metrics."""
    out_dir = Path(out_dir)
    trainer.save_model(str(out_dir))
    if trainer.args.process_index == 0:
        tokenizer.save_pretrained(str(out_dir))
        (out_dir / "training_args.bin").unlink(missing_ok=True)
        write_json(out_dir / METRICS_FILE, metrics)


def worker_loop(train: Callable[[dict], tuple[Any, dict, Any]]) -> Callable[[dict], None]:
    """A Ray Train ``train_loop_per_worker`` running ``train(plan)`` and reporting its result."""

    def loop(plan: dict) -> None:
        import ray.train

        setup_worker(plan)
        trainer, metrics, tokenizer = train(plan)
        rank = ray.train.get_context().get_world_rank()
        with tempfile.TemporaryDirectory(prefix="dpray-out-") as tmp:
            save_trained(trainer, tmp, metrics, tokenizer)
            checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
            ray.train.report({"done": 1}, checkpoint=checkpoint)

    return loop


# ---------------------------------------------------------------------------- driver side


def worker_shape(stage: str, section: AlignTrainerConfig, nodes=None) -> WorkerShape:
    """Each Ray Train worker's CPUs/GPUs, fitted to the alive nodes' shapes (``cpus_per_worker``
    when set, else as many as still place every worker); a clear error at once if none fits."""
    return fit_workers(
        stage,
        section.num_workers,
        gpus=1 if section.use_gpu else 0,
        cpus=section.cpus_per_worker or None,
        nodes=nodes,
    )


def fit(
    loop: Callable[[dict], None],
    plan: dict,
    section: AlignTrainerConfig,
    run_dir: RunDir,
    out_dir: Path,
) -> dict:
    """Run ``loop`` on ``section.num_workers`` Ray Train workers; copy the result to ``out_dir``.

    Returns the metrics rank 0 saved.  Ray's own files (results, worker logs) stay under
    ``private/<stage>/`` like every other stage's logs.
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    plan = dict(plan)
    for key in ("rows", "prompts"):
        if isinstance(plan.get(key), list):
            plan[key] = ray.put(plan[key])
    shape = worker_shape(plan["stage"], section)
    plan["threads"] = shape.cpus
    storage = run_dir.private(plan["stage"]) / "ray_results"
    name = f"{plan['stage']}-{plan['run_id']}"
    trainer = TorchTrainer(
        loop,
        train_loop_config=plan,
        torch_config=TorchConfig(backend="nccl" if section.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=section.num_workers,
            use_gpu=section.use_gpu,
            resources_per_worker={"CPU": shape.cpus, **({"GPU": shape.gpus} if shape.gpus else {})},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=section.max_failures),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{plan['stage']}: training produced no checkpoint")
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    result.checkpoint.to_directory(str(out_dir))
    shutil.rmtree(storage / name, ignore_errors=True)  # a second copy of the model
    return json.loads((out_dir / METRICS_FILE).read_text())


__all__ = [
    "METRICS_FILE",
    "base_plan",
    "deepspeed_config",
    "fit",
    "lora_config",
    "loss_before_training",
    "loss_history",
    "model_dtype",
    "probe_loss",
    "rows_of",
    "save_trained",
    "setup_worker",
    "shipped_deepspeed_config",
    "training_kwargs",
    "use_bf16",
    "worker_loop",
]
