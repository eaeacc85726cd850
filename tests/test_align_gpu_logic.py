"""The GPU/DeepSpeed logic of SFT, reward and PPO, pinned on CPU (issue #16, item 2).

* dtype per device: bf16 on a bf16 GPU for frozen weights, LoRA bases and DeepSpeed-mastered
  weights; fp32 on CPU and for weights a plain optimiser updates (``torch.cuda`` patched).
* PPO's ``Accelerator`` carries the DeepSpeed plugin when DeepSpeed is configured (TRL 1.12
  builds it without one), and the value model is a LoRA on a frozen backbone.
* Under ZeRO-3 the arguments exist before ``from_pretrained`` (weights partitioned at load); the
  loss before training is scored only after DeepSpeed prepared the model; PPO steps and saves
  its policy under ZeRO-2 and ZeRO-3 -- real DeepSpeed engines on one gloo rank in a
  subprocess (slow).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from dpray.config import config_from_tree
from dpray.stages.align.common import base_plan, model_dtype, training_kwargs
from tests.single_rank import single_rank_env

TINY = "tiny:hidden=64"
REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, **sections):
    return config_from_tree(
        {
            "run_dir": str(tmp_path / "run"),
            "data": {"path": "unused"},
            "privacy": {"epsilon": 1.0},
            **sections,
        }
    )


def _plan(tmp_path: Path, stage: str, **section):
    config = _config(tmp_path, **{stage: section})
    return base_plan(stage, getattr(config, stage), seed=0)


@pytest.fixture
def bf16_gpu(monkeypatch):
    """What ``use_bf16`` sees on a worker with a bf16-capable GPU (the only CUDA calls made)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


# ----------------------------------------------------------------------------------- fast


def test_model_dtype_is_fp32_on_cpu(tmp_path):
    for section in ({}, {"lora": False}, {"deepspeed": 3}):
        plan = _plan(tmp_path, "sft", **section)
        assert model_dtype(plan) == model_dtype(plan, trained=True) == torch.float32
    # bf16 only where asked for on CPU
    assert model_dtype(_plan(tmp_path, "sft", precision="bf16")) == torch.bfloat16


def test_model_dtype_on_a_bf16_gpu(tmp_path, bf16_gpu, monkeypatch):
    gpu = {"use_gpu": True}
    lora = _plan(tmp_path, "sft", **gpu)
    assert training_kwargs(lora, "/tmp/x")["bf16"] is True
    assert model_dtype(lora) == model_dtype(lora, trained=True) == torch.bfloat16
    full = _plan(tmp_path, "sft", lora=False, **gpu)
    assert model_dtype(full) == torch.bfloat16  # frozen copies (reward model, reference)
    assert model_dtype(full, trained=True) == torch.float32  # torch AdamW updates it directly
    full_ds = _plan(tmp_path, "sft", lora=False, deepspeed=2, **gpu)
    assert model_dtype(full_ds, trained=True) == torch.bfloat16  # DeepSpeed keeps fp32 masters
    assert model_dtype(_plan(tmp_path, "sft", precision="fp32", **gpu)) == torch.float32
    # a GPU worker without bf16 stays fp32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert model_dtype(_plan(tmp_path, "sft", **gpu)) == torch.float32


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    from dpray.stages.align.models import new_reward_model

    path = tmp_path_factory.mktemp("rm")
    model, tokenizer = new_reward_model(TINY)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_value_model_is_lora_on_a_frozen_backbone(tmp_path, reward_dir, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.utils import get_reward

    from dpray.stages.align.ppo import value_model

    plan = _plan(tmp_path, "ppo", precision="bf16")  # bf16 as on a GPU
    plan["reward_model"] = str(reward_dir)
    model = value_model(plan)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("score.") for n in trainable)
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    frozen = [p for p in model.named_parameters() if not p[1].requires_grad]
    assert {p.dtype for _, p in frozen} == {torch.bfloat16}
    assert sum(p.numel() for p in trainable.values()) < 0.2 * sum(p.numel() for _, p in frozen)
    # PPO scores values with the bare model outside autocast: the fp32 head takes bf16 input
    ids = torch.tensor([[5, 6, 7, 0]])
    values, _, _ = get_reward(model, ids, pad_token_id=0, context_length=1)
    assert values.dtype == torch.float32 and torch.isfinite(values).all()

    plan = _plan(tmp_path, "ppo", lora=False)
    plan["reward_model"] = str(reward_dir)
    assert all(p.requires_grad for p in value_model(plan).parameters())  # ppo.lora off: full


def test_ppo_accelerator_carries_the_deepspeed_plugin(tmp_path, monkeypatch):
    """TRL's PPOTrainer creates ``Accelerator(gradient_accumulation_steps=...)`` with no plugin;
    after :func:`accelerator_state` that very call returns the configured DeepSpeed state."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    from dpray.stages.align.ppo import _ppo_args, accelerator_state

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")  # restored after the test
    try:
        for stage in (2, 3):
            args = _ppo_args(_plan(tmp_path, "ppo", deepspeed=stage), num_prompts=4)
            accelerator_state(args)
            trl_accelerator = Accelerator(gradient_accumulation_steps=1)  # as PPOTrainer does
            assert trl_accelerator.state.distributed_type == DistributedType.DEEPSPEED
            assert trl_accelerator.state.deepspeed_plugin.zero_stage == stage
            assert trl_accelerator.state.deepspeed_plugin.hf_ds_config is args.hf_deepspeed_config
        # without DeepSpeed: plain state, no plugin
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")  # the plugin's Accelerator set it
        args = _ppo_args(_plan(tmp_path, "ppo"), num_prompts=4)
        accelerator_state(args)
        assert Accelerator(gradient_accumulation_steps=1).state.deepspeed_plugin is None
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_zero3_merges_a_lora_start_policy_once_on_the_driver(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dpray.models import resolve_causal_lm
    from dpray.stages.align.models import is_adapter, load_tokenizer, write_meta
    from dpray.stages.align.ppo import merge_start_policy

    base = resolve_causal_lm(TINY)
    adapter = tmp_path / "sft"
    lora = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora).save_pretrained(adapter)
    load_tokenizer(base).save_pretrained(adapter)
    write_meta(adapter, "lora", TINY)

    plan = _plan(tmp_path, "ppo", deepspeed=2)
    plan["policy"] = str(adapter)
    assert not merge_start_policy(plan, tmp_path / "start")  # ZeRO 0-2: each rank merges
    assert plan["policy"] == str(adapter)
    plan = _plan(tmp_path, "ppo", deepspeed=3)
    plan["policy"] = str(adapter)
    assert merge_start_policy(plan, tmp_path / "start")
    assert plan["policy"] == str(tmp_path / "start") and not is_adapter(tmp_path / "start")
    AutoModelForCausalLM.from_pretrained(tmp_path / "start")  # a full model


# ---------------------------------------------------------------------- DeepSpeed (slow)


def _deepspeed_child(out_dir: str) -> None:
    """Runs in a fresh interpreter as rank 0 of a one-process gloo group, as on a Ray worker."""
    import torch.distributed as dist
    from transformers.integrations import is_deepspeed_zero3_enabled

    from dpray.models import resolve_causal_lm
    from dpray.stages.align import ppo, reward, sft
    from dpray.stages.align.common import loss_before_training, probe_loss, save_trained
    from dpray.stages.align.models import new_reward_model

    dist.init_process_group("gloo")
    tmp = Path(tempfile.mkdtemp(prefix="dpray-ds-"))
    out: dict = {}
    model, tokenizer = new_reward_model(TINY)  # PPO's, saved before any ZeRO-3 trainer exists
    model.save_pretrained(tmp / "rm")
    tokenizer.save_pretrained(tmp / "rm")

    def plan_of(stage: str, **section):
        section = {"model": TINY, "batch_size": 2, "max_length": 64, **section}
        if stage == "ppo":
            section.pop("model")
        return base_plan(stage, getattr(_config(tmp, **{stage: section}), stage), seed=0)

    def partitioned(model) -> bool:
        return all(hasattr(p, "ds_id") for n, p in model.named_parameters() if "lora_" not in n)

    # SFT under ZeRO-3: partitioned at load; the before-training loss waits for the engine
    plan = plan_of("sft", deepspeed=3, max_steps=1, eval_examples=2)
    plan["model_path"] = str(resolve_causal_lm(TINY))
    plan["rows"] = [{"prompt": f"q{i}", "completion": f"a {i}"} for i in range(4)]
    trainer, _ = sft.build_trainer(plan)
    out["sft_partitioned_at_load"] = partitioned(trainer.model)
    try:
        probe_loss(trainer)
        out["sft_early_probe"] = "ran"
    except RuntimeError:
        out["sft_early_probe"] = "refused"
    forwards = []
    compute_loss = trainer.compute_loss

    def spy(model, inputs, *args, **kwargs):
        forwards.append(type(model).__name__)
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = spy
    before = loss_before_training(trainer)
    trainer.train()
    out["sft_forwards"] = forwards
    out["sft_loss_before"] = before.get("loss")

    # reward under ZeRO-3: partitioned at load
    plan = plan_of("reward", deepspeed=3)
    plan["model_spec"] = TINY
    plan["rows"] = [{"prompt": "p", "chosen": "yes, surely", "rejected": "no"}] * 4
    trainer, _ = reward.build_trainer(plan)
    out["reward_partitioned_at_load"] = partitioned(trainer.model)

    # PPO under ZeRO-2 and ZeRO-3: the plugin, engines, zero.Init at load, one step
    loads = []
    for name in ("load_causal_lm", "load_reward_model"):
        original = getattr(ppo, name)

        def recording(*args, _original=original, **kwargs):
            loads.append(is_deepspeed_zero3_enabled())
            return _original(*args, **kwargs)

        setattr(ppo, name, recording)
    for stage in (2, 3):
        loads.clear()
        plan = plan_of(
            "ppo", deepspeed=stage, total_episodes=2, response_length=4, num_ppo_epochs=1
        )
        plan.update(policy=TINY, reward_model=str(tmp / "rm"), prompts=["hi", "there"])
        trainer, tokenizer = ppo.build_trainer(plan)
        state = trainer.accelerator.state
        trainer.train()
        save_trained(trainer, Path(out_dir) / f"ppo{stage}", {"stage": stage}, tokenizer)
        steps = [h for h in trainer.state.log_history if "objective/scores" in h]
        out[f"ppo{stage}"] = {
            "zero_stage": state.deepspeed_plugin and state.deepspeed_plugin.zero_stage,
            "deepspeed_enabled": trainer.is_deepspeed_enabled,
            "model": type(trainer.model).__name__,
            "reward_model": type(trainer.reward_model).__name__,
            "zero3_at_load": loads[:],
            "steps": len(steps),
            "finite": all(
                torch.isfinite(torch.tensor(h[k])).item()
                for h in steps
                for k in ("loss/policy_avg", "loss/value_avg", "objective/scores")
            ),
        }
    (Path(out_dir) / "out.json").write_text(json.dumps(out))


@pytest.mark.slow
def test_deepspeed_paths_on_one_cpu_rank(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from dpray.runtime import cache_root
    from dpray.stages.align.models import is_adapter
    from dpray.stages.align.ppo import finalize

    env = single_rank_env(TRL_EXPERIMENTAL_SILENCE="1", PYTHONPATH=str(REPO))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(cache_root() / "torch_extensions"))
    code = f"from tests.test_align_gpu_logic import _deepspeed_child; _deepspeed_child({str(tmp_path)!r})"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())

    assert result["sft_partitioned_at_load"] and result["reward_partitioned_at_load"]
    assert result["sft_early_probe"] == "refused"
    assert result["sft_forwards"] and set(result["sft_forwards"]) == {"DeepSpeedEngine"}
    assert result["sft_loss_before"] > 0
    for stage in (2, 3):
        ppo = result[f"ppo{stage}"]
        assert ppo["zero_stage"] == stage and ppo["deepspeed_enabled"]
        assert ppo["model"] == ppo["reward_model"] == "DeepSpeedEngine"
        assert ppo["zero3_at_load"] == [stage == 3] * 3  # policy, reward model, value model
        assert ppo["steps"] == 1 and ppo["finite"]
        # the policy saved from the engine is the trained adapter; the driver merges it
        saved = tmp_path / f"ppo{stage}"
        lora_b = [
            t for k, t in load_file(saved / "adapter_model.safetensors").items() if "lora_B" in k
        ]
        assert lora_b and any(t.abs().sum() > 0 for t in lora_b)  # B starts at zero
        finalize(saved, TINY)
        assert not is_adapter(saved)
        AutoModelForCausalLM.from_pretrained(saved)
