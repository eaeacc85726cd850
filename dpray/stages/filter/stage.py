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

Out of core: the embeddings are read chunk by chunk (``filter.chunk_size`` rows,
:mod:`~dpray.stages.filter.rows`), the candidates' ids and texts are checked and gathered shard
by shard, and only the selected texts are held; ``filter.distributed`` assigns the candidates in
Ray tasks on every node (:mod:`~dpray.stages.filter.assign`), the real records always here.

Privacy: one Gaussian release with L2 sensitivity 1 (``histogram``), drawn and spent on the
ledger through :mod:`dpray.privacy.mechanisms.gaussian` as
``GaussianEvent("filter", noise_multiplier=sigma / 1)``.  sigma is ``filter.sigma`` or the
smallest value that keeps the composition of everything already spent (training's share) plus
this release within the target.  The spend is checked before any work and recorded right after
the noise is drawn; nothing noisy is written unless the spend succeeded.

Reruns: right after the spend the release is saved under ``private/filter/`` (``release.json``
and ``release_noisy.npy``), keyed on the candidate set, the real set and the config that shape
the votes (:func:`release_key`).  A rerun with the same key -- ``--force``, or a rerun after an
interruption that left the outputs unwritten -- reuses that release and re-derives every output
from it, spending nothing.  ``--spend-again`` draws a new release, which the ledger composes with
the first; so does a changed key (other candidates, other clustering or noise settings).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import tempfile
from dataclasses import dataclass
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
from dpray.privacy.releases import log_new_release, log_reuse, release_key, spend_again
from dpray.rundir import RunDir, file_digest, read_json, write_json
from dpray.stages.base import StageResult
from dpray.stages.filter import histogram, metrics
from dpray.stages.filter.core import METHODS, FilterOutcome
from dpray.stages.filter.rows import NpyRows

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


def sample_shards(run_dir: RunDir, syn_ids: pa.Table) -> list[Path]:
    """The sample shards, checked to be row-aligned with the embeddings (same shard order as the
    embed stage; a changed shard means: rerun embed).  Streamed: one batch of ids at a time."""
    shards = sorted((run_dir.root / "sample").glob("*.parquet"))
    if not shards:
        raise SourceError(f"{run_dir.root / 'sample'}: no synthetic shards")
    expected = syn_ids.column("sample_id")
    seen = 0
    for path in shards:
        for batch in pq.ParquetFile(path).iter_batches(columns=["sample_id"]):
            ids = pa.chunked_array([batch.column(0)])
            if seen + len(ids) > len(expected) or not ids.equals(expected.slice(seen, len(ids))):
                raise SourceError("sample shards changed since `dpray embed`; rerun it")
            seen += len(ids)
    if seen != len(expected):
        raise SourceError("sample shards changed since `dpray embed`; rerun it")
    return shards


def selected_texts(shards: list[Path], rows: np.ndarray) -> pa.ChunkedArray:
    """The texts of candidates ``rows`` (any order, repeats allowed), streamed from the shards:
    only the selected texts are ever held, not the millions of candidates'."""
    wanted = np.unique(rows)
    pieces, seen = [], 0
    for path in shards:
        for batch in pq.ParquetFile(path).iter_batches(columns=["text"]):
            lo, hi = np.searchsorted(wanted, [seen, seen + batch.num_rows])
            if hi > lo:
                taken = batch.column(0).take(pa.array(wanted[lo:hi] - seen, pa.int64()))
                pieces.append(taken.cast(pa.string()))
            seen += batch.num_rows
    texts = pa.chunked_array(pieces, type=pa.string())
    return texts.take(pa.array(np.searchsorted(wanted, rows), pa.int64()))


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
    shards = sample_shards(run_dir, syn_ids)
    real_ids, real = _load(run_dir, "real", private=True)
    if len(synthetic) == 0:
        raise SourceError("embed/synthetic: no synthetic candidates")
    units = privacy_units(real_ids, config.privacy.unit)

    ledger = Ledger.load(run_dir.ledger_path)
    key = release_key(config, ("privacy",), release_inputs(config, run_dir), run_dir, _knobs(fc))
    saved = SavedRelease.load(run_dir, key, ledger)
    if saved is not None:
        sigma, event = saved.sigma, saved.event
        log_reuse(STAGE_NAME, f"{saved.path.relative_to(run_dir.root)}")
    else:
        log_new_release(STAGE_NAME, SavedRelease.exists(run_dir))
        sigma = resolve_sigma(fc.sigma, ledger)
        event = gaussian_event(
            STAGE_NAME, sigma, histogram.SENSITIVITY, run_id=f"release-{secrets.token_hex(6)}"
        )
        ledger.check(event)  # refuse before any work; spend again at the release

    def on_release(noisy: np.ndarray) -> None:
        ledger.spend(event)  # right after the noise is drawn, before anything uses it
        SavedRelease.save(run_dir, key, fc.method, sigma, event, noisy)

    if fc.method == "cluster" and fc.distributed is True:
        from dpray.runtime import ensure_ray

        ensure_ray(config, run_dir)
    outcome = METHODS[fc.method](
        NpyRows(synthetic.filename),  # read chunk by chunk, never mapped whole
        NpyRows(real.filename),
        units,
        fc,
        sigma,
        secret_rng(),
        on_release=on_release,
        saved=None if saved is None else saved.noisy,
    )
    public, private = run_dir.public(STAGE_NAME), run_dir.private(STAGE_NAME)
    outputs = {
        "filtered": str(_write_filtered(public / "filtered.parquet", syn_ids, shards, outcome)),
        **_write_release(public, private, fc.method, sigma, config.privacy.unit, outcome),
    }
    report = {
        "method": fc.method,
        "candidates": int(len(synthetic)),
        "num_clusters": outcome.clustering.num_clusters,
        "num_clusters_source": "config" if fc.num_clusters else "auto: min(1000, candidates/50)",
        "pca_dims": outcome.clustering.pca.dim,
        "pca_explained": round(outcome.clustering.pca.explained, 4),
        "assignment": outcome.clustering.assignment,
        "sigma": sigma,
        "sensitivity_l2": histogram.SENSITIVITY,
        "noise_multiplier": event.noise_multiplier,
        "release": "reused" if saved is not None else "new",
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


RELEASE_FILE = "release.json"
RELEASE_VALUES = "release_noisy.npy"


def _knobs(fc) -> str:
    """The filter settings that shape the votes and their noise (the rest -- target size,
    selection, metrics -- is post-processing, re-derived from a saved release)."""
    knobs = ("method", "num_clusters", "pca_variance", "kmeans_iters", "seed", "nn_k", "sigma")
    return json.dumps({k: getattr(fc, k) for k in knobs}, sort_keys=True)


def release_inputs(config: DprayConfig, run_dir: RunDir) -> list[Path]:
    """The files a release depends on: the candidates and the real set (not the held-out)."""
    return [p for p in inputs(config, run_dir) if p.name != "heldout.npy"]


@dataclass
class SavedRelease:
    """The filter's saved DP release (``private/filter/release.json`` + its vector)."""

    path: Path
    sigma: float
    event: GaussianEvent
    noisy: np.ndarray

    @staticmethod
    def exists(run_dir: RunDir) -> bool:
        return (run_dir.private_root / STAGE_NAME / RELEASE_FILE).exists()

    @classmethod
    def load(cls, run_dir: RunDir, key: str, ledger: Ledger) -> SavedRelease | None:
        """The saved release for ``key``, or None: none saved, another key, ``--spend-again``,
        a damaged vector, or a release the ledger does not hold (never reuse unaccounted)."""
        path = run_dir.private_root / STAGE_NAME / RELEASE_FILE
        if spend_again() or not path.exists():
            return None
        record = read_json(path)
        if record.get("key") != key:
            return None
        values = path.parent / record["values_file"]
        if not values.exists() or file_digest(values) != record.get("values_sha256"):
            log.warning(
                "%s: the saved release's vector is missing or changed; not reused", STAGE_NAME
            )
            return None
        event = ledger.run_event(STAGE_NAME, record["release_id"])
        if event is None:
            log.warning(
                "%s: the saved release %s is not on the ledger; not reused",
                STAGE_NAME,
                record["release_id"],
            )
            return None
        return cls(path, float(record["sigma"]), event, np.load(values))

    @staticmethod
    def save(
        run_dir: RunDir, key: str, method: str, sigma: float, event: GaussianEvent, noisy
    ) -> None:
        """Vector first, then the record (the record is what makes it reusable); both atomic."""
        folder = run_dir.private(STAGE_NAME)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".release.", suffix=".npy.tmp")
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, np.asarray(noisy, dtype=np.float64))
        os.replace(tmp, folder / RELEASE_VALUES)
        record = {
            "key": key,
            "release_id": event.run_id,
            "method": method,
            "sigma": sigma,
            "noise_multiplier": event.noise_multiplier,
            "bins": int(len(noisy)),
            "values_file": RELEASE_VALUES,
            "values_sha256": file_digest(folder / RELEASE_VALUES),
        }
        write_json(folder / RELEASE_FILE, record)


def _write_filtered(
    path: Path, syn_ids: pa.Table, shards: list[Path], outcome: FilterOutcome
) -> Path:
    rows = pa.array(outcome.selected, pa.int64())
    table = pa.table(
        {
            "text": selected_texts(shards, outcome.selected),
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
