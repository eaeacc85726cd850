"""``dpray ppo``: PPO against the reward model, on the synthetic instructions as prompts.

The algorithm is TRL's ``PPOTrainer`` (``trl.experimental.ppo``, TRL 1.12: TRL 1.13 removed it,
which is why dpray pins ``trl==1.12.*``; the pin was checked against transformers 5.24, where
SFTTrainer, RewardTrainer and PPOTrainer all run).  Per rollout batch: the policy samples a
response to each prompt; the reward model scores it; the per-token reward is the score at the
end minus ``kl_coef`` times the KL to the reference; a value model (the reward model with a
LoRA adapter on its frozen backbone and its score head trained; every weight with ``ppo.lora``
off) gives GAE advantages; then ``num_ppo_epochs`` of clipped policy and value updates.

Starting point and reference: the SFT model (``RUN_DIR/sft/model``, its adapter merged).  With
``ppo.lora`` (default) a fresh LoRA adapter on top of it is the policy and the same network with
the adapter switched off is the KL reference, so no second copy is held; the trained adapter is
merged at the end, and ``ppo/model`` is a full model (a LoRA on top of a merged SFT model could
not be loaded from the original base alone).

On GPUs: the models load in bf16 (:func:`~dpray.stages.align.common.model_dtype`) after the
PPO arguments exist (under ZeRO-3 they switch on ``deepspeed.zero.Init``, so each rank holds
only its partition; a LoRA SFT start policy is then merged once on the driver, because a
partitioned weight cannot take a merge).  TRL 1.12's ``PPOTrainer`` builds its ``Accelerator``
without the DeepSpeed plugin the arguments carry; :func:`accelerator_state` sets up accelerate's
shared state with that plugin first, and the trainer's ``Accelerator`` reuses it.

Reads ``filter/filtered.parquet``, the SFT model and the reward model.  Writes ``ppo/model`` and
``ppo/metrics.json`` (per step: mean score, KL, policy and value losses).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
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
    model_dtype,
    rows_of,
    training_kwargs,
    worker_loop,
)
from dpray.stages.align.models import (
    chat_prompt_ids,
    fp32_score_head,
    is_adapter,
    load_causal_lm,
    load_reward_model,
    write_meta,
)
from dpray.stages.align.reward import reward_model_path
from dpray.stages.base import Stage, StageResult, register
from dpray.worker_progress import trainer_progress_callback

log = logging.getLogger(__name__)
STAGE_NAME = "ppo"
STEP_KEYS = {
    "objective/scores": "score",
    "objective/kl": "kl",
    "objective/rlhf_reward": "rlhf_reward",
    "loss/policy_avg": "policy_loss",
    "loss/value_avg": "value_loss",
    "policy/entropy_avg": "entropy",
}


def prompts_path(run_dir: RunDir) -> Path:
    return run_dir.root / "filter" / "filtered.parquet"


def policy_spec(config: DprayConfig, run_dir: RunDir) -> str:
    if config.ppo.policy:
        return config.ppo.policy
    sft = run_dir.root / "sft" / "model"
    if not sft.is_dir():
        raise FileNotFoundError(f"{sft} not found: run `dpray sft` first or set ppo.policy")
    return str(sft)


def load_prompts(path: Path, limit: int | None) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `dpray filter` first")
    texts = [t for t in pq.read_table(path, columns=["text"]).column("text").to_pylist() if t]
    return texts[:limit] if limit else texts


def build_plan(config: DprayConfig, run_dir: RunDir, prompts: list[str] | None = None) -> dict:
    pc = config.ppo
    prompts = load_prompts(prompts_path(run_dir), pc.max_prompts) if prompts is None else prompts
    if not prompts:
        raise ValueError(f"{STAGE_NAME}: no prompts")
    plan = base_plan(STAGE_NAME, pc, config.seed, progress_enabled(config))
    plan.update(
        {
            "policy": policy_spec(config, run_dir),
            "reward_model": str(reward_model_path(run_dir, pc.reward_model)),
            "prompts": prompts,
        }
    )
    return plan


def _ppo_args(plan: dict, num_prompts: int):
    from trl.experimental.ppo import PPOConfig as TRLPPOConfig

    s = plan["section"]
    kwargs = training_kwargs(plan, tempfile.mkdtemp(prefix="dpray-ppo-"))
    kwargs.pop("max_steps")  # PPO counts episodes: a step is one rollout batch
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if s["total_episodes"]:
        episodes = s["total_episodes"]
    elif s["max_steps"]:
        episodes = s["max_steps"] * s["batch_size"] * s["gradient_accumulation_steps"] * world
    else:
        episodes = math.ceil(s["epochs"] * num_prompts)
    return TRLPPOConfig(
        **kwargs,
        # PPOConfig's own ``world_size`` field (None until the trainer sets it) shadows
        # TrainingArguments.world_size, which transformers reads to fill DeepSpeed's "auto" sizes.
        world_size=world,
        total_episodes=episodes,
        response_length=s["response_length"],
        temperature=s["temperature"],
        num_ppo_epochs=s["num_ppo_epochs"],
        num_mini_batches=s["num_mini_batches"],
        kl_coef=s["kl_coef"],
        kl_estimator=s["kl_estimator"],
        cliprange=s["cliprange"],
        cliprange_value=s["cliprange_value"],
        vf_coef=s["vf_coef"],
        gamma=s["gamma"],
        lam=s["lam"],
        whiten_rewards=s["whiten_rewards"],
        missing_eos_penalty=s["missing_eos_penalty"],
        stop_token="eos",
        local_rollout_forward_batch_size=s["batch_size"],
        num_sample_generations=0,
    )


def accelerator_state(args):
    """accelerate's shared state for ``args``, with its DeepSpeed plugin when it has one.

    TRL 1.12's ``PPOTrainer`` creates ``Accelerator(gradient_accumulation_steps=...)`` and
    never passes ``args.deepspeed_plugin``: on GPUs the state then says DEEPSPEED with no
    plugin and ``prepare`` dereferences ``None``; on CPU PPO silently runs plain DDP.  An
    ``Accelerator`` created first with the plugin (and the trainer's bf16 flag as mixed
    precision) fixes the shared state, and accelerate hands the same plugin to any later
    ``Accelerator`` created without one -- the trainer's.
    """
    from accelerate import Accelerator

    # TrainingArguments sets up (and resets) accelerate's shared state the first time its
    # device is read; after that it is cached, so the state built here stays.
    _ = args.device
    return Accelerator(
        deepspeed_plugin=args.deepspeed_plugin,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision="bf16" if args.bf16 else "no",
    )


def value_model(plan: dict):
    """PPO's value model, initialised from the reward model.

    With ``ppo.lora`` (default) its backbone is frozen in the load dtype behind a LoRA adapter
    (fp32 weights) and only the adapter and the one-logit score head (fp32) train, so it costs
    one frozen copy of the weights rather than weights, gradients and optimiser state of a
    second full model.  With ``ppo.lora`` off every weight trains, as the policy's do.
    """
    s = plan["section"]
    if not s["lora"]:
        return load_reward_model(plan["reward_model"], model_dtype(plan, True), device=None)[0]
    from peft import inject_adapter_in_model

    model, _ = load_reward_model(plan["reward_model"], model_dtype(plan), device=None)
    model = inject_adapter_in_model(lora_config(s, "SEQ_CLS"), model)
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name or name.startswith("score.")
        if "lora_" in name:
            param.data = param.data.float()
    return fp32_score_head(model)


def _ppo_trainer_class():
    """TRL's ``PPOTrainer`` with two DeepSpeed gaps closed (both also on CPU with DeepSpeed).

    * Optimiser groups: transformers splits the trainable parameters into a weight-decay and a
      no-decay group; with LoRA policy and value models (norms frozen) the no-decay group is
      empty.  DeepSpeed drops empty groups from the optimiser it wraps, but PPOTrainer creates
      its learning-rate scheduler before ``prepare``, over both, and the first ``step()`` fails
      on the mismatch.  Empty groups are dropped before the scheduler exists.
    * Saving: PPOTrainer's ``save_model`` hands transformers the bare policy as
      ``self.deepspeed``, which then reads the engine's config off the model config and fails.
      Under DeepSpeed the policy's weights are taken from the engine instead (ZeRO-3: gathered
      from the partitions on every rank, frozen ones left out for a LoRA policy) and rank 0
      saves the policy (a LoRA adapter or a full model) with them.
    """
    from trl.experimental.ppo import PPOTrainer

    class DprayPPOTrainer(PPOTrainer):
        def create_optimizer(self, model=None):
            optimizer = super().create_optimizer(model)
            optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
            return optimizer

        def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
            if not self.is_deepspeed_enabled:
                return super().save_model(output_dir, _internal_call)
            engine = self.model
            if engine.zero_optimization_partition_weights():  # ZeRO-3: a collective
                state = engine._zero3_consolidated_16bit_state_dict(
                    exclude_frozen_parameters=self.is_peft_model
                )
            else:
                state = engine.module.state_dict()
            if self.args.should_save:
                policy = {
                    k[len("policy.") :]: v for k, v in state.items() if k.startswith("policy.")
                }
                engine.module.policy.save_pretrained(
                    output_dir or self.args.output_dir, state_dict=policy, safe_serialization=True
                )
            return None

    return DprayPPOTrainer


def _attribute_forwarding_ddp():
    from torch.nn.parallel import DistributedDataParallel

    class AttributeForwardingDDP(DistributedDataParallel):
        """DDP that falls back to its module's attributes, like a DeepSpeed engine does."""

        def __getattr__(self, name: str):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.module, name)

    return DistributedDataParallel, AttributeForwardingDDP


def patch_for_transformers5(trainer) -> None:
    """Two gaps between TRL 1.12's PPOTrainer and transformers 5 / DDP, closed in place.

    * The trainer reads ``self.model.policy`` on the *prepared* model (the KL reference pass with
      a LoRA policy, and ``save_model``).  A DeepSpeed engine forwards unknown attributes to its
      module; DistributedDataParallel does not -- and under Ray Train a process group always
      exists, so accelerate wraps even one worker in DDP.  The wrapper's class is swapped for a
      subclass that forwards the lookup (no new state; gradient syncing unchanged).
    * PPOTrainer skips ``transformers.Trainer.__init__``, so ``save_model`` on ranks other than 0
      misses ``is_distributed_loading_by_transformers``; its default there is False.
    """
    ddp, forwarding = _attribute_forwarding_ddp()
    if isinstance(trainer.model, ddp) and not isinstance(trainer.model, forwarding):
        trainer.model.__class__ = forwarding
    if not hasattr(trainer, "is_distributed_loading_by_transformers"):
        trainer.is_distributed_loading_by_transformers = False


def build_trainer(plan: dict):
    """The ``PPOTrainer`` of a plan (models prepared, nothing trained) and its tokenizer."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset

    s = plan["section"]
    prompts = rows_of(plan, "prompts")
    args = _ppo_args(plan, len(prompts))  # first: under ZeRO-3 it turns on zero.Init
    accelerator_state(args)
    frozen = model_dtype(plan)
    policy, tokenizer = load_causal_lm(plan["policy"], model_dtype(plan, True), device=None)
    tokenizer.padding_side = "left"  # rollouts generate from left-padded prompts
    reward_model, _ = load_reward_model(plan["reward_model"], frozen, device=None)
    reference = None if s["lora"] else load_causal_lm(plan["policy"], frozen, device=None)[0]
    ids = [chat_prompt_ids(tokenizer, text)[-s["max_length"] :] for text in prompts]
    trainer = _ppo_trainer_class()(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=reward_model,
        value_model=value_model(plan),
        train_dataset=Dataset.from_dict({"input_ids": ids}),
        peft_config=lora_config(s, "CAUSAL_LM") if s["lora"] else None,
        callbacks=trainer_progress_callback(plan["stage"], plan.get("progress", False)),
    )
    patch_for_transformers5(trainer)
    return trainer, tokenizer


def train(plan: dict):
    """Run PPO in this process; returns ``(trainer, metrics, tokenizer)``."""
    trainer, tokenizer = build_trainer(plan)
    trainer.train()
    steps = [
        {name: float(h[key]) for key, name in STEP_KEYS.items() if key in h}
        for h in trainer.state.log_history
        if "objective/scores" in h
    ]
    metrics = {
        "prompts": len(trainer.train_dataset),
        "episodes": int(trainer.args.total_episodes),
        "steps": steps,
        "world_size": int(trainer.args.world_size),
        **score_trend([step["score"] for step in steps]),
    }
    return trainer, metrics, tokenizer


def score_trend(scores: list[float]) -> dict:
    """Mean reward over the first and the last quarter of steps (at least one step each)."""
    if not scores:
        return {"score_first": float("nan"), "score_last": float("nan")}
    k = max(1, len(scores) // 4)
    return {"score_first": sum(scores[:k]) / k, "score_last": sum(scores[-k:]) / k}


def zero_stage(plan: dict) -> int | None:
    return (plan["deepspeed"] or {}).get("zero_optimization", {}).get("stage")


def merge_start_policy(plan: dict, directory: Path) -> bool:
    """Under ZeRO-3, merge a LoRA start policy into a full model in ``directory`` once, here.

    Workers load under ``deepspeed.zero.Init``, where each weight is a partition that an
    adapter merge cannot touch; merging on every rank instead would hold a full copy per rank.
    Points ``plan["policy"]`` at the merged model; returns whether it merged.
    """
    if zero_stage(plan) != 3 or not is_adapter(plan["policy"]):
        return False
    model, tokenizer = load_causal_lm(plan["policy"])
    shutil.rmtree(directory, ignore_errors=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    plan["policy"] = str(directory)
    return True


def finalize(out: Path, policy: str, spec: str | None = None) -> None:
    """Make ``out`` a full causal LM: merge a trained LoRA adapter into the start policy.

    ``spec``: the start policy as configured, recorded as the base (default ``policy``).
    """
    if is_adapter(out):
        from peft import PeftModel

        model, tokenizer = load_causal_lm(policy)
        merged_dir = out.with_name(out.name + ".merged")
        shutil.rmtree(merged_dir, ignore_errors=True)
        merged = PeftModel.from_pretrained(model, str(out)).merge_and_unload()
        merged.save_pretrained(merged_dir, safe_serialization=True)
        tokenizer.save_pretrained(merged_dir)
        shutil.copy2(out / "metrics.json", merged_dir / "metrics.json")
        shutil.rmtree(out)
        merged_dir.rename(out)
    write_meta(out, "full", spec or policy)


def run(config: DprayConfig, run_dir: RunDir) -> StageResult:
    pc = config.ppo
    plan = build_plan(config, run_dir)
    public = run_dir.public(STAGE_NAME)
    out = public / "model"
    log.info("%s: %d prompts, %d worker(s)", STAGE_NAME, len(plan["prompts"]), pc.num_workers)
    spec = plan["policy"]
    start = public / "start_policy"
    merge_start_policy(plan, start)
    metrics = fit(worker_loop(train), plan, pc, run_dir, out)
    finalize(out, plan["policy"], spec)
    shutil.rmtree(start, ignore_errors=True)
    write_json(public / "metrics.json", metrics)
    log.info(
        "%s: mean score %.4f (first steps) -> %.4f (last steps)",
        STAGE_NAME,
        metrics["score_first"],
        metrics["score_last"],
    )
    summary = {k: metrics[k] for k in ("prompts", "episodes", "score_first", "score_last")}
    return StageResult(
        outputs={"model": str(out), "metrics": str(public / "metrics.json")}, summary=summary
    )


def _inputs(config: DprayConfig, run_dir: RunDir) -> list[Path]:
    paths = [prompts_path(run_dir)]
    paths.append(Path(config.ppo.policy) if config.ppo.policy else run_dir.root / "sft" / "model")
    if config.ppo.reward_model:
        paths.append(Path(config.ppo.reward_model))
    else:
        paths += [run_dir.root / "reward" / "reward.json", run_dir.root / "reward" / "model"]
    return paths


STAGE = register(
    Stage(
        name=STAGE_NAME,
        run=run,
        help="PPO on the synthetic instructions with the reward model (TRL PPOTrainer on Ray).",
        reads="filter/filtered.parquet, sft/model, reward/reward.json (reward/model)",
        writes="ppo/model (full causal LM), ppo/metrics.json",
        sections=("ppo", "seed"),
        inputs=_inputs,
        needs_ray=True,
    )
)

__all__ = [
    "STAGE",
    "accelerator_state",
    "build_plan",
    "build_trainer",
    "finalize",
    "merge_start_policy",
    "run",
    "score_trend",
    "train",
    "value_model",
]
