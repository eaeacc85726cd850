"""The HTML report: self-contained, public-only, renders in a real headless browser."""

from __future__ import annotations

import json
import shutil
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpray.privacy.events import GaussianEvent, PoissonSubsampledGaussianEvent
from dpray.privacy.ledger import Ledger
from dpray.rundir import RunDir
from dpray.stages.report import write_report
from tests.conftest import make_canary


@pytest.fixture
def run_dir(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    ledger = Ledger.create(run_dir.ledger_path, "instruction", 4.0, 1e-5)
    ledger.spend(
        PoissonSubsampledGaussianEvent(
            "train-generator", noise_multiplier=1.0, sampling_rate=0.02, steps=50
        )
    )
    ledger.spend(GaussianEvent("filter", noise_multiplier=8.0))
    metrics = [{"step": s, "step_seconds": 1.0 + 0.1 * s, "epsilon": 0.1 * s} for s in range(1, 6)]
    (run_dir.public("generator") / "metrics.jsonl").write_text(
        "".join(json.dumps(m) + "\n" for m in metrics)
    )
    pq.write_table(
        pa.table({"text": ["Write a haiku about <autumn> & rain", "Explain DNS"]}),
        run_dir.public("filter") / "filtered.parquet",
    )
    (run_dir.public("timings") / "stages.json").write_text(json.dumps({"ingest": 0.5}))
    secret = make_canary()
    pq.write_table(
        pa.table({"id": ["1"], "text": [secret], "user_id": ["1"]}),
        run_dir.private("ingest") / "instructions.parquet",
    )
    run_dir.secret = secret
    return run_dir


def test_report_contents(run_dir):
    page = write_report(run_dir).read_text()
    assert page.startswith("<!doctype html>")
    assert "Privacy ledger" in page and "poisson_subsampled_gaussian" in page
    assert "data:image/png;base64," in page  # plots inlined: opens offline
    assert "Write a haiku about &lt;autumn&gt; &amp; rain" in page  # escaped
    assert "has not run" in page  # missing stages are said, not fatal
    assert run_dir.secret not in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from the web


@pytest.mark.browser
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("chromium is not installed (.ci/run installs it with apt-get)")
    page = write_report(run_dir)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,2000",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
