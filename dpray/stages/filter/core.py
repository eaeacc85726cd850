"""The two filter methods on arrays: what the stage and the benchmark share.

No files, no ledger: the caller passes the absolute noise std ``sigma``, a secret noise
generator (:func:`dpray.privacy.mechanisms.gaussian.secret_rng`; the noise itself is drawn by
:func:`~dpray.privacy.mechanisms.gaussian.gaussian_release`), and ``on_release(noisy)``, called
once right after the noise is drawn and before anything is derived from it (the stage spends the
ledger event and saves the release there, so a refused spend means nothing noisy was ever used).
``saved``: an earlier release of the same votes (DP output), used instead of drawing noise --
nothing is released, so ``on_release`` is not called.

Embeddings come as arrays or as :mod:`~dpray.stages.filter.rows` readers (an ``.npy`` read
chunk by chunk).  The cluster method never holds a set whole: candidates are assigned chunk by
chunk (in Ray tasks with ``filter.distributed``), real records chunk by chunk on this process.
The nn_vote method searches an index of every candidate, so it reads both sets into memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dpray.config import FilterConfig
from dpray.privacy.mechanisms.gaussian import gaussian_release
from dpray.stages.filter import histogram, nn_vote, resample
from dpray.stages.filter.assign import use_ray
from dpray.stages.filter.cluster import Clustering, auto_num_clusters, fit_clusters
from dpray.stages.filter.rows import Rows, as_rows


@dataclass
class FilterOutcome:
    """What one filter run produced.  ``exact`` is private; everything else is DP or public."""

    selected: np.ndarray  # indices into the synthetic candidates
    clustering: Clustering
    exact: np.ndarray  # exact vote totals (PRIVATE)
    noisy: np.ndarray  # the DP release
    shares: np.ndarray | None  # cluster method: clamped, normalised noisy shares
    report: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


def _release(
    exact: np.ndarray,
    sigma: float,
    noise_rng: np.random.Generator,
    on_release: Callable[[np.ndarray], object] | None,
    saved: np.ndarray | None,
) -> np.ndarray:
    """The noisy votes: the saved release if given, else a new draw (then ``on_release``)."""
    if saved is not None:
        saved = np.asarray(saved, dtype=np.float64)
        if saved.shape != np.shape(exact):
            raise ValueError(f"saved release has shape {saved.shape}, votes {np.shape(exact)}")
        return saved
    noisy = gaussian_release(exact, sigma, noise_rng)
    if on_release is not None:
        on_release(noisy)
    return noisy


def _timer() -> Callable[[], float]:
    import time

    start = time.perf_counter()
    last = [start]

    def lap() -> float:
        now = time.perf_counter()
        seconds, last[0] = now - last[0], now
        return round(seconds, 4)

    return lap


def _fit(synthetic: Rows, fc: FilterConfig) -> Clustering:
    k = auto_num_clusters(len(synthetic), fc.num_clusters)
    distributed = use_ray(fc.distributed, len(synthetic), fc.chunk_size)
    return fit_clusters(
        synthetic, k, fc.pca_variance, fc.seed, fc.kmeans_iters, fc.chunk_size, distributed
    )


def cluster_filter(
    synthetic: Rows | np.ndarray,
    real: Rows | np.ndarray,
    units: np.ndarray,
    fc: FilterConfig,
    sigma: float,
    noise_rng: np.random.Generator,
    on_release: Callable[[np.ndarray], object] | None = None,
    clustering: Clustering | None = None,
    saved: np.ndarray | None = None,
) -> FilterOutcome:
    """The seed paper's filter: cluster synthetic, histogram real, noise, resample to shares.

    The real records are assigned here, chunk by chunk, whatever ``filter.distributed`` says:
    their labels and exact votes stay in this process (the stage writes them under private/)."""
    lap = _timer()
    timings = {}
    if clustering is None:
        clustering = _fit(as_rows(synthetic), fc)
        timings.update(clustering.timings)
    lap()
    real_labels = clustering.assign(as_rows(real), fc.chunk_size)
    timings["assign_real"] = lap()
    k = clustering.num_clusters
    exact = histogram.unit_votes(units, real_labels, k, scheme="split")
    noisy = _release(exact, sigma, noise_rng, on_release, saved)
    capacity = np.bincount(clustering.synthetic_labels, minlength=k)
    shares = histogram.to_shares(noisy, fallback=capacity)
    selected, report = resample.resample(
        clustering.synthetic_labels,
        shares,
        fc.target_size,
        np.random.default_rng(fc.seed),
        fc.with_replacement,
    )
    timings["release_and_resample"] = lap()
    return FilterOutcome(selected, clustering, exact, noisy, shares, report.to_dict(), timings)


def nn_vote_filter(
    synthetic: Rows | np.ndarray,
    real: Rows | np.ndarray,
    units: np.ndarray,
    fc: FilterConfig,
    sigma: float,
    noise_rng: np.random.Generator,
    on_release: Callable[[np.ndarray], object] | None = None,
    clustering: Clustering | None = None,
    saved: np.ndarray | None = None,
) -> FilterOutcome:
    """Private-Evolution voting: nearest candidates, L2-scaled votes, noise, threshold, select.

    The clustering is fitted only for the ``cluster`` column and the evaluation metrics."""
    lap = _timer()
    timings = {}
    synthetic_rows = as_rows(synthetic)
    neighbours = nn_vote.nearest_candidates(
        synthetic_rows.read(0, len(synthetic_rows)),
        as_rows(real).read(0, len(real)),
        fc.nn_k,
        fc.seed,
    )
    timings["search"] = lap()
    exact = histogram.unit_votes(units, neighbours, len(synthetic), scheme="l2")
    noisy = _release(exact, sigma, noise_rng, on_release, saved)
    selected, report = nn_vote.select(
        noisy,
        fc.target_size,
        fc.nn_threshold,
        np.random.default_rng(fc.seed),
        fc.nn_select,
        fc.with_replacement,
    )
    timings["release_and_select"] = lap()
    if clustering is None:
        clustering = _fit(synthetic_rows, fc)
        timings.update(clustering.timings)
    return FilterOutcome(selected, clustering, exact, noisy, None, report.to_dict(), timings)


METHODS = {"cluster": cluster_filter, "nn_vote": nn_vote_filter}
