"""Completion markers: completed stages are skipped, changed config or inputs rerun them."""

from __future__ import annotations

import json

from dpray.config import config_from_tree
from dpray.pipeline import is_done, run_pipeline, run_stage
from dpray.rundir import RunDir
from dpray.stages import STAGES
from tests.conftest import base_tree


def _data(path, n=10):
    path.write_text("".join(json.dumps({"id": str(i), "text": f"q {i}"}) + "\n" for i in range(n)))


def test_skip_when_unchanged_rerun_when_changed(tmp_path):
    data = tmp_path / "d.jsonl"
    _data(data)
    config = config_from_tree(base_tree(tmp_path / "run", data))
    run_dir = RunDir(config.run_dir)
    stage = STAGES["ingest"]
    assert run_stage(stage, config, run_dir) is not None
    assert is_done(stage, config, run_dir)
    assert run_stage(stage, config, run_dir) is None  # skipped
    # an unrelated section does not invalidate ingest
    other = config_from_tree(base_tree(tmp_path / "run", data), ["train.lora_r=4"])
    assert run_stage(stage, other, run_dir) is None
    # its own section does
    changed = config_from_tree(base_tree(tmp_path / "run", data), ["data.max_chars=3"])
    assert not is_done(stage, changed, run_dir)
    # so does a change of the input file
    _data(data, n=12)
    assert not is_done(stage, config, run_dir)
    result = run_stage(stage, config, run_dir)
    assert result.summary["rows_out"] == 12
    # force reruns anyway
    assert run_stage(stage, config, run_dir, force=True) is not None


def test_missing_output_means_not_done(tmp_path):
    data = tmp_path / "d.jsonl"
    _data(data)
    config = config_from_tree(base_tree(tmp_path / "run", data))
    run_dir = RunDir(config.run_dir)
    run_pipeline(config, run_dir, stages=["ingest"])
    (run_dir.private("ingest") / "instructions.parquet").unlink()
    assert not is_done(STAGES["ingest"], config, run_dir)
    run_pipeline(config, run_dir, stages=["ingest"])
    assert (run_dir.private("ingest") / "instructions.parquet").exists()


def test_markers_are_private_and_timings_public(tmp_path):
    data = tmp_path / "d.jsonl"
    _data(data)
    config = config_from_tree(base_tree(tmp_path / "run", data))
    run_dir = RunDir(config.run_dir)
    run_pipeline(config, run_dir, stages=["ingest"])
    assert run_dir.is_private(run_dir.marker("ingest"))
    timings = json.loads((run_dir.root / "timings" / "stages.json").read_text())
    assert "ingest" in timings
