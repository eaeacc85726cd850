"""The whole pipeline end to end on the CI-sized config (tiny models, small counts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.test_output_schemas import assert_one_schema_per_folder

pytestmark = pytest.mark.slow


def test_smoke_pipeline_end_to_end(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, DPRAY_CACHE_DIR=os.environ.get("DPRAY_CACHE_DIR", ""))
    if not env["DPRAY_CACHE_DIR"]:
        env.pop("DPRAY_CACHE_DIR")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpray",
            "run",
            str(REPO / "jobs" / "smoke.yaml"),
            "--run-dir",
            str(run),
        ],
        capture_output=True,
        text=True,
        timeout=1500,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"outputs in {run}" in proc.stdout and "report:" in proc.stdout
    ledger = json.loads((run / "ledger.json").read_text())
    stages = {e["stage"] for e in ledger["events"]}
    assert {"train-generator", "filter"} <= stages
    assert ledger["spent"]["epsilon"] <= ledger["target"]["epsilon"] + 1e-9
    leaks = json.loads((run / "audit" / "leaks.json").read_text())
    assert leaks["leaks_total"] == 0 and leaks["files_scanned"] > 5
    # no public file holds a statistic of real records that the ledger does not cover (#14)
    assert leaks["nondp_statistics_total"] == 0, leaks["nondp_statistics_by_file"]
    page = (run / "report" / "index.html").read_text()
    assert "Privacy ledger" in page and "has not run" not in page.split("Privacy audit")[0]
    private_page = (run / "private" / "report" / "index.html").read_text()
    assert "Win rate" in private_page and "Probe accuracy" in private_page
    for path in (
        "generator/adapter",
        "filter/filtered.parquet",
        "sft",
        "private/evaluate/win_rates.json",
        "private/filter/metrics.json",
    ):
        assert (run / path).exists(), path
    # every public folder of Parquet files loads as one dataset (issue #15)
    checked = assert_one_schema_per_folder(run, load_with_datasets=True)
    assert {"sample", "sample_draws", "filter", "annotate/pairs"} <= set(checked)
    # a second run skips every completed stage
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpray",
            "run",
            str(REPO / "jobs" / "smoke.yaml"),
            "--run-dir",
            str(run),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stderr.count("already done") >= 8
