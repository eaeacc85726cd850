"""``dpray reward``: the reward model for PPO and for win-rate judging.

TRL's ``RewardTrainer`` (Bradley-Terry loss on chosen/rejected pairs) on a one-logit
sequence-classification head over the ``reward.model`` backbone, run on Ray Train workers like
SFT.  With LoRA the adapter and the trained score head are merged into a full model at the end,
because PPO's value model is initialised from the reward model and needs plain weights.  With
``reward.pretrained`` an existing reward model is used as is and nothing is trained.

Reads ``annotate/preferences/train.parquet``.  Writes ``reward/model`` (a full
sequence-classification model), ``reward/reward.json`` (where the reward model lives: what
``ppo`` and ``evaluate`` read) and ``reward/metrics.json`` (loss before and after; pairwise
accuracy on training pairs after).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from dpray.config import DprayConfig
from dpray.rundir import RunDir, read_json, write_json
from dpray.runtime import progress_enabled
from dpray.stages.align.common import (
    base_plan,
    fit,
    lora_config,
    loss_before_training,
    loss_history,
    model_dtype,
    rows_of,
    training_kwargs,
    worker_loop,
)
from dpray.stages.align.models import (
    fp32_score_head,
    is_adapter,
    merge_reward_adapter,
    new_reward_model,
    write_meta,
)
from dpray.stages.base import Stage, StageResult, register
from dpray.worker_progress import trainer_progress_callback

log = logging.getLogger(__name__)
STAGE_NAME = "reward"
POINTER_FILE = "reward.json"


def preferences_path(run_dir: RunDir) -> Path:
    """``annotate/preferences/train.parquet``; a run of an older dpray (its annotate stage done
    and skipped) has ``annotate/preferences.parquet``."""
    path = run_dir.root / "annotate" / "preferences" / "train.parquet"
    legacy = run_dir.root / "annotate" / "preferences.parquet"
    return legacy if legacy.is_file() and not path.is_file() else path


def reward_model_path(run_dir: RunDir, override: str | None = None) -> Path:
    """The reward model to use: ``override`` if given, else what the reward stage recorded."""
    if override:
        return Path(override).expanduser()
    pointer = run_dir.root / STAGE_NAME / POINTER_FILE
    if not pointer.is_file():
        raise FileNotFoundError(f"{pointer} not found: run `dpray reward` first")
    return Path(read_json(pointer)["path"])


def load_preferences(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `dpray annotate` with preferences")
    return pq.read_table(path, columns=["prompt", "chosen", "rejected"]).to_pylist()


def build_plan(config: DprayConfig, run_dir: RunDir, rows: list[dict] | None = None) -> dict:
    rows = load_preferences(preferences_path(run_dir)) if rows is None else rows
    if not rows:
        raise ValueError(f"{STAGE_NAME}: no preference pairs to train on")
    plan = base_plan(STAGE_NAME, config.reward, config.seed, progress_enabled(config))
    plan.update({"model_spec": config.reward.model, "rows": rows})
    return plan


def to_dataset(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": row["prompt"]}],
                "chosen": [{"role": "assistant", "content": row["chosen"]}],
                "rejected": [{"role": "assistant", "content": row["rejected"]}],
            }
            for row in rows
        ]
    )


def build_trainer(plan: dict):
    """The ``RewardTrainer`` of a plan, untrained, and its tokenizer.

    The arguments come first: under ZeRO-3 they switch on ``deepspeed.zero.Init``, so
    ``from_pretrained`` partitions the weights across ranks as it loads them.
    """
    import torch
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    s = plan["section"]
    args = TRLRewardConfig(
        **training_kwargs(plan, tempfile.mkdtemp(prefix="dpray-reward-")),
        max_length=s["max_length"],
        center_rewards_coefficient=s["center_rewards_coefficient"],
    )
    dtype = model_dtype(plan, trained=True)
    model, tokenizer = new_reward_model(plan["model_spec"], dtype)
    if dtype != torch.float32:
        fp32_score_head(model)  # a bf16 backbone (LoRA base or DeepSpeed's); the head trains
    data = to_dataset(rows_of(plan))
    probe = data.select(range(min(len(data), s["eval_examples"])))
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=probe,
        processing_class=tokenizer,
        peft_config=lora_config(s, "SEQ_CLS") if s["lora"] else None,
        callbacks=trainer_progress_callback(plan["stage"], plan.get("progress", False)),
    )
    return trainer, tokenizer


def train(plan: dict):
    """Train in this process; returns ``(trainer, metrics, tokenizer)``."""
    trainer, tokenizer = build_trainer(plan)
    before = loss_before_training(trainer)  # scored once train() has prepared the model
    result = trainer.train()
    after = trainer.evaluate()
    metrics = {
        "pairs": len(trainer.train_dataset),
        "steps": int(result.global_step),
        "accuracy_after": float(after.get("eval_accuracy", float("nan"))),
        "margin_after": float(after.get("eval_margin", float("nan"))),
        "loss_before": float(before["loss"]),
        "loss_after": float(after["eval_loss"]),
        "train_losses": loss_history(trainer),
        "world_size": int(trainer.args.world_size),
    }
    return trainer, metrics, tokenizer


def finalize(out: Path, base_spec: str) -> None:
    """Make ``out`` a full reward model (merging a LoRA adapter and its score head)."""
    if is_adapter(out):
        merged = out.with_name(out.name + ".merged")
        shutil.rmtree(merged, ignore_errors=True)
        merge_reward_adapter(out, merged, base_spec)
        shutil.copy2(out / "metrics.json", merged / "metrics.json")
        shutil.rmtree(out)
        merged.rename(out)
    write_meta(out, "reward", base_spec)


def run(config: DprayConfig, run_dir: RunDir) -> StageResult:
    rc = config.reward
    public = run_dir.public(STAGE_NAME)
    if rc.pretrained:
        path = Path(rc.pretrained).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"reward.pretrained: {path} is not a model directory")
        write_json(public / POINTER_FILE, {"path": str(path), "trained": False})
        return StageResult(outputs={"pointer": str(public / POINTER_FILE)}, summary={})
    plan = build_plan(config, run_dir)
    out = public / "model"
    log.info("%s: %d pairs, %d worker(s)", STAGE_NAME, len(plan["rows"]), rc.num_workers)
    metrics = fit(worker_loop(train), plan, rc, run_dir, out)
    finalize(out, rc.model)
    write_json(public / "metrics.json", metrics)
    write_json(public / POINTER_FILE, {"path": str(out), "trained": True})
    log.info(
        "%s: loss %.4f -> %.4f, pairwise accuracy %.3f",
        STAGE_NAME,
        metrics["loss_before"],
        metrics["loss_after"],
        metrics["accuracy_after"],
    )
    keys = ("pairs", "steps", "loss_before", "loss_after", "accuracy_after")
    summary = {k: metrics[k] for k in keys}
    return StageResult(
        outputs={
            "model": str(out),
            "pointer": str(public / POINTER_FILE),
            "metrics": str(public / "metrics.json"),
        },
        summary=summary,
    )


def _inputs(config: DprayConfig, run_dir: RunDir) -> list[Path]:
    if config.reward.pretrained:
        return [Path(config.reward.pretrained).expanduser()]
    return [preferences_path(run_dir)]


STAGE = register(
    Stage(
        name=STAGE_NAME,
        run=run,
        help="Train the reward model on preference pairs (TRL RewardTrainer on Ray Train).",
        reads="annotate/preferences/train.parquet (or reward.pretrained)",
        writes="reward/model (sequence classification), reward/reward.json, reward/metrics.json",
        sections=("reward", "seed"),
        inputs=_inputs,
        needs_ray=True,
    )
)

__all__ = [
    "STAGE",
    "build_plan",
    "build_trainer",
    "load_preferences",
    "reward_model_path",
    "run",
    "train",
]
