"""PCA + faiss k-means fitted on the synthetic embeddings, and nearest-centroid assignment.

Fitting on the synthetic set only is what keeps this free: the synthetic instructions are DP
output, so any function of them is post-processing.  The real (private) embeddings are only
*assigned* to the fitted centroids; the resulting histogram is what the DP release protects.

Speed at scale (1M candidates, K=1000): the PCA covariance is estimated on a random subsample
(faiss' own PCA trains on at most 1000 points per dimension, too), the projection is one matrix
product in chunks, and faiss k-means trains on its default subsample of 256 points per centroid.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import faiss
import numpy as np

log = logging.getLogger(__name__)

MAX_CLUSTERS = 1000
"""K at scale (the seed paper's choice)."""
MIN_PER_CLUSTER = 50
"""Automatic K keeps about this many synthetic candidates per cluster, so that every cluster can
feed the resampler without running dry at once."""
PCA_MAX_POINTS_PER_DIM = 1000
"""Covariance subsample: 1000 points per input dimension (what faiss' PCAMatrix uses)."""
CHUNK = 65536


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

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Project in chunks (float32), so a 1M x 384 input never needs a float64 copy."""
        out = np.empty((len(x), self.dim), dtype=np.float32)
        mean = self.mean.astype(np.float32)
        comps = self.components.astype(np.float32)
        for start in range(0, len(x), CHUNK):
            block = np.asarray(x[start : start + CHUNK], dtype=np.float32)
            np.matmul(block - mean, comps, out=out[start : start + CHUNK])
        return out


def fit_pca(x: np.ndarray, variance: float, rng: np.random.Generator) -> PCA:
    """Smallest PCA keeping ``variance`` of the (subsampled) covariance's total variance.

    The covariance is accumulated in float64 over float32 chunks of the subsample, so a 1M x 384
    input (memory-mapped or not) never needs a full centred copy.
    """
    n, d = x.shape
    limit = PCA_MAX_POINTS_PER_DIM * d
    rows = np.arange(n) if n <= limit else np.sort(rng.choice(n, size=limit, replace=False))
    chunks = [rows[i : i + CHUNK] for i in range(0, len(rows), CHUNK)]
    total_sum = np.zeros(d)
    for chunk in chunks:
        total_sum += np.asarray(x[chunk], dtype=np.float32).sum(axis=0, dtype=np.float64)
    mean = total_sum / len(rows)
    mean32 = mean.astype(np.float32)
    cov = np.zeros((d, d))
    for chunk in chunks:
        centred = np.asarray(x[chunk], dtype=np.float32) - mean32
        cov += centred.T @ centred
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

    @property
    def num_clusters(self) -> int:
        return int(len(self.centroids))

    def assign(self, x: np.ndarray) -> np.ndarray:
        """Nearest centroid (L2, in PCA space) of each row of ``x`` (original space)."""
        return nearest(self.centroids, self.pca.apply(x))


def nearest(centroids: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for each point (exact, faiss flat L2)."""
    if len(points) == 0:
        return np.zeros(0, dtype=np.int64)
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, labels = index.search(np.ascontiguousarray(points, dtype=np.float32), 1)
    return labels[:, 0].astype(np.int64)


def fit_clusters(
    synthetic: np.ndarray, num_clusters: int, variance: float, seed: int, niter: int = 20
) -> Clustering:
    """PCA then faiss k-means on the synthetic embeddings (public); label every candidate."""
    timings: dict[str, float] = {}
    lap = time.perf_counter()

    def tick(name: str) -> None:
        nonlocal lap
        now = time.perf_counter()
        timings[name], lap = round(now - lap, 4), now

    rng = np.random.default_rng(seed)
    pca = fit_pca(synthetic, variance, rng)
    tick("pca_fit")
    projected = pca.apply(synthetic)
    tick("pca_apply")
    k = int(min(num_clusters, len(projected)))
    kmeans = faiss.Kmeans(projected.shape[1], k, niter=niter, seed=seed % (2**31), verbose=False)
    kmeans.train(projected)
    tick("kmeans")
    _, labels = kmeans.index.search(projected, 1)
    tick("assign_synthetic")
    log.info(
        "filter: PCA %d -> %d dims (%.1f%% variance), k-means K=%d on %d candidates",
        synthetic.shape[1],
        pca.dim,
        100 * pca.explained,
        k,
        len(projected),
    )
    return Clustering(
        pca=pca,
        centroids=kmeans.centroids.copy(),
        synthetic_labels=labels[:, 0],
        timings=timings,
    )


def cluster_counts(labels: np.ndarray, num_clusters: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_clusters)
