"""The DP filter: vote math and sensitivity, resampling, both methods, ledger, stage outputs.

Everything here runs on small synthetic embedding arrays (no model, no Ray); the embed-then-filter
run on real text with a canary scan is in ``test_embed.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpray.config import FilterConfig, config_from_tree
from dpray.privacy.events import GaussianEvent, PoissonSubsampledGaussianEvent
from dpray.privacy.ledger import BudgetExceededError, Ledger
from dpray.privacy.mechanisms.gaussian import gaussian_event, gaussian_release, secret_rng
from dpray.rundir import RunDir, read_json
from dpray.stages.embed.store import write_set
from dpray.stages.filter import core, histogram, nn_vote, resample
from dpray.stages.filter.cluster import auto_num_clusters, fit_clusters, fit_pca
from dpray.stages.filter.metrics import extrapolate, frechet_distance, gap_closed, tv_distance
from dpray.stages.filter.stage import run as run_filter

K = 8
DIM = 32
REAL_WEIGHTS = np.full(K, 1.0 / K)
# The synthetic set over-represents the first clusters (a generator stuck on a few topics).
SYNTH_WEIGHTS = np.array([0.40, 0.30, 0.10, 0.05, 0.05, 0.04, 0.03, 0.03])
TV_MIXTURE = 0.5 * np.abs(REAL_WEIGHTS - SYNTH_WEIGHTS).sum()  # 0.45


def mixture(n: int, weights: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised points around K well-separated centres; returns (points, true cluster)."""
    centres = np.random.default_rng(1234).normal(size=(K, DIM)) * 3
    rng = np.random.default_rng(seed)
    labels = rng.choice(K, size=n, p=weights)
    points = centres[labels] + rng.normal(size=(n, DIM))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32), labels


def true_tv(reference_labels: np.ndarray, labels: np.ndarray) -> float:
    return tv_distance(np.bincount(reference_labels, minlength=K), np.bincount(labels, minlength=K))


# ------------------------------------------------------------------------------ DP vote math


@pytest.mark.parametrize("scheme", ["split", "l2"])
@pytest.mark.parametrize("k", [1, 3])
def test_every_unit_contributes_at_most_sensitivity(scheme, k):
    rng = np.random.default_rng(0)
    units = rng.integers(0, 30, size=200)  # users with 1..many records
    bins = rng.integers(0, 12, size=(200, k))
    assert histogram.max_unit_contribution(units, bins, 12, scheme) <= histogram.SENSITIVITY + 1e-9


@pytest.mark.parametrize("scheme", ["split", "l2"])
def test_removing_or_adding_one_user_moves_votes_by_at_most_sensitivity(scheme):
    rng = np.random.default_rng(1)
    units = rng.integers(0, 40, size=300)
    bins = rng.integers(0, 10, size=(300, 2))
    full = histogram.unit_votes(units, bins, 10, scheme)
    for user in np.unique(units):
        keep = units != user
        without = histogram.unit_votes(units[keep], bins[keep], 10, scheme)
        assert np.linalg.norm(full - without) <= histogram.SENSITIVITY + 1e-9
    # A new user piling all 8 records into one bin: the worst case is norm exactly 1.
    more_units = np.concatenate([units, np.full(8, 999)])
    more_bins = np.concatenate([bins, np.zeros((8, 2), dtype=int)])
    added = histogram.unit_votes(more_units, more_bins, 10, scheme)
    assert np.linalg.norm(added - full) == pytest.approx(1.0)


def test_instruction_level_histogram_is_one_vote_per_record():
    bins = np.array([0, 1, 1, 3, 3, 3])
    votes = histogram.unit_votes(np.arange(6), bins, 5, "split")
    assert votes.tolist() == [1, 2, 0, 3, 0]


def test_split_counts_users_and_l2_gives_unit_norm():
    units = np.array([0, 0, 0, 1])
    bins = np.array([[2], [2], [4], [1]])
    split = histogram.unit_votes(units, bins, 5, "split")
    assert split.sum() == pytest.approx(2.0)  # two users, one vote each
    assert split[2] == pytest.approx(2 / 3) and split[4] == pytest.approx(1 / 3)
    l2 = histogram.unit_votes(np.zeros(1), np.array([[0, 1, 2, 3]]), 5, "l2")
    assert np.allclose(l2[:4], 0.5)  # k=4 votes of 1/sqrt(4): norm 1


def test_noise_has_the_stated_std_and_event_multiplier():
    rng = np.random.default_rng(2)
    noisy = gaussian_release(np.zeros(200_000), 3.0, rng)
    assert noisy.std() == pytest.approx(3.0, rel=0.02)
    event = gaussian_event("filter", 3.0, histogram.SENSITIVITY)
    assert isinstance(event, GaussianEvent)
    assert event.noise_multiplier == pytest.approx(3.0 / histogram.SENSITIVITY)


def test_shares_clamp_at_zero_and_fall_back_when_noise_wins():
    shares = histogram.to_shares(np.array([3.0, -2.0, 1.0]))
    assert shares.tolist() == [0.75, 0.0, 0.25]
    fallback = histogram.to_shares(np.array([-1.0, -1.0]), fallback=np.array([1, 3]))
    assert fallback.tolist() == [0.25, 0.75]


# ------------------------------------------------------------------------------ resampling


def test_resample_meets_target_when_clusters_run_short():
    # The noisy shares ask 60% of cluster 0, which has only 10 candidates.
    labels = np.repeat(np.arange(4), [10, 100, 100, 100])
    shares = np.array([0.6, 0.2, 0.2, 0.0])
    picked, report = resample.resample(labels, shares, 100, np.random.default_rng(0))
    assert len(picked) == 100 and len(set(picked.tolist())) == 100
    assert report.short_clusters == 1 and report.deficit == 50 and report.redistributed == 50
    assert report.shortfall == 0 and report.repeated == 0
    counts = np.bincount(labels[picked], minlength=4)
    assert counts[0] == 10 and counts[3] == 0  # deficit went to positive-share clusters
    assert counts[1] == counts[2] == 45


def test_resample_spills_into_zero_share_clusters_only_when_needed():
    labels = np.repeat(np.arange(3), [5, 5, 50])
    picked, report = resample.resample(
        labels, np.array([0.5, 0.5, 0.0]), 30, np.random.default_rng(0)
    )
    assert np.bincount(labels[picked], minlength=3).tolist() == [5, 5, 20]
    assert report.redistributed == 20 and report.shortfall == 0


def test_resample_with_replacement_keeps_shares_and_reports_repeats():
    labels = np.repeat(np.arange(2), [5, 100])
    picked, report = resample.resample(
        labels, np.array([0.5, 0.5]), 40, np.random.default_rng(0), with_replacement=True
    )
    assert np.bincount(labels[picked]).tolist() == [20, 20]
    assert report.repeated == 15 and report.shortfall == 0
    cluster0 = picked[labels[picked] == 0]
    assert set(cluster0.tolist()) == set(range(5))  # every candidate used before repeats


def test_resample_reports_a_shortfall_when_candidates_run_out():
    labels = np.repeat(np.arange(2), [3, 4])
    picked, report = resample.resample(labels, np.array([0.5, 0.5]), 10, np.random.default_rng(0))
    assert len(picked) == 7 and report.shortfall == 3


@pytest.mark.parametrize("seed", range(20))
def test_resample_random_cases_meet_target_without_repeats(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 30))
    capacity = rng.integers(0, 40, size=k)
    capacity[0] += 1
    labels = np.repeat(np.arange(k), capacity)
    shares = histogram.to_shares(rng.normal(size=k) * 5)
    target = int(rng.integers(1, len(labels) + 1))
    picked, report = resample.resample(labels, shares, target, rng)
    assert len(picked) == target == report.selected
    assert len(np.unique(picked)) == target
    assert report.shortfall == 0


def test_apportion_adds_up_exactly():
    quotas = resample.apportion(np.array([1 / 3, 1 / 3, 1 / 3]), 100)
    assert quotas.sum() == 100 and sorted(quotas.tolist()) == [33, 33, 34]


# ------------------------------------------------------------------------------ clustering


def test_auto_k_uses_only_the_synthetic_count():
    assert auto_num_clusters(1_000_000) == 1000
    assert auto_num_clusters(1000) == 20
    assert auto_num_clusters(30) == 2
    assert auto_num_clusters(5000, configured=64) == 64


def test_pca_keeps_the_requested_variance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 20)) * np.linspace(5, 0.1, 20)
    pca = fit_pca(x.astype(np.float32), 0.9, rng)
    assert pca.explained >= 0.9 and pca.dim < 20
    assert pca.apply(x).shape == (2000, pca.dim)


# ------------------------------------------------------------------------------ the two methods


def test_cluster_filter_moves_shares_toward_real_with_noise_on():
    synthetic, syn_true = mixture(4000, SYNTH_WEIGHTS, seed=1)
    real, real_true = mixture(1500, REAL_WEIGHTS, seed=2)
    fc = FilterConfig(num_clusters=K, target_size=800, sigma=10.0)
    out = core.cluster_filter(synthetic, real, np.arange(len(real)), fc, 10.0, secret_rng())
    before = true_tv(real_true, syn_true)
    after = true_tv(real_true, syn_true[out.selected])
    assert before == pytest.approx(TV_MIXTURE, abs=0.03)
    assert after < before - 0.3, (before, after)  # the stated margin: TV drops by > 0.3
    assert len(out.selected) == 800 and out.report["shortfall"] == 0


def test_cluster_filter_at_user_level_votes_each_user_once():
    synthetic, _ = mixture(2000, SYNTH_WEIGHTS, seed=3)
    real, _ = mixture(600, REAL_WEIGHTS, seed=4)
    users = np.repeat(np.arange(100), 6)
    fc = FilterConfig(num_clusters=K, target_size=300, sigma=0.0)
    out = core.cluster_filter(synthetic, real, users, fc, 0.0, np.random.default_rng(0))
    assert out.exact.sum() == pytest.approx(100.0)


def test_nn_vote_filter_moves_shares_toward_real():
    synthetic, syn_true = mixture(3000, SYNTH_WEIGHTS, seed=5)
    real, real_true = mixture(1500, REAL_WEIGHTS, seed=6)
    fc = FilterConfig(
        method="nn_vote", num_clusters=K, target_size=600, sigma=1.0, nn_k=4, nn_threshold=0.5
    )
    out = core.nn_vote_filter(synthetic, real, np.arange(len(real)), fc, 1.0, secret_rng())
    before = true_tv(real_true, syn_true)
    after = true_tv(real_true, syn_true[out.selected])
    assert after < before - 0.15, (before, after)
    assert len(out.selected) == 600
    assert len(out.noisy) == len(synthetic)


def test_nn_select_top_proportional_and_short():
    votes = np.array([5.0, 0.0, 3.0, -1.0, 2.0, 0.2])
    rng = np.random.default_rng(0)
    top, report = nn_vote.select(votes, 2, 0.5, rng, mode="top")
    assert sorted(top.tolist()) == [0, 2] and report.above_threshold == 3
    prop, _ = nn_vote.select(votes, 3, 0.5, rng, mode="proportional")
    assert sorted(prop.tolist()) == [0, 2, 4]
    short, report = nn_vote.select(votes, 5, 2.5, rng)
    assert len(short) == 5 and report.filled_below_threshold == 3 and report.shortfall == 0
    repeated, report = nn_vote.select(votes, 5, 2.5, rng, with_replacement=True)
    assert len(repeated) == 5 and set(repeated.tolist()) <= {0, 2} and report.repeated == 3


def test_nearest_candidates_are_exact_neighbours():
    synthetic, _ = mixture(200, SYNTH_WEIGHTS, seed=7)
    real, _ = mixture(20, REAL_WEIGHTS, seed=8)
    found = nn_vote.nearest_candidates(synthetic, real, 3)
    brute = np.argsort(-(real @ synthetic.T), axis=1)[:, :3]
    assert (found == brute).all()


def test_fit_clusters_is_seeded():
    synthetic, _ = mixture(1000, SYNTH_WEIGHTS, seed=9)
    a = fit_clusters(synthetic, K, 0.9, seed=3)
    b = fit_clusters(synthetic, K, 0.9, seed=3)
    assert (a.synthetic_labels == b.synthetic_labels).all()


# ------------------------------------------------------------------------------ metrics


def test_frechet_distance_is_zero_on_itself_and_grows_with_shift():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(x, x + 1.0) == pytest.approx(8.0, rel=1e-6)


@pytest.mark.parametrize("n", [40, 300])  # fewer and more rows than dimensions
def test_frechet_distance_matches_the_sqrtm_formula(n):
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, 64))
    b = rng.normal(size=(n + 7, 64)) * 1.3 + 0.2
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = np.real(sqrtm(ca @ cb))
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * root)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_extrapolation_removes_a_one_over_n_bias():
    sizes = [400, 200, 100]
    assert extrapolate(sizes, [2.0 + 117 / n for n in sizes]) == pytest.approx(2.0)
    assert gap_closed(10.0, 6.0, 2.0) == pytest.approx(0.5)
    assert gap_closed(1.0, 1.0, 2.0) is None


# ------------------------------------------------------------------------------ the stage


def _stage_run_dir(tmp_path, unit="instruction", **filter_cfg):
    """A run directory as the embed stage leaves it, from the known mixture."""
    synthetic, syn_true = mixture(3000, SYNTH_WEIGHTS, seed=10)
    real, _ = mixture(1200, REAL_WEIGHTS, seed=11)
    heldout, _ = mixture(400, REAL_WEIGHTS, seed=12)
    tree = {
        "run_dir": str(tmp_path / "run"),
        "data": {"path": "demo://", "user_field": "user"},
        "privacy": {"epsilon": 4.0, "delta": 1e-5, "unit": unit},
        "filter": {"num_clusters": K, "target_size": 500, "mauve": False, **filter_cfg},
    }
    config = config_from_tree(tree)
    run_dir = RunDir(config.run_dir)
    texts = [f"synthetic instruction {i} about topic {c}" for i, c in enumerate(syn_true)]
    sample_ids = [f"s{i}" for i in range(len(texts))]
    for part, rows in enumerate((slice(0, 1000), slice(1000, None))):  # two sample shards
        shard = pa.table({"text": texts[rows], "sample_id": sample_ids[rows]})
        pq.write_table(shard, run_dir.public("sample") / f"shard-{part:05d}.parquet")
    write_set(run_dir.public("embed") / "synthetic", pa.table({"sample_id": sample_ids}), synthetic)
    users = [f"u{i // 4}" for i in range(len(real))]
    write_set(
        run_dir.private("embed") / "real",
        pa.table({"id": [str(i) for i in range(len(real))], "user_id": users}),
        real,
    )
    write_set(
        run_dir.private("embed") / "heldout",
        pa.table({"id": [f"h{i}" for i in range(len(heldout))], "user_id": ["x"] * len(heldout)}),
        heldout,
    )
    Ledger.create(run_dir.ledger_path, unit, 4.0, 1e-5)
    return config, run_dir


def test_stage_writes_filtered_set_release_and_marked_metrics(tmp_path):
    config, run_dir = _stage_run_dir(tmp_path, sigma=5.0)
    result = run_filter(config, run_dir)
    filtered = pq.read_table(run_dir.root / "filter" / "filtered.parquet")
    assert filtered.column_names == ["text", "sample_id", "cluster"]
    by_id = {f"s{i}": f"synthetic instruction {i} about" for i in range(3000)}
    rows = filtered.to_pylist()
    assert all(r["text"].startswith(by_id[r["sample_id"]] + " ") for r in rows)  # right rows
    assert len(filtered) == 500 == result.summary["selection"]["selected"]
    noisy = read_json(run_dir.root / "filter" / "noisy_histogram.json")
    exact = read_json(run_dir.private("filter") / "exact_histogram.json")
    assert noisy["bins"] == K and noisy["noise_multiplier"] == 5.0
    assert sum(exact["values"]) == pytest.approx(1200)
    assert noisy["values"] != exact["values"]
    assert not (run_dir.root / "filter" / "exact_histogram.json").exists()
    # non-DP statistics of the held-out split: private zone only (#14, defect 5)
    assert not (run_dir.root / "filter" / "metrics.json").exists()
    assert not (run_dir.root / "filter" / "cluster_shares.png").exists()
    report = json.loads((run_dir.private("filter") / "metrics.json").read_text())
    assert report["evaluation"] == "non-private, held-out real split"
    assert report["tv"]["filtered"] < report["tv"]["unfiltered"] - 0.2
    fed = report["fed"]
    assert fed["fed"]["filtered"] < fed["fed"]["unfiltered"]
    assert fed["gap_closed"] > 0.5 and fed["sample_size"] == 200
    assert (run_dir.private("filter") / "cluster_shares.png").stat().st_size > 1000
    ledger = Ledger.load(run_dir.ledger_path)
    assert [e.stage for e in ledger.events] == ["filter"]


def test_ledger_composes_train_and_filter_within_target(tmp_path):
    config, run_dir = _stage_run_dir(tmp_path, unit="user")
    ledger = Ledger.load(run_dir.ledger_path)
    # A fake training spend (one full-batch step: cheap to account).
    train = PoissonSubsampledGaussianEvent(
        "train-generator", noise_multiplier=2.0, sampling_rate=1.0, steps=1
    )
    ledger.spend(train)
    spent_by_train = ledger.spent_epsilon
    assert 0.4 * 4.0 < spent_by_train < 4.0
    result = run_filter(config, run_dir)  # sigma solved from what is left
    after = Ledger.load(run_dir.ledger_path)
    assert [e.stage for e in after.events] == ["train-generator", "filter"]
    total = after.spent_epsilon
    assert spent_by_train < total <= 4.0 + 1e-9
    assert total == pytest.approx(4.0, rel=0.01)  # the filter used the rest
    assert result.summary["sigma"] > 0
    assert result.summary["epsilon_spent_total"] == pytest.approx(total)
    # Nothing useful is left: a second release with real signal is refused and writes nothing.
    (run_dir.root / "filter" / "filtered.parquet").unlink()
    config.filter.sigma = 5.0
    with pytest.raises(BudgetExceededError):
        run_filter(config, run_dir)
    assert not (run_dir.root / "filter" / "filtered.parquet").exists()
    assert len(Ledger.load(run_dir.ledger_path).events) == 2


def test_stage_detects_sample_shards_changed_since_embed(tmp_path):
    from dpray.io.readers import SourceError

    config, run_dir = _stage_run_dir(tmp_path, sigma=5.0)
    (run_dir.root / "sample" / "shard-00001.parquet").unlink()
    with pytest.raises(SourceError):
        run_filter(config, run_dir)
    assert Ledger.load(run_dir.ledger_path).events == ()


def test_stage_refuses_too_little_noise_before_any_output(tmp_path):
    config, run_dir = _stage_run_dir(tmp_path, sigma=0.5)  # epsilon ~10 > 4
    with pytest.raises(BudgetExceededError):
        run_filter(config, run_dir)
    assert not (run_dir.root / "filter" / "noisy_histogram.json").exists()
    assert Ledger.load(run_dir.ledger_path).events == ()


def test_stage_nn_vote(tmp_path):
    config, run_dir = _stage_run_dir(
        tmp_path, method="nn_vote", sigma=2.0, nn_k=2, nn_threshold=0.5, metrics=False
    )
    result = run_filter(config, run_dir)
    assert result.summary["selection"]["selected"] == 500
    assert np.load(run_dir.root / "filter" / "noisy_votes.npy").shape == (3000,)
    assert (run_dir.private("filter") / "exact_votes.npy").exists()
    assert not (run_dir.private("filter") / "metrics.json").exists()


def test_stage_metrics_with_mauve(tmp_path):
    pytest.importorskip("mauve")
    config, run_dir = _stage_run_dir(tmp_path, sigma=5.0, mauve=True, metrics_subsamples=2)
    run_filter(config, run_dir)
    report = read_json(run_dir.private("filter") / "metrics.json")
    mauve = report["mauve"]
    assert "error" not in mauve, mauve
    assert 0 <= mauve["unfiltered"] < mauve["filtered"] <= 1
