"""PCA + faiss k-means fitted on the synthetic embeddings, and nearest-centroid assignment.

Fitting on the synthetic set only is what keeps this free: the synthetic instructions are DP
output, so any function of them is post-processing.  The real (private) embeddings are only
*assigned* to the fitted centroids; the resulting histogram is what the DP release protects.

Out of core (10M candidates do not fit in memory, issue 17): the candidates are read as
:mod:`~dpray.stages.filter.rows` chunks, never whole.  The PCA covariance is estimated on a
random subsample (1000 points per dimension, what faiss' PCAMatrix uses), and k-means trains on
exactly the subsample faiss would draw itself (``rand_perm(n, seed)``'s first 256 points per
centroid), gathered from disk and projected -- so the centres, and hence the labels and the
filtered set, are the same as fitting on the whole projected array.  Then every candidate is
assigned chunk by chunk (:mod:`~dpray.stages.filter.assign`, on every Ray node if asked); only
the int64 label array (8 bytes per candidate) is held whole.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import faiss
import numpy as np

from dpray.stages.filter.assign import DEFAULT_CHUNK, Assigner, assign, assign_local
from dpray.stages.filter.rows import Rows, as_rows, iter_chunks, take_in_chunks

log = logging.getLogger(__name__)

MAX_CLUSTERS = 1000
"""K at scale (the seed paper's choice)."""
MIN_PER_CLUSTER = 50
"""Automatic K keeps about this many synthetic candidates per cluster, so that every cluster can
feed the resampler without running dry at once."""
PCA_MAX_POINTS_PER_DIM = 1000
"""Covariance subsample: 1000 points per input dimension (what faiss' PCAMatrix uses)."""
CHUNK = DEFAULT_CHUNK


def auto_num_clusters(num_synthetic: int, configured: int | None = None) -> int:
    """K: the configured value, else ``min(1000, n_synthetic // 50)`` (at least 2).

    Deliberately a function of the (public) synthetic count only: a K chosen from the number of
    real records would be a non-DP release of it.  With few real records per cluster the noise
    dominates each bin; set ``filter.num_clusters`` lower in that case.
    """
    if configured is not None:
        k = configured
    else:
        k = min(MAX_CLUSTERS, num_synthetic // MIN_PER_CLUSTER)
    return int(max(2, min(k, num_synthetic)))


@dataclass
class PCA:
    """A linear projection ``(x - mean) @ components`` keeping a share of the variance."""

    mean: np.ndarray
    components: np.ndarray  # (d_in, d_out)
    explained: float

    @property
    def dim(self) -> int:
        return int(self.components.shape[1])

    def assigner(self, centroids: np.ndarray) -> Assigner:
        """The projection plus ``centroids``: the small model the assignment broadcasts."""
        return Assigner(
            mean=self.mean.astype(np.float32),
            components=np.ascontiguousarray(self.components, dtype=np.float32),
            centroids=np.ascontiguousarray(centroids, dtype=np.float32),
        )

    def project(self, block: np.ndarray) -> np.ndarray:
        """``(block - mean) @ components`` by numpy, in float32: how the k-means training points
        have always been projected (k-means amplifies last-bit differences, so keeping this
        arithmetic keeps the centres, and the filtered sets, of earlier versions)."""
        mean = self.mean.astype(np.float32)
        comps = self.components.astype(np.float32)
        return np.matmul(np.asarray(block, dtype=np.float32) - mean, comps)

    def apply(self, x: Rows | np.ndarray) -> np.ndarray:
        """Project every row (float32, chunk by chunk: no float64 copy of the input)."""
        rows = as_rows(x)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        for start, block in iter_chunks(rows, CHUNK):
            out[start : start + len(block)] = self.project(block)
        return out


def fit_pca(x: Rows | np.ndarray, variance: float, rng: np.random.Generator) -> PCA:
    """Smallest PCA keeping ``variance`` of the (subsampled) covariance's total variance.

    The subsample (at most 1000 x d rows, whatever n: 590 MB at d = 384) is read once, chunk
    by chunk; mean and covariance are then accumulated in float64 over its float32 chunks, so no
    centred copy of it is ever made.
    """
    x = as_rows(x)
    n, d = len(x), x.dim
    limit = PCA_MAX_POINTS_PER_DIM * d
    rows = np.arange(n) if n <= limit else np.sort(rng.choice(n, size=limit, replace=False))
    sample = np.empty((len(rows), d), dtype=np.float32)
    for start, block in zip(
        range(0, len(rows), CHUNK), take_in_chunks(x, rows, CHUNK), strict=True
    ):
        sample[start : start + len(block)] = block
    total_sum = np.zeros(d)
    for start in range(0, len(sample), CHUNK):
        total_sum += sample[start : start + CHUNK].sum(axis=0, dtype=np.float64)
    mean = total_sum / len(rows)
    mean32 = mean.astype(np.float32)
    cov = np.zeros((d, d))
    for start in range(0, len(sample), CHUNK):
        centred = sample[start : start + CHUNK] - mean32
        cov += centred.T @ centred
    del sample
    cov /= max(1, len(rows) - 1)
    eigvals, eigvecs = np.linalg.eigh(cov)
    order = np.argsort(eigvals)[::-1]
    eigvals = np.clip(eigvals[order], 0.0, None)
    eigvecs = eigvecs[:, order]
    total = eigvals.sum()
    if total <= 0:  # all points identical: keep one axis
        keep = 1
    else:
        cumulative = np.cumsum(eigvals) / total
        keep = int(np.searchsorted(cumulative, variance - 1e-12) + 1)
    keep = max(1, min(keep, d))
    explained = float(eigvals[:keep].sum() / total) if total > 0 else 1.0
    return PCA(mean=mean, components=eigvecs[:, :keep], explained=explained)


@dataclass
class Clustering:
    """Fitted PCA and centroids, plus every synthetic candidate's cluster."""

    pca: PCA
    centroids: np.ndarray  # (K, d_pca) float32
    synthetic_labels: np.ndarray  # (n_synthetic,) int64
    timings: dict[str, float] = field(default_factory=dict)
    assignment: dict = field(default_factory=dict)  # how the candidates were assigned (public)

    @property
    def num_clusters(self) -> int:
        return int(len(self.centroids))

    def assign(self, x: Rows | np.ndarray, chunk_size: int = CHUNK) -> np.ndarray:
        """Nearest centroid (L2, in PCA space) of each row of ``x`` (original space), chunk by
        chunk in this process (the real records' path: nothing leaves the driver)."""
        return assign_local(as_rows(x), self.pca.assigner(self.centroids), chunk_size)


def kmeans_sample(n: int, k: int, seed: int) -> np.ndarray | None:
    """The rows faiss k-means trains on, in its order: ``None`` (all rows) when ``n`` is at most
    ``k x max_points_per_centroid``, else the first ``k x 256`` of faiss' ``rand_perm(n, seed)``
    -- exactly what ``faiss.Clustering`` would subsample, drawn without holding the points."""
    limit = k * faiss.ClusteringParameters().max_points_per_centroid
    if n <= limit:
        return None
    perm = np.empty(n, dtype=np.int32)  # faiss' rand_perm fills C ints
    faiss.rand_perm(faiss.swig_ptr(perm), n, seed)
    return perm[:limit].astype(np.int64)


def _training_points(synthetic: Rows, pca: PCA, sample: np.ndarray | None) -> np.ndarray:
    """The projected k-means training set (rows in ``sample``'s order), read chunk by chunk."""
    if sample is None:
        return pca.apply(synthetic)
    ordered = np.sort(sample)
    projected = np.empty((len(ordered), pca.dim), dtype=np.float32)
    done = 0
    for block in take_in_chunks(synthetic, ordered, CHUNK):
        projected[done : done + len(block)] = pca.project(block)
        done += len(block)
    return projected[np.searchsorted(ordered, sample)]


def fit_clusters(
    synthetic: Rows | np.ndarray,
    num_clusters: int,
    variance: float,
    seed: int,
    niter: int = 20,
    chunk_size: int = CHUNK,
    distributed: bool = False,
) -> Clustering:
    """PCA then faiss k-means on the synthetic embeddings (public); label every candidate.

    ``distributed``: assign the candidates in Ray tasks (see ``assign``); same labels."""
    synthetic = as_rows(synthetic)
    timings: dict[str, float] = {}
    lap = time.perf_counter()

    def tick(name: str) -> None:
        nonlocal lap
        now = time.perf_counter()
        timings[name], lap = round(now - lap, 4), now

    rng = np.random.default_rng(seed)
    pca = fit_pca(synthetic, variance, rng)
    tick("pca_fit")
    k = int(min(num_clusters, len(synthetic)))
    faiss_seed = seed % (2**31)
    points = _training_points(synthetic, pca, kmeans_sample(len(synthetic), k, faiss_seed))
    tick("pca_apply")
    kmeans = faiss.Kmeans(points.shape[1], k, niter=niter, seed=faiss_seed, verbose=False)
    kmeans.train(points)
    del points
    tick("kmeans")
    centroids = kmeans.centroids.copy()
    labels, how = assign(synthetic, pca.assigner(centroids), chunk_size, distributed)
    tick("assign_synthetic")
    log.info(
        "filter: PCA %d -> %d dims (%.1f%% variance), k-means K=%d on %d candidates (%s)",
        synthetic.dim,
        pca.dim,
        100 * pca.explained,
        k,
        len(synthetic),
        how["mode"],
    )
    return Clustering(
        pca=pca, centroids=centroids, synthetic_labels=labels, timings=timings, assignment=how
    )


def cluster_counts(labels: np.ndarray, num_clusters: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_clusters)
