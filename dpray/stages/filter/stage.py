"""``dpray filter``: match the synthetic set to a noisy histogram of the real one.

Reads the embed stage's sets (``embed/synthetic.*`` public, ``private/embed/real.*`` and
``heldout.*`` private), the candidates' texts from ``sample/*.parquet``, and the ledger.  Writes

* ``filter/filtered.parquet`` (text, sample_id, cluster) -- the filtered synthetic set;
* ``filter/noisy_histogram.json`` -- the DP release (nn_vote: its vector in ``noisy_votes.npy``);
* ``filter/report.json`` -- method, K, noise, ledger figures, resampling counts (public);
* ``private/filter/exact_histogram.json`` (nn_vote: ``exact_votes.npy``) -- the exact votes;
* ``private/filter/metrics.json`` + ``private/filter/cluster_shares.png`` -- NON-PRIVATE
  evaluation on the held-out real split (exact statistics of real records that no DP mechanism
  released, so they stay in the private zone and reach only the private report).

Privacy: one Gaussian release with L2 sensitivity 1 (``histogram``), drawn and spent on the
ledger through :mod:`dpray.privacy.mechanisms.gaussian` as
``GaussianEvent("filter", noise_multiplier=sigma / 1)``.  sigma is ``filter.sigma`` or the
smallest value that keeps the composition of everything already spent (training's share) plus
this release within the target.  The spend is checked before any work and recorded right after
the noise is drawn; nothing noisy is written unless the spend succeeded.  A rerun is a new
release and spends again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dpray.config import DprayConfig
from dpray.io.readers import SourceError
from dpray.privacy.calibration import CalibrationError, solve_noise_multiplier
from dpray.privacy.events import GaussianEvent
from dpray.privacy.ledger import BudgetExceededError, Ledger
from dpray.privacy.mechanisms.gaussian import gaussian_event, secret_rng
from dpray.rundir import RunDir, write_json
from dpray.stages.base import StageResult
from dpray.stages.filter import histogram, metrics
from dpray.stages.filter.core import METHODS, FilterOutcome

log = logging.getLogger(__name__)
STAGE_NAME = "filter"


def resolve_sigma(configured: float | None, ledger: Ledger) -> float:
    """Absolute noise std: the configured one, or solved from what the ledger has left."""
    if configured is not None:
        return float(configured)

    def make_event(multiplier: float) -> GaussianEvent:
        return gaussian_event(STAGE_NAME, multiplier * histogram.SENSITIVITY, histogram.SENSITIVITY)

    try:
        multiplier = solve_noise_multiplier(
            make_event,
            target_epsilon=ledger.target_epsilon,
            delta=ledger.target_delta,
            existing=ledger.events,
        )
    except CalibrationError as exc:
        raise BudgetExceededError(f"{STAGE_NAME}: {exc}") from None
    return multiplier * histogram.SENSITIVITY


def privacy_units(ids: pa.Table, unit: str) -> np.ndarray:
    """One integer label per real record: its user at user level, else the record itself."""
    if unit == "user":
        _, labels = np.unique(
            np.asarray(ids.column("user_id").to_pylist(), dtype=object), return_inverse=True
        )
        return labels.astype(np.int64)
    return np.arange(len(ids), dtype=np.int64)


def read_set(prefix: Path) -> tuple[pa.Table, np.ndarray]:
    """An embed-stage set: ``<prefix>.parquet`` ids and memory-mapped ``<prefix>.npy`` vectors
    (read here, not imported: stages meet on disk only)."""
    vectors = np.load(prefix.with_suffix(".npy"), mmap_mode="r")
    ids = pq.read_table(prefix.with_suffix(".parquet"))
    if len(ids) != len(vectors):
        raise SourceError(f"{prefix}: ids and vectors disagree in length (rerun `dpray embed`)")
    return ids, vectors


def synthetic_texts(run_dir: RunDir, syn_ids: pa.Table) -> pa.ChunkedArray:
    """The candidates' texts from the sample shards, checked to be row-aligned with the
    embeddings (same shard order as the embed stage; a changed shard means: rerun embed)."""
    shards = sorted((run_dir.root / "sample").glob("*.parquet"))
    if not shards:
        raise SourceError(f"{run_dir.root / 'sample'}: no synthetic shards")
    tables = [pq.read_table(p, columns=["sample_id", "text"]) for p in shards]
    table = pa.concat_tables(tables, promote_options="default")
    if len(table) != len(syn_ids) or not table.column("sample_id").equals(
        syn_ids.column("sample_id")
    ):
        raise SourceError("sample shards changed since `dpray embed`; rerun it")
    return table.column("text")


def _load(run_dir: RunDir, name: str, private: bool) -> tuple[pa.Table, np.ndarray]:
    zone = run_dir.private("embed") if private else run_dir.public("embed")
    prefix = zone / name
    if not prefix.with_suffix(".npy").exists():
        raise SourceError(f"{prefix}.npy: missing (run `dpray embed`)")
    return read_set(prefix)


def run(config: DprayConfig, run_dir: RunDir) -> StageResult:
    """Filter the synthetic candidates with one DP release; see the module docstring."""
    fc = config.filter
    syn_ids, synthetic = _load(run_dir, "synthetic", private=False)
    texts = synthetic_texts(run_dir, syn_ids)
    real_ids, real = _load(run_dir, "real", private=True)
    if len(synthetic) == 0:
        raise SourceError("embed/synthetic: no synthetic candidates")
    units = privacy_units(real_ids, config.privacy.unit)

    ledger = Ledger.load(run_dir.ledger_path)
    sigma = resolve_sigma(fc.sigma, ledger)
    event = gaussian_event(STAGE_NAME, sigma, histogram.SENSITIVITY)
    ledger.check(event)  # refuse before any work; spend again at the release

    outcome = METHODS[fc.method](
        np.asarray(synthetic),
        np.asarray(real),
        units,
        fc,
        sigma,
        secret_rng(),
        on_release=lambda: ledger.spend(event),
    )
    public, private = run_dir.public(STAGE_NAME), run_dir.private(STAGE_NAME)
    outputs = {
        "filtered": str(_write_filtered(public / "filtered.parquet", syn_ids, texts, outcome)),
        **_write_release(public, private, fc.method, sigma, config.privacy.unit, outcome),
    }
    report = {
        "method": fc.method,
        "candidates": int(len(synthetic)),
        "num_clusters": outcome.clustering.num_clusters,
        "num_clusters_source": "config" if fc.num_clusters else "auto: min(1000, candidates/50)",
        "pca_dims": outcome.clustering.pca.dim,
        "pca_explained": round(outcome.clustering.pca.explained, 4),
        "sigma": sigma,
        "sensitivity_l2": histogram.SENSITIVITY,
        "noise_multiplier": event.noise_multiplier,
        "epsilon_spent_total": ledger.spent_epsilon,
        "epsilon_target": ledger.target_epsilon,
        "selection": outcome.report,
        "seconds": outcome.timings,
    }
    if outcome.report.get("shortfall", 0) > 0:
        log.warning(
            "filter: only %d of %d selected (too few candidates); raise sample.num_samples",
            outcome.report["selected"],
            fc.target_size,
        )
    outputs["report"] = str(write_json(public / "report.json", report))
    if fc.metrics:
        outputs.update(_evaluate(run_dir, config, synthetic, outcome))
    log.info(
        "filter: %s, %d of %d candidates kept, sigma %.3g, epsilon %.4g of %.4g",
        fc.method,
        len(outcome.selected),
        len(synthetic),
        sigma,
        report["epsilon_spent_total"],
        ledger.target_epsilon,
    )
    return StageResult(outputs=outputs, summary=report)


def _write_filtered(
    path: Path, syn_ids: pa.Table, texts: pa.ChunkedArray, outcome: FilterOutcome
) -> Path:
    rows = pa.array(outcome.selected, pa.int64())
    table = pa.table(
        {
            "text": texts.take(rows),
            "sample_id": syn_ids.column("sample_id").take(rows),
            "cluster": pa.array(outcome.clustering.synthetic_labels[outcome.selected], pa.int64()),
        }
    )
    pq.write_table(table, path)
    return path


def _write_release(
    public: Path, private: Path, method: str, sigma: float, unit: str, outcome: FilterOutcome
) -> dict[str, str]:
    """The noisy release outside ``private/``, the exact votes inside it."""
    header = {
        "method": method,
        "unit": unit,
        "bins": int(len(outcome.noisy)),
        "sigma": sigma,
        "sensitivity_l2": histogram.SENSITIVITY,
        "noise_multiplier": histogram.noise_multiplier(sigma),
    }
    if method == "cluster":
        noisy = {**header, "values": outcome.noisy.tolist(), "shares": outcome.shares.tolist()}
        exact = {**header, "values": outcome.exact.tolist()}
        return {
            "noisy_histogram": str(write_json(public / "noisy_histogram.json", noisy)),
            "exact_histogram": str(write_json(private / "exact_histogram.json", exact)),
        }
    np.save(public / "noisy_votes.npy", outcome.noisy)
    np.save(private / "exact_votes.npy", outcome.exact)
    noisy = {**header, "values_file": "noisy_votes.npy", "threshold_report": outcome.report}
    exact = {**header, "values_file": "exact_votes.npy"}
    return {
        "noisy_histogram": str(write_json(public / "noisy_histogram.json", noisy)),
        "noisy_votes": str(public / "noisy_votes.npy"),
        "exact_histogram": str(write_json(private / "exact_histogram.json", exact)),
    }


def _evaluate(
    run_dir: RunDir, config: DprayConfig, synthetic: np.ndarray, outcome: FilterOutcome
) -> dict[str, str]:
    """Non-private evaluation on the held-out split (skipped, and said so, without one).

    Written under ``private/filter/``: the numbers and the plot are exact statistics of held-out
    real records, outside the ledger.
    """
    fc = config.filter
    zone = run_dir.private(STAGE_NAME)
    path = zone / "metrics.json"
    prefix = run_dir.private("embed") / "heldout"
    if not prefix.with_suffix(".npy").exists():
        heldout = np.zeros((0, synthetic.shape[1]), dtype=np.float32)
    else:
        heldout = np.asarray(read_set(prefix)[1])
    clustering = outcome.clustering
    filtered = np.asarray(synthetic[np.sort(outcome.selected)])
    result = metrics.evaluate(
        heldout=heldout,
        unfiltered=np.asarray(synthetic),
        filtered=filtered,
        heldout_labels=clustering.assign(heldout),
        unfiltered_labels=clustering.synthetic_labels,
        filtered_labels=clustering.synthetic_labels[outcome.selected],
        num_clusters=clustering.num_clusters,
        noisy_shares=outcome.shares,
        repeats=fc.metrics_subsamples,
        seed=fc.seed,
        with_mauve=fc.mauve,
        plot_path=zone / "cluster_shares.png",
    )
    out = {"metrics": str(write_json(path, result))}
    if "plot" in result:
        out["plot"] = str(zone / result["plot"])
    return out


def inputs(config: DprayConfig, run_dir: RunDir) -> list[Path]:
    """The embed stage's sets (their content is part of the completion marker)."""
    public, private = run_dir.root / "embed", run_dir.private_root / "embed"
    return [
        *sorted((run_dir.root / "sample").glob("*.parquet")),
        public / "synthetic.npy",
        public / "synthetic.parquet",
        private / "real.npy",
        private / "real.parquet",
        private / "heldout.npy",
    ]
