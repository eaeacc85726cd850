"""``dpray train-generator``: build the instruction generator with the configured strategy.

``generator.strategy`` picks one of :mod:`~dpray.stages.train_generator.strategies`:
``dp_finetune`` (below: LoRA + DP-SGD), ``prompted`` (no training: public prompts only) or
``private_evolution`` (DP nearest-neighbour votes over rounds of candidates).  Every strategy
writes ``generator/generator.json``: its strategy, prompt format, the prompts and stop tokens the
sampling stage starts from, and what it spent.

dp_finetune reads nothing private on the driver: each Ray Train worker reads its own partition of
``private/ingest/partitions/`` (the driver learns only n, released by ingest, and the number of
partitions; see :mod:`dpray.io.partitions`).  Nor does it load model weights: it plans from the
model's config and tokenizer (:mod:`.plan`), and rank 0 saves and checks the PEFT adapter
(:mod:`.adapter`).  The stage writes ``RUN_DIR/generator/adapter`` (DP output: public),
``generator/generator.json`` (how to sample from it), ``generator/metrics.jsonl`` (step,
epsilon), private metrics (loss, batch sizes, step time: not DP) and Ray Train checkpoints under
``private/train/``, and the spend to the ledger.  Workers get CPUs/GPUs fitted to the alive
nodes' shapes (:func:`dpray.resources.fit_workers`): a cluster that cannot hold them fails at
once.

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
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow.parquet as pq

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
from dpray.resources import WorkerShape, fit_workers
from dpray.rundir import RunDir, file_digest, read_json, write_json
from dpray.runtime import progress_enabled
from dpray.stages.base import Stage, StageResult, register
from dpray.stages.train_generator.formats import PromptFormat, build_format, resolve_format
from dpray.stages.train_generator.plan import (
    CHECK_FILE,
    STATE_FILE,
    LoraLayout,
    TrainPlan,
    event_for,
    resolve_scheme,
    trainable_parameter_count,
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


def secure_fields_for(plan, dim: int, num_units: int) -> dict | None:
    """The Skellam event fields the workers will use (same formula, computed here first)."""
    if plan.noise != "secure":
        return None
    from dpray.privacy.secure_agg.aggregator import SecureAggConfig

    cfg = SecureAggConfig.create(
        dim=dim,
        num_workers=plan.num_workers,
        noise_multiplier=plan.noise_multiplier,
        clip_norm=plan.clip_norm,
        max_norm=plan.clip_norm * max(1, num_units),  # as the workers: n bounds any one
        bits=plan.secure_bits,
        min_honest_workers=plan.min_honest_workers,
    )
    return {
        "scale": float(cfg.scale),
        "bits": int(cfg.bits),
        "dim": int(cfg.padded_dim),
        "min_honest_workers": int(cfg.min_honest_workers),
    }


def calibrate(plan: TrainPlan, ledger: Ledger, share: float, dim: int, num_units: int) -> float:
    """Smallest σ keeping everything spent plus this run within ``share`` of the target."""
    target = share * ledger.target_epsilon

    def make_event(sigma: float):
        trial = replace(plan, noise_multiplier=sigma)
        return event_for(trial, plan.planned_steps, secure_fields_for(trial, dim, num_units))

    try:
        return solve_noise_multiplier(make_event, target, ledger.target_delta, ledger.events)
    except CalibrationError as exc:
        raise BudgetExceededError(f"{STAGE_NAME}: {exc}") from None


def worker_shape(tc) -> WorkerShape:
    """Each training worker's CPUs/GPUs, from the alive nodes' shapes (fails at once if none fit)."""
    return fit_workers(STAGE_NAME, tc.num_workers, gpus=1 if tc.use_gpu else 0)


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


@dataclass(frozen=True)
class Planned:
    """A planned run: what the workers get, plus what only the driver needs to record it."""

    plan: TrainPlan
    shape: WorkerShape
    fmt: PromptFormat
    dim: int
    key: str
    public: Path
    ledger_required: bool


def train_generator(
    config: DprayConfig,
    run_dir: RunDir,
    ledger_required: bool = True,
    out_dir: Path | None = None,
) -> StageResult:
    """The stage body: plan, launch, record.  ``ledger_required=False`` is for audits' non-DP
    control runs only.  The driver loads no model weights (see :mod:`.adapter`)."""
    planned = plan_run(config, run_dir, ledger_required, out_dir)
    if isinstance(planned, StageResult):  # a finished run of this key: reused, nothing to train
        return planned
    checkpoint_dir = _launch(planned.plan, config.train, planned.shape)
    return _record(planned, config, run_dir, checkpoint_dir)


def plan_run(
    config: DprayConfig, run_dir: RunDir, ledger_required: bool, out_dir: Path | None
) -> Planned | StageResult:
    """Everything decided before any worker starts: shape, counts, σ (checked on the ledger)."""
    tc = config.train
    partitions_dir = run_dir.private("ingest") / parts.DIRNAME
    manifest = _partition_manifest(config, partitions_dir)
    shape = worker_shape(tc)  # before anything is written: a cluster that cannot fit fails now
    private = run_dir.private("train")
    public = run_dir.public("generator") if out_dir is None else Path(out_dir)
    public.mkdir(parents=True, exist_ok=True)
    record, key = None, ""
    if ledger_required:
        key = release_key(config, KEY_SECTIONS, _ingest_output(config, run_dir), run_dir)
        record = _own_record(private, key, run_dir.ledger_path)
        if record is not None and record["state"] == "complete":
            return _reuse_finished(record, config, private, public, shape)
    plan, fmt = _base_plan(config, run_dir, manifest, shape, record, public, ledger_required)
    dim = trainable_parameter_count(plan.model_path, plan.lora)  # from the config: no weights
    plan = replace(plan, **_noise(plan, config, run_dir, record, dim, ledger_required))
    if record is None:  # a resumed run appends to its own metrics; its fault hook fired already
        for path in (Path(plan.public_metrics), Path(plan.private_metrics)):
            path.unlink(missing_ok=True)
        (private / "injected_fault.done").unlink(missing_ok=True)
    (private / CHECK_FILE).unlink(missing_ok=True)
    if ledger_required:
        write_json(
            private / RUN_RECORD,
            {
                "key": key,
                "run_id": plan.run_id,
                "state": "training",
                "strategy": "dp_finetune",
                "noise_multiplier": plan.noise_multiplier,
                "steps": plan.steps,
            },
        )
    log.info(
        "%s: %d units, q=%.4g, %d steps, sigma=%.4g, C=%g, %s noise, %d worker(s) x %d CPU(s)%s",
        STAGE_NAME,
        plan.num_units,
        plan.sampling_rate,
        plan.steps,
        plan.noise_multiplier,
        plan.clip_norm,
        plan.noise,
        shape.workers,
        shape.cpus,
        f" + {shape.gpus:g} GPU(s)" if shape.gpus else "",
    )
    return Planned(plan, shape, fmt, dim, key, public, ledger_required)


def _base_plan(config, run_dir, manifest, shape, record, public, ledger_required):
    """The run's :class:`TrainPlan` (σ still 0) and its prompt format (tokenizer only)."""
    from transformers import AutoTokenizer

    from dpray.models import resolve_causal_lm

    tc = config.train
    n = int(manifest["units"])  # released by ingest (report.json); no record is read here
    q = min(1.0, tc.expected_batch_size / n)
    steps = tc.steps or max(1, math.ceil(tc.epochs / q))
    model_path = resolve_causal_lm(tc.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    fmt = prompt_format(config, tokenizer, "dp_finetune")
    prompt = [int(t) for t in fmt.prompts[0]]
    private = run_dir.private("train")
    labels = tc.partition_labels
    plan = TrainPlan(
        run_id=record["run_id"] if record is not None else secrets.token_hex(8),
        session=secrets.token_hex(16),
        model_path=str(model_path),
        lora=LoraLayout.from_config(config),
        learning_rate=tc.learning_rate,
        weight_decay=tc.weight_decay,
        clip_norm=tc.clip_norm,
        noise_multiplier=0.0,
        sampling_rate=q,
        expected_batch_size=q * n,
        steps=steps,
        planned_steps=steps + tc.max_failures * tc.checkpoint_every,
        micro_batch_size=tc.micro_batch_size,
        grad_sample_mode=tc.grad_sample_mode,
        noise=resolve_scheme(tc.noise, tc.num_workers),
        num_workers=tc.num_workers,
        min_honest_workers=tc.min_honest_workers,
        secure_bits=tc.secure_bits,
        checkpoint_every=tc.checkpoint_every,
        threads_per_worker=shape.cpus,
        partitions_dir=str(run_dir.private("ingest") / parts.DIRNAME),
        partition_count=int(manifest["count"]),
        partition_labels=None if labels is None else tuple(dict(x) for x in labels),
        unit=config.privacy.unit,
        num_units=n,
        max_tokens=tc.max_tokens,
        prompt_ids=tuple(prompt),
        prompt_len=len(prompt),
        pad_id=int(tokenizer.pad_token_id or tokenizer.eos_token_id),
        stop_id=int(fmt.stop_ids[0]),
        private_dir=str(private),
        public_metrics=str(public / "metrics.jsonl"),
        private_metrics=str(private / "metrics.jsonl"),
        adapter_dir=str(public / "adapter"),
        ledger_path=str(run_dir.ledger_path) if ledger_required else None,
        fail_at_step=tc.fail_at_step,
        progress=progress_enabled(config),
    )
    return plan, fmt


def _noise(plan: TrainPlan, config, run_dir, record, dim: int, ledger_required: bool) -> dict:
    """σ (and, when resuming, the steps still to bound), checked against the ledger."""
    tc = config.train
    n = plan.num_units
    if record is not None:  # an interrupted run of this key: same run id, same σ
        ledger = Ledger.load(run_dir.ledger_path)
        previous = ledger.run_event(STAGE_NAME, plan.run_id)
        done = previous.steps if previous is not None else 0
        storage = Path(plan.private_dir) / "ray_results" / f"train-{plan.run_id}"
        resume_at = _latest_checkpoint_step(storage)
        # what this run may still add: the steps after its last checkpoint plus restart headroom
        bound = done + (plan.steps - resume_at) + tc.max_failures * tc.checkpoint_every
        sigma = float(record["noise_multiplier"])
        trial = replace(plan, noise_multiplier=sigma, planned_steps=bound)
        ledger.check(event_for(trial, bound, secure_fields_for(trial, dim, n)), replace_run=True)
        log.info(
            "%s: resuming interrupted run %s from its checkpoint at step %d (%d steps already "
            "on the ledger, counted once in the same event)",
            STAGE_NAME,
            plan.run_id,
            resume_at,
            done,
        )
        return {"noise_multiplier": sigma, "planned_steps": bound}
    if not ledger_required:
        return {"noise_multiplier": tc.noise_multiplier or 0.0}
    log_new_release(STAGE_NAME, previous=(Path(plan.private_dir) / RUN_RECORD).exists())
    ledger = Ledger.load(run_dir.ledger_path)
    if tc.noise_multiplier is None:
        sigma = calibrate(plan, ledger, config.privacy.train_share, dim, n)
    else:
        sigma = tc.noise_multiplier
    trial = replace(plan, noise_multiplier=sigma)
    # the whole run, restarts' headroom included, must fit
    ledger.check(event_for(trial, plan.planned_steps, secure_fields_for(trial, dim, n)))
    return {"noise_multiplier": sigma}


def _record(planned: Planned, config: DprayConfig, run_dir: RunDir, checkpoint_dir: Path):
    """After training: the summary, ``generator.json``, the ledger's exact figure, run.json."""
    plan, public = planned.plan, planned.public
    private, adapter_dir = Path(plan.private_dir), Path(plan.adapter_dir)
    from dpray.stages.train_generator.adapter import read_check  # torch: only when it ran

    changed = read_check(private, plan.run_id)  # rank 0 saved and verified the adapter
    summary = {
        "units": plan.num_units,
        "sampling_rate": plan.sampling_rate,
        "steps": plan.steps,
        "noise_multiplier": plan.noise_multiplier,
        "clip_norm": plan.clip_norm,
        "noise": plan.noise,
        "num_workers": plan.num_workers,
        "trainable_parameters": planned.dim,
        "lora_tensors_changed": changed,
    }
    if planned.ledger_required:
        ledger = Ledger.load(run_dir.ledger_path)
        executed = ledger.run_event(STAGE_NAME, plan.run_id)
        final = ledger.record_progress(executed, exact=True)  # exact (PLD) figure at the end
        summary.update({"executed_steps": executed.steps, "epsilon_total": final})
    lora = plan.lora
    meta = {
        "base_model": config.train.model,
        **format_metadata(planned.fmt, "dp_finetune"),
        "max_tokens": plan.max_tokens,
        "lora": {"r": lora.r, "alpha": lora.alpha, "targets": sorted(set(lora.targets))},
        "adapter_sha256": _dir_hash(adapter_dir),
        **summary,
    }
    write_json(public / "generator.json", meta)
    if planned.ledger_required:
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


def _reuse_finished(
    record: dict, config: DprayConfig, private: Path, public: Path, shape: WorkerShape
) -> StageResult:
    """A finished run of this key: its adapter is the DP release; keep it (re-save it from the
    final checkpoint, in a Ray task, if the folder is gone or changed) and spend nothing."""
    adapter_dir, final = public / "adapter", private / "final_checkpoint"
    if not adapter_dir.exists() or file_digest(adapter_dir) != record["adapter_sha256"]:
        if not final.exists() or file_digest(final) != record["checkpoint_sha256"]:
            raise BudgetExceededError(
                f"{STAGE_NAME}: run {record['run_id']} finished, but its adapter and final "
                f"checkpoint are gone or changed; training again spends the budget again: pass "
                f"{SPEND_AGAIN_FLAG} to do so"
            )
        from dpray.models import resolve_causal_lm

        # the key pins the config: the same LoRA layout as the finished run
        model_path = str(resolve_causal_lm(config.train.model))
        layout = LoraLayout.from_config(config)
        from dpray.stages.train_generator.adapter import resave_on_ray

        resave_on_ray(model_path, layout, final, adapter_dir, shape.cpus)
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


def _launch(plan: TrainPlan, tc, shape: WorkerShape) -> Path:
    """Run the TorchTrainer; return the final checkpoint's directory.

    ``plan`` carries no private record and no object reference to one: each worker reads its own
    partition file.  With ``train.partition_labels`` Ray places worker k's bundle on a node with
    the k-th labels, and the worker reads the partition its node's labels name.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dpray.stages.train_generator.worker import train_loop_per_worker

    pinning = {}
    if tc.partition_labels is not None:
        pinning["label_selector"] = [dict(labels) for labels in tc.partition_labels]
    private = Path(plan.private_dir)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan},
        torch_config=TorchConfig(backend="nccl" if shape.gpus else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=shape.workers,
            use_gpu=bool(shape.gpus),
            resources_per_worker={"CPU": shape.cpus, **({"GPU": shape.gpus} if shape.gpus else {})},
            **pinning,
        ),
        run_config=RunConfig(
            name=f"train-{plan.run_id}",
            storage_path=str(private / "ray_results"),
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
