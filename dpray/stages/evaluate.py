"""``dpray evaluate``: pairwise win rates of the base, SFT and PPO models on real instructions.

Each model answers the same held-out real instructions (greedy by default); a judge compares two
models' answers per instruction -- the reward model's scores, or a judge LLM asked in both
orders (see :mod:`dpray.stages.align.judges`) -- and a win rate counts ties as half a win, with a
bootstrap (percentile, over instructions) or Wilson confidence interval.

Privacy: the default instructions are the held-out split ``private/ingest/heldout.parquet``,
private data that no DP stage trained on.  The answers (which may echo it) stay in
``private/evaluate/answers.parquet``, and so do the aggregates -- counts, win rates and intervals
in ``win_rates.json`` and ``win_rates.png``: they are statistics of private records that no DP
mechanism released, shown only in the private report.  ``evaluate.data_path`` may point at a
public benchmark instead; declared public with ``evaluate.data_public: true``, its win rates go to
``evaluate/`` and the public report.  Nothing here is logged per instruction.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dpray.config import DprayConfig, EvaluateConfig
from dpray.rundir import RunDir, write_json
from dpray.stages.align.generate import (
    EndpointSettings,
    GenerationSettings,
    describe,
    is_endpoint,
    respond_all,
)
from dpray.stages.base import Stage, StageResult, register
from dpray.stages.sample.backends import choose_backend, derive_seed

log = logging.getLogger(__name__)
STAGE_NAME = "evaluate"
COMPARISONS = (("sft", "base"), ("ppo", "base"), ("ppo", "sft"))


# ------------------------------------------------------------------------------ statistics


def wilson_interval(rate: float, n: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval for a proportion (ties already counted as half successes)."""
    if n == 0:
        return (0.0, 1.0)
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2))
    denom = 1 + z * z / n
    center = (rate + z * z / (2 * n)) / denom
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def bootstrap_interval(
    outcomes: np.ndarray, confidence: float, samples: int, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap of the mean outcome, resampling instructions."""
    if len(outcomes) == 0:
        return (0.0, 1.0)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(outcomes), size=(samples, len(outcomes)))
    means = outcomes[draws].mean(axis=1)
    alpha = (1 - confidence) / 2
    return (float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))


def win_rate(outcomes: list[float], ec: EvaluateConfig, seed: int) -> dict:
    """Counts, the win rate (ties half) and its interval for one comparison."""
    values = np.asarray(outcomes, dtype=float)
    n = len(values)
    rate = float(values.mean()) if n else float("nan")
    if ec.interval == "wilson":
        low, high = wilson_interval(rate if n else 0.0, n, ec.confidence)
    else:
        low, high = bootstrap_interval(values, ec.confidence, ec.bootstrap_samples, seed)
    return {
        "n": n,
        "wins": int((values == 1.0).sum()),
        "ties": int((values == 0.5).sum()),
        "losses": int((values == 0.0).sum()),
        "win_rate": rate,
        "ci_low": low,
        "ci_high": high,
    }


def plot(results: dict, path: Path, confidence: float) -> None:
    """A small horizontal bar chart of the win rates with their intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    rates = [results[k]["win_rate"] for k in names]
    errors = [
        [r - results[k]["ci_low"] for k, r in zip(names, rates, strict=True)],
        [results[k]["ci_high"] - r for k, r in zip(names, rates, strict=True)],
    ]
    fig, ax = plt.subplots(figsize=(5, 0.6 + 0.5 * len(names)), dpi=100)
    ax.barh(range(len(names)), rates, xerr=errors, color="#4c72b0", capsize=4)
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(names)), [k.replace("_", " ") for k in names])
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"win rate (ties half), {confidence:.0%} interval")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------ inputs


def eval_source(config: DprayConfig, run_dir: RunDir) -> Path:
    if config.evaluate.data_path:
        return Path(config.evaluate.data_path).expanduser()
    return run_dir.private_root / "ingest" / "heldout.parquet"


def load_eval_instructions(config: DprayConfig, run_dir: RunDir) -> list[str]:
    """The first ``max_instructions`` real instructions (held-out split or ``data_path``)."""
    ec = config.evaluate
    source = eval_source(config, run_dir)
    if ec.data_path is None:
        if not source.is_file():
            raise FileNotFoundError(
                f"{source} not found: set data.heldout_fraction > 0 and rerun ingest, or set "
                "evaluate.data_path"
            )
        texts = pq.read_table(source, columns=["text"]).column("text").to_pylist()
    else:
        from dpray.io.readers import iter_rows

        texts = [
            row.fields.get(ec.text_field)
            for row in iter_rows(str(source))
            if row.fields is not None
        ]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(f"{STAGE_NAME}: no instructions in the evaluation source")
    return texts[: ec.max_instructions]


def available_models(config: DprayConfig, run_dir: RunDir) -> dict[str, str]:
    """Model name -> spec, for the configured models that exist."""
    found = {
        "base": config.evaluate.base_model,
        "sft": run_dir.root / "sft" / "model",
        "ppo": run_dir.root / "ppo" / "model",
    }
    models = {}
    for name in config.evaluate.models:
        spec = found[name]
        if isinstance(spec, Path) and not spec.is_dir():
            log.warning("%s: no %s model at %s; skipped", STAGE_NAME, name, spec)
            continue
        models[name] = str(spec)
    return models


def make_judge(config: DprayConfig, run_dir: RunDir):
    """``(compare(prompts, a, b) -> outcomes, description)``."""
    ec = config.evaluate
    if ec.judge == "llm":
        from dpray.stages.align.judges import LLMJudge, LogprobJudge

        verdict = ec.llm_verdict
        if verdict == "auto":
            verdict = "text" if is_endpoint(str(ec.judge_model)) else "logprob"
        if verdict == "logprob":
            if is_endpoint(str(ec.judge_model)):
                raise ValueError("evaluate.llm_verdict: logprob needs a local judge model")
            scorer = LogprobJudge(str(ec.judge_model), batch_size=ec.batch_size)
            name = f"{describe(str(ec.judge_model))} (A/B log-probabilities, both orders)"
            return (lambda p, a, b: scorer.compare(p, a, b, ec.tie_margin)), name

        endpoint = EndpointSettings(model_name=ec.judge_name, api_key_env=ec.api_key_env)
        judge = LLMJudge(str(ec.judge_model), endpoint=endpoint, backend=choose_backend(ec.backend))
        return (lambda p, a, b: judge.compare(p, a, b, seed=ec.seed)), describe(str(ec.judge_model))
    from dpray.stages.align.judges import RewardJudge
    from dpray.stages.align.reward import reward_model_path

    path = reward_model_path(run_dir, ec.judge_model)
    judge = RewardJudge(str(path), batch_size=ec.batch_size)
    return (lambda p, a, b: judge.compare(p, a, b, ec.tie_margin)), "reward_model"


# ------------------------------------------------------------------------------ stage


def run(config: DprayConfig, run_dir: RunDir) -> StageResult:
    ec = config.evaluate
    instructions = load_eval_instructions(config, run_dir)
    models = available_models(config, run_dir)
    pairs = [(a, b) for a, b in COMPARISONS if a in models and b in models]
    if not pairs:
        raise ValueError(f"{STAGE_NAME}: need two of {list(ec.models)}; found {list(models)}")
    seed = derive_seed(config.seed, STAGE_NAME, ec.seed)
    settings = GenerationSettings(
        temperature=ec.temperature,
        max_new_tokens=ec.max_new_tokens,
        batch_size=ec.batch_size,
        vllm_batch_size=ec.vllm_batch_size,
        tensor_parallel_size=ec.tensor_parallel_size,
        max_model_len=ec.max_model_len,
        gpu_memory_utilization=ec.gpu_memory_utilization,
        deterministic=ec.deterministic,
    )
    log.info("%s: %d instructions, models %s", STAGE_NAME, len(instructions), list(models))
    answers = {}
    for name, spec in models.items():
        completions = respond_all(
            spec,
            instructions,
            settings,
            derive_seed(seed, "answers"),  # same seed for every model: a paired comparison
            backend=choose_backend(ec.backend),
            num_actors=0 if is_endpoint(spec) else ec.num_actors,
        )
        answers[name] = [c.text for c in completions]
    compare, judge_name = make_judge(config, run_dir)
    results, outcomes = {}, {}
    for a, b in pairs:
        key = f"{a}_vs_{b}"
        outcomes[key] = compare(instructions, answers[a], answers[b])
        results[key] = win_rate(outcomes[key], ec, derive_seed(seed, key))
        log.info("%s: %s win rate %.3f", STAGE_NAME, key, results[key]["win_rate"])

    private = run_dir.private(STAGE_NAME)
    columns = {"instruction": instructions, **{f"answer_{k}": v for k, v in answers.items()}}
    columns.update({f"outcome_{k}": v for k, v in outcomes.items()})
    pq.write_table(pa.table(columns), private / "answers.parquet")

    public = results_dir(config, run_dir)
    report = {
        "instructions": len(instructions),
        "source": "heldout" if ec.data_path is None else eval_source(config, run_dir).name,
        "public_data": evaluates_public_data(config),
        "judge": judge_name,
        "interval": ec.interval,
        "confidence": ec.confidence,
        "models": list(models),
        "comparisons": results,
    }
    write_json(public / "win_rates.json", report)
    plot(results, public / "win_rates.png", ec.confidence)
    return StageResult(
        outputs={
            "win_rates": str(public / "win_rates.json"),
            "plot": str(public / "win_rates.png"),
        },
        summary={k: round(v["win_rate"], 4) for k, v in results.items()},
    )


def evaluates_public_data(config: DprayConfig) -> bool:
    """Whether the instructions are declared public (``evaluate.data_public`` with a
    ``data_path``); the held-out split never is."""
    return config.evaluate.data_path is not None and config.evaluate.data_public


def results_dir(config: DprayConfig, run_dir: RunDir) -> Path:
    """Where the win rates go: ``evaluate/`` for declared-public data, else
    ``private/evaluate/`` -- win rates on private instructions are statistics of private records
    that no DP mechanism released (the judge read them)."""
    if evaluates_public_data(config):
        return run_dir.public(STAGE_NAME)
    return run_dir.private(STAGE_NAME)


def _inputs(config: DprayConfig, run_dir: RunDir) -> list[Path]:
    paths = [eval_source(config, run_dir)]
    paths += [run_dir.root / name / "model" for name in ("sft", "ppo")]
    if config.evaluate.judge_model and not is_endpoint(config.evaluate.judge_model):
        paths.append(Path(config.evaluate.judge_model).expanduser())
    elif config.evaluate.judge == "reward_model":
        paths.append(run_dir.root / "reward" / "reward.json")
    return paths


STAGE = register(
    Stage(
        name=STAGE_NAME,
        run=run,
        help="Win rates (with confidence intervals) of base, SFT and PPO on real instructions.",
        reads="private/ingest/heldout.parquet (or evaluate.data_path), sft/model, ppo/model, "
        "reward/reward.json",
        writes="private/evaluate/win_rates.json, win_rates.png, answers.parquet (evaluate/ "
        "instead for the win rates when evaluate.data_public declares data_path public)",
        sections=("evaluate", "seed"),
        inputs=_inputs,
        needs_ray=True,
    )
)

__all__ = [
    "STAGE",
    "bootstrap_interval",
    "load_eval_instructions",
    "plot",
    "run",
    "wilson_interval",
    "win_rate",
]
