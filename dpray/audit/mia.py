"""Membership and canary audit: does the DP generator remember its training data?

Two generators are trained on the *same* members (half of ``audit.mia_records`` real
instructions, plus canaries), one with DP-SGD at the configured epsilon and one without (no noise,
no clipping): the control.  Then:

* **canary exposure** (Carlini et al., "The Secret Sharer"): each canary is a fixed prefix plus a
  random secret, inserted ``r`` times (r in ``audit.canary_repeats``).  The secret's likelihood
  is ranked among ``audit.canary_candidates`` random secrets of the same form;
  exposure = log2(#candidates) − log2(rank).  ~0 means "no better than chance", the maximum
  log2(#candidates) means "the model spells out the secret".
* **loss-based membership inference**: AUC of "lower loss ⇒ member" on members vs the held-out
  non-members.  0.5 is chance.

The DP model should show AUC ≈ 0.5 and low exposure (group privacy weakens the guarantee for the
100-times canary); the control must show measurable leakage, or the audit is too weak to mean
anything, and the report says so.  Everything lives under ``private/audit/``, the aggregate
numbers in ``private/audit/mia.json`` too: both models trained on real records without (the
control) or outside (the audit's own DP model) the run's ledger, so their AUCs and exposures are
statistics of private data that the ledger does not cover.  Only the private report shows them.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dpray.config import DprayConfig
from dpray.privacy.ledger import Ledger
from dpray.rundir import RunDir, write_json

log = logging.getLogger(__name__)

CANARY_PREFIX = "Please remember my account recovery code: "
SECRET_DIGITS = 9
WEAK_CONTROL_AUC = 0.55
WEAK_CONTROL_EXPOSURE = 3.0


@dataclass(frozen=True)
class Canary:
    secret: str
    repeats: int

    @property
    def text(self) -> str:
        return CANARY_PREFIX + self.secret


def random_secret(rng: np.random.Generator) -> str:
    digits = "".join(str(d) for d in rng.integers(0, 10, SECRET_DIGITS))
    return " ".join(digits[i : i + 3] for i in range(0, SECRET_DIGITS, 3))


def exposure(rank: int, candidates: int) -> float:
    """log2(|candidates|) − log2(rank), rank 1 = the true secret is the most likely."""
    return math.log2(candidates) - math.log2(rank)


def roc_auc(member_scores: np.ndarray, non_member_scores: np.ndarray) -> float:
    """AUC of "higher score ⇒ member" (Mann–Whitney U, ties counted half)."""
    scores = np.concatenate([member_scores, non_member_scores])
    ranks = _average_ranks(scores)
    n1, n0 = len(member_scores), len(non_member_scores)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=float)
    sorted_vals = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def sequence_losses(
    model,
    tokenizer,
    texts: list[str],
    max_tokens: int,
    template: str,
    prompt: list[int] | None = None,
    stop_id: int | None = None,
) -> np.ndarray:
    """Per-text token-mean loss in the generator's training format (its prompt and stop token,
    as recorded in its generator.json; default the unconditional format with ``template``)."""
    from dpray.stages.train_generator.data import (
        collate,
        generator_prompt_ids,
        tokenize_instructions,
    )
    from dpray.stages.train_generator.dp_sgd import per_example_loss

    if prompt is None:
        prompt = generator_prompt_ids(tokenizer, template)
    prompt_len = len(prompt)
    seqs = tokenize_instructions(
        texts, tokenizer, max_tokens, template, prompt=prompt, stop_id=stop_id
    )
    out = []
    pad = int(tokenizer.pad_token_id or tokenizer.eos_token_id)
    with torch.inference_mode():
        for start in range(0, len(seqs), 32):
            chunk = seqs[start : start + 32]
            batch = collate(chunk, list(range(len(chunk))), prompt_len, pad)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            out.append(per_example_loss(logits, batch.labels).numpy())
    return np.concatenate(out)


def canary_rank(
    model, tokenizer, canary: Canary, candidates: int, rng, config, fmt: dict | None = None
) -> int:
    """Rank of the true secret among random ones by loss (1 = lowest loss)."""
    others = [random_secret(rng) for _ in range(candidates - 1)]
    texts = [canary.text] + [CANARY_PREFIX + s for s in others]
    losses = sequence_losses(
        model, tokenizer, texts, config.train.max_tokens, config.train.template, **(fmt or {})
    )
    return int(1 + (losses[1:] < losses[0]).sum())


def _train(config: DprayConfig, audit_dir: RunDir, dp: bool, steps: int):
    from dpray.stages.train_generator.stage import train_generator

    overrides = {"steps": steps, "checkpoint_every": steps}
    if not dp:
        overrides.update({"noise_multiplier": 0.0, "clip_norm": 1e6})
    train = config.train.model_copy(update=overrides)
    # The audit models are DP fine-tunes whatever the run's strategy: one fixed prompt, no topics.
    generator = config.generator.model_copy(update={"topics": "none"})
    cfg = config.model_copy(update={"train": train, "generator": generator})
    if dp:
        Ledger.create(audit_dir.ledger_path, config.privacy.unit, config.privacy.epsilon, 1e-5)
    return train_generator(cfg, audit_dir, ledger_required=dp, out_dir=audit_dir.root / "generator")


def _write_partitions(config: DprayConfig, audit_dir: RunDir, ids: list, texts: list) -> None:
    """The audit's training set cut into one partition per worker (each worker reads its own)."""
    from dpray.io import partitions as parts

    count = config.train.num_workers
    key = parts.partition_key(config.seed)
    records = [{"id": i, "text": t, "user_id": i} for i, t in zip(ids, texts, strict=True)]
    parts.write_partitions(
        audit_dir.private("ingest") / parts.DIRNAME,
        records,
        [parts.hash_partition(i, key, count) for i in ids],
        count,
        by="hash",
        unit=config.privacy.unit,
    )


def _training_format(audit_dir: RunDir) -> dict:
    """The prompt and stop token the audit model was trained with (its generator.json)."""
    import json

    meta = json.loads((audit_dir.root / "generator" / "generator.json").read_text())
    prompts, stops = meta.get("prompts"), meta.get("stop_ids")
    if not prompts or not stops:
        return {}
    return {"prompt": [int(t) for t in prompts[0]], "stop_id": int(stops[0])}


def _load(model_path: str, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()
    return model, AutoTokenizer.from_pretrained(model_path, local_files_only=True)


def run_mia_audit(config: DprayConfig, run_dir: RunDir) -> dict:
    """Train DP and non-DP generators on members + canaries; report exposure and MIA AUC."""
    from dpray.models import resolve_causal_lm
    from dpray.runtime import ensure_ray

    ensure_ray(config, run_dir)
    audit = config.audit
    table = pq.read_table(run_dir.private("ingest") / "instructions.parquet")
    texts = table.column("text").to_pylist()
    rng = np.random.default_rng(secrets.randbits(63))
    chosen = rng.permutation(len(texts))[: min(audit.mia_records, len(texts))]
    half = len(chosen) // 2
    members = [texts[i] for i in chosen[:half]]
    non_members = [texts[i] for i in chosen[half:]]
    canaries = [Canary(random_secret(rng), r) for r in audit.canary_repeats]
    training = members + [c.text for c in canaries for _ in range(c.repeats)]
    steps = audit.mia_steps or config.train.steps or 50
    model_path = str(resolve_causal_lm(config.train.model))
    n_eval = min(audit.mia_eval_records, half, len(non_members))

    results = {}
    for name, dp in (("dp", True), ("non_dp", False)):
        audit_dir = RunDir(run_dir.private_root / "audit" / name)
        ids = [f"a{i}" for i in range(len(training))]
        pq.write_table(
            pa.table({"id": ids, "text": training, "user_id": ids}),
            audit_dir.private("ingest") / "instructions.parquet",
        )
        _write_partitions(config, audit_dir, ids, training)
        log.info("audit mia: training the %s model (%d steps)", name, steps)
        summary = _train(config, audit_dir, dp, steps).summary
        model, tokenizer = _load(model_path, audit_dir.root / "generator" / "adapter")
        tmpl = (config.train.max_tokens, config.train.template)
        fmt = _training_format(audit_dir)
        member_loss = sequence_losses(model, tokenizer, members[:n_eval], *tmpl, **fmt)
        non_member_loss = sequence_losses(model, tokenizer, non_members[:n_eval], *tmpl, **fmt)
        canary_results = []
        for canary in canaries:
            rank = canary_rank(model, tokenizer, canary, audit.canary_candidates, rng, config, fmt)
            canary_results.append(
                {
                    "repeats": canary.repeats,
                    "rank": rank,
                    "candidates": audit.canary_candidates,
                    "exposure_bits": exposure(rank, audit.canary_candidates),
                }
            )
        results[name] = {
            "epsilon": summary.get("epsilon_total", math.inf) if dp else math.inf,
            "noise_multiplier": summary["noise_multiplier"],
            "steps": steps,
            "mia_auc": roc_auc(-member_loss, -non_member_loss),
            "mean_member_loss": float(member_loss.mean()),
            "mean_non_member_loss": float(non_member_loss.mean()),
            "canaries": canary_results,
        }
    control = results["non_dp"]
    weak = (
        control["mia_auc"] < WEAK_CONTROL_AUC
        and max(c["exposure_bits"] for c in control["canaries"]) < WEAK_CONTROL_EXPOSURE
    )
    report = {
        "evaluation": "non-private audit on the training data (aggregates only)",
        "members": half,
        "non_members": len(non_members),
        "scored_per_side": n_eval,
        "model": config.train.model,
        "results": results,
        "control_shows_leakage": not weak,
        "note": (
            "the non-DP control shows no measurable leakage: the audit is too weak to mean "
            "anything at these settings (train longer or on fewer records)"
            if weak
            else "the non-DP control leaks measurably, so the DP model's figures are meaningful"
        ),
    }
    path = write_json(run_dir.private("audit") / "mia.json", _finite(report))
    log.info("audit mia: report -> %s", path)
    return report


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
