"""``dpray sft``: supervised fine-tuning of the student on the teacher's responses.

TRL's ``SFTTrainer`` on conversational prompt/completion pairs, so the student's chat template
formats every example and the loss covers the response tokens only (``completion_only_loss``):
the synthetic instruction is context, not something the student should learn to write.  LoRA
(peft) by default, or all weights.  Runs on Ray Train workers (:mod:`dpray.stages.align.common`);
DDP, or DeepSpeed ZeRO with ``sft.deepspeed``.

Reads ``annotate/pairs/train.parquet`` (public: DP instructions, teacher responses, in TRL's
``prompt``/``completion`` columns as plain strings; the trainer wraps them as one user and one
assistant message, so the chat template applies).  Writes
``sft/model`` (a peft adapter plus tokenizer and ``dpray_model.json``, or a full model) and
``sft/metrics.json``: the mean loss on the first ``eval_examples`` training examples before and
after training, and the logged training losses.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from dpray.config import DprayConfig
from dpray.rundir import RunDir, write_json
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
from dpray.stages.align.models import is_adapter, load_tokenizer, write_meta
from dpray.stages.base import Stage, StageResult, register
from dpray.worker_progress import trainer_progress_callback

log = logging.getLogger(__name__)
STAGE_NAME = "sft"


LEGACY_COLUMNS = {"instruction": "prompt", "response": "completion"}  # dpray 0.1's pairs.parquet


def pairs_path(run_dir: RunDir) -> Path:
    """``annotate/pairs/train.parquet`` (written by :mod:`dpray.stages.annotate`); a run of an
    older dpray, whose annotate stage is done and skipped, has ``annotate/pairs.parquet``."""
    path = run_dir.root / "annotate" / "pairs" / "train.parquet"
    legacy = run_dir.root / "annotate" / "pairs.parquet"
    return legacy if legacy.is_file() and not path.is_file() else path


def load_pairs(path: Path, drop_truncated: bool = False) -> list[dict]:
    """``prompt``/``completion`` rows with a non-empty (and, optionally, finished) completion."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `dpray annotate` first")
    table = pq.read_table(path)
    table = table.rename_columns([LEGACY_COLUMNS.get(n, n) for n in table.column_names])
    rows = table.select(["prompt", "completion"]).to_pylist()
    cut = table.column("truncated").to_pylist() if "truncated" in table.column_names else None
    keep = []
    for i, row in enumerate(rows):
        if not (row["completion"] and row["completion"].strip()):
            continue  # an empty response teaches nothing
        if drop_truncated and cut is not None and cut[i]:
            continue
        keep.append(row)
    return keep


def build_plan(config: DprayConfig, run_dir: RunDir, rows: list[dict] | None = None) -> dict:
    """Everything a worker needs (plain values; the rows become an object-store ref on Ray)."""
    from dpray.models import resolve_causal_lm

    if rows is None:
        rows = load_pairs(pairs_path(run_dir), config.sft.drop_truncated)
    if not rows:
        raise ValueError(
            f"{STAGE_NAME}: no prompt/completion pairs to train on (all empty, or truncated: "
            "raise annotate.max_new_tokens or leave sft.drop_truncated off)"
        )
    plan = base_plan(STAGE_NAME, config.sft, config.seed, progress_enabled(config))
    plan.update({"model_path": str(resolve_causal_lm(config.sft.model)), "rows": rows})
    return plan


def to_dataset(rows: list[dict]):
    """TRL's conversational prompt/completion form of the pairs, so the student's chat template
    formats each example (the stored pairs are TRL's standard form: plain strings)."""
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": row["prompt"]}],
                "completion": [{"role": "assistant", "content": row["completion"]}],
            }
            for row in rows
        ]
    )


def build_trainer(plan: dict):
    """The ``SFTTrainer`` of a plan, untrained, and its tokenizer.

    The arguments come first: under ZeRO-3 they switch on ``deepspeed.zero.Init``, so
    ``from_pretrained`` partitions the weights across ranks as it loads them.
    """
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    s = plan["section"]
    args = TRLSFTConfig(
        **training_kwargs(plan, tempfile.mkdtemp(prefix="dpray-sft-")),
        max_length=s["max_length"],
        completion_only_loss=s["completion_only_loss"],
        packing=False,
    )
    tokenizer = load_tokenizer(plan["model_path"])
    data = to_dataset(rows_of(plan))
    probe = data.select(range(min(len(data), s["eval_examples"])))
    model = AutoModelForCausalLM.from_pretrained(
        plan["model_path"], dtype=model_dtype(plan, trained=True), local_files_only=True
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=probe,
        processing_class=tokenizer,
        peft_config=lora_config(s, "CAUSAL_LM") if s["lora"] else None,
        callbacks=trainer_progress_callback(plan["stage"], plan.get("progress", False)),
    )
    return trainer, tokenizer


def train(plan: dict):
    """Fine-tune in this process; returns ``(trainer, metrics, tokenizer)``."""
    trainer, tokenizer = build_trainer(plan)
    before = loss_before_training(trainer)  # scored once train() has prepared the model
    result = trainer.train()
    after = trainer.evaluate()["eval_loss"]
    data = trainer.train_dataset
    metrics = {
        "examples": len(data),
        "steps": int(result.global_step),
        "loss_before": float(before["loss"]),
        "loss_after": float(after),
        "train_losses": loss_history(trainer),
        "train_seconds": float(result.metrics.get("train_runtime", 0.0)),
        "world_size": int(trainer.args.world_size),
        "deepspeed_stage": (plan["deepspeed"] or {}).get("zero_optimization", {}).get("stage"),
    }
    return trainer, metrics, tokenizer


def run(config: DprayConfig, run_dir: RunDir) -> StageResult:
    plan = build_plan(config, run_dir)
    public = run_dir.public(STAGE_NAME)
    out = public / "model"
    log.info(
        "%s: %d pairs, %d worker(s), %s, deepspeed=%s",
        STAGE_NAME,
        len(plan["rows"]),
        config.sft.num_workers,
        "lora" if config.sft.lora else "full",
        config.sft.deepspeed,
    )
    metrics = fit(worker_loop(train), plan, config.sft, run_dir, out)
    write_meta(out, "lora" if is_adapter(out) else "full", config.sft.model)
    write_json(public / "metrics.json", metrics)
    log.info("%s: loss %.4f -> %.4f", STAGE_NAME, metrics["loss_before"], metrics["loss_after"])
    summary = {k: metrics[k] for k in ("examples", "steps", "loss_before", "loss_after")}
    return StageResult(
        outputs={"model": str(out), "metrics": str(public / "metrics.json")}, summary=summary
    )


def _inputs(config: DprayConfig, run_dir: RunDir) -> list[Path]:
    return [pairs_path(run_dir)]


STAGE = register(
    Stage(
        name=STAGE_NAME,
        run=run,
        help="Supervised fine-tuning on the teacher's responses (TRL SFTTrainer on Ray Train).",
        reads="annotate/pairs/train.parquet (prompt, completion)",
        writes="sft/model (peft adapter or full model), sft/metrics.json",
        sections=("sft", "seed"),
        inputs=_inputs,
        needs_ray=True,
    )
)

__all__ = ["STAGE", "build_plan", "build_trainer", "load_pairs", "run", "to_dataset", "train"]
