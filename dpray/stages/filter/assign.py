"""Nearest-centre assignment of embedding rows, chunk by chunk, here or on every Ray node.

The model is small and public (PCA mean and matrix, K centres: a few MB, fitted on synthetic
data), so it is what moves: :func:`assign_ray` puts it in the object store once and every task
reads its own range of the candidates' ``.npy`` from the shared run directory, projects it and
returns one int32 label per row.  :func:`assign_local` is the same chunk computation in a loop;
both give the same labels because they cut the same chunks and run the same arithmetic.

Only the *public* synthetic candidates are ever assigned in Ray tasks.  The real records are
assigned on the driver with :func:`assign_local` (see ``core``): their labels and the exact
histogram never enter the object store, so they stay in the driver's memory and ``private/``.

When to use Ray (``filter.distributed``): ``true`` always (on one node too), ``false`` never,
``auto`` only when Ray is already connected (the pipeline connects for ``embed``), the cluster has
at least two alive nodes with CPUs, and the candidates span more than one chunk.  On one node the
chunk loop is as fast (faiss already uses every core) and starts nothing.
"""

from __future__ import annotations

import functools
import logging
import sys
from dataclasses import dataclass

import faiss
import numpy as np

from dpray.stages.filter.rows import NpyRows, Rows, chunk_ranges

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 65536
"""Rows per chunk: 65536 x 384 float32 is 96 MB read at a time."""


@dataclass(frozen=True)
class Assigner:
    """What the assignment needs: ``(x - mean) @ components``, then the nearest centre (L2)."""

    mean: np.ndarray  # (d_in,) float32
    components: np.ndarray  # (d_in, d_out) float32
    centroids: np.ndarray  # (K, d_out) float32

    def project(self, block: np.ndarray) -> np.ndarray:
        """``(block - mean) @ components``, computed as ``block @ components + bias`` by faiss.

        Why faiss' BLAS, not numpy's: faiss runs on OpenMP threads, numpy's OpenBLAS on its own
        pthreads, and alternating the two per chunk makes each pool spin while the other works;
        on 2 cores that made the assignment 1.3-2.8x slower than faiss alone (one pool, as in
        bare faiss).  Why the bias ``-mean @ components`` rather than centring the block: the
        centring was a pass of its own over every 96 MB chunk (read and written back), 3-5 s of
        the assignment at 10M candidates; the bias rides on the product, as in faiss' own
        ``PCAMatrix``.  The rows are unit-norm embeddings, so folding the mean in changes the
        projections by float32 rounding only."""
        d_in, d_out = self.components.shape
        if len(block) == 0:
            return np.zeros((0, d_out), dtype=np.float32)
        transform = faiss.LinearTransform(d_in, d_out, True)
        faiss.copy_array_to_vector(np.ascontiguousarray(self.components.T).ravel(), transform.A)
        faiss.copy_array_to_vector(self.bias, transform.b)
        transform.is_trained = True
        return transform.apply(np.ascontiguousarray(block, dtype=np.float32))

    @property
    def bias(self) -> np.ndarray:
        """``-mean @ components`` (float32, length ``d_out``), computed in float64."""
        return (-(self.mean.astype(np.float64) @ self.components.astype(np.float64))).astype(
            np.float32
        )

    def labels(self, block: np.ndarray) -> np.ndarray:
        """Nearest centre of each row of ``block`` (original space), as int32."""
        return nearest(self.centroids, self.project(block)).astype(np.int32)


def nearest(centroids: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for each point (exact, faiss flat L2)."""
    if len(points) == 0:
        return np.zeros(0, dtype=np.int64)
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, labels = index.search(np.ascontiguousarray(points, dtype=np.float32), 1)
    return labels[:, 0].astype(np.int64)


def assign_local(rows: Rows, model: Assigner, chunk_size: int = DEFAULT_CHUNK) -> np.ndarray:
    """Labels of every row, one chunk in memory at a time (int64, like faiss' own)."""
    out = np.empty(len(rows), dtype=np.int64)
    buffer = np.empty((min(chunk_size, len(rows)), rows.dim), dtype=np.float32)  # reused
    for start, stop in chunk_ranges(len(rows), chunk_size):
        block = rows.read_into(start, buffer[: stop - start])
        out[start:stop] = model.labels(block)
    return out


def _assign_range(source, start: int, stop: int, model: Assigner) -> tuple[np.ndarray, str]:
    """One Ray task: labels of rows ``[start, stop)`` and the node that computed them.

    ``source``: the candidates' ``.npy`` path and shape (opened here, on the task's node), or
    the block itself."""
    import ray

    if isinstance(source, tuple):
        path, shape = source
        try:
            rows = NpyRows(path)
            if rows.shape != shape:
                raise OSError("another file at this path")
            block = rows.read(start, stop)
        except (OSError, ValueError) as exc:
            raise OSError(
                f"filter: {path} is not readable as on the driver on this node ({exc}); "
                "distributed assignment needs the run directory on a shared volume, or set "
                "filter.distributed: false"
            ) from None
    else:
        block = source
    return model.labels(block), ray.get_runtime_context().get_node_id()


@functools.cache
def _remote_assign():
    import ray

    # SPREAD: the point is that every node takes a share of the candidates.
    return ray.remote(num_cpus=1, scheduling_strategy="SPREAD", max_retries=3)(_assign_range)


def assign_ray(
    rows: Rows, model: Assigner, chunk_size: int = DEFAULT_CHUNK
) -> tuple[np.ndarray, dict]:
    """:func:`assign_local` as Ray tasks over chunk ranges; returns labels and a public summary.

    An :class:`NpyRows` travels as its path (each task reads its own range); an in-memory set
    travels chunk by chunk through the object store.  At most twice the cluster's CPUs tasks are
    in flight, so neither the driver nor the object store holds more than that many chunks."""
    import ray

    task = _remote_assign()
    model_ref = ray.put(model)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    in_flight = max(2, 2 * cpus)
    out = np.empty(len(rows), dtype=np.int64)
    pending: dict = {}
    nodes: set[str] = set()

    def collect(count: int) -> None:
        done, _ = ray.wait(list(pending), num_returns=count)
        for ref in done:
            start, stop = pending.pop(ref)
            labels, node = ray.get(ref)
            out[start:stop] = labels
            nodes.add(node)

    ranges = chunk_ranges(len(rows), chunk_size)
    for start, stop in ranges:
        if len(pending) >= in_flight:
            collect(1)
        if isinstance(rows, NpyRows):
            source = (str(rows.path.resolve()), rows.shape)
        else:
            source = ray.put(rows.read(start, stop))
        pending[task.remote(source, start, stop, model_ref)] = (start, stop)
    if pending:
        collect(len(pending))
    return out, {"mode": "ray", "tasks": len(ranges), "nodes": len(nodes)}


def cluster_nodes_with_cpus() -> int:
    """Alive nodes of the connected Ray cluster that have CPUs (a 0-CPU head does not count)."""
    from dpray.resources import alive_nodes

    return sum(1 for node in alive_nodes() if node.cpus > 0)


def use_ray(setting: bool | str, num_rows: int, chunk_size: int) -> bool:
    """Resolve ``filter.distributed`` (see the module docstring)."""
    if setting is False:
        return False
    connected = "ray" in sys.modules and sys.modules["ray"].is_initialized()  # never import it
    if setting is True:
        if not connected:
            raise RuntimeError("filter.distributed: true needs a connected Ray (dpray connects it)")
        return True
    if not connected or num_rows <= chunk_size:
        return False
    return cluster_nodes_with_cpus() >= 2


def assign(
    rows: Rows, model: Assigner, chunk_size: int, distributed: bool
) -> tuple[np.ndarray, dict]:
    """Labels of every row, by :func:`assign_ray` or :func:`assign_local`, plus a summary."""
    if distributed:
        return assign_ray(rows, model, chunk_size)
    labels = assign_local(rows, model, chunk_size)
    return labels, {"mode": "local", "chunks": len(chunk_ranges(len(rows), chunk_size))}
