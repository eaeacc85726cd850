"""``dpray train-generator``: build the instruction generator with the configured strategy.

``generator.strategy`` picks one of :mod:`~dpray.stages.train_generator.strategies`:
``dp_finetune`` (below: LoRA + DP-SGD), ``prompted`` (no training: public prompts only) or
``private_evolution`` (DP nearest-neighbour votes over rounds of candidates).  Every strategy
writes ``generator/generator.json``: its strategy, prompt format, the prompts and stop tokens the
sampling stage starts from, and what it spent.

dp_finetune reads nothing private on the driver: each Ray Train worker reads its own partition of
``private/ingest/partitions/`` (the driver learns only n, released by ingest, and the number of
partitions; see :mod:`dpray.io.partitions`); it writes the PEFT adapter to
``RUN_DIR/generator/adapter`` (DP output: public), ``generator/generator.json`` (how to sample
from it), ``generator/metrics.jsonl`` (step, epsilon, step time), private metrics (loss, batch
sizes: not DP) and Ray Train checkpoints under ``private/train/``, and the spend to the ledger.

Calibration: σ is the smallest noise multiplier for which the ledger's composition of everything
already spent plus this run (planned steps + headroom for steps that restarts may repeat) stays
within ``privacy.train_share`` of the target epsilon; the filter stage gets the rest.

Reruns: the run's id, σ and state are kept in ``private/train/run.json``, keyed on the config and
the ingested data (:func:`~dpray.privacy.releases.release_key`).  A rerun with the same key
resumes an interrupted run from its own Ray Train checkpoints under the same run id (the ledger
keeps counting that run's steps in its one event, redone steps included), and reuses a finished
run's adapter (re-saved from ``private/train/final_checkpoint`` if the adapter folder is gone)
without training.  ``--spend-again`` starts a new run with a new id: a second training event,
composed with the first on the ledger.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch

from dpray.config import ConfigError, DprayConfig
from dpray.io import partitions as parts
from dpray.privacy.calibration import CalibrationError, solve_noise_multiplier
from dpray.privacy.ledger import BudgetExceededError, Ledger
from dpray.privacy.releases import (
    SPEND_AGAIN_FLAG,
    log_new_release,
    log_reuse,
    release_key,
    spend_again,
)
from dpray.rundir import RunDir, file_digest, read_json, write_json
from dpray.stages.base import Stage, StageResult, register
from dpray.stages.train_generator.formats import PromptFormat, build_format, resolve_format
from dpray.stages.train_generator.noise import resolve_scheme
from dpray.stages.train_generator.worker import (
    STATE_FILE,
    WEIGHTS_FILE,
    build_lora_model,
    event_for,
    train_loop_per_worker,
)

log = logging.getLogger(__name__)
STAGE_NAME = "train-generator"
RUN_RECORD = "run.json"
KEY_SECTIONS = ("generator", "train", "privacy", "seed")


@dataclass
class Units:
    """Privacy units: each a list of record indices (one record, or one user's records)."""

    members: list[list[int]]
    texts: list[str]


def load_units(run_dir: RunDir, unit: str) -> Units:
    table = pq.read_table(run_dir.private("ingest") / "instructions.parquet")
    texts = table.column("text").to_pylist()
    if unit == "user":
        groups: dict[str, list[int]] = {}
        for index, user in enumerate(table.column("user_id").to_pylist()):
            groups.setdefault(user, []).append(index)
        return Units(list(groups.values()), texts)
    return Units([[i] for i in range(len(texts))], texts)


def secure_fields_for(plan: dict, dim: int, num_units: int) -> dict | None:
    """The Skellam event fields the workers will use (same formula, computed here first)."""
    if plan["noise"] != "secure":
        return None
    from dpray.privacy.secure_agg.aggregator import SecureAggConfig

    world = plan["num_workers"]
    cfg = SecureAggConfig.create(
        dim=dim,
        num_workers=world,
        noise_multiplier=plan["noise_multiplier"],
        clip_norm=plan["clip_norm"],
        max_norm=plan["clip_norm"] * max(1, num_units),  # as the workers: n bounds any one
        bits=plan["secure_bits"],
        min_honest_workers=plan["min_honest_workers"],
    )
    return {
        "scale": float(cfg.scale),
        "bits": int(cfg.bits),
        "dim": int(cfg.padded_dim),
        "min_honest_workers": int(cfg.min_honest_workers),
    }


def calibrate(plan: dict, ledger: Ledger, share: float, dim: int, num_units: int) -> float:
    """Smallest σ keeping everything spent plus this run within ``share`` of the target."""
    target = share * ledger.target_epsilon
    planned = plan["planned_steps"]

    def make_event(sigma: float):
        trial = {**plan, "noise_multiplier": sigma}
        return event_for(trial, planned, secure_fields_for(trial, dim, num_units))

    try:
        return solve_noise_multiplier(make_event, target, ledger.target_delta, ledger.events)
    except CalibrationError as exc:
        raise BudgetExceededError(f"{STAGE_NAME}: {exc}") from None


def _cpus_per_worker(num_workers: int) -> int:
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, cpus // num_workers)


def run(config: DprayConfig, run_dir: RunDir) -> StageResult:
    """Build the generator with ``generator.strategy``; see the module docstring."""
    from dpray.stages.train_generator.strategies import run_strategy

    return run_strategy(config, run_dir)


def prompt_format(config: DprayConfig, tokenizer, strategy: str) -> PromptFormat:
    """The generator's public prompt format for ``strategy`` (topics only for untrained ones)."""
    from dpray.stages.train_generator.formats import load_topics

    gc = config.generator
    name = resolve_format(gc.format, tokenizer)
    topics = load_topics(gc.resolved_topics(strategy))
    if topics and strategy == "dp_finetune":
        raise ConfigError(
            "generator.topics: dp_finetune learns what to write from the private data with one "
            "fixed prompt; set generator.topics: none (topics are for prompted and "
            "private_evolution)"
        )
    try:
        return build_format(
            name,
            tokenizer,
            template=config.train.template,
            request=gc.request,
            system=gc.system,
            topics=topics,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def format_metadata(fmt: PromptFormat, strategy: str) -> dict:
    """The generator.json keys every strategy writes (public, data-independent)."""
    return {
        "strategy": strategy,
        "format": fmt.name,
        "template": fmt.template,
        "prompt_ids": fmt.prompts[0],
        "prompts": fmt.prompts,
        "prompt_texts": fmt.prompt_texts,
        "stop_ids": fmt.stop_ids,
        "topics": fmt.topics,
    }


def train_generator(
    config: DprayConfig,
    run_dir: RunDir,
    ledger_required: bool = True,
    out_dir: Path | None = None,
) -> StageResult:
    """The stage body.  ``ledger_required=False`` is for audits' non-DP control runs only."""
    from transformers import AutoTokenizer

    from dpray.models import resolve_causal_lm

    tc = config.train
    partitions_dir = run_dir.private("ingest") / parts.DIRNAME
    manifest = _partition_manifest(config, partitions_dir)
    n = int(manifest["units"])  # released by ingest (report.json); no record is read here
    q = min(1.0, tc.expected_batch_size / n)
    steps = tc.steps or max(1, math.ceil(tc.epochs / q))
    scheme = resolve_scheme(tc.noise, tc.num_workers)
    model_path = resolve_causal_lm(tc.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    fmt = prompt_format(config, tokenizer, "dp_finetune")
    prompt = fmt.prompts[0]

    private = run_dir.private("train")
    public = run_dir.public("generator") if out_dir is None else Path(out_dir)
    public.mkdir(parents=True, exist_ok=True)
    record, key = None, ""
    if ledger_required:
        key = release_key(config, KEY_SECTIONS, _ingest_output(config, run_dir), run_dir)
        record = _own_record(private, key, run_dir.ledger_path)
        if record is not None and record["state"] == "complete":
            return _reuse_finished(record, config, private, public)
    resuming = record is not None  # an interrupted run of this key: same run id, same sigma
    run_id = record["run_id"] if resuming else secrets.token_hex(8)
    plan = {
        "run_id": run_id,
        "model_path": str(model_path),
        "init_seed": config.seed,
        "session": secrets.token_hex(16),
        "lora_r": tc.lora_r,
        "lora_alpha": tc.lora_alpha,
        "lora_dropout": tc.lora_dropout,
        "lora_targets": list(tc.lora_targets),
        "learning_rate": tc.learning_rate,
        "weight_decay": tc.weight_decay,
        "clip_norm": tc.clip_norm,
        "sampling_rate": q,
        "expected_batch_size": q * n,
        "steps": steps,
        "planned_steps": steps + tc.max_failures * tc.checkpoint_every,
        "micro_batch_size": tc.micro_batch_size,
        "grad_sample_mode": tc.grad_sample_mode,
        "noise": scheme,
        "num_workers": tc.num_workers,
        "min_honest_workers": tc.min_honest_workers,
        "secure_bits": tc.secure_bits,
        "checkpoint_every": tc.checkpoint_every,
        "prompt_len": len(prompt),
        "pad_id": int(tokenizer.pad_token_id or tokenizer.eos_token_id),
        # where each worker finds its own partition: a folder and a count, never a record
        "partitions_dir": str(partitions_dir),
        "partition_count": int(manifest["count"]),
        "partition_labels": tc.partition_labels,
        "unit": config.privacy.unit,
        "num_units": n,
        "max_tokens": tc.max_tokens,
        "prompt_ids": [int(t) for t in prompt],
        "stop_id": int(fmt.stop_ids[0]),
        "private_dir": str(private),
        "public_metrics": str(public / "metrics.jsonl"),
        "private_metrics": str(private / "metrics.jsonl"),
        "fail_at_step": tc.fail_at_step,
        "ledger_path": str(run_dir.ledger_path) if ledger_required else None,
    }
    model, lora_config = build_lora_model(str(model_path), plan)
    dim = sum(p.numel() for p in model.parameters() if p.requires_grad)

    if resuming:
        ledger = Ledger.load(run_dir.ledger_path)
        plan["noise_multiplier"] = float(record["noise_multiplier"])
        previous = ledger.run_event(STAGE_NAME, run_id)
        done = previous.steps if previous is not None else 0
        resume_at = _latest_checkpoint_step(private / "ray_results" / f"train-{run_id}")
        # what this run may still add: the steps after its last checkpoint plus restart headroom
        plan["planned_steps"] = done + (steps - resume_at) + tc.max_failures * tc.checkpoint_every
        planned = event_for(plan, plan["planned_steps"], secure_fields_for(plan, dim, n))
        ledger.check(planned, replace_run=True)
        log.info(
            "%s: resuming interrupted run %s from its checkpoint at step %d (%d steps already "
            "on the ledger, counted once in the same event)",
            STAGE_NAME,
            run_id,
            resume_at,
            done,
        )
    elif ledger_required:
        log_new_release(STAGE_NAME, previous=(private / RUN_RECORD).exists())
        ledger = Ledger.load(run_dir.ledger_path)
        if tc.noise_multiplier is None:
            plan["noise_multiplier"] = calibrate(plan, ledger, config.privacy.train_share, dim, n)
        else:
            plan["noise_multiplier"] = tc.noise_multiplier
        planned = event_for(plan, plan["planned_steps"], secure_fields_for(plan, dim, n))
        ledger.check(planned)  # the whole run, restarts' headroom included, must fit
    else:
        plan["noise_multiplier"] = tc.noise_multiplier or 0.0

    if not resuming:  # a resumed run appends to its own metrics; its fault hook fired already
        for path in (public / "metrics.jsonl", private / "metrics.jsonl"):
            path.unlink(missing_ok=True)
        (private / "injected_fault.done").unlink(missing_ok=True)
    if ledger_required:
        write_json(
            private / RUN_RECORD,
            {
                "key": key,
                "run_id": run_id,
                "state": "training",
                "strategy": "dp_finetune",
                "noise_multiplier": plan["noise_multiplier"],
                "steps": steps,
            },
        )
    log.info(
        "%s: %d units, q=%.4g, %d steps, sigma=%.4g, C=%g, %s noise, %d worker(s)",
        STAGE_NAME,
        n,
        q,
        steps,
        plan["noise_multiplier"],
        tc.clip_norm,
        scheme,
        tc.num_workers,
    )
    checkpoint_dir = _fit(plan, tc, private)

    adapter_dir = public / "adapter"
    _save_adapter(model, checkpoint_dir, adapter_dir)
    changed = _verify_adapter(str(model_path), adapter_dir, model)
    summary = {
        "units": n,
        "sampling_rate": q,
        "steps": steps,
        "noise_multiplier": plan["noise_multiplier"],
        "clip_norm": tc.clip_norm,
        "noise": scheme,
        "num_workers": tc.num_workers,
        "trainable_parameters": dim,
        "lora_tensors_changed": changed,
    }
    if ledger_required:
        ledger = Ledger.load(run_dir.ledger_path)
        executed = ledger.run_event(STAGE_NAME, run_id)
        final = ledger.record_progress(executed, exact=True)  # exact (PLD) figure at the end
        summary.update({"executed_steps": executed.steps, "epsilon_total": final})
    meta = {
        "base_model": tc.model,
        **format_metadata(fmt, "dp_finetune"),
        "max_tokens": tc.max_tokens,
        "lora": {
            "r": lora_config.r,
            "alpha": lora_config.lora_alpha,
            "targets": sorted(lora_config.target_modules),
        },
        "adapter_sha256": _dir_hash(adapter_dir),
        **summary,
    }
    write_json(public / "generator.json", meta)
    if ledger_required:
        write_json(
            private / RUN_RECORD,
            {
                **read_json(private / RUN_RECORD),
                "state": "complete",
                "adapter_sha256": file_digest(adapter_dir),
                "checkpoint_sha256": file_digest(checkpoint_dir),
                "generator": meta,
                "summary": summary,
            },
        )
    return StageResult(
        outputs={"adapter": str(adapter_dir), "generator": str(public / "generator.json")},
        summary=summary,
    )


def _own_record(private: Path, key: str, ledger_path: Path) -> dict | None:
    """This key's run record, unless ``--spend-again`` asks for a new run or the ledger does not
    hold the run (its steps would go unaccounted: never reuse or resume such a run)."""
    path = private / RUN_RECORD
    if spend_again() or not path.exists():
        return None
    record = read_json(path)
    if record.get("key") != key or record.get("strategy") != "dp_finetune":
        return None
    if Ledger.load(ledger_path).run_event(STAGE_NAME, record["run_id"]) is None:
        log.warning(
            "%s: run %s is not on the ledger; not reused or resumed, a new run starts",
            STAGE_NAME,
            record["run_id"],
        )
        return None
    return record


def _reuse_finished(record: dict, config: DprayConfig, private: Path, public: Path) -> StageResult:
    """A finished run of this key: its adapter is the DP release; keep it (re-save it from the
    final checkpoint if the folder is gone or changed) and spend nothing."""
    adapter_dir, final = public / "adapter", private / "final_checkpoint"
    if not adapter_dir.exists() or file_digest(adapter_dir) != record["adapter_sha256"]:
        if not final.exists() or file_digest(final) != record["checkpoint_sha256"]:
            raise BudgetExceededError(
                f"{STAGE_NAME}: run {record['run_id']} finished, but its adapter and final "
                f"checkpoint are gone or changed; training again spends the budget again: pass "
                f"{SPEND_AGAIN_FLAG} to do so"
            )
        from dpray.models import resolve_causal_lm

        tc = config.train  # the key pins it: the same LoRA layout as the finished run
        model_path = resolve_causal_lm(tc.model)
        layout = {
            "init_seed": config.seed,
            "lora_r": tc.lora_r,
            "lora_alpha": tc.lora_alpha,
            "lora_dropout": tc.lora_dropout,
            "lora_targets": list(tc.lora_targets),
        }
        model, _ = build_lora_model(str(model_path), layout)
        _save_adapter(model, final, adapter_dir)
        _verify_adapter(str(model_path), adapter_dir, model)
        log_reuse(STAGE_NAME, f"run {record['run_id']}, adapter re-saved from its final checkpoint")
    else:
        log_reuse(STAGE_NAME, f"run {record['run_id']}, its adapter")
    path = public / "generator.json"
    if not path.exists() or read_json(path) != record["generator"]:
        write_json(path, record["generator"])
    summary = {**record["summary"], "reused_release": True}
    return StageResult(
        outputs={"adapter": str(adapter_dir), "generator": str(path)}, summary=summary
    )


def _latest_checkpoint_step(storage: Path) -> int:
    """The step of the newest Ray Train checkpoint under ``storage`` (0: none yet)."""
    import json

    steps = [0]
    for state in storage.rglob(STATE_FILE) if storage.exists() else []:
        try:
            steps.append(int(json.loads(state.read_text())["step"]))
        except (ValueError, KeyError, OSError):
            continue
    return max(steps)


def _partition_manifest(config: DprayConfig, directory: Path) -> dict:
    """The partitions ingest wrote, checked against this run's unit and workers."""
    try:
        manifest = parts.read_manifest(directory)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    if manifest["unit"] != config.privacy.unit:
        raise ConfigError(
            f"{directory}: partitions are by {manifest['unit']}, privacy.unit is "
            f"{config.privacy.unit}; run `dpray ingest` again"
        )
    workers = config.train.num_workers
    if config.train.partition_labels is not None and manifest["count"] != workers:
        raise ConfigError(
            f"train.partition_labels pins one partition per worker, but ingest wrote "
            f"{manifest['count']} partitions for {workers} workers"
        )
    if manifest["count"] < workers:
        log.warning(
            "%s: %d partitions for %d workers: %d worker(s) hold no data (they still add "
            "their noise share); set data.partitions or re-run ingest",
            STAGE_NAME,
            manifest["count"],
            workers,
            workers - manifest["count"],
        )
    return manifest


def _fit(plan: dict, tc, private: Path) -> Path:
    """Run the TorchTrainer; return the final checkpoint's directory.

    ``plan`` carries no private record and no object reference to one: each worker reads its own
    partition file.  With ``train.partition_labels`` Ray places worker k's bundle on a node with
    the k-th labels, and the worker reads the partition its node's labels name.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    plan = dict(plan)
    cpus = _cpus_per_worker(tc.num_workers)
    pinning = {}
    if tc.partition_labels is not None:
        pinning["label_selector"] = [dict(labels) for labels in tc.partition_labels]
    plan["threads_per_worker"] = cpus
    storage = private / "ray_results"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=plan,
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers,
            use_gpu=tc.use_gpu,
            resources_per_worker={"CPU": cpus},
            **pinning,
        ),
        run_config=RunConfig(
            name=f"train-{plan['run_id']}",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{STAGE_NAME}: training produced no checkpoint")
    final = private / "final_checkpoint"
    shutil.rmtree(final, ignore_errors=True)
    result.checkpoint.to_directory(str(final))
    return final


def _save_adapter(model, checkpoint_dir: Path, adapter_dir: Path) -> None:
    state = torch.load(checkpoint_dir / WEIGHTS_FILE)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            named[name].copy_(value)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    model.save_pretrained(str(adapter_dir))


def _verify_adapter(model_path: str, adapter_dir: Path, trained) -> int:
    """Reload the adapter; check weights round-trip and moved away from init; return #changed.

    (Opacus has silently corrupted LoRA weights with some peft versions: check, don't trust.)
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True)
    reloaded = PeftModel.from_pretrained(base, str(adapter_dir))
    trained_state = {n: p for n, p in trained.named_parameters() if "lora_" in n}
    reloaded_state = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
    if set(trained_state) != set(reloaded_state):
        raise RuntimeError(f"{STAGE_NAME}: adapter reload has different LoRA tensors")
    changed = 0
    for name, value in trained_state.items():
        if not torch.allclose(value, reloaded_state[name]):
            raise RuntimeError(f"{STAGE_NAME}: adapter tensor {name} did not round-trip")
        if "lora_B" in name and bool(value.abs().sum() > 0):
            changed += 1  # LoRA B starts at zero: non-zero means training moved it
    if changed == 0:
        raise RuntimeError(f"{STAGE_NAME}: no LoRA weight changed during training")
    return changed


def _dir_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(item.name.encode())
        digest.update(item.read_bytes())
    return digest.hexdigest()[:16]


def _ingest_output(config: DprayConfig, run_dir: RunDir) -> list[Path]:
    directory = run_dir.private_root / "ingest" / parts.DIRNAME
    return [
        run_dir.private_root / "ingest" / "instructions.parquet",
        directory / parts.MANIFEST,
        *sorted(directory.glob("part-*.parquet")),
    ]


STAGE = register(
    Stage(
        name=STAGE_NAME,
        run=run,
        help="Build the instruction generator: DP fine-tune (LoRA, DP-SGD, Ray Train), prompted, "
        "or private evolution (generator.strategy).",
        reads="private/ingest/partitions/ (each worker its own), ledger.json",
        writes="generator/adapter (PEFT, DP), generator/generator.json, generator/metrics.jsonl, "
        "private/train/ (checkpoints, non-DP metrics), ledger.json (+ training event)",
        sections=("generator", "train", "privacy", "seed"),
        inputs=_ingest_output,
        needs_ray=True,
        spends_budget=True,
    )
)

__all__ = ["run", "train_generator", "load_units", "calibrate", "prompt_format", "format_metadata"]
