"""Embedding throughput: the Ray Data pipeline of ``dpray embed`` vs a bare ``model.encode`` loop.

Same machine, same cores, same texts, same model and batch size.  Texts: real instructions read
from ``../shared/data/*.jsonl`` (field ``instruction``; never copied into the repo), either
``--n`` distinct ones (at most the ~17k there), or with ``--mix`` a length-realistic mix of any
size: instructions drawn with replacement, each draw's words (split on single spaces, so line
breaks stay) shuffled with a seeded generator until the text is new -- the lengths are real, every
text distinct, so the embedding cache serves none of them.

* ``bare``: one process, ``SentenceTransformer.encode(texts, batch_size)`` with every core's
  threads (encode sorts texts by characters internally) -- the baseline of issue 5;
* ``ray``: ``dpray.stages.embed.encode.embed_texts`` (texts in the driver's memory) -- Ray Data,
  an actor pool of one single-threaded actor per CPU running the traced encoder, rows sorted by
  token count, longest first -- timed end to end, actor start included;
* ``stage`` (``--stage``): the real ``dpray embed`` stage code, streamed (``stage.embed_sets``),
  on the texts written as sample shards of a fresh run directory, in a child process whose peak
  RSS is the driver's; its seconds include reading, hashing, queueing, the Ray pass and writing
  ``embed/synthetic.{npy,parquet}``;
* with ``--parts``: ``ray_st``, the in-memory pipeline with actors that load sentence-transformers
  (what the trace saves at start-up), and ``bare_traced``, the traced encoder in this process
  with every core's threads (token-count sorting without Ray's layout);
* ``ray_file_order`` (``--file-order``): the pipeline fed in file order, the slow way the
  sorting fixes;
* ``--stage-memory 100000,300000``: the stage's driver memory alone -- the same child process
  with a fake encoder (zeros, read from the queue as actors read it), at each size: peak RSS and
  its growth per candidate row (what a ten-million-candidate run adds to the driver).

``--deadline HH:MM`` (UTC): a part that would not finish by then at the rate measured so far runs
on a prefix of the (shuffled) texts instead and says so (``texts`` per part); ratios are of
throughput.  The one-time trace (once per machine and model, cached) is made before timing and
reported separately.  Goals: ray / bare >= 1.3 (issue 5); at 100k texts stage / bare >= 1.8 and
stage / bare_traced >= 0.9 (issue 17).

    python -m benchmarks.embed                  # 5000 texts, packaged MiniLM, ~3 min on 2 cores
    python -m benchmarks.embed --n 500          # a quick check
    python -m benchmarks.embed --mix --n 100000 --stage --parts --no-ray --order stage,bare_traced,bare \
        --name embed_100k                       # issue 17: ~50 min on 2 idle cores
    python -m benchmarks.embed --stage-memory 100000,300000 --name embed_stage_memory
    python -m benchmarks.embed --mix --n 30000 --stage --parts --no-ray --precision bfloat16 \
        --name embed_bf16                       # the bfloat16 encoder (AMX CPUs) vs float32 bare

``--stage-actors N`` runs the stage with ``embed.num_actors = N`` (each actor then takes the
node's CPUs divided among N, and as many torch threads): ``--stage-actors 1`` is one actor of two
threads on two cores, against the default two actors of one.

``--precision bfloat16`` runs the stage and ``bare_traced`` with the bfloat16 encoder; ``bare``
stays sentence-transformers in float32 (the baseline), and each part reports its vectors' largest
coordinate difference and smallest cosine to it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import print_table, write_result

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def _pool() -> list[str]:
    """Every distinct real instruction under ``SHARED``, in file order."""
    texts: dict[str, None] = {}
    for path in sorted(SHARED.glob("*.jsonl")):
        with path.open() as handle:
            for line in handle:
                text = json.loads(line).get("instruction")
                if isinstance(text, str) and text.strip():
                    texts.setdefault(text, None)
    return list(texts)


def start_local_ray(cpus: int) -> None:
    """A local Ray of ``cpus`` CPUs, its session files under ``~/.cache/dpray``, no bars."""
    import ray

    root = Path.home() / ".cache" / "dpray"
    root.mkdir(parents=True, exist_ok=True)
    ray.init(
        num_cpus=cpus,
        include_dashboard=False,
        _temp_dir=tempfile.mkdtemp(prefix="r", dir=root),
        logging_level="WARNING",
    )
    ray.data.DataContext.get_current().enable_progress_bars = False


def real_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct real instructions from every shared file, shuffled (a fixed seed)."""
    pool = _pool()
    if len(pool) < n:
        raise SystemExit(f"only {len(pool)} texts under {SHARED} (use --mix for more)")
    order = np.random.default_rng(seed).permutation(len(pool))[:n]
    return [pool[i] for i in order]


def mixed_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct texts of real lengths: real instructions drawn with replacement, each
    draw's words shuffled until the text is new (one-word texts get a counter if need be)."""
    pool = _pool()
    rng = np.random.default_rng(seed)
    out: dict[str, None] = {}
    for index in rng.integers(0, len(pool), n):
        words = pool[index].split(" ")
        for attempt in range(8):
            text = " ".join(words[i] for i in rng.permutation(len(words))) if attempt else ""
            if attempt == 0 and pool[index] not in out:
                text = pool[index]  # a first draw stays as written
            if text and text not in out:
                break
        else:
            text = f"{pool[index]} ({len(out)})"
        out[text] = None
    return list(out)


def peak_rss_bytes() -> int:
    """This process's peak resident set size: ``VmHWM``, which starts afresh at ``exec`` (Linux
    keeps ``ru_maxrss`` across it, so a child would report its parent's peak)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_candidates(root: Path, texts: list[str], shards: int = 10) -> None:
    """``texts`` as the sample shards of a fresh run directory, plus a small real side (the
    stage requires one; 64 texts, public instructions here)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dpray.rundir import RunDir

    run_dir = RunDir(root)
    folder = run_dir.public("sample")
    step = -(-len(texts) // shards)
    for number, start in enumerate(range(0, len(texts), step)):
        part = texts[start : start + step]
        ids = [f"s{start + i}" for i in range(len(part))]
        pq.write_table(
            pa.table({"text": part, "sample_id": ids}), folder / f"shard-{number:05d}.parquet"
        )
    real = real_texts(64, seed=1)
    pq.write_table(
        pa.table({"id": [f"r{i}" for i in range(64)], "text": real, "user_id": ["u"] * 64}),
        run_dir.private("ingest") / "instructions.parquet",
    )


def child_stage(
    root: str,
    model: str,
    batch_size: int,
    fake: bool,
    precision: str = "float32",
    actors: int | None = None,
) -> None:
    """Run the embed stage on ``root`` in this (child) process; print one JSON line."""
    import ray

    from dpray.config import config_from_tree
    from dpray.rundir import RunDir, read_json
    from dpray.stages.embed import stage

    config = config_from_tree(
        {
            "run_dir": root,
            "data": {"path": str(Path(root) / "unused.jsonl")},
            "privacy": {"epsilon": 4.0, "delta": 1e-5},
            "embed": {
                "model": model,
                "batch_size": batch_size,
                "precision": precision,
                "num_actors": actors,
            },
        }
    )
    if fake:  # the driver's own memory: queue files read back as actors would, zeros out
        import pyarrow.parquet as pq

        def fake_pool(queues, model_path, batch_size, pool=None, nodes=None):
            for q, (path, groups) in enumerate(queues):
                handle = pq.ParquetFile(path) if groups else None
                for g in range(groups):
                    hashes = handle.read_row_group(g, columns=["hash"]).column(0).to_pylist()
                    yield q, hashes, np.zeros((len(hashes), 384), dtype=np.float32)

        stage.encode_queues = fake_pool
        from dpray.stages.embed.encode import PoolSettings

        settings = PoolSettings(1, None, 1, "fake", None)
        stage.pool_settings = lambda *a, **k: settings
    else:
        start_local_ray(len(os.sched_getaffinity(0)))
    start = time.perf_counter()
    try:
        stage.embed_sets(config, RunDir(root), stage.CHUNK_ROWS)
        seconds = time.perf_counter() - start  # Ray's shutdown is the child wall's, not this
    finally:
        if not fake:
            ray.shutdown()
    report = read_json(RunDir(root).private("embed") / "report.json")
    keys = ("prepare_seconds", "encode_seconds", "actor_nodes")
    result = {"seconds": seconds, "peak_rss_bytes": peak_rss_bytes()}
    result.update({k: report.get(k) for k in keys})
    print("RESULT " + json.dumps(result), flush=True)


def run_stage_child(
    texts: list[str],
    model: str,
    batch_size: int,
    fake: bool,
    precision: str = "float32",
    actors: int | None = None,
) -> dict:
    """The stage on ``texts`` in a child process (its peak RSS is the stage driver's alone)."""
    root = Path(tempfile.mkdtemp(prefix="embed-bench-"))
    try:
        write_candidates(root, texts)
        command = [
            sys.executable,
            "-m",
            "benchmarks.embed",
            "--child-stage",
            str(root),
            "--model",
            model,
            "--batch-size",
            str(batch_size),
            "--precision",
            precision,
            *(["--stage-actors", str(actors)] if actors else []),
            *(["--fake-encoder"] if fake else []),
        ]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"stage child failed:\n{done.stderr[-3000:]}")
        line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
        result = json.loads(line[len("RESULT ") :])
        result["wall_seconds_with_start"] = wall
        if not fake:
            result["vectors"] = np.load(root / "embed" / "synthetic.npy")
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


def stage_memory(sizes: list[int], model: str, batch_size: int, name: str) -> None:
    """Peak driver RSS of the stage (fake encoder) at each size, and its growth per row."""
    rows = []
    figures: dict = {"sizes": {}}
    for n in sizes:
        result = run_stage_child(mixed_texts(n), model, batch_size, fake=True)
        figures["sizes"][str(n)] = {
            "peak_rss_bytes": result["peak_rss_bytes"],
            "seconds": round(result["seconds"], 2),
            "prepare_seconds": result["prepare_seconds"],
        }
        rows.append((f"{n} rows", f"peak RSS {result['peak_rss_bytes'] / 2**20:7.1f} MiB"))
    if len(sizes) > 1:
        low, high = figures["sizes"][str(sizes[0])], figures["sizes"][str(sizes[-1])]
        slope = (high["peak_rss_bytes"] - low["peak_rss_bytes"]) / (sizes[-1] - sizes[0])
        figures["bytes_per_row"] = round(slope, 1)
        figures["projected_10m_peak_rss_bytes"] = int(
            high["peak_rss_bytes"] + slope * (10_000_000 - sizes[-1])
        )
        rows.append(("growth", f"{slope:.1f} bytes per candidate row"))
    config = {"sizes": sizes, "model": model, "batch_size": batch_size, "encoder": "fake"}
    path = write_result(name, figures, config)
    print_table("Embed stage driver memory (fake encoder)", rows)
    print(f"\nwritten {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="texts")
    parser.add_argument("--mix", action="store_true", help="length-realistic mix (any --n)")
    parser.add_argument("--model", default="packaged:all-minilm-l6-v2")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--precision",
        default="float32",
        choices=("float32", "bfloat16"),
        help="the stage's and bare_traced's encoder (bare stays sentence-transformers float32)",
    )
    parser.add_argument("--file-order", action="store_true", help="also time unsorted Ray")
    parser.add_argument(
        "--parts",
        action="store_true",
        help="also time Ray with sentence-transformers actors and the bare traced encoder",
    )
    parser.add_argument("--stage", action="store_true", help="also time the streamed stage")
    parser.add_argument(
        "--stage-actors",
        type=int,
        default=None,
        help="the stage's embed.num_actors (default: one single-threaded actor per CPU)",
    )
    parser.add_argument("--no-ray", action="store_true", help="skip the in-memory Ray pipeline")
    parser.add_argument("--order", default="", help="parts in this order (comma-separated)")
    parser.add_argument("--deadline", default="", help="HH:MM UTC: shrink parts to fit")
    parser.add_argument("--repeats", type=int, default=1, help="alternating rounds (median)")
    parser.add_argument("--name", default="embed", help="result file name")
    parser.add_argument("--stage-memory", default="", help="sizes, e.g. 100000,300000")
    parser.add_argument("--child-stage", default="", help=argparse.SUPPRESS)
    parser.add_argument("--fake-encoder", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_stage:
        return child_stage(
            args.child_stage,
            args.model,
            args.batch_size,
            args.fake_encoder,
            args.precision,
            args.stage_actors,
        )
    if args.stage_memory:
        sizes = [int(x) for x in args.stage_memory.split(",")]
        return stage_memory(sizes, args.model, args.batch_size, args.name)

    import ray
    import torch

    from dpray.models import load_sentence_encoder, resolve_sentence_encoder
    from dpray.stages.embed.encode import embed_texts, make_encoder, resolve_backend
    from dpray.stages.embed.traced import ensure_traced_encoder

    cpus = len(os.sched_getaffinity(0))
    texts = mixed_texts(args.n) if args.mix else real_texts(args.n)
    model_path = resolve_sentence_encoder(args.model)
    deadline = None
    if args.deadline:
        hour, minute = (int(x) for x in args.deadline.split(":"))
        now = datetime.datetime.now(datetime.UTC)
        deadline = now.replace(hour=hour, minute=minute, second=0, microsecond=0).timestamp()

    trace = ensure_traced_encoder(model_path, precision=args.precision)
    backend = resolve_backend("auto", model_path, use_gpu=False, precision=args.precision)
    # Everything loaded and started before timing (the old layout: only encoding is timed).
    torch.set_num_threads(cpus)
    model = load_sentence_encoder(model_path)
    model.encode(texts[:64], batch_size=args.batch_size)  # warm-up
    bare_traced = None
    if args.parts and backend == "traced":
        bare_traced = make_encoder(model_path, "cpu", cpus, "traced", args.precision)
        torch.set_num_threads(cpus)
    ray_started = not args.no_ray or args.file_order
    if ray_started:
        start_local_ray(cpus)

    def bare_encode(part: list[str]) -> np.ndarray:
        return model.encode(part, batch_size=args.batch_size, normalize_embeddings=True)

    def traced_encode(part: list[str]) -> np.ndarray:
        return bare_traced(part, args.batch_size)

    def ray_encode(sort: bool, run_backend: str):
        def encode(part: list[str]) -> np.ndarray:
            return embed_texts(
                part,
                model_path,
                args.batch_size,
                sort_by_length=sort,
                backend=run_backend,
                precision=args.precision,
            )

        return encode

    stage_rounds: list[dict] = []  # the child's own figures, one per round

    def stage_encode(part: list[str]) -> np.ndarray:
        result = run_stage_child(
            part, args.model, args.batch_size, False, args.precision, args.stage_actors
        )
        stage_rounds.append({k: v for k, v in result.items() if k != "vectors"})
        return result["vectors"]

    # name -> encode(texts); the relative speed guesses size a part to a deadline.
    parts: dict[str, object] = {"bare": bare_encode}
    speed = {"bare": 0.5, "bare_traced": 1.0, "ray": 0.9, "stage": 0.9, "ray_st": 0.8}
    if args.parts and backend == "traced":
        parts["bare_traced"] = traced_encode
    if not args.no_ray:
        parts["ray"] = ray_encode(True, backend)
    if args.stage:
        parts["stage"] = stage_encode
    if args.parts and backend == "traced" and not args.no_ray:
        parts["ray_st"] = ray_encode(True, "sentence-transformers")
    if args.file_order:
        parts["ray_file_order"] = ray_encode(False, backend)
        speed["ray_file_order"] = 0.6
    if args.order:
        wanted = args.order.split(",")
        parts = {k: parts[k] for k in wanted if k in parts} | {
            k: v for k, v in parts.items() if k not in wanted
        }

    seconds: dict[str, list[float]] = {name: [] for name in parts}
    counts: dict[str, int] = {}
    vectors: dict[str, np.ndarray] = {}
    rate: float | None = None  # texts/s of the fastest kind measured so far, scaled by speed
    try:
        # Rounds run every part once, so all see the same background load.
        for _ in range(args.repeats):
            for name, encode in parts.items():
                part = texts
                if deadline is not None and rate is not None:
                    budget = deadline - time.time() - 60
                    fits = int(budget * rate * speed.get(name, 0.5) * 0.9)
                    if fits < len(texts):
                        part = texts[: max(args.batch_size * 4, fits)]
                        print(f"{name}: {len(part)} of {len(texts)} texts to meet the deadline")
                start = time.perf_counter()
                out = encode(part)  # type: ignore[operator]
                took = time.perf_counter() - start
                seconds[name].append(took)
                counts[name] = len(part)
                vectors[name] = np.asarray(out, dtype=np.float32)
                rate = len(part) / took / speed.get(name, 0.5)
                print(f"{name}: {len(part)} texts in {took:.1f} s", flush=True)
    finally:
        if ray_started:
            ray.shutdown()

    def per_second(name: str) -> float:
        return counts[name] / statistics.median(seconds[name])

    bare_rate = per_second("bare")
    reference = vectors["bare"]
    figures: dict = {
        "texts": len(texts),
        "mix": args.mix,
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
    }
    for name in parts:
        common = min(len(reference), len(vectors[name]))
        f = {
            "texts": counts[name],
            "seconds": round(statistics.median(seconds[name]), 2),
            "rounds": [round(x, 2) for x in seconds[name]],
            "per_second": per_second(name),
        }
        if name != "bare":
            f["ratio_to_bare"] = per_second(name) / bare_rate
            f["max_abs_diff_to_bare"] = float(
                np.abs(vectors[name][:common] - reference[:common]).max()
            )
            f["min_cosine_to_bare"] = float(
                (vectors[name][:common] * reference[:common]).sum(axis=1).min()
            )
        if "bare_traced" in parts and name not in ("bare", "bare_traced"):
            f["ratio_to_bare_traced"] = per_second(name) / per_second("bare_traced")
        if name == "stage":

            def median_of(key: str) -> float:
                return statistics.median(r[key] for r in stage_rounds)

            f.update(
                driver_peak_rss_bytes=max(r["peak_rss_bytes"] for r in stage_rounds),
                prepare_seconds=median_of("prepare_seconds"),
                encode_seconds=median_of("encode_seconds"),
                child_wall_seconds=round(median_of("wall_seconds_with_start"), 2),
                # The stage alone, Ray already up (as in `dpray run`, which starts Ray once for
                # every stage): the child's own clock around embed_sets.  The headline ratios
                # above also count the child's start, its imports and Ray's start and shutdown.
                seconds_ray_up=round(median_of("seconds"), 2),
                rounds_ray_up=[round(r["seconds"], 2) for r in stage_rounds],
            )
            ray_up_rate = counts[name] / median_of("seconds")
            f["ratio_to_bare_ray_up"] = ray_up_rate / bare_rate
            if "bare_traced" in parts:
                f["ratio_to_bare_traced_ray_up"] = ray_up_rate / per_second("bare_traced")
        if name != "bare" and len(seconds[name]) > 1 and deadline is None:
            # each round's ratio of its own times (all parts ran on the same texts per round)
            f["ratio_to_bare_per_round"] = [
                round(b / x, 3) for x, b in zip(seconds[name], seconds["bare"], strict=True)
            ]
            if "bare_traced" in parts and name != "bare_traced":
                f["ratio_to_bare_traced_per_round"] = [
                    round(b / x, 3)
                    for x, b in zip(seconds[name], seconds["bare_traced"], strict=True)
                ]
        figures[name] = f
    figures["goal_ratio"] = 1.3
    figures["goals_issue_17"] = {"stage_to_bare": 1.8, "stage_to_bare_traced": 0.9}
    rows = []
    for name in parts:
        f = figures[name]
        line = f"{f['per_second']:7.1f} texts/s ({f['texts']} in {f['seconds']:.1f} s)"
        if name != "bare":
            line += f"   {f['ratio_to_bare']:.2f}x bare"
        if "ratio_to_bare_traced" in f:
            line += f"   {f['ratio_to_bare_traced']:.2f}x bare_traced"
        if name == "stage":
            line += f"   driver peak RSS {f['driver_peak_rss_bytes'] / 2**20:.0f} MiB"
            if "ratio_to_bare_traced_ray_up" in f:
                line += f"   (Ray up: {f['ratio_to_bare_traced_ray_up']:.2f}x bare_traced)"
        rows.append((name, line))
    config = {
        "n": args.n,
        "mix": args.mix,
        "model": args.model,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "cpus": cpus,
        "stage_actors": args.stage_actors,
        "repeats": args.repeats,
        "parts": list(parts),
        "deadline": args.deadline or None,
        "timing": "end to end per run, Ray actor start included; median over rounds",
    }
    path = write_result(args.name, figures, config)
    title = f"Embedding {len(texts)} instructions, {cpus} CPUs, batch {args.batch_size}"
    if args.precision != "float32":
        title += f", stage and bare_traced in {args.precision} (bare: float32)"
    print_table(title, rows)
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
