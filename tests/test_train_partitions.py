"""Secure DP-SGD on Ray Train: each worker receives only its own partition (issue #14, defect 4).

Two workers, secure noise, 500 real instructions hash-partitioned at ingest.  The driver's plan
(the only thing Ray ships to the workers) must hold no record and no object reference; each
worker records what it loaded (partitions, counts and a digest of the record ids) in
``private/train/received/``: worker r must have loaded exactly partition r, and the partitions
are disjoint.  The ledger event must carry t = W - 1.
"""

from __future__ import annotations

import dataclasses
import json

import pyarrow.parquet as pq
import pytest

from dpray.config import config_from_tree
from dpray.io import partitions as parts
from dpray.pipeline import run_stage
from dpray.rundir import RunDir
from dpray.stages import STAGES
from dpray.stages.train_generator import stage as stage_module
from dpray.stages.train_generator.worker import ids_digest
from tests.test_train_generator import ray_local, real_500, tiny_model  # noqa: F401 (fixtures)
from tests.train_helpers import dp_train_tree

pytestmark = pytest.mark.slow


def _holds_data(value) -> bool:
    """Whether a plan value is (or contains) an object reference or a record-sized payload."""
    import numpy as np
    import ray

    if isinstance(value, ray.ObjectRef | np.ndarray | bytes):
        return True
    if isinstance(value, dict):
        return any(_holds_data(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_holds_data(v) for v in value)
    return False


def test_each_secure_worker_receives_only_its_partition(
    tmp_path,
    ray_local,  # noqa: F811
    tiny_model,  # noqa: F811
    real_500,  # noqa: F811
    monkeypatch,
):
    tree = dp_train_tree(
        tmp_path / "run", real_500, tiny_model, steps=2, num_workers=2, checkpoint_every=2
    )
    config = config_from_tree(tree)
    run_dir = RunDir(config.run_dir)
    run_stage(STAGES["ingest"], config, run_dir)

    plans = []
    real_launch = stage_module._launch

    def spy(plan, *args, **kwargs):
        plans.append(dataclasses.asdict(plan))  # the typed TrainPlan every worker receives
        return real_launch(plan, *args, **kwargs)

    monkeypatch.setattr(stage_module, "_launch", spy)
    result = run_stage(STAGES["train-generator"], config, run_dir)
    assert result.summary["noise"] == "secure" and result.summary["executed_steps"] == 2

    (plan,) = plans
    assert "data_ref" not in plan
    bad = sorted(key for key, value in plan.items() if _holds_data(value))
    assert not bad, f"the plan ships data to every worker: {bad}"
    assert len(json.dumps(plan)) < 4000  # paths, counts and settings only

    directory = run_dir.private("ingest") / parts.DIRNAME
    ids = [
        pq.read_table(parts.partition_path(directory, k)).column("id").to_pylist() for k in range(2)
    ]
    assert ids[0] and ids[1] and not set(ids[0]) & set(ids[1])  # disjoint, both non-empty
    everything = pq.read_table(run_dir.private("ingest") / "instructions.parquet")
    assert sorted(ids[0] + ids[1]) == sorted(everything.column("id").to_pylist())

    received = run_dir.private("train") / "received"
    for rank in range(2):
        got = json.loads((received / f"rank-{rank}.json").read_text())
        assert got["partitions"] == [rank]
        assert got["records"] == got["units"] == len(ids[rank])
        assert got["ids_sha256"] == ids_digest(ids[rank])  # exactly its own records
        assert got["ids_sha256"] != ids_digest(ids[1 - rank])

    (event,) = json.loads(run_dir.ledger_path.read_text())["events"]
    assert event["mechanism"] == "poisson_subsampled_skellam"
    assert event["min_honest_workers"] == 1  # W - 1: one curious worker tolerated
