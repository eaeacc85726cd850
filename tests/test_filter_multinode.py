"""The filter's candidate assignment on a two-node local Ray cluster == the single-process path.

`cluster/local.sh up --workers 2` starts a head with 0 CPUs and two 1-CPU worker nodes (as
``test_multinode`` does, without the dashboard).  A driver process joins it and runs
``core.cluster_filter`` on small candidate and real ``.npy`` files with the same seed and
noise generator: ``filter.distributed: true`` (Ray tasks over chunk ranges, SPREAD over the
nodes, each reading its range from the shared files), ``false`` (the chunk loop in the driver),
``auto`` (which must pick Ray here: two nodes with CPUs), and ``true`` on the candidates in
memory (chunks shipped through the object store).  The filtered sets, labels and
votes must be identical, and the tasks must have run on both nodes.  `local.sh down` runs in a
finally and must leave no process of the sessions it started.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.test_filter import REAL_WEIGHTS, SYNTH_WEIGHTS, K, mixture
from tests.two_nodes import run_driver_on_two_nodes

CHUNK = 250  # 3000 candidates: 12 tasks

pytestmark = pytest.mark.slow  # three Ray nodes start and stop: more than 10 s


def driver(data_dir: str, out_path: str) -> None:
    """Run in a subprocess joined to the cluster (``RAY_ADDRESS``): the three runs, to JSON."""
    import ray

    from dpray.config import FilterConfig
    from dpray.stages.filter import core
    from dpray.stages.filter.rows import NpyRows

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    synthetic = NpyRows(Path(data_dir) / "synthetic.npy")
    real = NpyRows(Path(data_dir) / "real.npy")
    units = np.arange(len(real))
    runs = {}
    in_memory = np.load(Path(data_dir) / "synthetic.npy")  # chunks through the object store
    for name, setting, candidates in (
        ("ray", True, synthetic),
        ("local", False, synthetic),
        ("auto", "auto", synthetic),
        ("ray_in_memory", True, in_memory),
    ):
        fc = FilterConfig(
            num_clusters=K, target_size=400, sigma=3.0, chunk_size=CHUNK, distributed=setting
        )
        out = core.cluster_filter(candidates, real, units, fc, 3.0, np.random.default_rng(11))
        runs[name] = {
            "selected": out.selected.tolist(),
            "labels": out.clustering.synthetic_labels.tolist(),
            "exact": out.exact.tolist(),
            "assignment": out.clustering.assignment,
        }
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    runs["worker_nodes"] = len(nodes)
    Path(out_path).write_text(json.dumps(runs))
    ray.shutdown()


def test_distributed_assignment_on_two_nodes_equals_the_local_path(tmp_path):
    synthetic, _ = mixture(3000, SYNTH_WEIGHTS, seed=31)
    real, _ = mixture(600, REAL_WEIGHTS, seed=32)
    np.save(tmp_path / "synthetic.npy", synthetic)
    np.save(tmp_path / "real.npy", real)
    out = tmp_path / "runs.json"
    run_driver_on_two_nodes(
        tmp_path,
        f"from tests.test_filter_multinode import driver; driver({str(tmp_path)!r}, {str(out)!r})",
    )

    runs = json.loads(out.read_text())
    assert runs["worker_nodes"] == 2
    local_run = runs["local"]
    assert local_run["assignment"] == {"mode": "local", "chunks": 12}
    assert runs["ray"]["assignment"] == {"mode": "ray", "tasks": 12, "nodes": 2}
    assert runs["ray_in_memory"]["assignment"] == {"mode": "ray", "tasks": 12, "nodes": 2}
    assert runs["auto"]["assignment"]["mode"] == "ray"  # auto: two nodes with CPUs, 12 chunks
    for other in (runs["ray"], runs["auto"], runs["ray_in_memory"]):
        assert other["labels"] == local_run["labels"]
        assert other["exact"] == local_run["exact"]
        assert other["selected"] == local_run["selected"]
    assert len(set(local_run["selected"])) == 400
