"""Membership/canary audit: the math, and a small end-to-end run on a tiny model."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from dpray.audit.mia import exposure, roc_auc


def test_roc_auc_against_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    a, b = rng.normal(0.3, 1, 200), rng.normal(0, 1, 150)
    a[:10] = b[:10]  # ties
    expected = roc_auc_score(np.r_[np.ones(200), np.zeros(150)], np.r_[a, b])
    assert roc_auc(a, b) == pytest.approx(expected)
    assert roc_auc(np.ones(5), np.ones(5)) == pytest.approx(0.5)


def test_exposure_bounds():
    assert exposure(1, 1024) == pytest.approx(10.0)
    assert exposure(1024, 1024) == pytest.approx(0.0)


@pytest.mark.slow
def test_mia_audit_end_to_end(tmp_path):
    import ray

    from dpray.config import config_from_tree
    from dpray.pipeline import run_stage
    from dpray.rundir import RunDir
    from dpray.stages import STAGES

    root = Path(os.path.expanduser("~/.cache/dpray"))
    root.mkdir(parents=True, exist_ok=True)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=tempfile.mkdtemp(prefix="r", dir=root),
        logging_level="WARNING",
    )
    try:
        config = config_from_tree(
            {
                "run_dir": str(tmp_path / "run"),
                "data": {"path": "demo://?n=200&seed=5", "id_field": "id"},
                "privacy": {"epsilon": 4.0, "delta": 1e-5},
                "train": {
                    "model": "tiny:hidden=64",
                    "expected_batch_size": 16,
                    "micro_batch_size": 16,
                    "max_tokens": 40,
                },
                "audit": {
                    "mia_records": 80,
                    "canary_repeats": [1, 8],
                    "canary_candidates": 40,
                    "mia_steps": 4,
                    "mia_eval_records": 30,
                },
            }
        )
        run_dir = RunDir(config.run_dir)
        run_stage(STAGES["ingest"], config, run_dir)
        from dpray.audit.mia import run_mia_audit

        report = run_mia_audit(config, run_dir)
    finally:
        ray.shutdown()
    assert not (run_dir.root / "audit" / "mia.json").exists()  # non-DP: private only
    saved = json.loads((run_dir.private("audit") / "mia.json").read_text())
    assert saved["members"] == 40 and saved["scored_per_side"] == 30
    for name in ("dp", "non_dp"):
        result = report["results"][name]
        assert 0.0 <= result["mia_auc"] <= 1.0
        assert [c["repeats"] for c in result["canaries"]] == [1, 8]
        assert all(0 <= c["exposure_bits"] <= np.log2(40) + 1e-9 for c in result["canaries"])
    assert saved["results"]["non_dp"]["epsilon"] == "inf"
    assert report["results"]["dp"]["epsilon"] <= 4.0
    # audit models and their data stay private
    assert (run_dir.private_root / "audit" / "dp" / "generator" / "adapter").exists()
    assert not (run_dir.root / "audit" / "dp").exists()
