"""The cluster filter at scale vs bare faiss, on random-but-clustered 384-d embeddings.

Two modes, each measured run in a fresh process (so peak RSS is per run):

**In memory** (default sizes 100k, 300k, 1M synthetic; 100k real; K=1000), the arrays loaded
into RAM first:

* ``filter``: ``dpray.stages.filter.core.cluster_filter`` -- PCA (0.9 variance) + faiss k-means
  fitted on synthetic, assignment of real and synthetic, the per-unit histogram, Gaussian noise,
  resampling to ``target_size``; i.e. the filter stage without file I/O and metrics.
* ``baseline``: bare faiss on the same arrays -- ``faiss.PCAMatrix`` (same output size) fit +
  apply, ``faiss.Kmeans(K, niter=20)`` with its default training subsample, nearest-centroid
  search of the real and of the synthetic points (the filter needs both).

**Out of core** (``--scale``: 1M, 3M and 10M synthetic, 100k real, K=1000; issue 17): each
size's candidates are generated block by block straight into an ``.npy`` file (the generator
never holds the set; ``--data-dir``, deleted afterwards unless ``--keep-data``), and both runs
read them from disk:

* ``filter``: ``cluster_filter`` on :class:`~dpray.stages.filter.rows.NpyRows` (positioned reads
  of 65,536-row chunks, ``filter.chunk_size``; ``distributed: false``, one process);
* ``baseline``: bare faiss as one would write it for data that do not fit in RAM: the file
  opened with ``np.load(mmap_mode="r")``; ``faiss.PCAMatrix`` trained on 1000 x 384 random rows
  (what PCAMatrix would subsample itself); ``faiss.Kmeans(K, niter=20)`` trained on 256 x K
  random projected rows (its own subsample size); then every 65,536-row slice of synthetic and
  of real copied out of the memmap, projected and searched (``index.search(x, 1)``).  No
  histogram, noise or resampling (cheap).  Its peak RSS counts the memmap's touched file pages
  (they are resident, if reclaimable), so it is reported but not a goal.

Before every measured run the candidates' file is read through once (the same page-cache state
for both).  Goals (issue 17, ``--scale``): 10M completes with filter peak RSS <= 4 GB, filter <=
1.3x baseline, filter growth 1M -> 10M <= 12x.  In memory (issue 5): 1M <= 1.5x; growth <= 12x.

    python -m benchmarks.filter                       # ~3-6 min on 2 cores
    python -m benchmarks.filter --sizes 20000,50000 --real 10000 --k 100   # a quick check
    python -m benchmarks.filter --scale --data-dir /big/disk   # ~25 GB of disk, ~25 min
    python -m benchmarks.filter --scale --sizes 20000,50000 --real 10000 --k 100   # quick
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
CHUNK = 65536
"""Rows per chunk, both runs of ``--scale`` (``filter.chunk_size``'s default)."""


def embedding_blocks(n: int, seed: int, skew: float, block: int = 100_000):
    """L2-normalised points around ``TOPICS`` topic centres in a ``LATENT``-dim subspace of R^384
    plus small isotropic noise (sentence embeddings are low-rank-ish too), ``block`` rows at a
    time.  ``skew`` > 0 makes topic popularity uneven (a generator that over-produces some
    topics)."""
    basis_rng = np.random.default_rng(1234)
    basis = np.linalg.qr(basis_rng.normal(size=(DIM, LATENT)))[0].T.astype(np.float32)
    centres = basis_rng.normal(size=(TOPICS, LATENT)).astype(np.float32)
    rng = np.random.default_rng(seed)
    popularity = rng.pareto(1.0 + skew, size=TOPICS) + 1.0 if skew > 0 else np.ones(TOPICS)
    labels = rng.choice(TOPICS, size=n, p=popularity / popularity.sum())
    for start in range(0, n, block):
        stop = min(n, start + block)
        latent = centres[labels[start:stop]] + 0.6 * rng.standard_normal(
            (stop - start, LATENT), dtype=np.float32
        )
        out = latent @ basis + 0.05 * rng.standard_normal((stop - start, DIM), dtype=np.float32)
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        yield out


def make_embeddings(n: int, seed: int, skew: float) -> np.ndarray:
    """:func:`embedding_blocks` in one array."""
    out = np.empty((n, DIM), dtype=np.float32)
    start = 0
    for block in embedding_blocks(n, seed, skew):
        out[start : start + len(block)] = block
        start += len(block)
    return out


def write_embeddings(path: Path, n: int, seed: int, skew: float) -> Path:
    """:func:`embedding_blocks` written to an ``.npy`` file block by block (header first)."""
    header = {"descr": "<f4", "fortran_order": False, "shape": (n, DIM)}
    with path.open("wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        for block in embedding_blocks(n, seed, skew):
            handle.write(np.ascontiguousarray(block, dtype="<f4").tobytes())
    return path


def read_through(path: Path, block: int = 64 * 1024**2) -> None:
    """Read a file once, discarding it: the same page-cache state before every measured run."""
    with path.open("rb", buffering=0) as handle:
        buffer = bytearray(block)
        while handle.readinto(buffer):
            pass


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


def _scale_child(kind: str, syn_path: str, real_path: str, k: int, pca_dims: int, queue) -> None:
    """One measured out-of-core run (``--scale``) in a fresh process; see the module docstring."""
    import faiss

    from dpray.config import FilterConfig
    from dpray.stages.filter import core, histogram
    from dpray.stages.filter.rows import NpyRows

    rss_start = _memory_mb("VmRSS")
    parts: dict[str, float] = {}
    start = time.perf_counter()
    if kind == "filter":
        synthetic, real = NpyRows(syn_path), NpyRows(real_path)
        fc = FilterConfig(
            num_clusters=k, pca_variance=0.9, sigma=10.0, target_size=10_000, distributed=False
        )
        units = np.arange(len(real))
        outcome = core.cluster_filter(synthetic, real, units, fc, 10.0, histogram.secret_rng())
        parts = dict(outcome.timings)
        parts["pca_dims"] = outcome.clustering.pca.dim
        parts["selected"] = int(len(outcome.selected))
    else:
        synthetic = np.load(syn_path, mmap_mode="r")
        real = np.load(real_path, mmap_mode="r")
        n = len(synthetic)
        rng = np.random.default_rng(0)
        lap = time.perf_counter()
        rows = np.sort(rng.choice(n, size=min(n, 1000 * DIM), replace=False))
        pca = faiss.PCAMatrix(DIM, pca_dims)
        pca.train(np.ascontiguousarray(synthetic[rows]))
        parts["pca_fit"] = time.perf_counter() - lap
        lap = time.perf_counter()
        rows = np.sort(rng.choice(n, size=min(n, 256 * k), replace=False))
        kmeans = faiss.Kmeans(pca_dims, k, niter=20, seed=0, verbose=False)
        kmeans.train(pca.apply(np.ascontiguousarray(synthetic[rows])))
        parts["kmeans"] = time.perf_counter() - lap
        for name, data in (("assign_synthetic", synthetic), ("assign_real", real)):
            lap = time.perf_counter()
            labels = np.empty(len(data), dtype=np.int64)
            for first in range(0, len(data), CHUNK):
                block = np.ascontiguousarray(data[first : first + CHUNK])
                labels[first : first + len(block)] = kmeans.index.search(pca.apply(block), 1)[1][
                    :, 0
                ]
            parts[name] = time.perf_counter() - lap
    seconds = time.perf_counter() - start
    peak = _memory_mb("VmHWM")
    queue.put(
        {
            "seconds": seconds,
            "start_rss_mb": round(rss_start, 1),
            "peak_rss_mb": round(peak, 1),
            "parts": {key: round(v, 3) for key, v in parts.items()},
        }
    )


def measure(kind: str, data_dir: Path, size: int, k: int, pca_dims: int) -> dict:
    return _spawn(_child, kind, str(data_dir), size, k, pca_dims)


def measure_scale(kind: str, syn_path: Path, real_path: Path, k: int, pca_dims: int) -> dict:
    read_through(syn_path)
    return _spawn(_scale_child, kind, str(syn_path), str(real_path), k, pca_dims)


def _spawn(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default=None, help="synthetic sizes (100k,300k,1M; --scale: 1M,3M,10M)"
    )
    parser.add_argument("--real", type=int, default=100_000, help="real records")
    parser.add_argument("--k", type=int, default=1000, help="clusters")
    parser.add_argument("--repeats", type=int, default=1, help="runs per case (median)")
    parser.add_argument("--name", default=None, help="result file name (filter / filter_scale)")
    parser.add_argument("--scale", action="store_true", help="out of core: 1M, 3M, 10M from disk")
    parser.add_argument("--data-dir", default=None, help="--scale: where the arrays are written")
    parser.add_argument("--keep-data", action="store_true", help="--scale: keep the arrays")
    args = parser.parse_args()
    if args.scale:
        main_scale(args)
        return
    args.name = args.name or "filter"
    sizes = sorted(int(s) for s in (args.sizes or "100000,300000,1000000").split(","))
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


SCALE_SIZES = "1000000,3000000,10000000"


def main_scale(args) -> None:
    """``--scale``: per size, write the candidates to disk, measure filter and baseline, delete."""
    sizes = sorted(int(s) for s in (args.sizes or SCALE_SIZES).split(","))
    name = args.name or "filter_scale"
    root = Path(args.data_dir) if args.data_dir else Path.home() / ".cache" / "dpray"
    root.mkdir(parents=True, exist_ok=True)
    data_dir = Path(tempfile.mkdtemp(prefix="bench-filter-scale-", dir=root))
    rows: list = []
    figures: dict = {"generate_seconds": {}, "sizes": {}}
    try:
        real_path = write_embeddings(data_dir / "real.npy", args.real, seed=2, skew=0.0)
        for size in sizes:
            start = time.perf_counter()
            syn_path = write_embeddings(data_dir / f"synthetic-{size}.npy", size, seed=1, skew=1.0)
            figures["generate_seconds"][str(size)] = round(time.perf_counter() - start, 1)
            filt = measure_scale("filter", syn_path, real_path, args.k, 0)
            dims = int(filt["parts"]["pca_dims"])
            base = measure_scale("baseline", syn_path, real_path, args.k, dims)
            for _ in range(args.repeats - 1):  # alternating: the same background load
                _add_round(filt, measure_scale("filter", syn_path, real_path, args.k, 0))
                _add_round(base, measure_scale("baseline", syn_path, real_path, args.k, dims))
            if not args.keep_data:
                syn_path.unlink()
            ratio = filt["seconds"] / base["seconds"]
            figures["sizes"][str(size)] = {"filter": filt, "baseline": base, "ratio": ratio}
            rows.append(
                (
                    f"{size:>10,d} synthetic",
                    f"filter {filt['seconds']:6.1f} s ({filt['peak_rss_mb']:6.0f} MB peak)   "
                    f"baseline {base['seconds']:6.1f} s ({base['peak_rss_mb']:6.0f} MB peak, "
                    f"memmap pages)   ratio {ratio:4.2f}   PCA dims {dims}",
                )
            )
            print(rows[-1][0], rows[-1][1], flush=True)
            _write_scale(name, figures, sizes, args)  # after every size: a partial result
        small, large = str(sizes[0]), str(sizes[-1])
        growth = {
            kind: figures["sizes"][large][kind]["seconds"]
            / figures["sizes"][small][kind]["seconds"]
            for kind in ("filter", "baseline")
        }
        rows.append(
            (
                f"growth {sizes[-1] // sizes[0]}x size",
                f"filter {growth['filter']:.2f}x   baseline {growth['baseline']:.2f}x",
            )
        )
        for size in sizes:
            parts = figures["sizes"][str(size)]
            rows.append((f"{size:>10,d} filter parts", str(parts["filter"]["parts"])))
            rows.append((f"{size:>10,d} baseline parts", str(parts["baseline"]["parts"])))
        path = _write_scale(name, figures, sizes, args)
        print_table(
            f"DP filter (cluster, out of core) vs bare faiss, {args.real:,} real, K={args.k}", rows
        )
        print(f"\nwritten {path}")
    finally:
        if not args.keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)


def _write_scale(name: str, figures: dict, sizes: list[int], args) -> Path:
    """The result so far, with growth and goals over the sizes measured."""
    done = [s for s in sizes if str(s) in figures["sizes"]]
    small, large = figures["sizes"][str(done[0])], figures["sizes"][str(done[-1])]
    figures["growth"] = {
        "from": done[0],
        "to": done[-1],
        **{k: large[k]["seconds"] / small[k]["seconds"] for k in ("filter", "baseline")},
    }
    figures["goals"] = {
        "largest": done[-1],
        "filter_over_baseline_at_largest": large["ratio"],
        "ratio_goal": 1.3,
        "filter_peak_rss_mb_at_largest": large["filter"]["peak_rss_mb"],
        "peak_rss_goal_mb": 4096,
        "growth_goal": 12.0 if done[-1] // done[0] == 10 else None,
    }
    config = {
        "sizes": sizes,
        "measured": done,
        "real": args.real,
        "k": args.k,
        "dim": DIM,
        "topics": TOPICS,
        "chunk_size": CHUNK,
        "repeats": args.repeats,
    }
    return write_result(name, figures, config)


if __name__ == "__main__":
    main()
