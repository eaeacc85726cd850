"""What each Ray worker or actor gets, decided from the shapes of the alive nodes.

Why per node: a worker runs on one node, so a request must fit a node, not the cluster's sum.
Cluster totals ÷ workers asks for more CPUs than any node has as soon as there are more nodes
than workers (4 nodes x 4 CPUs, 2 workers: 8 CPUs each), and Ray then waits forever.  A request
that no packing of the alive nodes can hold fails here at once, naming the node shape that is
missing, instead of after a deadline.

Why the device is resolved in the worker: the driver (a RayJob's head pod) often has no GPU while
the workers do.  The driver decides only how many GPUs to *ask* for; ``device: auto`` becomes
``cuda`` inside the worker when Ray gave it a GPU (:func:`local_device`).

:func:`fit_workers` is the one entry point (``dpray plan`` calls it with the stages' requests);
it takes ``nodes`` for tests and for planning against a described cluster.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "NodeShape",
    "ResourceError",
    "WorkerShape",
    "alive_nodes",
    "describe_nodes",
    "fit_workers",
    "local_device",
    "total_slots",
]


class ResourceError(RuntimeError):
    """No packing of the alive Ray nodes holds the requested workers."""


@dataclass(frozen=True)
class NodeShape:
    """One alive node's static resources (what Ray schedules against)."""

    cpus: float
    gpus: float = 0.0
    labels: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    def describe(self) -> str:
        parts = [f"CPU: {_num(self.cpus)}"]
        if self.gpus:
            parts.append(f"GPU: {_num(self.gpus)}")
        return "{" + ", ".join(parts) + "}"


@dataclass(frozen=True)
class WorkerShape:
    """What each of ``workers`` workers asks Ray for."""

    workers: int
    cpus: int
    gpus: float = 0.0

    @property
    def device(self) -> str:
        """The device a worker of this shape will resolve ``auto`` to (see :func:`local_device`)."""
        return "cuda" if self.gpus else "cpu"


def alive_nodes(nodes: Iterable[Mapping] | None = None) -> list[NodeShape]:
    """The alive nodes' shapes, from ``ray.nodes()`` (or ``nodes``, in its format)."""
    if nodes is None:
        import ray

        nodes = ray.nodes()
    shapes = []
    for node in nodes:
        if not node.get("Alive", node.get("alive", False)):
            continue
        res = node.get("Resources", {}) or {}
        shapes.append(
            NodeShape(
                cpus=float(res.get("CPU", 0)),
                gpus=float(res.get("GPU", 0)),
                labels=dict(node.get("Labels", {}) or {}),
            )
        )
    return shapes


def describe_nodes(nodes: Iterable[NodeShape]) -> str:
    """``2 x {CPU: 4}, 1 x {CPU: 0}``: the node shapes, most common first."""
    counts = Counter(node.describe() for node in nodes)
    if not counts:
        return "no alive nodes"
    return ", ".join(f"{n} x {shape}" for shape, n in counts.most_common())


def _slots(node: NodeShape, cpus: float, gpus: float) -> int:
    """How many workers of (cpus, gpus) fit on ``node``."""
    fits = math.inf
    if cpus > 0:
        fits = min(fits, math.floor(node.cpus / cpus + 1e-9))
    if gpus > 0:
        fits = min(fits, math.floor(node.gpus / gpus + 1e-9))
    if fits is math.inf:  # asks for nothing: Ray places it anywhere
        return 1 << 30
    return int(fits)


def total_slots(nodes: Iterable[NodeShape], cpus: float, gpus: float = 0.0) -> int:
    """How many workers of (cpus, gpus) the nodes hold together, each on one node."""
    return sum(_slots(node, cpus, gpus) for node in nodes)


def fit_workers(
    what: str,
    workers: int,
    *,
    gpus: float = 0.0,
    cpus: int | None = None,
    max_cpus: int | None = None,
    nodes: Iterable[Mapping] | Iterable[NodeShape] | None = None,
) -> WorkerShape:
    """The per-worker shape for ``workers`` workers of ``what`` (a stage name, for messages).

    ``cpus=None``: as many CPUs per worker as still lets all workers be placed (at most
    ``max_cpus``), at least 1; ``cpus`` given: exactly that, checked.  ``gpus``: per worker.
    ``nodes``: ``ray.nodes()``-style dicts or :class:`NodeShape` (default: the connected
    cluster's alive nodes).  Raises :class:`ResourceError` when no packing fits.
    """
    if workers < 1:
        raise ValueError(f"{what}: needs at least one worker, not {workers}")
    shapes = _as_shapes(nodes)
    ask = f"{what} asks for {workers} worker{'s' if workers != 1 else ''}"
    where = f"(nodes: {describe_nodes(shapes)})"
    if gpus > 0 and not any(node.gpus >= gpus for node in shapes):
        need = "a GPU" if gpus == 1 else f"{_num(gpus)} GPUs"
        raise ResourceError(
            f"{ask} with {_num(gpus)} GPU{'s' if gpus != 1 else ''} each; no alive Ray node "
            f"has {need} {where}"
        )
    if cpus is not None:
        if not any(node.cpus >= cpus and node.gpus >= gpus for node in shapes):
            raise ResourceError(
                f"{ask} with {_each(cpus, gpus)} each; no alive Ray node has "
                f"{_each(cpus, gpus)} {where}"
            )
        fits = total_slots(shapes, cpus, gpus)
        if fits < workers:
            raise ResourceError(
                f"{ask} with {_each(cpus, gpus)} each; the alive nodes hold {fits} {where}"
            )
        return WorkerShape(workers, int(cpus), gpus)
    biggest = int(max((node.cpus for node in shapes), default=0))
    top = min(biggest, max_cpus) if max_cpus else biggest
    for per in range(max(top, 1), 0, -1):
        if total_slots(shapes, per, gpus) >= workers:
            return WorkerShape(workers, per, gpus)
    fits = total_slots(shapes, 1, gpus)
    raise ResourceError(f"{ask} with {_each(1, gpus)} each; the alive nodes hold {fits} {where}")


def local_device(requested: str | None = "auto") -> str:
    """``auto`` resolved in *this* process: ``cuda`` if Ray gave it a GPU (or, outside a Ray
    worker, if this machine has one), else ``cpu``.  Call it inside the worker/actor."""
    if requested and requested != "auto":
        return requested
    try:
        import torch

        cuda = bool(torch.cuda.is_available())
    except Exception:  # a broken torch install must not stop device selection
        cuda = False
    if _in_ray_worker():
        import ray

        return "cuda" if cuda and ray.get_gpu_ids() else "cpu"
    return "cuda" if cuda else "cpu"


def _in_ray_worker() -> bool:
    try:
        import ray
        from ray._private import worker

        return ray.is_initialized() and worker.global_worker.mode == worker.WORKER_MODE
    except Exception:
        return False


def _as_shapes(nodes) -> list[NodeShape]:
    if nodes is None:
        return alive_nodes()
    nodes = list(nodes)
    if all(isinstance(node, NodeShape) for node in nodes):
        return nodes
    return alive_nodes(nodes)


def _each(cpus: float, gpus: float) -> str:
    text = f"{_num(cpus)} CPU{'s' if cpus != 1 else ''}"
    if gpus:
        text += f" and {_num(gpus)} GPU{'s' if gpus != 1 else ''}"
    return text


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
