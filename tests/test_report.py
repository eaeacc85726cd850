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
from dpray.stages.report import SAMPLE_ROWS, write_report
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
    metrics = [{"step": s, "epsilon": 0.1 * s} for s in range(1, 6)]
    (run_dir.public("generator") / "metrics.jsonl").write_text(
        "".join(json.dumps(m) + "\n" for m in metrics)
    )
    timed = [{**m, "step_seconds": 1.0 + 0.1 * m["step"], "loss_rank0": 2.0} for m in metrics]
    (run_dir.private("train") / "metrics.jsonl").write_text(
        "".join(json.dumps(m) + "\n" for m in timed)
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


def test_training_plot_says_its_per_step_epsilons_are_bounds_and_gives_the_final_cost(run_dir):
    """The per-step figures are upper bounds (they can sit above the final exact cost, as
    2.80 against 2.645 in the quality benchmark's run): the section says so and names the
    ledger's figure for the training stage."""
    from dpray.stages.report import section_training, training_epsilon

    final = dict(Ledger.load(run_dir.ledger_path).per_stage())["train-generator"]
    assert training_epsilon(run_dir) == final
    html = section_training(run_dir)
    assert "upper bound" in html and "exact cost of the steps executed" in html


def _write_json(path, data):
    path.write_text(json.dumps(data))


@pytest.fixture
def full_run_dir(run_dir):
    """The fixture's run plus every output the summaries read (non-DP ones under private/)."""
    _write_json(
        run_dir.public("generator") / "generator.json",
        {"strategy": "dp_finetune", "format": "chat", "base_model": "tiny-base", "steps": 50},
    )
    _write_json(run_dir.public("sample") / "report.json", {"requested": 300, "written": 240})
    texts = [f"MARKER instruction {i}" for i in range(SAMPLE_ROWS)]
    texts += [f"plain instruction {i}" for i in range(75)]
    pq.write_table(pa.table({"text": texts}), run_dir.public("filter") / "filtered.parquet")
    _write_json(
        run_dir.private("filter") / "metrics.json",
        {
            "evaluation": "heldout",
            "note": "Computed from held-out real records without noise: NOT differentially "
            "private.",
            "heldout_records": 400,
            "probe": {
                "unfiltered": 0.81,
                "filtered": 0.74,
                "real_floor": 0.52,
                "sample_size": 500,
                "folds": 5,
            },
            "mauve": {"sample_size": 200, "unfiltered": 0.61, "filtered": 0.83, "real_floor": 0.97},
            "fed": {
                "sample_size": 200,
                "fed": {"unfiltered": 0.3, "filtered": 0.2, "real_floor": 0.1},
                "gap_closed": 0.5,
                "gap_closed_bias_corrected": 0.375,
            },
        },
    )
    _write_json(
        run_dir.private("evaluate") / "win_rates.json",
        {
            "instructions": 16,
            "source": "heldout",
            "public_data": False,
            "judge": "reward_model",
            "interval": "wilson",
            "confidence": 0.95,
            "models": ["base", "sft"],
            "comparisons": {
                "sft_vs_base": {
                    "n": 16,
                    "wins": 10,
                    "ties": 0,
                    "losses": 6,
                    "win_rate": 0.625,
                    "ci_low": 0.386,
                    "ci_high": 0.818,
                }
            },
        },
    )
    _write_json(
        run_dir.public("audit") / "leaks.json",
        {
            "files_scanned": 17,
            "private_texts_indexed": 1,
            "min_tokens": 12,
            "leaks_total": 2,
            "leaks_by_file": {"sample/report.json": 2},
            "memorised_total": 0,
            "memorised_by_file": {},
        },
    )
    return run_dir


def _summary(page: str) -> str:
    start, end = page.index('id="summary"'), page.index('id="details"')
    assert start < end < page.index("<h2>Privacy ledger</h2>")  # summary first, details after
    return page[start:end]


def test_summary_leads_with_what_matters(full_run_dir):
    page = write_report(full_run_dir, full=True).read_text()
    summary = _summary(page)
    spent = Ledger.load(full_run_dir.ledger_path).accounting().epsilon
    assert f"ε {spent:.2f} <small>spent of 4.00</small>" in summary
    assert "within target" in summary
    assert "train-generator" in summary and "filter" in summary  # ε by stage
    assert "dp_finetune" in summary and "<b>chat</b>" in summary
    assert "100 <small>synthetic instructions" in summary and "240 sampled" in summary
    assert "filtered <b>0.74</b> (unfiltered 0.81, real-vs-real 0.52)" in summary
    assert "filtered <b>0.83</b> (unfiltered 0.61, real-vs-real 0.97)" in summary  # MAUVE
    assert "<b>50%</b> (bias-corrected 38%)" in summary  # FED gap closed
    assert "Non-DP evaluation on 400 held-out real records" in summary
    assert "<b>0.62</b>, 95% CI 0.39–0.82, n=16" in summary
    assert "2 leaks" in summary and 'class="badge bad"' in summary
    assert "not measured" not in summary
    # the long dumps fold away below the summary
    assert page.index("<details>") > page.index('id="details"')
    assert "<summary>Ledger events (2)" in page


def test_summary_says_not_measured(run_dir):
    summary = _summary(write_report(run_dir).read_text())
    assert "spent of 4.00" in summary
    assert "Distribution match" in summary and "not measured" in summary
    assert "strategy" not in summary  # no generator.json: no strategy line
    assert "The final leak scan has not run" in summary


def test_summary_handles_partial_metrics(full_run_dir):
    path = full_run_dir.private("filter") / "metrics.json"
    metrics = json.loads(path.read_text())
    del metrics["probe"]
    metrics["mauve"] = {"error": "mauve-text is not installed"}
    metrics["fed"] = {"skipped": "too few records"}
    _write_json(path, metrics)
    summary = _summary(write_report(full_run_dir, full=True).read_text())
    assert "0.5 = indistinguishable): not measured</li>" in summary
    assert "not measured (mauve-text is not installed)" in summary
    assert "not measured (too few records)" in summary
    metrics["mauve"] = None
    _write_json(path, metrics)
    summary = _summary(write_report(full_run_dir, full=True).read_text())
    assert "MAUVE (higher = closer to real): not measured</li>" in summary
    _write_json(path, {"heldout_records": 10, "skipped": "too few held-out records"})
    summary = _summary(write_report(full_run_dir, full=True).read_text())
    assert "not measured (too few held-out records)" in summary


def test_public_report_holds_no_nondp_statistics(full_run_dir):
    """#14 defect 5: the public page shows DP outputs only; the private page the rest."""
    private = full_run_dir.private("audit") / "mia.json"
    _write_json(
        private,
        {
            "results": {
                "dp": {
                    "epsilon": 4.0,
                    "mia_auc": 0.513,
                    "canaries": [{"repeats": 1, "exposure_bits": 0.7}],
                }
            },
            "note": "MIA NOTE",
        },
    )
    public_path = write_report(full_run_dir)
    page = public_path.read_text()
    assert public_path == full_run_dir.root / "report" / "index.html"
    for number in ("0.74", "0.83", "0.625", "0.62</b>", "0.513", "MIA NOTE"):
        assert number not in page, number
    assert "plotted on the right" not in page
    assert page.count("private/report/index.html") >= 3  # where the numbers are instead
    private_path = write_report(full_run_dir, full=True)
    assert private_path == full_run_dir.private_root / "report" / "index.html"
    assert oct(private_path.stat().st_mode & 0o777) == "0o600"
    full = private_path.read_text()
    for number in (
        "filtered <b>0.74</b>",
        "<b>0.62</b>",
        "0.513",
        "MIA NOTE",
        "plotted on the right",
    ):
        assert number in full, number


def test_public_report_shows_win_rates_on_declared_public_data(full_run_dir):
    data = json.loads((full_run_dir.private("evaluate") / "win_rates.json").read_text())
    data.update(source="bench.jsonl", public_data=True)
    _write_json(full_run_dir.public("evaluate") / "win_rates.json", data)
    summary = _summary(write_report(full_run_dir).read_text())
    assert "<b>0.62</b>, 95% CI 0.39–0.82, n=16" in summary
    assert "filtered <b>0.74</b>" not in summary  # the held-out metrics stay private


def test_summary_flags_epsilon_over_target(run_dir):
    data = json.loads(run_dir.ledger_path.read_text())
    data["target"]["epsilon"] = 1.0  # a hand-edited or older ledger whose spends exceed it
    run_dir.ledger_path.write_text(json.dumps(data))
    summary = _summary(write_report(run_dir).read_text())
    assert "spent of 1.00" in summary and "over target" in summary and "badge bad" in summary


def _examples(page: str) -> str:
    start = page.index("<h2>Synthetic instructions")
    return page[start : page.index("</ol>", start)]


def test_examples_are_a_seeded_random_sample(full_run_dir):
    first = _examples(write_report(full_run_dir).read_text())
    assert f"a random sample of {SAMPLE_ROWS} of 100 (filtered set)" in first
    assert first.count("<li>") == SAMPLE_ROWS
    assert first.count("MARKER") < SAMPLE_ROWS  # not simply the first rows
    assert "plain instruction" in first
    assert _examples(write_report(full_run_dir).read_text()) == first  # same on every render


@pytest.mark.browser
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("chromium is not installed (bash scripts/install-system-deps.sh installs it)")
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


def test_distribution_card_says_why_when_the_filter_ran_without_metrics(tmp_path):
    from dpray.stages.report import summary_distribution

    run_dir = RunDir(tmp_path / "run")
    assert "The filter has not run." in summary_distribution(run_dir)
    pq.write_table(pa.table({"text": ["a request"]}), run_dir.public("filter") / "filtered.parquet")
    card = summary_distribution(run_dir)
    assert "filter.metrics off" in card and "has not run" not in card
