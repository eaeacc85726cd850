"""The per-worker DP-SGD loop run by Ray Train (``TorchTrainer``), one process per worker.

Every worker builds the same LoRA model (same init seed), reads *only its own partition* of the
private data from its file under ``private/ingest/partitions/`` (the driver sends no records: a
partition number at most, and a pinned worker finds its partition from its node's labels),
Poisson-samples it each step (from a seed it draws from the OS at every (re)start, so a step
redone after a failure samples a fresh batch and no other worker can predict its batch), computes
its clipped gradient sum, and joins the aggregation (central or secure); all workers receive the
same noisy sum, so the replicas stay identical without DDP.  What a worker loaded is recorded in
``private/train/received/rank-<r>.json`` (its partitions, unit and record counts, a digest of the
record ids) so that a test can check that no worker held another partition's records.  Rank 0 records every executed step in the ledger right after the noisy
sum is revealed (so a step lost to a crash still counts), writes metrics, and checkpoints every
``checkpoint_every`` steps through ``ray.train.report``; at the end it saves the PEFT adapter and
checks it by reloading it (:mod:`~dpray.stages.train_generator.adapter`): the driver loads no
weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from dpray.io import partitions as parts
from dpray.privacy.ledger import Ledger
from dpray.stages.train_generator.adapter import CHECK_FILE, build_lora_model, save_and_verify
from dpray.stages.train_generator.data import (
    PoissonSampler,
    batch_digest,
    collate,
    pack_micro_batches,
    read_partition_units,
    tokenize_instructions,
)
from dpray.stages.train_generator.device import worker_device
from dpray.stages.train_generator.dp_sgd import (
    apply_update,
    clipped_sum,
    trainable_parameters,
    wrap_for_per_sample_grads,
)
from dpray.stages.train_generator.noise import make_aggregator, secure_event_fields
from dpray.stages.train_generator.plan import STATE_FILE, TrainPlan, event_for
from dpray.worker_progress import StepBar

log = logging.getLogger("dpray.train")

WEIGHTS_FILE = "trainable.pt"
OPTIMIZER_FILE = "optimizer.pt"


class InjectedFault(RuntimeError):
    """Raised once by the fault-injection test hook (train.fail_at_step)."""


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def train_loop_per_worker(config: dict) -> None:
    """Entry point for ``TorchTrainer``: ``config["plan"]`` is the driver's :class:`TrainPlan`."""
    plan: TrainPlan = config["plan"]
    import ray
    import ray.train

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(plan.threads_per_worker)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    units = _load_own_partitions(plan, rank, world)
    shard = np.arange(len(units))
    # the device Ray gave this worker (its GPU, else CPU); the step's tensors live there
    device = worker_device()
    model, _ = build_lora_model(plan.model_path, plan.lora, device)
    model.train()
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=plan.learning_rate, weight_decay=plan.weight_decay)
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            folder = Path(folder)
            # saved from whatever device the last attempt had: load to CPU, then copy over
            state = torch.load(folder / WEIGHTS_FILE, map_location="cpu")
            named = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in state.items():
                    named[name].copy_(value)
            # Optimizer.load_state_dict moves the state to each parameter's device
            optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, map_location="cpu"))
            start = json.loads((folder / STATE_FILE).read_text())["step"]
        log.info("rank %d: resumed from checkpoint at step %d", rank, start)

    # fresh secret randomness for this attempt: a step redone after a restart samples anew
    sampler = PoissonSampler(shard, plan.sampling_rate, rank)
    gsm = wrap_for_per_sample_grads(model, plan.grad_sample_mode)
    # partitions may be uneven: bound a worker's units by n (public), the same on every worker
    max_units = int(plan.num_units)
    aggregator = make_aggregator(
        plan.noise,
        dim=sum(p.numel() for p in params),
        noise_multiplier=plan.noise_multiplier,
        clip_norm=plan.clip_norm,
        max_units_per_worker=max_units,
        bits=plan.secure_bits,
        min_honest_workers=plan.min_honest_workers,
        session=bytes.fromhex(plan.session),
    )
    secure_fields = secure_event_fields(aggregator) if plan.noise == "secure" else None

    ledger = executed = None
    if rank == 0 and plan.ledger_path:
        ledger = Ledger.load(plan.ledger_path)
        previous = ledger.run_event("train-generator", plan.run_id)
        executed = previous.steps if previous is not None else 0
    total_steps = plan.steps
    log_every = max(1, total_steps // 20)
    bar = StepBar(
        "train-generator (DP-SGD)",
        total_steps,
        enabled=plan.progress and rank == 0,
        start=start,
        every=log_every,  # chunks, never one step's (batch-size-dependent) time
    )
    aggregator.prefetch(start)
    for step in range(start, total_steps):
        tick = time.perf_counter()
        _maybe_fail(plan, step, rank, world)
        sampled = sampler(step)
        # micro-batches of similar lengths pad less (each is padded to its longest sequence);
        # the step's clipped sum does not depend on how its units are grouped
        by_length = sorted(sampled, key=lambda u: max(len(seq) for seq in units[u]))
        groups = pack_micro_batches([len(units[u]) for u in by_length], plan.micro_batch_size)
        batches = []
        for group in groups:
            seqs, owners = [], []
            for local in group:
                unit = int(by_length[local])
                seqs.extend(units[unit])
                owners.extend([unit] * len(units[unit]))
            batches.append(collate(seqs, owners, plan.prompt_len, plan.pad_id))
        local = clipped_sum(gsm, params, batches, plan.clip_norm)
        noisy = aggregator(local.vector, step)
        epsilon = None
        if ledger is not None:
            executed += 1  # the noisy sum exists now: this step is spent
            epsilon = ledger.record_progress(
                event_for(plan, executed, secure_fields),
                bound=event_for(plan, max(executed, plan.planned_steps), secure_fields),
            )
        apply_update(optimizer, params, noisy, plan.expected_batch_size)
        if step + 1 < total_steps:
            aggregator.prefetch(step + 1)  # the next share, drawn during the next backward pass
        seconds = time.perf_counter() - tick
        # what Ray Train gets is logged to the driver's console: public figures only
        metrics = {"step": step + 1, "epsilon": epsilon}
        if rank == 0:
            _write_metrics(plan, metrics, local, seconds, sampled)
            if (step + 1) % log_every == 0 or step + 1 == total_steps:
                # no step time here: it tracks the realised (private) Poisson batch size
                log.info(
                    "train-generator: step %d/%d  epsilon<=%.3f",
                    step + 1,
                    total_steps,
                    epsilon or 0.0,
                )
        bar.advance_to(step + 1, note=f"epsilon<={epsilon:.2f}" if epsilon is not None else None)
        _report(metrics, model, optimizer, step + 1, plan, rank)
    bar.close()
    if rank == 0:  # the weights are here: save and check the adapter here, not on the driver
        save_and_verify(
            model,
            trainable_state(model),
            plan.model_path,
            Path(plan.adapter_dir),
            Path(plan.private_dir) / CHECK_FILE,
            plan.run_id,
        )


def my_partitions(plan: TrainPlan, rank: int, world: int) -> list[int]:
    """The partitions this worker reads: by its node's labels when pinned, else k ≡ rank mod W."""
    selectors = plan.partition_labels
    if not selectors:
        return parts.assigned_partitions(rank, world, plan.partition_count)
    import ray

    mine = parts.partition_for_labels(ray.get_runtime_context().get_node_labels(), selectors)
    if world > 1:  # two workers must never read the same silo
        import torch.distributed as dist

        everyone: list[int | None] = [None] * world
        dist.all_gather_object(everyone, mine)
        if sorted(everyone) != list(range(world)):
            raise RuntimeError(f"pinned workers read partitions {everyone}, not one each")
    return [mine]


def _load_own_partitions(plan: TrainPlan, rank: int, world: int) -> list[list[np.ndarray]]:
    """Read and tokenize this worker's partitions only; record what was loaded (privately)."""
    from transformers import AutoTokenizer

    partitions = my_partitions(plan, rank, world)
    files = parts.partition_files(plan.partitions_dir, partitions)
    members, texts, ids = read_partition_units(files, plan.unit)
    biggest = max((len(m) for m in members), default=0)
    if biggest > plan.micro_batch_size:
        raise ValueError(
            f"train.micro_batch_size ({plan.micro_batch_size}) must be >= the records of one "
            f"user ({biggest}); raise it or lower privacy.max_records_per_user"
        )
    tokenizer = AutoTokenizer.from_pretrained(plan.model_path, local_files_only=True)
    seqs = (
        tokenize_instructions(
            texts,
            tokenizer,
            plan.max_tokens,
            prompt=plan.prompt_ids,
            stop_id=plan.stop_id,
        )
        if texts
        else []
    )
    received = Path(plan.private_dir) / "received"
    received.mkdir(parents=True, exist_ok=True)
    (received / f"rank-{rank}.json").write_text(
        json.dumps(
            {
                "rank": rank,
                "partitions": partitions,
                "units": len(members),
                "records": len(ids),
                "ids_sha256": ids_digest(ids),
            }
        )
    )
    log.info("rank %d: read partition(s) %s", rank, partitions)
    return [[seqs[i] for i in unit] for unit in members]


def ids_digest(ids: list[str]) -> str:
    """sha256 of the sorted record ids (what a worker loaded, without the ids themselves)."""
    return hashlib.sha256("\n".join(sorted(ids)).encode("utf-8", "surrogatepass")).hexdigest()


def _maybe_fail(plan: TrainPlan, step: int, rank: int, world: int) -> None:
    """Test hook: raise once at ``fail_at_step`` on the last rank (a marker makes it once)."""
    if plan.fail_at_step is None or step != plan.fail_at_step or rank != world - 1:
        return
    marker = Path(plan.private_dir) / "injected_fault.done"
    if marker.exists():
        return
    marker.write_text(str(step))
    raise InjectedFault(f"injected fault at step {step} on rank {rank}")


def _write_metrics(plan: TrainPlan, metrics: dict, local, seconds: float, sampled) -> None:
    """Public metrics (step, epsilon) and private ones (loss, tokens, batch, time: not DP).

    The step time goes to the private file only: it grows with the realised Poisson batch, whose
    size is a statistic of the private data that no DP mechanism released.
    """
    public = {"step": metrics["step"], "epsilon": metrics["epsilon"]}
    with open(plan.public_metrics, "a") as handle:
        handle.write(json.dumps(public) + "\n")
    private = {
        **metrics,
        "step_seconds": seconds,
        "loss_rank0": local.loss_sum / max(local.examples, 1),
        "examples_rank0": local.examples,
        "tokens_per_second_rank0": local.tokens / max(seconds, 1e-9),
        "clipped_fraction_rank0": local.clipped_units / max(local.units, 1),
        "batch_digest_rank0": batch_digest(sampled),
    }
    with open(plan.private_metrics, "a") as handle:
        handle.write(json.dumps(private) + "\n")


def _report(metrics: dict, model, optimizer, step: int, plan: TrainPlan, rank: int) -> None:
    import tempfile

    import ray.train

    is_checkpoint = step % plan.checkpoint_every == 0 or step == plan.steps
    if not is_checkpoint or rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(dir=plan.private_dir) as tmp:
        folder = Path(tmp)
        torch.save(trainable_state(model), folder / WEIGHTS_FILE)
        torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)
        (folder / STATE_FILE).write_text(json.dumps({"step": step}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
