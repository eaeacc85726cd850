"""SFT, reward model and PPO: DeepSpeed/trainer plumbing (fast) and the stages for real on Ray
Train with tiny models (slow): SFT lowers its loss and its adapter reloads, the reward model
ranks chosen over rejected, PPO raises the mean reward on a toy reward, ZeRO-2 on 2 CPU workers."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dpray.config import config_from_tree
from dpray.models import resolve_causal_lm
from dpray.pipeline import run_stage
from dpray.rundir import RunDir, read_json
from dpray.stages import STAGES
from dpray.stages.align.common import (
    base_plan,
    deepspeed_config,
    shipped_deepspeed_config,
    training_kwargs,
)
from dpray.stages.align.models import chat_prompt_ids, load_tokenizer
from dpray.stages.align.ppo import score_trend
from dpray.stages.align.reward import reward_model_path

TINY = "tiny:hidden=64"


def _config(tmp_path: Path, **sections):
    return config_from_tree(
        {
            "run_dir": str(tmp_path / "run"),
            "data": {"path": "unused"},
            "privacy": {"epsilon": 1.0},
            **sections,
        }
    )


# ----------------------------------------------------------------------------------- fast


def test_deepspeed_configs(tmp_path):
    assert deepspeed_config(_config(tmp_path).sft) is None  # plain DDP by default
    for stage in (0, 1, 2, 3):
        ds = deepspeed_config(_config(tmp_path, sft={"deepspeed": stage}).sft)
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["train_micro_batch_size_per_gpu"] == "auto"  # filled in by transformers
        assert ds["zero_allow_untested_optimizer"] is True  # torch AdamW under ZeRO
    assert (
        "stage3_gather_16bit_weights_on_model_save"
        in shipped_deepspeed_config(3)["zero_optimization"]
    )
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_batch_size": "auto"}))
    ds = deepspeed_config(_config(tmp_path, ppo={"deepspeed_config": str(own)}).ppo)
    assert ds == {"zero_optimization": {"stage": 1}, "train_batch_size": "auto"}
    ds = deepspeed_config(
        _config(tmp_path, reward={"deepspeed_config": str(own), "deepspeed": 3}).reward
    )
    assert ds["zero_optimization"]["stage"] == 3


def test_trainer_arguments_follow_the_section(tmp_path):
    config = _config(
        tmp_path, sft={"batch_size": 3, "learning_rate": 0.01, "max_steps": 7, "deepspeed": 2}
    )
    kwargs = training_kwargs(base_plan("sft", config.sft, seed=5), "/tmp/out")
    assert kwargs["per_device_train_batch_size"] == 3
    assert kwargs["learning_rate"] == 0.01 and kwargs["max_steps"] == 7
    assert kwargs["use_cpu"] is True and kwargs["bf16"] is False and kwargs["seed"] == 5
    assert kwargs["deepspeed"]["zero_optimization"]["stage"] == 2
    assert kwargs["save_strategy"] == "no" and kwargs["report_to"] == []


def test_ppo_episodes_from_max_steps_or_epochs(tmp_path):
    from dpray.stages.align.ppo import _ppo_args

    section = {"max_steps": 3, "batch_size": 4, "gradient_accumulation_steps": 2}
    plan = base_plan("ppo", _config(tmp_path, ppo=section).ppo, 0)
    assert _ppo_args(plan, num_prompts=100).total_episodes == 3 * 4 * 2  # rollout batches
    plan = base_plan("ppo", _config(tmp_path, ppo={"epochs": 1.5}).ppo, 0)
    args = _ppo_args(plan, num_prompts=10)
    assert args.total_episodes == 15 and args.stop_token == "eos"
    assert args.world_size == 1  # not None: DeepSpeed's "auto" sizes are computed from it


def test_sft_skips_empty_and_unfinished_responses(tmp_path):
    from dpray.stages.align.sft import load_pairs

    path = tmp_path / "pairs.parquet"
    rows = {
        "prompt": ["a", "b", "c"],
        "completion": ["done.", "cut mid", "  "],
        "teacher": ["t"] * 3,
        "truncated": [False, True, False],
    }
    pq.write_table(pa.table(rows), path)
    assert [r["prompt"] for r in load_pairs(path)] == ["a", "b"]
    assert [r["prompt"] for r in load_pairs(path, drop_truncated=True)] == ["a"]
    # an older dpray's pairs (instruction, response) are read as prompt/completion
    legacy = tmp_path / "legacy.parquet"
    pq.write_table(pa.table({"instruction": ["a"], "response": ["done."]}), legacy)
    assert load_pairs(legacy) == [{"prompt": "a", "completion": "done."}]


def test_section_defaults_differ_per_trainer(tmp_path):
    config = _config(tmp_path)
    assert config.sft.lora and config.ppo.lora and not config.reward.lora
    assert config.reward.learning_rate < config.sft.learning_rate


def test_score_trend_and_reward_pointer(tmp_path):
    assert score_trend([0.0, 0.0, 1.0, 1.0]) == {"score_first": 0.0, "score_last": 1.0}
    assert math.isnan(score_trend([])["score_first"])
    run_dir = RunDir(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="dpray reward"):
        reward_model_path(run_dir)
    (run_dir.public("reward") / "reward.json").write_text(json.dumps({"path": "/models/rm"}))
    assert reward_model_path(run_dir) == Path("/models/rm")
    assert reward_model_path(run_dir, "/other") == Path("/other")


def test_stages_registered_reading_public_files_only():
    for name in ("sft", "reward", "ppo"):
        stage = STAGES[name]
        assert stage.needs_ray and "private" not in stage.reads
        assert stage.sections == (name, "seed")


# ------------------------------------------------------------------------ toy models (slow)


def make_ending_reward_model(path: Path, lm_dir: Path) -> Path:
    """A reward model scoring 1 when the last token is EOS and 0 otherwise.

    Every layer's output projections are zero, so the residual stream at the last position is that
    token's embedding: one-hot on dimension 0 for EOS, on dimension 1 for every other token.
    """
    from transformers import AutoModelForCausalLM, LlamaForSequenceClassification

    config = AutoModelForCausalLM.from_pretrained(lm_dir).config
    tokenizer = load_tokenizer(lm_dir)
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
    config.tie_word_embeddings = False
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embedding = model.model.embed_tokens.weight
        embedding.zero_()
        embedding[:, 1] = 1.0
        embedding[tokenizer.eos_token_id] = 0.0
        embedding[tokenizer.eos_token_id, 0] = 1.0
        model.model.norm.weight.fill_(1.0)
        model.score.weight.zero_()
        model.score.weight[0, 0] = config.hidden_size**-0.5  # RMSNorm scales 1 to sqrt(d)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_sometimes_ending_policy(path: Path, lm_dir: Path, prompts: list[str], target=0.3):
    """The tiny LM with an untied head whose EOS row ends about ``target`` of 8-token samples
    (PPO needs some episodes with reward to learn from)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    tokenizer = load_tokenizer(lm_dir)
    eos = tokenizer.eos_token_id
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    ids = torch.tensor([chat_prompt_ids(tokenizer, p) for p in prompts]).repeat(4, 1)
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    direction /= direction.norm()
    low, high = 0.0, 64.0
    with torch.no_grad():
        for _ in range(12):  # bisect the EOS row's length
            middle = (low + high) / 2
            model.lm_head.weight[eos] = middle * direction
            torch.manual_seed(0)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=0.7,
                top_k=0,
                top_p=1.0,
                max_new_tokens=8,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
            )
            ended = (out[:, ids.shape[1] :] == eos).any(-1).float().mean().item()
            low, high = (middle, high) if ended < target else (low, middle)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------ Ray (slow)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    root = Path(os.path.expanduser("~/.cache/dpray"))
    root.mkdir(parents=True, exist_ok=True)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=tempfile.mkdtemp(prefix="r", dir=root),
        logging_level="WARNING",
    )
    yield
    ray.shutdown()


PROMPTS = [f"Write something about topic {i}." for i in range(8)]


def _write_inputs(run_dir: RunDir) -> None:
    """Learnable SFT pairs, preferences (long answer over 'no') and prompts."""
    pairs = [
        {"prompt": f"Give me fact number {i} about cats.", "completion": f"Cats nap {i} times."}
        for i in range(32)
    ]
    prefs = [
        {
            "prompt": f"Tell me about topic {i}.",
            "chosen": f"Topic {i} is a fine topic.",
            "rejected": "no",
        }
        for i in range(32)
    ]
    annotate = run_dir.public("annotate")
    for name, rows in (("pairs", pairs), ("preferences", prefs)):
        (annotate / name).mkdir()
        pq.write_table(pa.Table.from_pylist(rows), annotate / name / "train.parquet")
    pq.write_table(pa.table({"text": PROMPTS}), run_dir.public("filter") / "filtered.parquet")


def _check_adapter_reloads(adapter: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    meta = read_json(adapter / "dpray_model.json")
    assert meta == {"kind": "lora", "base_model": TINY}
    base = AutoModelForCausalLM.from_pretrained(resolve_causal_lm(TINY))
    model = PeftModel.from_pretrained(base, str(adapter))
    moved = [p for n, p in model.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert moved, "LoRA B starts at zero: training must move it"


TRAINER = {"model": TINY, "batch_size": 4, "logging_steps": 1, "max_length": 96}


@pytest.mark.slow
def test_sft_reward_ppo_evaluate_on_ray(ray_local, tmp_path):
    lm_dir = resolve_causal_lm(TINY)
    policy = make_sometimes_ending_policy(tmp_path / "policy", lm_dir, PROMPTS)
    toy_reward = make_ending_reward_model(tmp_path / "toy_rm", lm_dir)
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"instruction": p}) + "\n" for p in PROMPTS[:4]))
    config = _config(
        tmp_path,
        sft={**TRAINER, "num_workers": 2, "learning_rate": 3e-3},
        reward={**TRAINER, "batch_size": 8, "learning_rate": 3e-3},
        ppo={
            "policy": str(policy),
            "reward_model": str(toy_reward),
            "learning_rate": 2e-3,
            "batch_size": 4,
            "total_episodes": 24,
            "response_length": 8,
            "num_ppo_epochs": 2,
            "kl_coef": 0.01,
            "missing_eos_penalty": None,
        },
        evaluate={"base_model": TINY, "data_path": str(bench), "max_new_tokens": 6},
    )
    run_dir = RunDir(config.run_dir)
    _write_inputs(run_dir)

    sft = run_stage(STAGES["sft"], config, run_dir).summary
    metrics = read_json(run_dir.root / "sft" / "metrics.json")
    assert metrics["world_size"] == 2 and metrics["deepspeed_stage"] is None
    assert sft["loss_after"] < sft["loss_before"]  # one epoch lowers the training loss
    _check_adapter_reloads(run_dir.root / "sft" / "model")

    reward = run_stage(STAGES["reward"], config, run_dir).summary
    assert reward["accuracy_after"] > 0.5  # chosen over rejected, above chance
    from dpray.stages.align.judges import RewardJudge

    judge = RewardJudge(str(reward_model_path(run_dir)))
    prefs = pq.read_table(run_dir.root / "annotate" / "preferences" / "train.parquet")
    prefs = prefs.to_pylist()
    wins = judge.compare(
        [p["prompt"] for p in prefs], [p["chosen"] for p in prefs], [p["rejected"] for p in prefs]
    )
    assert sum(wins) / len(wins) > 0.5

    ppo = run_stage(STAGES["ppo"], config, run_dir).summary
    steps = read_json(run_dir.root / "ppo" / "metrics.json")["steps"]
    assert len(steps) == 6
    for step in steps:
        assert all(math.isfinite(step[k]) for k in ("policy_loss", "value_loss", "kl", "score"))
    assert ppo["score_last"] > ppo["score_first"]  # the toy reward moves up
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run_dir.root / "ppo" / "model")  # a full model

    summary = run_stage(STAGES["evaluate"], config, run_dir).summary  # Ray Data actors
    assert set(summary) == {"sft_vs_base", "ppo_vs_base", "ppo_vs_sft"}


@pytest.mark.slow
def test_annotate_on_ray_actors_matches_in_process(ray_local, tmp_path):
    from dpray.stages import annotate

    results = {}
    for actors in (2, 0):
        config = _config(
            tmp_path / str(actors),
            annotate={
                "teacher": TINY,
                "num_actors": actors,
                "max_new_tokens": 6,
                "batch_size": 2,
                "preferences": False,
            },
        )
        run_dir = RunDir(config.run_dir)
        pq.write_table(
            pa.table({"text": PROMPTS * 2}), run_dir.public("filter") / "filtered.parquet"
        )
        annotate.run(config, run_dir)
        pairs = run_dir.root / "annotate" / "pairs" / "train.parquet"
        results[actors] = pq.read_table(pairs).to_pylist()
    assert len(results[2]) == len(PROMPTS) * 2  # one response per instruction
    assert results[2] == results[0]  # chunk seeds do not depend on the actor count


@pytest.mark.slow
def test_sft_deepspeed_zero2_on_two_cpu_workers(ray_local, tmp_path):
    config = _config(
        tmp_path,
        sft={**TRAINER, "num_workers": 2, "deepspeed": 2, "learning_rate": 3e-3},
    )
    run_dir = RunDir(config.run_dir)
    _write_inputs(run_dir)
    summary = run_stage(STAGES["sft"], config, run_dir).summary
    metrics = read_json(run_dir.root / "sft" / "metrics.json")
    assert metrics["deepspeed_stage"] == 2 and metrics["world_size"] == 2
    assert summary["loss_after"] < summary["loss_before"]
    _check_adapter_reloads(run_dir.root / "sft" / "model")


def test_checkpointing_goes_by_the_installed_transformers_name(tmp_path, monkeypatch):
    """transformers 5.17 knows ``gradient_checkpointing`` only, 5.24 ``activation_checkpointing``:
    the kwargs name whichever ``TrainingArguments`` has, and ``SFTConfig`` accepts them."""
    import dataclasses

    from transformers import TrainingArguments

    from dpray.stages.align import common

    config = _config(tmp_path, sft={"activation_checkpointing": True})
    plan = base_plan("sft", config.sft, seed=0)
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    kwargs = training_kwargs(plan, str(tmp_path / "out"))
    name = common.checkpointing_argument()
    assert name in fields and kwargs[name] is True
    assert not {"activation_checkpointing", "gradient_checkpointing"} - {name} & kwargs.keys()

    # a transformers without the new name (5.17's fields, as far as this choice goes)
    older = dataclasses.make_dataclass("TrainingArguments", [("gradient_checkpointing", bool)])
    monkeypatch.setattr("transformers.TrainingArguments", older)
    assert common.checkpointing_argument() == "gradient_checkpointing"
    assert training_kwargs(plan, str(tmp_path / "out"))["gradient_checkpointing"] is True
