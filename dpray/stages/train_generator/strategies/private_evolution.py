"""``private_evolution``: Aug-PE / Private Evolution (Xie et al., ICML 2024) on Ray.

No gradient ever touches the private data.  The private set is used only through a DP
nearest-neighbour histogram, once per round:

1. round 0: ``pe_population`` candidates from the base model and the public prompt format (one
   prompt per public topic), drawn on the sampling stage's actors;
2. each round: embed the candidates (public), let every private record vote for its nearest
   candidate(s) (``filter.nn_vote``'s search; one unit's votes scaled to L2 norm 1), release
   the votes with Gaussian noise -- one ``gaussian`` ledger event per round -- and keep
   ``pe_population / pe_variations`` candidates in proportion to their noisy votes (or the top);
3. the kept candidates and ``pe_variations - 1`` variations of each (the model asked for a
   message "similar in subject and style" to a kept one) form the next round's candidates;
4. after the last vote the kept candidates are the generator: ``generator.json`` holds one
   variation prompt per kept candidate, and the sampling stage draws ``sample.num_samples``
   variations of them (post-processing: free), which the DP filter then matches once more.

Privacy: variation prompts are built from synthetic candidates only -- texts the model wrote
from public prompts, selected through noisy votes -- never from a private record.  Each round's
release has L2 sensitivity 1 (``filter.histogram``), so it is a Gaussian mechanism with noise
multiplier sigma; sigma is calibrated so that the ``pe_rounds`` releases together fit in
``privacy.train_share`` of the epsilon target on top of what the ledger already holds.

Public outputs (DP, or post-processing of DP outputs), one Parquet schema per folder so each loads
as one dataset: ``generator/population.parquet`` (the final population, what ``sample`` draws
variations of), ``generator_rounds/round-R.parquet`` (the candidates of round R, their noisy votes,
which were kept; with the round's release ``round-R.json``) and ``generator_draws/round-R/``
(resumable generation shards). A rerun with the same settings regenerates the same candidates
(seeded shards) and reuses each round's saved release instead of spending again; only
``--spend-again`` (:func:`~dpray.privacy.releases.spending_again`) calibrates afresh under a new
run id and draws every round anew, and the ledger composes those rounds with the earlier ones.
Private: the exact votes (``private/train/pe_exact_votes-R.npy``) and the private embeddings.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dpray.config import ConfigError, DprayConfig
from dpray.privacy.calibration import CalibrationError, solve_noise_multiplier
from dpray.privacy.events import GaussianEvent
from dpray.privacy.ledger import BudgetExceededError, Ledger
from dpray.privacy.mechanisms.gaussian import gaussian_event, gaussian_release, secret_rng
from dpray.privacy.releases import log_new_release, log_reuse, spend_again
from dpray.rundir import RunDir, read_json, write_json
from dpray.stages.base import StageResult

log = logging.getLogger(__name__)
STAGE_NAME = "train-generator"
ROUNDS_DIR = "generator_rounds"  # public folder: round-R.parquet, round-R.json, plan.json
DRAWS_DIR = "generator_draws"  # public folder: round-R/ draw shards (the sample schema)


# ----------------------------------------------------------------------------- budget


def round_event(multiplier: float, count: int = 1, run_id: str = "") -> GaussianEvent:
    """The ledger event of ``count`` vote releases with noise multiplier ``multiplier``."""
    from dpray.stages.filter.histogram import SENSITIVITY

    return gaussian_event(
        STAGE_NAME, multiplier * SENSITIVITY, SENSITIVITY, count=count, run_id=run_id
    )


def calibrate_rounds(ledger: Ledger, rounds: int, share: float) -> float:
    """Smallest noise multiplier for which ``rounds`` releases fit within ``share`` of target."""
    try:
        return solve_noise_multiplier(
            lambda m: round_event(m, rounds),
            share * ledger.target_epsilon,
            ledger.target_delta,
            ledger.events,
        )
    except CalibrationError as exc:
        raise BudgetExceededError(f"{STAGE_NAME}: private_evolution: {exc}") from None


def _budget_plan(config: DprayConfig, run_dir: RunDir, rounds: int) -> tuple[float, str, int]:
    """``(noise multiplier, run id, rounds already released)`` for this run.

    A rerun with the same settings (``generator_rounds/plan.json``) keeps its noise multiplier
    and run id, so each round's saved release can be reused and only the rounds not released
    yet are spent; new settings, or ``--spend-again``, calibrate afresh against everything the
    ledger holds (earlier rounds included) under a new run id.
    """
    path = run_dir.public(ROUNDS_DIR) / "plan.json"
    key = config.section_hash("generator", "train", "sample", "embed", "privacy", "seed")
    ledger = Ledger.load(run_dir.ledger_path)
    if path.exists() and not spend_again():
        plan = read_json(path)
        if plan.get("config") == key:
            released = [
                e
                for e in ledger.events
                if e.stage == STAGE_NAME and e.run_id.startswith(f"{plan['run_id']}-round")
            ]
            remaining = rounds - len(released)
            if remaining > 0:
                ledger.check(round_event(plan["noise_multiplier"], remaining))
            return float(plan["noise_multiplier"]), str(plan["run_id"]), len(released)
    log_new_release(f"{STAGE_NAME}: private_evolution", previous=path.exists())
    multiplier = calibrate_rounds(ledger, rounds, config.privacy.train_share)
    ledger.check(round_event(multiplier, rounds))  # all rounds must fit before the first
    run_id = secrets.token_hex(6)
    write_json(path, {"config": key, "noise_multiplier": multiplier, "run_id": run_id})
    return multiplier, run_id, 0


# ----------------------------------------------------------------------------- embeddings


def _embed_cached(texts: list[str], cache_root: Path, config: DprayConfig) -> np.ndarray:
    """Embeddings of ``texts`` through the embed stage's content-hash cache at ``cache_root``
    (the same cache folders the embed stage uses, so it re-embeds nothing later)."""
    from dpray.models import resolve_sentence_encoder
    from dpray.stages.embed.encode import embed_texts
    from dpray.stages.embed.store import EmbeddingCache, embedding_key, text_hash

    ec = config.embed
    model_path = resolve_sentence_encoder(ec.model)
    cache = EmbeddingCache(cache_root / embedding_key(model_path, ec.precision))
    hashes = [text_hash(t) for t in texts]
    first = dict(zip(hashes, texts, strict=True))
    todo = cache.missing(hashes)
    if todo:
        vectors = embed_texts(
            [first[h] for h in todo],
            str(model_path),
            ec.batch_size,
            ec.num_actors,
            ec.use_gpu,
            backend=ec.backend,
            precision=ec.precision,
        )
        cache.add(todo, vectors)
    dim = cache.dim()
    if dim is None:
        raise RuntimeError("private_evolution: nothing embedded")
    return cache.gather(hashes, dim)


def private_votes_input(config: DprayConfig, run_dir: RunDir) -> tuple[np.ndarray, np.ndarray]:
    """(privacy unit label per record, embedding per record) of the private training split."""
    from dpray.io.readers import SourceError

    path = run_dir.private("ingest") / "instructions.parquet"
    if not path.exists():
        raise SourceError(f"{path}: missing (run `dpray ingest`)")
    table = pq.read_table(path, columns=["text", "user_id"])
    if config.privacy.unit == "user":
        _, labels = np.unique(
            np.asarray(table.column("user_id").to_pylist(), dtype=object), return_inverse=True
        )
    else:
        labels = np.arange(len(table))
    from dpray.stages.embed.stage import cache_root as embed_cache_root

    texts = table.column("text").to_pylist()
    vectors = _embed_cached(texts, embed_cache_root(run_dir, "real"), config)
    return labels.astype(np.int64), vectors


# ----------------------------------------------------------------------------- generation


def generate(
    config: DprayConfig,
    run_dir: RunDir,
    spec,
    count: int,
    round_index: int,
    pool=None,
) -> list[tuple[str, bool]]:
    """``count`` cleaned draws ``(text, truncated)`` from ``spec`` (draw ``i`` uses prompt
    ``i % len(prompts)``), made on the sampling stage's actors into resumable shards
    under ``generator_draws/round-R``.  Empty/short draws (and, with
    ``sample.drop_truncated``, draws cut at the token limit) come back as ``("", truncated)``.
    ``pool``: the actors kept across rounds (``sample.stage.rounds_pool``), else a pool for
    this round alone."""
    from dpray.stages.sample.backends import choose_backend, derive_seed
    from dpray.stages.sample.clean import clean_column
    from dpray.stages.sample.shards import DrawStore
    from dpray.stages.sample.stage import Progress, draw_plan, generate_shards, plan_resources

    sc = config.sample
    backend = choose_backend(sc.backend)
    resources = plan_resources(config, backend)
    seed = derive_seed("private_evolution", config.seed, sc.seed, round_index)
    # the sampling stage's plan (what shapes a shard), with this round's own seed
    plan = {
        **draw_plan(config, spec, backend, resources.device),
        "round": round_index,
        "root_seed": seed,
    }
    folder = run_dir.public(DRAWS_DIR) / f"round-{round_index}"
    store = DrawStore(folder, plan)
    shards = range(math.ceil(count / sc.shard_size))
    missing = store.missing(shards)
    if missing:
        generate_shards(
            missing,
            store,
            config=config,
            spec=spec,
            backend=backend,
            resources=resources,
            progress=Progress(rounds=round_index),
            crash_marker=None,
            seed=seed,
            pool=pool,
        )
    out: list[tuple[str, bool]] = []
    for shard in shards:
        table = store.read(shard).to_pydict()
        texts, drops = clean_column(table["raw"], "", sc.min_chars)
        for text, drop, truncated in zip(texts, drops, table["truncated"], strict=True):
            unusable = drop or (truncated and sc.drop_truncated)
            out.append(("" if unusable else text, bool(truncated)))
    return out[:count]


def _spec(config: DprayConfig, model_path: Path, fmt_name: str, prompts, stop_ids, prefixes=()):
    from dpray.stages.sample.backends import GeneratorSpec, prompts_digest

    prompts = tuple(tuple(int(t) for t in p) for p in prompts)
    return GeneratorSpec(
        base_model=config.train.model,
        base_path=str(model_path),
        adapter_dir="",
        prompt_ids=prompts[0],
        template="",
        adapter_sha256=prompts_digest(prompts),
        lora_r=0,
        prompts=prompts,
        stop_ids=tuple(int(t) for t in stop_ids),
        strategy="private_evolution",
        format=fmt_name,
        prefixes=tuple(prefixes) if any(prefixes) else (),
    )


def variation_prompts(
    tokenizer, fmt_name: str, parents: list[str], gc
) -> tuple[list[str], list[list[int]], list[str]]:
    """(texts, token ids, text prefixes) of the prompts asking for variations of ``parents``
    (synthetic candidates), per ``generator.pe_variation`` (see ``formats.VARIATIONS``)."""
    from dpray.stages.train_generator.formats import encode_prompt, variation_prompt

    made = [
        variation_prompt(
            fmt_name,
            tokenizer,
            parent[: gc.pe_parent_chars],
            method=gc.pe_variation,
            keep_fraction=gc.pe_keep_fraction,
            system=gc.system,
            request=gc.request,
        )
        for parent in parents
    ]
    texts = [text for text, _ in made]
    return texts, [encode_prompt(tokenizer, t) for t in texts], [prefix for _, prefix in made]


# ----------------------------------------------------------------------------- one round


def _dedupe(texts: list[str]) -> list[int]:
    """Indices of the first occurrence of each non-empty text (normalised like sampling)."""
    from dpray.stages.sample.clean import Deduper

    dedup = Deduper()
    return [i for i, t in enumerate(texts) if dedup.offer(t, "" if t else "empty")]


def vote_round(
    *,
    round_index: int,
    candidates: list[str],
    candidate_vectors: np.ndarray,
    real_vectors: np.ndarray,
    units: np.ndarray,
    sigma: float,
    multiplier: float,
    keep: int,
    config: DprayConfig,
    run_dir: RunDir,
    ledger: Ledger,
    run_id: str,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """One DP vote over ``candidates``: ``(noisy votes, kept indices, reused)``.

    A saved release for exactly these candidates and this noise is reused (it is DP output;
    releasing again would spend again); otherwise the exact votes are computed, noised, spent
    on the ledger (one event) and saved, in that order.
    """
    from dpray.stages.filter import histogram, nn_vote
    from dpray.stages.sample.backends import derive_seed, prompts_digest

    gc = config.generator
    public = run_dir.public(ROUNDS_DIR)
    release_path = public / f"round-{round_index}.json"
    digest = prompts_digest([[hash_text(t)] for t in candidates])
    noisy = None
    reused = False
    if release_path.exists() and not spend_again():
        saved = read_json(release_path)
        if saved.get("candidates_digest") == digest and saved.get("sigma") == sigma:
            noisy = np.asarray(saved["noisy_votes"], dtype=np.float64)
            reused = True
            log_reuse(f"{STAGE_NAME}: private_evolution", f"round {round_index}")
    if noisy is None:
        neighbours = nn_vote.nearest_candidates(
            candidate_vectors, real_vectors, gc.pe_nn_k, config.seed
        )
        exact = histogram.unit_votes(units, neighbours, len(candidates), scheme="l2")
        event = round_event(multiplier, 1, run_id=f"{run_id}-round{round_index}")
        ledger.check(event)
        noisy = gaussian_release(exact, sigma, secret_rng())
        ledger.spend(event)  # right after the noise is drawn, before anything uses it
        np.save(run_dir.private("train") / f"pe_exact_votes-{round_index}.npy", exact)
        write_json(
            release_path,
            {
                "round": round_index,
                "mechanism": "gaussian",
                "sensitivity_l2": histogram.SENSITIVITY,
                "sigma": sigma,
                "noise_multiplier": multiplier,
                "candidates": len(candidates),
                "candidates_digest": digest,
                "noisy_votes": noisy.tolist(),
            },
        )
    rng = np.random.default_rng(derive_seed("pe-select", config.seed, round_index))
    kept, _ = nn_vote.select(noisy, keep, 0.0, rng, gc.pe_select, with_replacement=False)
    return noisy, np.sort(kept), reused


def hash_text(text: str) -> int:
    """A stable integer digest of a text (for the release's candidate fingerprint)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=6).digest(), "big")


def _write_round(run_dir: RunDir, r: int, texts: list[str], parent: list[int], noisy, kept):
    selected = np.zeros(len(texts), dtype=bool)
    selected[kept] = True
    table = pa.table(
        {
            "text": pa.array(texts, pa.string()),
            "parent": pa.array(parent, pa.int64()),
            "noisy_votes": pa.array(np.asarray(noisy, dtype=np.float64)),
            "kept": pa.array(selected),
        }
    )
    path = run_dir.public(ROUNDS_DIR) / f"round-{r}.parquet"
    pq.write_table(table, path)
    return path


# ----------------------------------------------------------------------------- the strategy


def run(config: DprayConfig, run_dir: RunDir) -> StageResult:
    """Run ``generator.pe_rounds`` rounds of Private Evolution; see the module docstring.

    The sampling actors (and their model) are kept across rounds where they can wait while the
    candidates are embedded (:func:`~dpray.stages.sample.stage.rounds_pool`)."""
    from dpray.stages.sample.stage import rounds_pool

    with rounds_pool(config, between_rounds_gpu=config.embed.use_gpu) as pool:
        return _run(config, run_dir, pool)


def _run(config: DprayConfig, run_dir: RunDir, pool) -> StageResult:
    from transformers import AutoTokenizer

    from dpray.models import resolve_causal_lm
    from dpray.stages.train_generator.stage import format_metadata, prompt_format

    gc = config.generator
    start = time.monotonic()
    model_path = resolve_causal_lm(config.train.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    fmt = prompt_format(config, tokenizer, "private_evolution")
    if fmt.name == "unconditional":
        raise ConfigError(
            "generator.strategy private_evolution needs a chat model (generator.format chat_user "
            "or chat_reply): its variation step asks the model for a message like a given one"
        )
    rounds, keep = gc.pe_rounds, max(1, math.ceil(gc.pe_population / gc.pe_variations))
    public = run_dir.public("generator")
    multiplier, run_id, released = _budget_plan(config, run_dir, rounds)
    from dpray.stages.embed.stage import cache_root as embed_cache_root
    from dpray.stages.filter.histogram import SENSITIVITY

    sigma = multiplier * SENSITIVITY
    log.info(
        "private_evolution: %d rounds (%d released before), %d candidates, keep %d, sigma %.3g",
        rounds,
        released,
        gc.pe_population,
        keep,
        sigma,
    )
    units, real_vectors = private_votes_input(config, run_dir)

    spec = _spec(config, model_path, fmt.name, fmt.prompts, fmt.stop_ids)
    draws = generate(config, run_dir, spec, gc.pe_population, 0, pool)
    texts = [t for t, _ in draws]
    truncated = [tr for _, tr in draws]
    parent = [-1] * len(texts)
    history = []
    parents: list[str] = []
    for r in range(rounds):
        unique = _dedupe(texts)
        candidates = [texts[i] for i in unique]
        if len(candidates) < 2:
            raise RuntimeError(
                f"private_evolution: round {r}: {len(candidates)} usable candidates; raise "
                "sample.max_new_tokens or lower sample.min_chars"
            )
        vectors = _embed_cached(candidates, embed_cache_root(run_dir, "synthetic"), config)
        ledger = Ledger.load(run_dir.ledger_path)
        noisy, kept, reused = vote_round(
            round_index=r,
            candidates=candidates,
            candidate_vectors=vectors,
            real_vectors=real_vectors,
            units=units,
            sigma=sigma,
            multiplier=multiplier,
            keep=min(keep, len(candidates)),
            config=config,
            run_dir=run_dir,
            ledger=ledger,
            run_id=run_id,
        )
        _write_round(run_dir, r, candidates, [parent[i] for i in unique], noisy, kept)
        parents = [candidates[i] for i in kept]
        history.append(
            {
                "round": r,
                "candidates": len(candidates),
                "drawn": len(texts),
                # over every draw of the round (draws cut at the limit are dropped before voting)
                "ended_with_stop": round(1 - float(np.mean(truncated)), 4) if truncated else None,
                "kept": len(parents),
                "reused_release": reused,
            }
        )
        log.info(
            "private_evolution: round %d/%d: %d candidates, kept %d (%.1f s so far)",
            r + 1,
            rounds,
            len(candidates),
            len(parents),
            time.monotonic() - start,
        )
        if r + 1 == rounds:
            break
        _, prompt_ids, prefixes = variation_prompts(tokenizer, fmt.name, parents, gc)
        children = max(1, gc.pe_variations - 1) * len(parents)
        child_spec = _spec(config, model_path, fmt.name, prompt_ids, fmt.stop_ids, prefixes)
        child_draws = generate(config, run_dir, child_spec, children, r + 1, pool)
        texts = parents + [t for t, _ in child_draws]
        truncated = [False] * len(parents) + [tr for _, tr in child_draws]
        parent = list(range(len(parents))) + [i % len(parents) for i in range(children)]

    _, prompt_ids, prefixes = variation_prompts(tokenizer, fmt.name, parents, gc)
    pq.write_table(
        pa.table({"text": pa.array(parents, pa.string())}), public / "population.parquet"
    )
    (public / "metrics.jsonl").unlink(missing_ok=True)
    import shutil

    shutil.rmtree(public / "adapter", ignore_errors=True)  # a former strategy's adapter
    ledger = Ledger.load(run_dir.ledger_path)
    final = type(fmt)(
        name=fmt.name,
        prompts=prompt_ids,
        stop_ids=fmt.stop_ids,
        prompt_texts=[],
        topics=fmt.topics,
        template="",
    )
    summary = {
        "strategy": "private_evolution",
        "format": fmt.name,
        "rounds": rounds,
        "population": gc.pe_population,
        "kept_per_round": keep,
        "noise_multiplier": multiplier,
        "sigma": sigma,
        "epsilon_total": ledger.spent_epsilon,
        "seconds": round(time.monotonic() - start, 1),
    }
    meta = {
        "base_model": config.train.model,
        **format_metadata(final, "private_evolution"),
        "adapter": False,
        "adapter_sha256": "",
        "round0_prompt_texts": fmt.prompt_texts,
        "variation": gc.pe_variation,
        "prompt_prefixes": prefixes if any(prefixes) else [],
        "population_file": "population.parquet",
        "history": history,
        **summary,
    }
    path = write_json(public / "generator.json", meta)
    return StageResult(
        outputs={"generator": str(path), "population": str(public / "population.parquet")},
        summary=summary,
    )


__all__ = ["calibrate_rounds", "generate", "private_votes_input", "round_event", "run"]
