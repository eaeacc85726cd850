"""train-generator reruns (issue #14, defect 2), one run directory throughout: an interrupted run
resumes from its own Ray Train checkpoints under the same run id, and the ledger counts its steps in one event; a finished run's
adapter is reused -- in a moved run directory, on ``--force``, even when the adapter folder is
gone -- and only ``spend_again`` trains anew, as a second event composed with the first."""

from __future__ import annotations

import json
import shutil

import pytest

from dpray.config import config_from_tree
from dpray.pipeline import run_stage
from dpray.privacy.ledger import Ledger
from dpray.rundir import RunDir, file_digest, read_json
from dpray.stages import STAGES
from tests.test_train_generator import ray_local, real_500, tiny_model  # noqa: F401 (fixtures)
from tests.train_helpers import dp_train_tree

pytestmark = pytest.mark.slow


def _tree(run, data, model) -> dict:
    return dp_train_tree(
        run,
        data,
        model,
        epsilon=8.0,
        learning_rate=5e-3,
        noise_multiplier=2.0,
        steps=5,
        num_workers=1,
        checkpoint_every=2,
        max_failures=0,  # the injected fault ends the run: an interruption
        fail_at_step=3,
    )


def _train_events(run_dir: RunDir) -> list:
    return [e for e in Ledger.load(run_dir.ledger_path).events if e.stage == "train-generator"]


def _ray_runs(run_dir: RunDir) -> list[str]:
    return sorted(p.name for p in (run_dir.private("train") / "ray_results").glob("train-*"))


def test_interrupted_run_resumes_a_finished_one_is_reused_and_spend_again_adds_a_run(
    tmp_path,
    ray_local,  # noqa: F811
    tiny_model,  # noqa: F811
    real_500,  # noqa: F811
):
    config = config_from_tree(_tree(tmp_path / "run", real_500, tiny_model))
    run_dir = RunDir(config.run_dir)
    stage = STAGES["train-generator"]
    run_stage(STAGES["ingest"], config, run_dir)

    # steps 0, 1 (checkpoint at 2), 2 ran; the fault hit step 3 and ended the run
    with pytest.raises(Exception, match="injected fault"):
        run_stage(stage, config, run_dir)
    record = read_json(run_dir.private("train") / "run.json")
    assert record["state"] == "training"
    (interrupted,) = _train_events(run_dir)
    assert interrupted.run_id == record["run_id"] and interrupted.steps == 3
    assert not (run_dir.root / "generator" / "adapter").exists()
    assert list((run_dir.private("train") / "ray_results").rglob("checkpoint_*"))

    # the rerun resumes that run from its step-2 checkpoint: steps 2, 3, 4 again
    result = run_stage(stage, config, run_dir)
    (event,) = _train_events(run_dir)  # one event: the same run, its steps counted once
    assert event.run_id == record["run_id"]
    assert event.steps == 6 == result.summary["executed_steps"]  # 3 before + 3 redone/new
    assert _ray_runs(run_dir) == [f"train-{record['run_id']}"]
    metrics = [json.loads(x)["step"] for x in (run_dir.root / "generator/metrics.jsonl").open()]
    assert metrics == [1, 2, 3, 3, 4, 5]
    adapter = run_dir.root / "generator" / "adapter"
    digest = file_digest(adapter)
    ledger_text = run_dir.ledger_path.read_text()

    # moved run directory: still done; --force reuses the adapter without training
    target = tmp_path / "moved"
    shutil.move(str(run_dir.root), str(target))
    moved_config = config_from_tree(_tree(target, real_500, tiny_model))
    moved = RunDir(moved_config.run_dir)
    assert run_stage(stage, moved_config, moved) is None
    result = run_stage(stage, moved_config, moved, force=True)
    assert result.summary["reused_release"] is True
    assert moved.ledger_path.read_text() == ledger_text  # nothing spent, nothing rewritten
    assert file_digest(target / "generator" / "adapter") == digest
    # the adapter folder lost: re-saved from the run's final checkpoint, still no training
    shutil.rmtree(target / "generator" / "adapter")
    result = run_stage(stage, moved_config, moved, force=True)
    assert result.summary["reused_release"] is True
    assert file_digest(target / "generator" / "adapter") == digest
    assert moved.ledger_path.read_text() == ledger_text
    assert _ray_runs(moved) == [f"train-{record['run_id']}"]

    # only spend_again trains anew: a second run, a second event composed with the first
    (first,) = _train_events(moved)
    again = config_from_tree(
        _tree(target, real_500, tiny_model), ["train.fail_at_step=null", "train.steps=2"]
    )
    result = run_stage(stage, again, moved, spend_again=True)
    events = _train_events(moved)
    assert len(events) == 2 and events[0] == first and events[1].run_id != first.run_id
    assert result.summary["executed_steps"] == 2 == events[1].steps
    assert len(_ray_runs(moved)) == 2
