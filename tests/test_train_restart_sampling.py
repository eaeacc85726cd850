"""A step redone after a worker failure samples a fresh Poisson batch (issue #14, defect 1).

The ledger counts every executed step as its own Poisson-subsampled release, which is only true
if a redone step's batch is drawn independently of the lost attempt's.  Rank 0 records a digest
of the units it sampled in the PRIVATE metrics file; the step that is run twice must show two
different batches.
"""

from __future__ import annotations

import json

import pytest

from dpray.config import config_from_tree
from dpray.pipeline import run_stage
from dpray.rundir import RunDir
from dpray.stages import STAGES
from tests.test_train_generator import ray_local, real_500, tiny_model  # noqa: F401 (fixtures)
from tests.train_helpers import dp_train_tree

pytestmark = pytest.mark.slow


def test_redone_step_samples_a_fresh_batch(tmp_path, ray_local, tiny_model, real_500):  # noqa: F811
    tree = dp_train_tree(
        tmp_path / "run",
        real_500,
        tiny_model,
        steps=2,
        num_workers=2,
        checkpoint_every=2,
        max_failures=1,
        fail_at_step=1,
    )
    config = config_from_tree(tree)
    run_dir = RunDir(config.run_dir)
    run_stage(STAGES["ingest"], config, run_dir)
    result = run_stage(STAGES["train-generator"], config, run_dir)
    # step 0 was released, the fault hit step 1 before any checkpoint, and the restart began
    # again at step 0: step 0 was released twice (metrics "step": 1 appears twice).
    private = [json.loads(x) for x in (run_dir.private("train") / "metrics.jsonl").open()]
    assert all("batch_digest_rank0" in m for m in private)
    public = [json.loads(x) for x in (run_dir.root / "generator/metrics.jsonl").open()]
    assert not any("batch" in key for m in public for key in m)  # the batch stays private
    assert [m["step"] for m in private] == [1, 1, 2]
    assert result.summary["executed_steps"] == 3  # both releases of step 0 are in the ledger
    first, redone = private[0]["batch_digest_rank0"], private[1]["batch_digest_rank0"]
    # ~16 of rank 0's ~250 units join each step: two independent batches coincide with
    # probability below 1e-12; the same randomness gives the same batch every time
    assert first != redone, "the redone step reused the lost attempt's Poisson batch"
