"""Quality of the synthetic instructions, per generation strategy, against held-out real ones.

    python -m benchmarks.quality                       # in-the-wild mix and Dolly, every strategy
    python -m benchmarks.quality --datasets wild --strategies prompted private_evolution
    python -m benchmarks.quality --quick               # tiny sizes: checks the plumbing only
    python -m benchmarks.quality --datasets wild --strategies dp_finetune \
        --clusters 24 64 128 256 --filter-draws 3       # the filter's K, on a finished run

Private = real human-written instructions from ``../shared/data`` (read in place; the private
split is written only to the work directory, outside the repository):

* ``wild``: ShareGPT first turns + OpenAssistant prompts + InstructionWild (in-the-wild users);
* ``dolly``: the 6,400 Dolly instructions (written by employees, more formal).

Each is shuffled once (seed 0); ``2n`` rows are held out -- A (the reference) and B (the
real-vs-real floor) -- and never reach dpray; up to ``--private-limit`` of the rest are the private
set.  For each strategy, ``dpray run jobs/quality-cpu.yaml`` (ingest -> generator -> sample ->
embed -> DP filter at epsilon 4) runs in its own process and its wall time is the strategy's
compute.  Against A, for the unfiltered candidates and the filtered set (n rows each, averaged
over ``--subsamples`` draws), the benchmark reports:

* **probe accuracy**: a cross-validated logistic regression on MiniLM embeddings telling the set
  from A (0.5 = indistinguishable; the floor tells B from A);
* MAUVE (mauve-text on the same features), FED and bias-corrected FED with the share of the
  unfiltered-to-floor gap the filter closed, cluster TV (k-means on A + candidates);
* the share of all draws that ended with the stop token (not cut at ``max_new_tokens``; the
  sampler drops cut draws, so the kept sets end with it by construction and report 100%), the
  duplicate rate, and the ledger's epsilon.

``--reference`` adds the non-private ceiling: the same fine-tune with no noise and no clipping
budget (``train_generator(..., ledger_required=False)``), in the benchmark only -- never a
pipeline run.  It has no DP filter, so it samples only what the comparison draws from
(``--reference-samples``, default 2n) rather than the recipe's candidate count.

Results: ``benchmarks/results/quality.json`` and ``quality.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, write_result
from dpray.stages.sample.shards import draw_files

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DATASETS = {
    "wild": [
        "sharegpt_first_turns_mlenergy.jsonl",
        "oasst_prompts.jsonl",
        "instructionwild_v2_user123.jsonl",
    ],
    "dolly": ["dolly15k_rows0-6399.jsonl"],
}
STRATEGIES = ("prompted", "private_evolution", "dp_finetune")
MAX_CHARS = 2000


def load_dataset(name: str) -> list[str]:
    """Instructions of a dataset, de-duplicated (first wins), at most MAX_CHARS, shuffled."""
    seen, texts = set(), []
    for file in DATASETS[name]:
        path = SHARED / file
        if not path.exists():
            raise SystemExit(f"{path} not found (the benchmark reads ../shared/data)")
        for line in path.read_text(encoding="utf-8").split("\n"):
            if not line.strip():
                continue
            text = json.loads(line)["instruction"]
            key = " ".join(text.split()).casefold()
            if text.strip() and len(text) <= MAX_CHARS and key not in seen:
                seen.add(key)
                texts.append(text)
    random.Random(0).shuffle(texts)
    return texts


def encoder():
    from sentence_transformers import SentenceTransformer

    from dpray.models import resolve_sentence_encoder

    return SentenceTransformer(str(resolve_sentence_encoder("packaged:all-minilm-l6-v2")))


def embed(model, texts: list[str]) -> np.ndarray:
    return np.asarray(model.encode(texts, batch_size=64, normalize_embeddings=True), np.float32)


def dpray_run(run_dir: Path, sets: list[str], log: Path, config: str) -> float:
    cmd = [sys.executable, "-m", "dpray", "run", config, "--run-dir", str(run_dir)]
    for item in sets:
        cmd += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.perf_counter()
    with log.open("a") as out:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"dpray run failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def run_outputs(run_dir: Path) -> dict:
    """Unfiltered and filtered candidates (texts, embeddings) and counts of one run."""
    import pyarrow.parquet as pq

    ids = pq.read_table(run_dir / "embed" / "synthetic.parquet").column("sample_id").to_pylist()
    vectors = np.load(run_dir / "embed" / "synthetic.npy")
    parts = sorted((run_dir / "sample").glob("part-*.parquet"))
    table = pq.read_table(parts[0]) if len(parts) == 1 else None
    if table is None:
        import pyarrow as pa

        table = pa.concat_tables([pq.read_table(p) for p in parts])
    text_of = dict(
        zip(table.column("sample_id").to_pylist(), table.column("text").to_pylist(), strict=True)
    )
    filtered = pq.read_table(run_dir / "filter" / "filtered.parquet")
    row_of = {sid: i for i, sid in enumerate(ids)}
    filtered_rows = [row_of[s] for s in filtered.column("sample_id").to_pylist()]
    truncated = {}
    for draw in draw_files(run_dir):
        t = pq.read_table(draw, columns=["sample_id", "truncated"]).to_pydict()
        truncated.update(zip(t["sample_id"], t["truncated"], strict=True))
    report = json.loads((run_dir / "sample" / "report.json").read_text())
    ledger = json.loads((run_dir / "ledger.json").read_text())
    return {
        "unfiltered": vectors,
        "filtered": vectors[filtered_rows],
        "unfiltered_texts": [text_of[s] for s in ids],
        "filtered_texts": filtered.column("text").to_pylist(),
        "ended_unfiltered": 1 - float(np.mean([truncated.get(s, False) for s in ids])),
        "ended_filtered": 1
        - float(
            np.mean([truncated.get(s, False) for s in filtered.column("sample_id").to_pylist()])
        ),
        "ended_draws": draws_ended(report),
        "sampler_duplicate_rate": report.get("duplicate_rate"),
        "epsilon": ledger["spent"]["epsilon"],
    }


def draws_ended(report: dict) -> float | None:
    """Share of all generated draws that stopped on their own (before any were dropped).

    The sampler drops draws cut at ``max_new_tokens`` (``sample.drop_truncated``), so the kept
    candidates end with the stop token by construction; this is the share that tells how often
    the generator finishes an instruction within the token limit.
    """
    generated = report.get("generated")
    if not generated:
        return None
    return 1 - float(report.get("truncated", 0)) / float(generated)


def duplicate_rate(texts: list[str]) -> float:
    keys = [" ".join(t.split()).casefold() for t in texts]
    return 1 - len(set(keys)) / max(1, len(keys))


def cluster_tv(a: np.ndarray, pool: np.ndarray, sets: dict[str, np.ndarray], k: int = 20) -> dict:
    import faiss

    from dpray.stages.filter.metrics import tv_distance

    train = np.ascontiguousarray(np.concatenate([a, pool]), dtype=np.float32)
    km = faiss.Kmeans(train.shape[1], k, niter=20, seed=0, verbose=False)
    km.train(train)
    real = np.bincount(km.index.search(np.ascontiguousarray(a), 1)[1][:, 0], minlength=k)
    out = {}
    for name, x in sets.items():
        labels = km.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)[1][:, 0]
        out[name] = tv_distance(real, np.bincount(labels, minlength=k))
    return out


def distribution_metrics(a: np.ndarray, b: np.ndarray, sets: dict, n: int, subsamples: int) -> dict:
    """Probe accuracy, MAUVE, FED (+ bias-corrected, gap closed) of each set vs A at size n."""
    import mauve

    from dpray.stages.filter.metrics import (
        extrapolate,
        frechet_distance,
        gap_closed,
        probe_accuracy,
    )

    rng = np.random.default_rng(0)
    result: dict = {"sample_size": n, "subsamples": subsamples}
    pools = {**sets, "real_floor": b}
    for name, pool in pools.items():
        m = min(n, len(pool))
        probes, mauves, feds, sizes = [], [], [], {}
        for r in range(subsamples):
            x = pool[rng.choice(len(pool), m, replace=False)]
            ref = a[rng.choice(len(a), m, replace=False)]
            probes.append(probe_accuracy(ref, x, 5, r))
            mauves.append(
                float(
                    mauve.compute_mauve(p_features=ref, q_features=x, seed=r, verbose=False).mauve
                )
            )
            for size in (m, m // 2, m // 4):
                sizes.setdefault(size, []).append(frechet_distance(ref[:size], x[:size]))
            feds.append(sizes[m][-1])
        result[name] = {
            "n": m,
            "probe_accuracy": float(np.mean(probes)),
            "probe_std": float(np.std(probes)),
            "mauve": float(np.mean(mauves)),
            "fed": float(np.mean(feds)),
            "fed_bias_corrected": extrapolate(
                list(sizes), [float(np.mean(v)) for v in sizes.values()]
            ),
        }
    floor = result["real_floor"]
    for kind in ("fed", "fed_bias_corrected"):
        if "unfiltered" in result and "filtered" in result:
            result[f"gap_closed_{kind}"] = gap_closed(
                result["unfiltered"][kind], result["filtered"][kind], floor[kind]
            )
    return result


def reference_run(run_dir: Path, private: Path, log: Path, config: str, sets: list[str]) -> float:
    """The non-private ceiling: same fine-tune, no noise, outside any ledger; then sample+embed."""
    overrides = [*sets, "generator.strategy=dp_finetune", "generator.topics=none"]
    start = time.perf_counter()
    # ingest through the CLI (the ledger and the private split as in a real run)
    cmd = [sys.executable, "-m", "dpray", "ingest", config, "--run-dir", str(run_dir)]
    for item in overrides:
        cmd += ["--set", item]
    with log.open("a") as out:
        subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=True)
    code = (
        "import sys; from dpray.config import load_config; from dpray.rundir import RunDir;"
        "from dpray.runtime import ensure_ray;"
        "from dpray.stages.train_generator.stage import train_generator;"
        "c = load_config(sys.argv[1], sys.argv[3:]); r = RunDir(sys.argv[2]); ensure_ray(c, r);"
        "c.train.noise_multiplier = 0.0;"
        "train_generator(c, r, ledger_required=False)"
    )
    with log.open("a") as out:
        subprocess.run(
            [sys.executable, "-c", code, config, str(run_dir), *overrides],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
        )
    cmd = [sys.executable, "-m", "dpray", "run", config, "--run-dir", str(run_dir)]
    cmd += ["--stages", "sample,embed"]
    for item in overrides:
        cmd += ["--set", item]
    with log.open("a") as out:
        subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def plot(figures: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(figures)
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, ds in zip(axes[0], datasets, strict=True):
        rows = figures[ds]["strategies"]
        names = list(rows)
        xs = np.arange(len(names))
        unf = [
            rows[s]["metrics"].get("unfiltered", {}).get("probe_accuracy", np.nan) for s in names
        ]
        fil, err = [], []
        for s in names:  # the mean and sd over the filter draws where there are several
            m = rows[s]["metrics"]
            draws = m.get("filtered_draws", {}).get("probe_accuracy")
            fil.append(
                draws["mean"] if draws else m.get("filtered", {}).get("probe_accuracy", np.nan)
            )
            err.append(draws["std"] if draws else 0.0)
        ax.bar(xs - 0.2, unf, 0.4, label="unfiltered", color="tab:red", alpha=0.7)
        ax.bar(
            xs + 0.2,
            fil,
            0.4,
            yerr=err,
            capsize=3,
            label="DP-filtered (mean ± sd over filter draws)",
            color="tab:blue",
            alpha=0.8,
        )
        floor = figures[ds]["real_floor"]["probe_accuracy"]
        ax.axhline(floor, color="black", ls="--", lw=1, label=f"real vs real ({floor:.2f})")
        ax.axhline(0.5, color="grey", ls=":", lw=1)
        ax.set_xticks(xs, [n.replace("_", "\n") for n in names], fontsize=8)
        ax.set_ylim(0.45, 1.0)
        ax.set_ylabel("probe accuracy vs held-out real (lower is better)")
        ax.set_title(f"{ds}: n={figures[ds]['sample_size']}, epsilon 4", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rounds_report(run_dir: Path, dataset: str, n: int, subsamples: int) -> dict:
    """How a private-evolution run moved towards the held-out set, round by round: each round's
    candidates and the candidates its DP vote kept, against A (the floor: B against A)."""
    import pyarrow.parquet as pq

    texts = load_dataset(dataset)
    model = encoder()
    a, b = embed(model, texts[:n]), embed(model, texts[n : 2 * n])
    sets = {}
    from dpray.stages.train_generator.strategies.private_evolution import ROUNDS_DIR

    rounds = run_dir / ROUNDS_DIR
    if not rounds.is_dir():  # a run of dpray before the rounds had a folder of their own
        rounds = run_dir / "generator" / "rounds"
    for path in sorted(rounds.glob("round-*.parquet")):
        table = pq.read_table(path).to_pandas()
        sets[f"{path.stem} candidates"] = embed(model, table.text.tolist())
        sets[f"{path.stem} kept"] = embed(model, table[table.kept].text.tolist())
    m = min(len(x) for x in sets.values())
    metrics = distribution_metrics(a, b, sets, m, subsamples)
    return {"run_dir": str(run_dir), "dataset": dataset, "sample_size": m, "metrics": metrics}


def cluster_sweep(
    work: Path, dataset: str, strategy: str, clusters: list[int], args, base_sets: list[str]
) -> dict:
    """The DP filter's K, measured on one finished run's candidates: for each K, the filter
    refiltered ``--filter-draws`` times (``filter.seed`` 0..), each set against A at n.  The
    candidates are the same for every K, so only the filter's clustering differs (each draw
    spends what the recipe's filter spends once: a benchmark-only measurement)."""
    texts = load_dataset(dataset)
    n = args.n
    model = encoder()
    a, b = embed(model, texts[:n]), embed(model, texts[n : 2 * n])
    run_dir = work / f"{dataset}-{strategy}"
    if not (run_dir / "embed" / "synthetic.npy").exists():
        raise SystemExit(f"{run_dir} has no candidates: run the strategy first (same --work)")
    sets = strategy_sets(strategy, base_sets)
    out: dict = {"run_dir": str(run_dir), "strategy": strategy, "sample_size": n, "clusters": {}}
    floor = None
    for k in clusters:
        draws = []
        for seed in range(args.filter_draws):
            copy = refilter(
                run_dir,
                work / f"{dataset}-{strategy}-k{k}-filter{seed}",
                [*sets, f"filter.num_clusters={k}"],
                args.config,
                seed,
            )
            metrics = distribution_metrics(
                a, b, {"filtered": run_outputs(copy)["filtered"]}, n, args.subsamples
            )
            floor = metrics["real_floor"]
            draws.append(metrics["filtered"])
        row = {
            key: {
                "mean": float(np.mean([d[key] for d in draws])),
                "std": float(np.std([d[key] for d in draws])),
            }
            for key in ("probe_accuracy", "mauve", "fed", "fed_bias_corrected")
        }
        out["clusters"][str(k)] = row
        print(
            f"[quality] K={k}: probe {row['probe_accuracy']['mean']:.3f} "
            f"± {row['probe_accuracy']['std']:.3f}, MAUVE {row['mauve']['mean']:.3f}, "
            f"FED {row['fed']['mean']:.4f} ({len(draws)} draws)",
            flush=True,
        )
    out["real_floor"] = floor
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--reference", action="store_true", help="add the non-DP fine-tune")
    parser.add_argument(
        "--reference-samples",
        type=int,
        default=None,
        help="candidates the unfiltered reference draws (default 2n)",
    )
    parser.add_argument(
        "--filter-draws",
        type=int,
        default=4,
        help="filtered sets per strategy (the first from the run, the rest refiltered with "
        "filter.seed=1..); the table gives their mean and spread",
    )
    parser.add_argument("--n", type=int, default=500, help="rows per compared set")
    parser.add_argument("--private-limit", type=int, default=6000)
    parser.add_argument("--subsamples", type=int, default=3)
    parser.add_argument("--config", default="jobs/quality-cpu.yaml")
    parser.add_argument("--set", action="append", default=[], dest="sets", help="extra --set")
    parser.add_argument("--work", default=str(REPO / "runs" / "quality-bench"))
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs in --work")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (plumbing check)")
    parser.add_argument("--name", default=None, help="result name (default quality[_quick])")
    parser.add_argument(
        "--rounds-of",
        default=None,
        help="only report a finished private_evolution run's rounds (candidates vs kept) "
        "against the held-out split of --datasets' first dataset",
    )
    parser.add_argument(
        "--clusters",
        nargs="+",
        type=int,
        default=None,
        help="only sweep the DP filter's K over a finished run of the first --strategies "
        "strategy on the first --datasets dataset (same --work): --filter-draws refilters each",
    )
    args = parser.parse_args(argv)
    if args.clusters:
        ds, strategy = args.datasets[0], args.strategies[0]
        work = Path(args.work)
        base = [
            f"data.path={work / f'{ds}-private.jsonl'}",
            "data.text_field=instruction",
            "data.id_field=id",
            *args.sets,
        ]
        report = cluster_sweep(work, ds, strategy, args.clusters, args, base)
        path = write_result(args.name or "quality_clusters", report, vars(args))
        print(f"wrote {path}")
        return report
    if args.rounds_of:
        report = rounds_report(Path(args.rounds_of), args.datasets[0], args.n, args.subsamples)
        path = write_result(args.name or "quality_pe_rounds", report, vars(args))
        for name, row in report["metrics"].items():
            if isinstance(row, dict):
                print(
                    f"{name}: probe {row['probe_accuracy']:.3f} MAUVE {row['mauve']:.3f} "
                    f"FED {row['fed']:.3f} (n={row['n']})"
                )
        print(f"wrote {path}")
        return report
    quick_sets = []
    if args.quick:
        args.n, args.private_limit, args.subsamples = 60, 400, 1
        quick_sets = [
            "generator.pe_population=60",
            "generator.pe_variations=3",
            "sample.num_samples=120",
            "sample.max_new_tokens=24",
            "train.steps=2",
            "train.expected_batch_size=16",
            "train.max_tokens=64",
            "filter.num_clusters=4",
            "filter.target_size=60",
        ]
    name = args.name or ("quality_quick" if args.quick else "quality")
    config = {k: v for k, v in vars(args).items() if k != "work"}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = encoder()
    figures: dict = {}
    for ds in args.datasets:
        texts = load_dataset(ds)
        n = args.n
        a_texts, b_texts = texts[:n], texts[n : 2 * n]
        private = texts[2 * n : 2 * n + args.private_limit]
        data = work / f"{ds}-private.jsonl"
        data.write_text(
            "".join(
                json.dumps({"id": f"{ds}-{i}", "instruction": t}) + "\n"
                for i, t in enumerate(private)
            )
        )
        a, b = embed(model, a_texts), embed(model, b_texts)
        base_sets = [
            f"data.path={data}",
            "data.text_field=instruction",
            "data.id_field=id",
            *quick_sets,
            *args.sets,
        ]
        rows: dict = {}
        floor = None
        runs = list(args.strategies) + (["reference_nondp"] if args.reference else [])
        for strategy in runs:
            run_dir = work / f"{ds}-{strategy}"
            log = work / f"{ds}-{strategy}.log"
            done = run_dir / "filter" / "filtered.parquet"
            seconds = None
            if not (
                args.reuse and (done.exists() or (run_dir / "embed" / "synthetic.npy").exists())
            ):
                import shutil

                shutil.rmtree(run_dir, ignore_errors=True)
                print(f"[quality] {ds} {strategy}: running", flush=True)
                if strategy == "reference_nondp":
                    draws = args.reference_samples or 2 * n
                    ref_sets = [*base_sets, f"sample.num_samples={draws}"]
                    seconds = reference_run(run_dir, data, log, args.config, ref_sets)
                else:
                    seconds = dpray_run(
                        run_dir, strategy_sets(strategy, base_sets), log, args.config
                    )
            if seconds is None:  # reused: the run's own stage timings
                seconds = recorded_seconds(run_dir)
            out = run_outputs(run_dir) if done.exists() else run_outputs_unfiltered(run_dir)
            sets = {"unfiltered": out["unfiltered"]}
            if out.get("filtered") is not None:
                sets["filtered"] = out["filtered"]
            metrics = distribution_metrics(a, b, sets, n, args.subsamples)
            floor = metrics.pop("real_floor")
            metrics["cluster_tv"] = cluster_tv(a, out["unfiltered"], sets)
            if "filtered" in sets and args.filter_draws > 1:
                draws = [metrics["filtered"]]
                for seed in range(1, args.filter_draws):
                    copy = refilter(
                        run_dir,
                        work / f"{ds}-{strategy}-filter{seed}",
                        strategy_sets(strategy, base_sets),
                        args.config,
                        seed,
                    )
                    again = run_outputs(copy)["filtered"]
                    draws.append(
                        distribution_metrics(a, b, {"filtered": again}, n, args.subsamples)[
                            "filtered"
                        ]
                    )
                metrics["filtered_draws"] = filter_spread(draws, metrics["unfiltered"], floor)
            rows[strategy] = {
                "seconds": seconds,
                "epsilon": out["epsilon"],
                "ended_with_stop": {
                    "draws": out.get("ended_draws"),
                    "unfiltered": out["ended_unfiltered"],
                    "filtered": out.get("ended_filtered"),
                },
                "duplicate_rate": {
                    "sampler": out["sampler_duplicate_rate"],
                    "filtered": duplicate_rate(out.get("filtered_texts") or []),
                },
                "metrics": metrics,
                "examples": random.Random(0).sample(
                    out.get("filtered_texts") or out["unfiltered_texts"],
                    min(8, len(out.get("filtered_texts") or out["unfiltered_texts"])),
                ),
            }
            print(f"[quality] {ds} {strategy}: {summary_line(rows[strategy], floor)}", flush=True)
            figures[ds] = {
                "sample_size": n,
                "private_records": len(private),
                "real_floor": floor,
                "strategies": rows,
            }
            # what is measured so far is kept if a later (hour-long) run fails or is stopped
            write_result(name, figures, config)
    path = write_result(name, figures, config)
    plot(figures, RESULTS / f"{name}.png")
    print(table(figures))
    print(f"wrote {path}")
    return figures


def strategy_sets(strategy: str, base_sets: list[str]) -> list[str]:
    """The ``--set`` overrides that switch the recipe to ``strategy``.

    dp_finetune learns what to write from the private data under one fixed prompt, so it runs
    without the public topic list that prompted and private_evolution draw from.
    """
    sets = [*base_sets, f"generator.strategy={strategy}"]
    if strategy == "dp_finetune":
        sets.append("generator.topics=none")
    return sets


def recorded_seconds(run_dir: Path) -> float | None:
    """Wall time of a finished run from its stage timings (``timings/stages.json``)."""
    path = run_dir / "timings" / "stages.json"
    if not path.exists():
        return None
    return float(sum(json.loads(path.read_text()).values()))


def refilter(run_dir: Path, copy: Path, sets: list[str], config: str, seed: int) -> Path:
    """The filter stage once more on a copy of a finished run, with ``filter.seed=seed``.

    One filtered set is one draw: which candidates the resampling keeps (and the DP noise) move
    the probe by about 0.01-0.02 at n = 500, as much as many settings differ.  The copy drops
    the filter's ledger event (earlier events, such as private evolution's votes, stay), so each
    draw spends what the recipe's filter spends once; a benchmark-only measurement of the
    mechanism's spread, never a pipeline run.
    """
    import shutil

    from dpray.privacy.ledger import Ledger

    if (copy / "filter" / "filtered.parquet").exists():
        return copy
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("filter", "report", "audit"))
    shutil.rmtree(copy / "private" / "filter", ignore_errors=True)
    for name in ("filter.json", "report.json"):
        (copy / "private" / "state" / name).unlink(missing_ok=True)
    ledger = Ledger.load(copy / "ledger.json")
    ledger.events = [e for e in ledger.events if e.stage != "filter"]
    ledger.save()
    cmd = [sys.executable, "-m", "dpray", "filter", config, "--run-dir", str(copy)]
    for item in [*sets, f"filter.seed={seed}"]:
        cmd += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"refilter of {run_dir.name} failed (exit {done.returncode})")
    return copy


def filter_spread(draws: list[dict], unfiltered: dict, floor: dict) -> dict:
    """Mean and standard deviation over filter draws of the filtered set's metrics."""
    from dpray.stages.filter.metrics import gap_closed

    out: dict = {"draws": len(draws)}
    for key in ("probe_accuracy", "mauve", "fed", "fed_bias_corrected"):
        values = [d[key] for d in draws]
        out[key] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "all": values}
    for kind in ("fed", "fed_bias_corrected"):
        gaps = [gap_closed(unfiltered[kind], d[kind], floor[kind]) for d in draws]
        out[f"gap_closed_{kind}"] = {"mean": float(np.mean(gaps)), "std": float(np.std(gaps))}
    return out


def run_outputs_unfiltered(run_dir: Path) -> dict:
    """The reference run has candidates but no DP filter."""
    import pyarrow.parquet as pq

    ids = pq.read_table(run_dir / "embed" / "synthetic.parquet").column("sample_id").to_pylist()
    vectors = np.load(run_dir / "embed" / "synthetic.npy")
    text_of = {}
    for p in sorted((run_dir / "sample").glob("part-*.parquet")):
        t = pq.read_table(p, columns=["sample_id", "text"]).to_pydict()
        text_of.update(zip(t["sample_id"], t["text"], strict=True))
    truncated = {}
    for draw in draw_files(run_dir):
        t = pq.read_table(draw, columns=["sample_id", "truncated"]).to_pydict()
        truncated.update(zip(t["sample_id"], t["truncated"], strict=True))
    report = json.loads((run_dir / "sample" / "report.json").read_text())
    return {
        "unfiltered": vectors,
        "filtered": None,
        "unfiltered_texts": [text_of[s] for s in ids],
        "filtered_texts": None,
        "ended_unfiltered": 1 - float(np.mean([truncated.get(s, False) for s in ids])),
        "ended_draws": draws_ended(report),
        "sampler_duplicate_rate": report.get("duplicate_rate"),
        "epsilon": float("inf"),
    }


def summary_line(row: dict, floor: dict) -> str:
    m = row["metrics"]
    parts = []
    for kind in ("unfiltered", "filtered"):
        if kind in m:
            parts.append(
                f"{kind}: probe {m[kind]['probe_accuracy']:.3f} MAUVE {m[kind]['mauve']:.3f} "
                f"FED {m[kind]['fed']:.3f}"
            )
    spread = m.get("filtered_draws")
    if spread:
        parts.append(
            f"over {spread['draws']} filter draws: probe {_pm(spread['probe_accuracy'])} "
            f"MAUVE {_pm(spread['mauve'])} gap closed {spread['gap_closed_fed']['mean']:.0%}"
        )
    gap = m.get("gap_closed_fed")
    parts.append(f"floor probe {floor['probe_accuracy']:.3f} MAUVE {floor['mauve']:.3f}")
    if gap is not None:
        parts.append(f"gap closed {gap:.0%}")
    if row["seconds"]:
        parts.append(f"{row['seconds'] / 60:.1f} min")
    return "; ".join(parts)


def _pm(stat: dict, digits: int = 3) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _pct(value) -> str:
    return "" if value is None else f"{value:.0%}"


def _num(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


FIGURES = ("probe_accuracy", "mauve", "fed", "fed_bias_corrected")


def table(figures: dict) -> str:
    lines = [
        "| data | strategy | set | probe acc. | MAUVE | FED | FED (bias-corr.) | gap closed | "
        "cluster TV | draws ended with stop | kept ended with stop | dup. rate | epsilon | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ds, fig in figures.items():
        floor = fig["real_floor"]
        lines.append(
            f"| {ds} | real vs real | | {floor['probe_accuracy']:.3f} | {floor['mauve']:.3f} | "
            f"{floor['fed']:.3f} | {floor['fed_bias_corrected']:.3f} | | | | | | | |"
        )
        for strategy, row in fig["strategies"].items():
            m = row["metrics"]
            minutes = row["seconds"] / 60 if row["seconds"] else None
            for kind in ("unfiltered", "filtered"):
                if kind not in m:
                    continue
                gap = ""
                values = {key: _num(m[kind][key]) for key in FIGURES}
                if kind == "filtered":
                    gap = f"{_pct(m.get('gap_closed_fed'))} ({_pct(m.get('gap_closed_fed_bias_corrected'))})"
                    spread = m.get("filtered_draws")
                    if spread:  # mean ± sd over the filter draws
                        values = {key: _pm(spread[key]) for key in FIGURES}
                        gap = (
                            f"{_pct(spread['gap_closed_fed']['mean'])} "
                            f"({_pct(spread['gap_closed_fed_bias_corrected']['mean'])})"
                        )
                ended = row["ended_with_stop"].get(kind)
                drawn = row["ended_with_stop"].get("draws") if kind == "unfiltered" else None
                dup = row["duplicate_rate"]["filtered" if kind == "filtered" else "sampler"]
                cells = [
                    ds,
                    strategy,
                    kind,
                    *values.values(),
                    gap,
                    _num(m["cluster_tv"][kind]),
                    "" if drawn is None else f"{drawn:.1%}",
                    "" if ended is None else f"{ended:.1%}",
                    "" if dup is None else f"{dup:.1%}",
                    _num(row["epsilon"], 2),
                    _num(minutes, 1),
                ]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
