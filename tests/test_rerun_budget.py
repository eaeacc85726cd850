"""Reruns never spend the budget again without saying so (issue #14, defect 2).

Completion markers name their files relative to the run directory and record the content of the
outputs; a DP stage rerun (``--force``, after an interruption, in a moved run directory) reuses
its saved release, and only ``--spend-again`` draws a new one, which the ledger composes with the
first.  No model and no Ray here: the filter on synthetic embedding arrays, ingest, and one
Private Evolution vote; the train-generator's resume is in ``test_train_resume.py`` (slow).
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import yaml

from dpray.cli import main
from dpray.config import config_from_tree
from dpray.pipeline import is_done, run_stage
from dpray.privacy.ledger import BudgetExceededError, Ledger
from dpray.privacy.releases import spending_again
from dpray.rundir import RunDir, read_json
from dpray.stages import STAGES
from tests.conftest import base_tree
from tests.test_filter import _stage_run_dir


def _filter_events(run_dir: RunDir) -> list:
    return [e for e in Ledger.load(run_dir.ledger_path).events if e.stage == "filter"]


def _noisy(run_dir: RunDir) -> list[float]:
    return read_json(run_dir.root / "filter" / "noisy_histogram.json")["values"]


def _tree(run_dir: RunDir, config) -> dict:
    """The config tree of :func:`tests.test_filter._stage_run_dir` (for a config file)."""
    return {
        "run_dir": str(run_dir.root),
        "data": {"path": "demo://", "user_field": "user"},
        "privacy": {"epsilon": 4.0, "delta": 1e-5, "unit": config.privacy.unit},
        "filter": {
            "num_clusters": config.filter.num_clusters,
            "target_size": config.filter.target_size,
            "mauve": False,
            "sigma": config.filter.sigma,
            "metrics": False,
        },
    }


# --------------------------------------------------------------------------------- markers


def _ingested(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": str(i), "text": f"q {i}"}) + "\n" for i in range(10)))
    config = config_from_tree(base_tree(tmp_path / "run", data))
    run_dir = RunDir(config.run_dir)
    assert run_stage(STAGES["ingest"], config, run_dir) is not None
    return config, run_dir, data


def test_markers_name_outputs_relative_to_the_run_dir_with_their_content(tmp_path):
    config, run_dir, _ = _ingested(tmp_path)
    marker = read_json(run_dir.marker("ingest"))
    assert str(run_dir.root) not in json.dumps(marker)  # nothing absolute under the run dir
    output = marker["outputs"]["instructions"]
    assert output["path"] == "private/ingest/instructions.parquet"
    assert len(output["sha256"]) == 64


def test_changed_output_content_means_not_done(tmp_path):
    config, run_dir, _ = _ingested(tmp_path)
    assert is_done(STAGES["ingest"], config, run_dir)
    path = run_dir.private("ingest") / "instructions.parquet"
    path.write_bytes(path.read_bytes() + b"\0")  # still there, other content
    assert not is_done(STAGES["ingest"], config, run_dir)
    assert run_stage(STAGES["ingest"], config, run_dir) is not None
    assert is_done(STAGES["ingest"], config, run_dir)


def test_moved_run_dir_is_still_done(tmp_path):
    config, run_dir, data = _ingested(tmp_path)
    shutil.move(str(run_dir.root), str(tmp_path / "renamed"))
    moved_config = config_from_tree(base_tree(tmp_path / "renamed", data))
    moved = RunDir(moved_config.run_dir)
    assert is_done(STAGES["ingest"], moved_config, moved)
    assert run_stage(STAGES["ingest"], moved_config, moved) is None  # skipped


# ---------------------------------------------------------------------------------- filter


def test_force_on_the_filter_reuses_its_release_and_spend_again_composes(tmp_path, caplog):
    config, run_dir = _stage_run_dir(tmp_path, sigma=5.0, metrics=False)
    stage = STAGES["filter"]
    run_stage(stage, config, run_dir)
    (first,) = _filter_events(run_dir)
    noisy = _noisy(run_dir)
    spent = Ledger.load(run_dir.ledger_path).spent_epsilon

    # the CLI's logging setup (an earlier test may have run main()) stops "dpray" propagating
    # to the root logger, where caplog listens: then listen on "dpray" itself (only then: with
    # propagation on, the handler on both loggers would see every record twice)
    dpray_log = logging.getLogger("dpray")
    listen_here = not dpray_log.propagate
    if listen_here:
        dpray_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="dpray"):
            result = run_stage(stage, config, run_dir, force=True)
    finally:
        if listen_here:
            dpray_log.removeHandler(caplog.handler)
    assert _filter_events(run_dir) == [first]  # nothing new on the ledger
    assert _noisy(run_dir) == noisy  # the outputs come from the saved release
    assert result.summary["release"] == "reused"
    reuse = [r.getMessage() for r in caplog.records if "reusing the saved DP release" in r.message]
    assert len(reuse) == 1 and "--spend-again" in reuse[0]

    result = run_stage(stage, config, run_dir, spend_again=True)
    events = _filter_events(run_dir)
    assert len(events) == 2 and events[0] == first  # composed next to the first, not in place
    assert events[1].run_id != first.run_id
    assert result.summary["release"] == "new"
    assert _noisy(run_dir) != noisy
    assert Ledger.load(run_dir.ledger_path).spent_epsilon > spent


def test_cli_force_reuses_and_spend_again_spends(tmp_path, capsys):
    config, run_dir = _stage_run_dir(tmp_path, sigma=5.0, metrics=False)
    path = tmp_path / "filter.yaml"
    path.write_text(yaml.safe_dump(_tree(run_dir, config)))
    assert main(["filter", str(path)]) == 0
    assert len(_filter_events(run_dir)) == 1
    assert main(["filter", str(path)]) == 0
    assert "already done" in capsys.readouterr().out
    assert main(["filter", str(path), "--force"]) == 0
    assert len(_filter_events(run_dir)) == 1
    assert main(["filter", str(path), "--spend-again"]) == 0
    assert len(_filter_events(run_dir)) == 2
    assert main(["run", str(path), "--stages", "filter", "--force"]) == 0
    assert len(_filter_events(run_dir)) == 2


def test_interrupted_filter_reruns_from_its_saved_release(tmp_path, monkeypatch):
    from dpray.stages.filter import stage as filter_stage

    config, run_dir = _stage_run_dir(tmp_path, sigma=5.0, metrics=False)
    real_write = filter_stage._write_filtered

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("interrupted after the release")

    monkeypatch.setattr(filter_stage, "_write_filtered", crash)
    with pytest.raises(KeyboardInterrupt):
        run_stage(STAGES["filter"], config, run_dir)
    assert len(_filter_events(run_dir)) == 1  # released and spent ...
    assert not (run_dir.root / "filter" / "filtered.parquet").exists()  # ... outputs not written
    assert not is_done(STAGES["filter"], config, run_dir)

    monkeypatch.setattr(filter_stage, "_write_filtered", real_write)
    result = run_stage(STAGES["filter"], config, run_dir)
    assert len(_filter_events(run_dir)) == 1  # no second spend
    assert result.summary["release"] == "reused"
    saved = np.load(run_dir.private("filter") / "release_noisy.npy")
    assert _noisy(run_dir) == saved.tolist()
    assert (run_dir.root / "filter" / "filtered.parquet").exists()
    assert is_done(STAGES["filter"], config, run_dir)


def test_moved_run_dir_keeps_the_filter_done_and_force_reuses(tmp_path):
    config, run_dir = _stage_run_dir(tmp_path, sigma=5.0, metrics=False)
    run_stage(STAGES["filter"], config, run_dir)
    noisy = _noisy(run_dir)
    target = tmp_path / "moved"
    shutil.move(str(run_dir.root), str(target))
    moved_config = config_from_tree({**_tree(run_dir, config), "run_dir": str(target)})
    moved = RunDir(moved_config.run_dir)
    assert run_stage(STAGES["filter"], moved_config, moved) is None  # still done
    run_stage(STAGES["filter"], moved_config, moved, force=True)
    assert len(_filter_events(moved)) == 1
    assert _noisy(moved) == noisy


def test_changed_selection_rederives_from_the_release(tmp_path):
    config, run_dir = _stage_run_dir(tmp_path, sigma=5.0, metrics=False)
    run_stage(STAGES["filter"], config, run_dir)
    noisy = _noisy(run_dir)
    config.filter.target_size = 300  # post-processing of the release: nothing to spend
    result = run_stage(STAGES["filter"], config, run_dir)
    assert result.summary["selection"]["selected"] == 300
    assert len(_filter_events(run_dir)) == 1 and _noisy(run_dir) == noisy
    config.filter.sigma = 6.0  # another release: spent, and composed with the first
    run_stage(STAGES["filter"], config, run_dir)
    assert len(_filter_events(run_dir)) == 2


def test_a_release_missing_from_the_ledger_is_not_reused(tmp_path):
    config, run_dir = _stage_run_dir(tmp_path, sigma=5.0, metrics=False)
    run_stage(STAGES["filter"], config, run_dir)
    run_dir.ledger_path.unlink()  # a fresh ledger knows nothing of the saved release
    Ledger.create(run_dir.ledger_path, "instruction", 4.0, 1e-5)
    result = run_stage(STAGES["filter"], config, run_dir, force=True)
    assert result.summary["release"] == "new"
    assert len(_filter_events(run_dir)) == 1  # accounted on the ledger that is there now


def test_budget_refusal_of_spend_again_keeps_the_first_release(tmp_path):
    config, run_dir = _stage_run_dir(tmp_path, sigma=1.2, metrics=False)  # most of epsilon 4
    run_stage(STAGES["filter"], config, run_dir)
    noisy = _noisy(run_dir)
    with pytest.raises(BudgetExceededError):
        run_stage(STAGES["filter"], config, run_dir, spend_again=True)
    assert len(_filter_events(run_dir)) == 1 and _noisy(run_dir) == noisy


# ------------------------------------------------------------------------ private evolution


def test_private_evolution_round_reuses_unless_spending_again(tmp_path):
    from dpray.stages.train_generator.strategies.private_evolution import vote_round

    data = tmp_path / "d.jsonl"
    data.write_text("")
    config = config_from_tree(base_tree(tmp_path / "run", data))
    run_dir = RunDir(config.run_dir)
    Ledger.create(run_dir.ledger_path, "instruction", 2.0, 1e-5)
    rng = np.random.default_rng(0)
    candidates = [f"candidate {i}" for i in range(12)]
    kwargs = dict(
        round_index=0,
        candidates=candidates,
        candidate_vectors=rng.normal(size=(12, 8)).astype(np.float32),
        real_vectors=rng.normal(size=(30, 8)).astype(np.float32),
        units=np.arange(30),
        sigma=8.0,
        multiplier=8.0,
        keep=4,
        config=config,
        run_dir=run_dir,
        run_id="pe1",
    )
    first, _, reused = vote_round(ledger=Ledger.load(run_dir.ledger_path), **kwargs)
    assert not reused
    again, _, reused = vote_round(ledger=Ledger.load(run_dir.ledger_path), **kwargs)
    assert reused and np.array_equal(first, again)
    assert len(Ledger.load(run_dir.ledger_path).events) == 1
    with spending_again():
        fresh, _, reused = vote_round(
            ledger=Ledger.load(run_dir.ledger_path), **{**kwargs, "run_id": "pe2"}
        )
    assert not reused and not np.array_equal(first, fresh)
    assert [e.run_id for e in Ledger.load(run_dir.ledger_path).events] == [
        "pe1-round0",
        "pe2-round0",
    ]
