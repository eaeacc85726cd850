"""DP-SGD step cost: DP vs non-DP with LoRA, secure vs central aggregation with 2 workers.

Measured in one run on the same model and batch, interleaved, medians of several repetitions:
  * single process (all threads): plain LoRA step, Opacus hooks DP step, functorch DP step;
  * two gloo processes (threads split): DP step + central aggregation vs + secure aggregation
    in blocks of consecutive steps (steady state: the next secure noise share is drawn on the
    side thread during a step, as in training), plus the secure pieces on their own (side-thread
    offset, encode, int64 all-reduce, decode);
  * tokens/s of each.

    python -m benchmarks.train_step                 # SmolLM2-135M, LoRA r=8 q/k/v/o, 16 x 64
    python -m benchmarks.train_step --model tiny --repeats 3   # seconds, for a quick check
    python -m benchmarks.train_step --skip-single-process      # secure vs central only
    python -m benchmarks.train_step --skip-single-process --numpy-sampler
        # + a third scheme: secure with the numpy PTRS round instead of the compiled one
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import interleaved, print_table, write_result

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
NUMPY_SAMPLER = "secure_numpy_ptrs"


def real_batch(tokenizer, batch: int, tokens: int) -> list[np.ndarray]:
    """``batch`` real instructions (from ../shared/data) tokenised to exactly ``tokens`` ids."""
    from dpray.stages.train_generator.data import tokenize_instructions

    texts = []
    path = SHARED / "dolly15k_rows0-6399.jsonl"
    with path.open() as handle:
        for line in handle:
            text = json.loads(line)["instruction"]
            texts.append((text + " ") * 8)  # long enough to fill the window
            if len(texts) == batch:
                break
    return tokenize_instructions(texts, tokenizer, tokens)


def build(model_path: str, seed: int = 0):
    from dpray.stages.train_generator.adapter import build_lora_model
    from dpray.stages.train_generator.plan import LoraLayout

    layout = LoraLayout(seed, 8, 16, 0.0, ("q_proj", "k_proj", "v_proj", "o_proj"))
    model, _ = build_lora_model(model_path, layout)
    model.train()
    return model


def resolve_model(name: str) -> str:
    from dpray.models import make_tiny_causal_lm, resolve_causal_lm

    if name == "tiny":
        path = Path(tempfile.mkdtemp()) / "tiny"
        return str(make_tiny_causal_lm(path, hidden_size=64, num_layers=2))
    return str(resolve_causal_lm(name))


def single_process(model_path: str, seqs, repeats: int) -> dict:
    from dpray.stages.train_generator.data import collate
    from dpray.stages.train_generator.dp_sgd import (
        apply_update,
        clipped_sum,
        plain_step,
        trainable_parameters,
        wrap_for_per_sample_grads,
    )

    batch = [collate(seqs, list(range(len(seqs))), 1, 0)]
    tokens = batch[0].num_tokens
    plain = build(model_path)
    plain_opt = torch.optim.AdamW(trainable_parameters(plain), lr=1e-4)
    variants = {}
    for mode in ("hooks", "functorch"):
        model = build(model_path)
        params = trainable_parameters(model)
        variants[mode] = (
            wrap_for_per_sample_grads(model, mode),
            params,
            torch.optim.AdamW(params, lr=1e-4),
        )

    def dp(mode):
        gsm, params, opt = variants[mode]

        def step():
            local = clipped_sum(gsm, params, batch, clip_norm=1.0)
            apply_update(opt, params, local.vector, len(seqs))

        return step

    medians = interleaved(
        {
            "plain": lambda: plain_step(plain, plain_opt, batch, len(seqs)),
            "dp_hooks": dp("hooks"),
            "dp_functorch": dp("functorch"),
        },
        repeats,
    )
    dim = sum(p.numel() for p in trainable_parameters(plain))
    return {
        "trainable_parameters": dim,
        "tokens_per_step": tokens,
        "seconds": medians,
        "tokens_per_second": {k: tokens / v for k, v in medians.items()},
        "ratio_dp_hooks_over_plain": medians["dp_hooks"] / medians["plain"],
        "ratio_dp_functorch_over_plain": medians["dp_functorch"] / medians["plain"],
    }


def _two_worker(rank, world, store, model_path, seqs, repeats, block, out, numpy_sampler=False):
    import torch.distributed as dist

    from dpray.privacy.secure_agg import kernels
    from dpray.privacy.secure_agg.aggregator import (
        all_reduce_int64,
        decode,
        encode_with_offset,
        prepare_share,
    )
    from dpray.stages.train_generator.data import collate
    from dpray.stages.train_generator.dp_sgd import (
        apply_update,
        clipped_sum,
        trainable_parameters,
        wrap_for_per_sample_grads,
    )
    from dpray.stages.train_generator.noise import CentralAggregator, SecureAggregator

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    mine = seqs[rank::world]
    batch = [collate(mine, list(range(len(mine))), 1, 0)]
    model = build(model_path)
    params = trainable_parameters(model)
    gsm = wrap_for_per_sample_grads(model)
    opt = torch.optim.AdamW(params, lr=1e-4)
    dim = sum(p.numel() for p in params)

    def secure_aggregator():
        return SecureAggregator(
            dim, noise_multiplier=1.0, clip_norm=1.0, max_units_per_worker=64, session=b"b" * 16
        )

    aggregators = {"central": CentralAggregator(noise_multiplier=1.0, clip_norm=1.0)}
    aggregators["secure"] = secure_aggregator()
    # the same scheme, its share's Poisson rounds drawn by the numpy form (csprng._ptrs_chunk)
    # instead of the compiled kernel (kernels.BACKEND): what the kernel saves, in the same run
    if numpy_sampler:
        aggregators[NUMPY_SAMPLER] = secure_aggregator()
    backend = kernels.BACKEND
    steps = dict.fromkeys(aggregators, 0)  # each scheme counts its own steps, as in training
    samples: dict[str, list[float]] = {name: [] for name in aggregators}
    rounds: dict[str, list[float]] = {name: [] for name in aggregators if name != "central"}

    def step(name):
        agg = aggregators[name]
        # the side thread reads the backend when it draws, which is within this step
        kernels.BACKEND = "numpy" if name == NUMPY_SAMPLER else backend
        # this step's share, drawn on the side thread during its backward pass: the training
        # loop starts it right after the previous step's update, as here
        agg.prefetch(steps[name])
        dist.barrier()
        start = time.perf_counter()
        local = clipped_sum(gsm, params, batch, clip_norm=1.0)
        noisy = agg(local.vector, steps[name])
        apply_update(opt, params, noisy, len(seqs))
        steps[name] += 1
        kernels.BACKEND = backend
        return time.perf_counter() - start

    for name in aggregators:  # warm-up
        step(name)
    # Steady state, interleaved: each round runs a block of `block + 1` consecutive steps per
    # scheme and times all but the first (it absorbs the switch between schemes).  Every secure
    # step's share is drawn on the side thread during its own backward pass, as in training.
    for _ in range(repeats):
        medians = {}
        for name in aggregators:
            times = [step(name) for _ in range(block + 1)][1:]
            samples[name] += times
            medians[name] = statistics.median(times)
        for name in rounds:
            rounds[name].append(medians[name] / medians["central"])
    # the pieces, one at a time: the side thread's share (Skellam noise + masks + rounding
    # words), the encode with it, the int64 all-reduce, and the decode
    secure = aggregators["secure"]
    vec = torch.randn(dim)
    pieces: dict[str, list[float]] = {"offset": [], "encode": [], "allreduce": [], "decode": []}
    for k in range(repeats):
        t0 = time.perf_counter()
        share = prepare_share(secure.cfg, rank, 10_000 + k, secure.seeds, secure.offset_generator)
        pieces["offset"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        payload = encode_with_offset(
            vec, secure.cfg, share.offset, secure.generator, rounding_words=share.rounding_words
        )
        pieces["encode"].append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        all_reduce_int64(payload, secure.cfg.bits)
        pieces["allreduce"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        decode(payload, secure.cfg)
        pieces["decode"].append(time.perf_counter() - t0)
    if rank == 0:
        medians = {k: statistics.median(v) for k, v in (samples | pieces).items()}
        result = {
            "seconds": medians,
            "dim": dim,
            "ptrs_backend": backend,
            "ratio_per_round": rounds["secure"],
            "block": block,
            # every timed step, in round order (`block` per scheme and round)
            "step_seconds": samples,
        }
        if numpy_sampler:
            result["ratio_per_round_" + NUMPY_SAMPLER] = rounds[NUMPY_SAMPLER]
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def bootstrap_ratio_ci(
    step_seconds: dict[str, list[float]], name: str, block: int, draws: int = 4000
) -> list[float]:
    """95% bootstrap interval of median(``name`` steps) / median(central steps), resampling
    whole rounds (each round's blocks of both schemes together: they ran minutes apart from the
    other rounds, and the machine's speed drifts between rounds)."""
    rng = np.random.default_rng(0)
    central = np.asarray(step_seconds["central"]).reshape(-1, block)
    other = np.asarray(step_seconds[name]).reshape(-1, block)
    picks = rng.integers(0, len(central), size=(draws, len(central)))
    ratios = np.median(other[picks].reshape(draws, -1), axis=1) / np.median(
        central[picks].reshape(draws, -1), axis=1
    )
    return [float(q) for q in np.quantile(ratios, [0.025, 0.975])]


def two_workers(
    model_path: str, seqs, repeats: int, block: int = 2, numpy_sampler: bool = False
) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        mp.spawn(
            _two_worker,
            args=(
                2,
                os.path.join(tmp, "store"),
                model_path,
                seqs,
                repeats,
                block,
                out,
                numpy_sampler,
            ),
            nprocs=2,
            join=True,
        )
        result = json.loads(Path(out).read_text())
    s = result["seconds"]
    result["ratio_secure_over_central"] = s["secure"] / s["central"]
    result["median_round_ratio"] = statistics.median(result["ratio_per_round"])
    result["ratio_ci95"] = bootstrap_ratio_ci(result["step_seconds"], "secure", block)
    if numpy_sampler:
        result["ratio_" + NUMPY_SAMPLER + "_over_central"] = s[NUMPY_SAMPLER] / s["central"]
        result["median_round_ratio_" + NUMPY_SAMPLER] = statistics.median(
            result["ratio_per_round_" + NUMPY_SAMPLER]
        )
        result["ratio_ci95_" + NUMPY_SAMPLER] = bootstrap_ratio_ci(
            result["step_seconds"], NUMPY_SAMPLER, block
        )
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="packaged:smollm2", help="model spec or 'tiny'")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-two-workers", action="store_true")
    parser.add_argument(
        "--skip-single-process",
        action="store_true",
        help="only the 2-worker secure vs central comparison (results: train_step_two_workers)",
    )
    parser.add_argument(
        "--block", type=int, default=2, help="timed consecutive steps per scheme and round"
    )
    parser.add_argument(
        "--numpy-sampler",
        action="store_true",
        help="also time secure steps whose Poisson rounds use the numpy form, not the C kernel",
    )
    args = parser.parse_args(argv)
    if args.skip_two_workers and args.skip_single_process:
        parser.error("--skip-two-workers and --skip-single-process leave nothing to run")
    if args.repeats < 1 or args.block < 1:
        parser.error("--repeats and --block must be >= 1")

    from transformers import AutoTokenizer

    model_path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    seqs = real_batch(tokenizer, args.batch, args.tokens)
    figures = {}
    rows = []
    if not args.skip_single_process:
        sp = figures["single_process"] = single_process(model_path, seqs, args.repeats)
        rows += [
            ("plain LoRA step", f"{sp['seconds']['plain']:.3f} s"),
            ("DP step (hooks) / plain", f"{sp['ratio_dp_hooks_over_plain']:.3f}x"),
            ("DP step (functorch) / plain", f"{sp['ratio_dp_functorch_over_plain']:.3f}x"),
            (
                "tokens/s plain | DP hooks",
                f"{sp['tokens_per_second']['plain']:.0f} | "
                f"{sp['tokens_per_second']['dp_hooks']:.0f}",
            ),
        ]
    if not args.skip_two_workers:
        tw = figures["two_workers"] = two_workers(
            model_path, seqs, args.repeats, args.block, args.numpy_sampler
        )
        ms = {k: f"{v * 1e3:.1f} ms" for k, v in tw["seconds"].items()}
        rows += [
            ("2 workers: central DP step", f"{tw['seconds']['central']:.3f} s"),
            (
                "2 workers: secure / central (median round)",
                f"{tw['ratio_secure_over_central']:.3f}x ({tw['median_round_ratio']:.3f}x)",
            ),
            ("  95% bootstrap interval over rounds", "{:.3f}x - {:.3f}x".format(*tw["ratio_ci95"])),
            (f"secure offset, side thread ({tw['dim']} params)", ms["offset"]),
            ("secure encode | decode", f"{ms['encode']} | {ms['decode']}"),
            ("int64 all-reduce (gloo)", ms["allreduce"]),
        ]
        if args.numpy_sampler:
            key = NUMPY_SAMPLER
            rows.append(
                (
                    "secure, numpy PTRS / central (median round)",
                    f"{tw['ratio_' + key + '_over_central']:.3f}x "
                    f"({tw['median_round_ratio_' + key]:.3f}x; 95%: "
                    "{:.3f}x - {:.3f}x)".format(*tw["ratio_ci95_" + key]),
                )
            )
    config = vars(args) | {"threads": torch.get_num_threads()}
    name = "train_step_two_workers" if args.skip_single_process else "train_step"
    path = write_result(name, figures, config)
    print_table(f"train step ({args.model}, {args.batch} x {args.tokens} tokens)", rows)
    print(f"\nresults: {path}")
    return figures


if __name__ == "__main__":
    main()
