"""Embedding throughput: the Ray Data pipeline of ``dpray embed`` vs a bare ``model.encode`` loop.

Same machine, same cores, same texts (real instructions read from ``../shared/data/*.jsonl``,
field ``instruction``; never copied into the repo), same model and batch size:

* ``bare``: one process, ``SentenceTransformer.encode(texts, batch_size)`` with every core's
  threads (encode sorts texts by characters internally) -- the baseline of issue 5;
* ``ray``: ``dpray.stages.embed.encode.embed_texts`` as ``dpray embed`` runs it -- Ray Data, an
  actor pool of one single-threaded actor per CPU running the traced encoder, rows sorted by token
  count, longest first -- timed end to end, actor start included;
* with ``--parts``: ``ray_st``, the same pipeline with actors that load sentence-transformers
  (what the trace saves at start-up), and ``bare_traced``, the traced encoder in this process
  with every core's threads (token-count sorting without Ray's layout);
* ``ray_file_order`` (``--file-order``): the pipeline fed in file order, the slow way the
  sorting fixes.

The one-time trace (once per machine and model, cached) is made before timing and reported
separately.  Goal (issue 5): ray / bare throughput >= 1.3.

    python -m benchmarks.embed                  # 5000 texts, packaged MiniLM, ~3 min on 2 cores
    python -m benchmarks.embed --n 500          # a quick check
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

from benchmarks.common import print_table, write_result

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def real_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct real instructions from every shared file, shuffled (a fixed seed)."""
    texts: dict[str, None] = {}
    for path in sorted(SHARED.glob("*.jsonl")):
        with path.open() as handle:
            for line in handle:
                text = json.loads(line).get("instruction")
                if isinstance(text, str) and text.strip():
                    texts.setdefault(text, None)
    pool = list(texts)
    if len(pool) < n:
        raise SystemExit(f"only {len(pool)} texts under {SHARED}")
    order = np.random.default_rng(seed).permutation(len(pool))[:n]
    return [pool[i] for i in order]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="texts")
    parser.add_argument("--model", default="packaged:all-minilm-l6-v2")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--file-order", action="store_true", help="also time unsorted Ray")
    parser.add_argument(
        "--parts",
        action="store_true",
        help="also time Ray with sentence-transformers actors and the bare traced encoder",
    )
    parser.add_argument("--repeats", type=int, default=1, help="alternating rounds (median)")
    parser.add_argument("--name", default="embed", help="result file name")
    args = parser.parse_args()

    import ray
    import torch

    from dpray.models import load_sentence_encoder, resolve_sentence_encoder
    from dpray.stages.embed.encode import embed_texts, make_encoder, resolve_backend
    from dpray.stages.embed.traced import ensure_traced_encoder

    cpus = len(os.sched_getaffinity(0))
    texts = real_texts(args.n)
    model_path = resolve_sentence_encoder(args.model)

    torch.set_num_threads(cpus)
    model = load_sentence_encoder(model_path)
    model.encode(texts[:64], batch_size=args.batch_size)  # warm-up
    trace = ensure_traced_encoder(model_path)
    backend = resolve_backend("auto", model_path, use_gpu=False)
    bare_traced = None
    if args.parts and backend == "traced":
        bare_traced = make_encoder(model_path, "cpu", cpus, "traced")
        torch.set_num_threads(cpus)

    root = Path.home() / ".cache" / "dpray"
    root.mkdir(parents=True, exist_ok=True)
    ray.init(
        num_cpus=cpus,
        include_dashboard=False,
        _temp_dir=tempfile.mkdtemp(prefix="r", dir=root),
        logging_level="WARNING",
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    # name -> (sort by token count, backend)
    runs: dict[str, tuple[bool, str]] = {"ray": (True, backend)}
    if args.parts and backend == "traced":
        runs["ray_st"] = (True, "sentence-transformers")
    if args.file_order:
        runs["ray_file_order"] = (False, backend)
    baselines = ["bare", *(["bare_traced"] if bare_traced is not None else [])]
    seconds: dict[str, list[float]] = {name: [] for name in [*baselines, *runs]}
    diffs: dict[str, float] = {}
    try:
        # Rounds alternate bare and Ray, so both see the same background load.
        for _ in range(args.repeats):
            start = time.perf_counter()
            bare = model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True)
            seconds["bare"].append(time.perf_counter() - start)
            if bare_traced is not None:
                start = time.perf_counter()
                vectors = bare_traced(texts, args.batch_size)
                seconds["bare_traced"].append(time.perf_counter() - start)
                diffs["bare_traced"] = float(np.abs(vectors - bare).max())
            for name, (sort, run_backend) in runs.items():
                start = time.perf_counter()
                vectors = embed_texts(
                    texts,
                    model_path,
                    args.batch_size,
                    sort_by_length=sort,
                    backend=run_backend,
                )
                seconds[name].append(time.perf_counter() - start)
                diffs[name] = float(np.abs(vectors - bare).max())
    finally:
        ray.shutdown()
    bare_seconds = statistics.median(seconds["bare"])
    figures: dict = {
        "texts": len(texts),
        "cpus": cpus,
        "backend": backend,
        "trace": {
            "verified": trace.verified,
            "reason": trace.reason,
            "max_abs_diff_on_probes": trace.max_abs_diff,
            "seconds_once_per_machine": json.loads((trace.directory / "meta.json").read_text()).get(
                "seconds"
            ),
        },
        "bare": {
            "seconds": round(bare_seconds, 2),
            "rounds": [round(x, 2) for x in seconds["bare"]],
            "per_second": len(texts) / bare_seconds,
        },
    }
    for name in [*baselines[1:], *runs]:
        median = statistics.median(seconds[name])
        figures[name] = {
            "seconds": round(median, 2),
            "rounds": [round(x, 2) for x in seconds[name]],
            "per_second": len(texts) / median,
            "ratio_to_bare": bare_seconds / median,
            "round_ratios": [
                round(b / r, 3) for b, r in zip(seconds["bare"], seconds[name], strict=True)
            ],
            "max_abs_diff_to_bare": diffs[name],
        }
    figures["goal_ratio"] = 1.3
    rows = [("bare encode", f"{figures['bare']['per_second']:7.1f} texts/s ({bare_seconds:.1f} s)")]
    for name in [*baselines[1:], *runs]:
        f = figures[name]
        rows.append(
            (
                name,
                f"{f['per_second']:7.1f} texts/s ({f['seconds']:.1f} s)   "
                f"{f['ratio_to_bare']:.2f}x bare   max |diff| {f['max_abs_diff_to_bare']:.1e}",
            )
        )
    config = {
        "n": args.n,
        "model": args.model,
        "batch_size": args.batch_size,
        "cpus": cpus,
        "repeats": args.repeats,
        "parts": args.parts,
        "timing": "end to end per run, Ray actor start included; median over rounds",
    }
    path = write_result(args.name, figures, config)
    print_table(
        f"Embedding {len(texts)} real instructions, {cpus} CPUs, batch {args.batch_size}", rows
    )
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
