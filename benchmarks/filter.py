"""The cluster filter at scale vs bare faiss, on random-but-clustered 384-d embeddings.

For each synthetic size (default 100k, 300k, 1M) with 100k real records and K=1000, two runs,
each in a fresh process (so peak RSS is per run):

* ``filter``: ``dpray.stages.filter.core.cluster_filter`` -- PCA (0.9 variance) + faiss k-means
  fitted on synthetic, assignment of real and synthetic, the per-unit histogram, Gaussian noise,
  resampling to ``target_size``; i.e. the filter stage without file I/O and metrics.
* ``baseline``: bare faiss on the same arrays -- ``faiss.PCAMatrix`` (same output size) fit +
  apply, ``faiss.Kmeans(K, niter=20)`` with its default training subsample, nearest-centroid
  search of the real and of the synthetic points (the filter needs both).

Reports seconds per size (with the baseline's parts), peak RSS, the filter/baseline ratio and the
growth 1M/100k.  Goals (issue 5): filter on 1M <= 1.5x baseline; growth <= 12x.

    python -m benchmarks.filter                       # ~3-6 min on 2 cores
    python -m benchmarks.filter --sizes 20000,50000 --real 10000 --k 100   # a quick check
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import print_table, write_result

DIM = 384
TOPICS = 2000
LATENT = 96


def make_embeddings(n: int, seed: int, skew: float) -> np.ndarray:
    """L2-normalised points around ``TOPICS`` topic centres in a ``LATENT``-dim subspace of R^384
    plus small isotropic noise (sentence embeddings are low-rank-ish too).  ``skew`` > 0 makes
    topic popularity uneven (a generator that over-produces some topics)."""
    basis_rng = np.random.default_rng(1234)
    basis = np.linalg.qr(basis_rng.normal(size=(DIM, LATENT)))[0].T.astype(np.float32)
    centres = basis_rng.normal(size=(TOPICS, LATENT)).astype(np.float32)
    rng = np.random.default_rng(seed)
    popularity = rng.pareto(1.0 + skew, size=TOPICS) + 1.0 if skew > 0 else np.ones(TOPICS)
    labels = rng.choice(TOPICS, size=n, p=popularity / popularity.sum())
    out = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        latent = centres[labels[start:stop]] + 0.6 * rng.standard_normal(
            (stop - start, LATENT), dtype=np.float32
        )
        block = latent @ basis + 0.05 * rng.standard_normal((stop - start, DIM), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:stop] = block
    return out


def _memory_mb(field: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` (now) of this process, in MB.

    Not ``getrusage``: its ``ru_maxrss`` survives fork + exec, so a spawned child would report
    the parent's peak (the generated arrays) instead of its own.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(kind: str, data_dir: str, size: int, k: int, pca_dims: int, queue) -> None:
    """One measured run in a fresh process (peak RSS of this run only)."""
    import faiss

    from dpray.config import FilterConfig
    from dpray.stages.filter import core, histogram

    # Real in-memory copies (a slice of a memmap would stay file-backed).
    synthetic = np.array(np.load(Path(data_dir) / "synthetic.npy", mmap_mode="r")[:size])
    real = np.load(Path(data_dir) / "real.npy")
    rss_data = _memory_mb("VmRSS")
    parts: dict[str, float] = {}
    start = time.perf_counter()
    if kind == "filter":
        fc = FilterConfig(num_clusters=k, pca_variance=0.9, sigma=10.0, target_size=10_000)
        units = np.arange(len(real))
        outcome = core.cluster_filter(synthetic, real, units, fc, 10.0, histogram.secret_rng())
        parts = dict(outcome.timings)
        parts["pca_dims"] = outcome.clustering.pca.dim
        parts["selected"] = int(len(outcome.selected))
    else:
        lap = time.perf_counter()
        pca = faiss.PCAMatrix(DIM, pca_dims)
        pca.train(synthetic)
        parts["pca_fit"] = time.perf_counter() - lap
        lap = time.perf_counter()
        syn_p = pca.apply(synthetic)
        real_p = pca.apply(real)
        parts["pca_apply"] = time.perf_counter() - lap
        lap = time.perf_counter()
        kmeans = faiss.Kmeans(pca_dims, k, niter=20, seed=0, verbose=False)
        kmeans.train(syn_p)
        parts["kmeans"] = time.perf_counter() - lap
        lap = time.perf_counter()
        kmeans.index.search(real_p, 1)
        parts["assign_real"] = time.perf_counter() - lap
        lap = time.perf_counter()
        kmeans.index.search(syn_p, 1)
        parts["assign_synthetic"] = time.perf_counter() - lap
    seconds = time.perf_counter() - start
    peak = _memory_mb("VmHWM")
    queue.put(
        {
            "seconds": seconds,
            "data_rss_mb": round(rss_data, 1),
            "peak_rss_mb": round(peak, 1),
            "working_mb": round(peak - rss_data, 1),
            "parts": {key: round(v, 3) for key, v in parts.items()},
        }
    )


def _add_round(result: dict, again: dict) -> None:
    """Fold another run into ``result``: seconds become the median of all rounds."""
    rounds = result.setdefault("rounds", [result["seconds"]])
    rounds.append(again["seconds"])
    result["seconds"] = statistics.median(rounds)
    result["peak_rss_mb"] = max(result["peak_rss_mb"], again["peak_rss_mb"])


def measure(kind: str, data_dir: Path, size: int, k: int, pca_dims: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(kind, str(data_dir), size, k, pca_dims, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,300000,1000000", help="synthetic sizes")
    parser.add_argument("--real", type=int, default=100_000, help="real records")
    parser.add_argument("--k", type=int, default=1000, help="clusters")
    parser.add_argument("--repeats", type=int, default=1, help="runs per case (median)")
    parser.add_argument("--name", default="filter", help="result file name")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    root = Path.home() / ".cache" / "dpray"
    root.mkdir(parents=True, exist_ok=True)
    data_dir = Path(tempfile.mkdtemp(prefix="bench-filter-", dir=root))
    try:
        start = time.perf_counter()
        np.save(data_dir / "synthetic.npy", make_embeddings(max(sizes), seed=1, skew=1.0))
        np.save(data_dir / "real.npy", make_embeddings(args.real, seed=2, skew=0.0))
        generate = time.perf_counter() - start
        rows = []
        figures: dict = {"generate_seconds": round(generate, 1), "sizes": {}}
        for size in sizes:
            filt = measure("filter", data_dir, size, args.k, 0)
            dims = int(filt["parts"]["pca_dims"])
            base = measure("baseline", data_dir, size, args.k, dims)
            # Extra rounds alternate the two, so both see the same background load.
            for _ in range(args.repeats - 1):
                _add_round(filt, measure("filter", data_dir, size, args.k, 0))
                _add_round(base, measure("baseline", data_dir, size, args.k, dims))
            ratio = filt["seconds"] / base["seconds"]
            figures["sizes"][str(size)] = {"filter": filt, "baseline": base, "ratio": ratio}
            rows.append(
                (
                    f"{size:>9,d} synthetic",
                    f"filter {filt['seconds']:6.1f} s ({filt['peak_rss_mb']:6.0f} MB peak, "
                    f"+{filt['working_mb']:5.0f} MB)   baseline {base['seconds']:6.1f} s "
                    f"({base['peak_rss_mb']:6.0f} MB)   ratio {ratio:4.2f}   PCA dims {dims}",
                )
            )
        small, large = str(sizes[0]), str(sizes[-1])
        growth = {
            kind: figures["sizes"][large][kind]["seconds"]
            / figures["sizes"][small][kind]["seconds"]
            for kind in ("filter", "baseline")
        }
        figures["growth"] = {"from": sizes[0], "to": sizes[-1], **growth}
        figures["goals"] = {
            "filter_over_baseline_at_largest": figures["sizes"][large]["ratio"],
            "ratio_goal": 1.5,
            "growth_goal": 12.0 if sizes[-1] // sizes[0] == 10 else None,
        }
        rows.append(
            (
                f"growth {sizes[-1] // sizes[0]}x size",
                f"filter {growth['filter']:.2f}x   baseline {growth['baseline']:.2f}x",
            )
        )
        for size in sizes:
            parts = figures["sizes"][str(size)]
            rows.append((f"{size:>9,d} filter parts", str(parts["filter"]["parts"])))
            rows.append((f"{size:>9,d} baseline parts", str(parts["baseline"]["parts"])))
        config = {
            "sizes": sizes,
            "real": args.real,
            "k": args.k,
            "dim": DIM,
            "topics": TOPICS,
            "repeats": args.repeats,
        }
        path = write_result(args.name, figures, config)
        print_table(f"DP filter (cluster) vs bare faiss, {args.real:,} real, K={args.k}", rows)
        print(f"\nwritten {path}")
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
