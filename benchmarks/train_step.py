"""DP-SGD step cost: DP vs non-DP with LoRA, secure vs central aggregation with 2 workers.

Measured in one run on the same model and batch, interleaved, medians of several repetitions:
  * single process (all threads): plain LoRA step, Opacus hooks DP step, functorch DP step;
  * two gloo processes (threads split): DP step + central aggregation vs + secure aggregation,
    plus the secure encode and the int64 all-reduce on their own;
  * tokens/s of each.

    python -m benchmarks.train_step                 # SmolLM2-135M, LoRA r=8 q/k/v/o, 16 x 64
    python -m benchmarks.train_step --model tiny --repeats 3   # seconds, for a quick check
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


def _two_worker(rank, world, store, model_path, seqs, repeats, out):
    import torch.distributed as dist

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
    aggregators = {
        "central": CentralAggregator(noise_multiplier=1.0, clip_norm=1.0),
        "secure": SecureAggregator(
            dim, noise_multiplier=1.0, clip_norm=1.0, max_units_per_worker=64, session=b"b" * 16
        ),
    }
    counter = {"step": 0}
    samples: dict[str, list[float]] = {"central": [], "secure": [], "encode": [], "allreduce": []}

    def step(name):
        counter["step"] += 1
        agg = aggregators[name]
        agg.prefetch(counter["step"])
        dist.barrier()
        start = time.perf_counter()
        local = clipped_sum(gsm, params, batch, clip_norm=1.0)
        noisy = agg(local.vector, counter["step"])
        apply_update(opt, params, noisy, len(seqs))
        return time.perf_counter() - start

    for rep in range(repeats + 1):
        for name in ("central", "secure"):
            seconds = step(name)
            if rep > 0:
                samples[name].append(seconds)
    # the pieces: secure encode (offset prepared ahead, as in training) and the int64 all-reduce
    from dpray.privacy.secure_agg.aggregator import (
        all_reduce_int64,
        data_independent_offset,
        encode_with_offset,
    )

    secure = aggregators["secure"]
    vec = torch.randn(dim)
    for k in range(repeats):
        offset = data_independent_offset(
            secure.cfg, rank, 10_000 + k, secure.seeds, secure.offset_generator
        )
        t0 = time.perf_counter()
        payload = encode_with_offset(vec, secure.cfg, offset, secure.generator)
        samples["encode"].append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        all_reduce_int64(payload, secure.cfg.bits)
        samples["allreduce"].append(time.perf_counter() - t0)
    if rank == 0:
        medians = {k: statistics.median(v) for k, v in samples.items()}
        Path(out).write_text(json.dumps({"seconds": medians, "dim": dim}))
    dist.destroy_process_group()


def two_workers(model_path: str, seqs, repeats: int) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        mp.spawn(
            _two_worker,
            args=(2, os.path.join(tmp, "store"), model_path, seqs, repeats, out),
            nprocs=2,
            join=True,
        )
        result = json.loads(Path(out).read_text())
    s = result["seconds"]
    result["ratio_secure_over_central"] = s["secure"] / s["central"]
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="packaged:smollm2", help="model spec or 'tiny'")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-two-workers", action="store_true")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    model_path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    seqs = real_batch(tokenizer, args.batch, args.tokens)
    figures = {"single_process": single_process(model_path, seqs, args.repeats)}
    if not args.skip_two_workers:
        figures["two_workers"] = two_workers(model_path, seqs, args.repeats)
    config = vars(args) | {"threads": torch.get_num_threads()}
    path = write_result("train_step", figures, config)
    sp = figures["single_process"]
    rows = [
        ("plain LoRA step", f"{sp['seconds']['plain']:.3f} s"),
        ("DP step (hooks) / plain", f"{sp['ratio_dp_hooks_over_plain']:.3f}x"),
        ("DP step (functorch) / plain", f"{sp['ratio_dp_functorch_over_plain']:.3f}x"),
        (
            "tokens/s plain | DP hooks",
            f"{sp['tokens_per_second']['plain']:.0f} | {sp['tokens_per_second']['dp_hooks']:.0f}",
        ),
    ]
    if "two_workers" in figures:
        tw = figures["two_workers"]
        rows += [
            ("2 workers: central DP step", f"{tw['seconds']['central']:.3f} s"),
            ("2 workers: secure / central", f"{tw['ratio_secure_over_central']:.3f}x"),
            (f"secure encode ({tw['dim']} params)", f"{tw['seconds']['encode'] * 1e3:.1f} ms"),
            ("int64 all-reduce (gloo)", f"{tw['seconds']['allreduce'] * 1e3:.1f} ms"),
        ]
    print_table(f"train step ({args.model}, {args.batch} x {args.tokens} tokens)", rows)
    print(f"\nresults: {path}")
    return figures


if __name__ == "__main__":
    main()
