"""Distribution metrics for the filter: evaluation only, on the held-out real split (NOT DP).

Every figure here is computed from real held-out records without noise, so it is *not* a DP
output: the JSON says so in its ``evaluation`` field, and nothing here is ever fed back into a DP
step.  The held-out split never enters training or the histogram.

Why the care with sample sizes: the Frechet embedding distance (FED) between two Gaussian fits has
a finite-sample bias of roughly c/n (about 117/n for MiniLM), so the real-vs-real floor is almost
all bias and raw ratios drift with n.  Every set is therefore compared at one stated n, averaged
over several subsamples, and also extrapolated to n -> infinity by a least-squares fit of
FED(n) = a + b/n over n, n/2, n/4 (``a`` is the bias-corrected FED).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

EVALUATION = "non-private, held-out real split"
MIN_FED_SIZE = 16
MAUVE_MAX = 5000


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of Gaussian fits to two samples.

    ``Tr (S_a S_b)^(1/2)`` is the sum of the singular values of ``A B^T / sqrt((n_a-1)(n_b-1))``
    for the centred samples A, B (the non-zero eigenvalues of S_a S_b are those of that
    product times its transpose).  With fewer rows than dimensions -- the usual case for
    evaluation subsamples of 384-d embeddings -- that is a small n x n problem; otherwise the
    d x d route ``sqrt(S_a) S_b sqrt(S_a)`` is cheaper.  Both are symmetric and stable for the
    rank-deficient covariances of n < d.
    """
    xa = np.asarray(a, dtype=np.float64)
    xb = np.asarray(b, dtype=np.float64)
    mu_a, mu_b = xa.mean(axis=0), xb.mean(axis=0)
    xa = xa - mu_a
    xb = xb - mu_b
    na, nb = max(1, len(xa) - 1), max(1, len(xb) - 1)
    trace_a = float((xa * xa).sum() / na)
    trace_b = float((xb * xb).sum() / nb)
    if min(len(xa), len(xb)) <= xa.shape[1]:
        cross = (xa @ xb.T) / np.sqrt(na * nb)
        trace_root = float(np.linalg.svd(cross, compute_uv=False).sum())
    else:
        cov_a = xa.T @ xa / na
        cov_b = xb.T @ xb / nb
        vals, vecs = np.linalg.eigh(cov_a)
        root_a = (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T
        middle = root_a @ cov_b @ root_a
        eig = np.linalg.eigvalsh((middle + middle.T) / 2)
        trace_root = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    value = float(((mu_a - mu_b) ** 2).sum()) + trace_a + trace_b - 2 * trace_root
    return max(0.0, value)


def probe_accuracy(
    real: np.ndarray, other: np.ndarray, folds: int = 5, seed: int = 0
) -> float | None:
    """Classifier two-sample test: cross-validated accuracy of a logistic regression telling
    ``real`` from ``other`` rows (equal sizes; 0.5 = indistinguishable, 1 = always told apart).

    Stricter than MAUVE or FED on sentence embeddings: text that reads as junk can still score
    a MAUVE of 0.8 against real instructions while a linear probe tells it apart 80% of the time.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n = min(len(real), len(other))
    if n < 2 * folds:
        return None
    rng = np.random.default_rng(seed)
    a = np.asarray(real)[rng.choice(len(real), n, replace=False)]
    b = np.asarray(other)[rng.choice(len(other), n, replace=False)]
    x = np.concatenate([a, b]).astype(np.float64)
    y = np.concatenate([np.zeros(n), np.ones(n)])
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    split = StratifiedKFold(folds, shuffle=True, random_state=seed % (2**31))
    return float(cross_val_score(model, x, y, cv=split, scoring="accuracy").mean())


def probe_metrics(
    heldout: np.ndarray,
    unfiltered: np.ndarray,
    filtered: np.ndarray,
    repeats: int,
    seed: int,
    folds: int = 5,
) -> dict | None:
    """Probe accuracy of held-out real vs each set at one n, averaged over subsamples; the
    floor tells two disjoint halves of the held-out split apart (about 0.5)."""
    n = min(len(heldout) // 2, len(unfiltered), len(filtered))
    if n < 2 * folds:
        return None
    rng = np.random.default_rng(seed)
    out: dict[str, list[float]] = {"unfiltered": [], "filtered": [], "real_floor": []}
    for r in range(repeats):
        order = rng.permutation(len(heldout))
        reference, other = heldout[order[:n]], heldout[order[n : 2 * n]]
        for name, pool in (
            ("unfiltered", unfiltered),
            ("filtered", filtered),
            ("real_floor", other),
        ):
            value = probe_accuracy(reference, _subsample(pool, n, rng), folds, seed + r)
            out[name].append(value)
    return {
        "sample_size": n,
        "folds": folds,
        "subsamples": repeats,
        **{name: float(np.mean(v)) for name, v in out.items()},
        "std": {name: float(np.std(v)) for name, v in out.items()},
        "model": "standardised features, logistic regression (C=0.1), stratified k-fold",
    }


def tv_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Total variation distance between two histograms (normalised here)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p = p / p.sum() if p.sum() > 0 else p
    q = q / q.sum() if q.sum() > 0 else q
    return float(0.5 * np.abs(p - q).sum())


def _subsample(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return pool[rng.choice(len(pool), size=n, replace=False)]


def fed_table(
    heldout: np.ndarray,
    sets: dict[str, np.ndarray],
    n: int,
    repeats: int,
    rng: np.random.Generator,
) -> dict[str, list[float]]:
    """FED of held-out vs each set at size ``n`` over ``repeats`` subsamples, plus the floor.

    The floor ``real_floor`` compares two disjoint size-``n`` halves of the held-out split.
    """
    out: dict[str, list[float]] = {name: [] for name in [*sets, "real_floor"]}
    for _ in range(repeats):
        order = rng.permutation(len(heldout))
        reference = heldout[order[:n]]
        other_real = heldout[order[n : 2 * n]]
        for name, pool in sets.items():
            out[name].append(frechet_distance(reference, _subsample(pool, n, rng)))
        out["real_floor"].append(frechet_distance(reference, other_real))
    return out


def extrapolate(sizes: list[int], values: list[float]) -> float:
    """Intercept ``a`` of the least-squares fit FED(n) = a + b / n (the n -> infinity value)."""
    x = 1.0 / np.asarray(sizes, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if len(np.unique(x)) < 2:
        return float(y.mean())
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept)


def gap_closed(unfiltered: float, filtered: float, floor: float) -> float | None:
    """Share of the unfiltered-to-floor gap that filtering closes (1 = reaches the floor)."""
    gap = unfiltered - floor
    if gap <= 0:
        return None
    return float((unfiltered - filtered) / gap)


def fed_metrics(
    heldout: np.ndarray,
    unfiltered: np.ndarray,
    filtered: np.ndarray,
    repeats: int,
    rng: np.random.Generator,
) -> dict | None:
    """FED at one stated n (the largest all sets allow), its bias-corrected version, gap closed."""
    n = min(len(heldout) // 2, len(unfiltered), len(filtered))
    if n < MIN_FED_SIZE:
        return None
    sizes = sorted({n, max(MIN_FED_SIZE, n // 2), max(MIN_FED_SIZE, n // 4)}, reverse=True)
    sets = {"unfiltered": unfiltered, "filtered": filtered}
    by_size = {size: fed_table(heldout, sets, size, repeats, rng) for size in sizes}
    at_n = by_size[n]
    mean = {name: float(np.mean(v)) for name, v in at_n.items()}
    corrected = {
        name: extrapolate(sizes, [float(np.mean(by_size[s][name])) for s in sizes]) for name in at_n
    }
    return {
        "sample_size": n,
        "subsamples": repeats,
        "fed": mean,
        "fed_std": {name: float(np.std(v)) for name, v in at_n.items()},
        "fed_by_size": {
            str(s): {name: float(np.mean(v)) for name, v in by_size[s].items()} for s in sizes
        },
        "fed_bias_corrected": corrected,
        "bias_correction": "least-squares fit FED(n) = a + b/n over the sizes in fed_by_size; a",
        "gap_closed": gap_closed(mean["unfiltered"], mean["filtered"], mean["real_floor"]),
        "gap_closed_bias_corrected": gap_closed(
            corrected["unfiltered"], corrected["filtered"], corrected["real_floor"]
        ),
    }


def mauve_metrics(
    heldout: np.ndarray,
    unfiltered: np.ndarray,
    filtered: np.ndarray,
    seed: int,
) -> dict:
    """MAUVE (the ``mauve-text`` package, on our features) of held-out vs each set.

    Sizes are equalised (at most :data:`MAUVE_MAX`), since MAUVE also depends on n.  Returns
    ``{"error": ...}`` instead of raising when the package is missing or fails.
    """
    try:
        import mauve
    except ImportError:
        return {"error": "mauve-text is not installed"}
    rng = np.random.default_rng(seed)
    half = len(heldout) // 2
    n = min(MAUVE_MAX, half, len(unfiltered), len(filtered))
    if n < MIN_FED_SIZE:
        return {"error": f"too few records for MAUVE (n={n})"}
    order = rng.permutation(len(heldout))
    reference, other = heldout[order[:n]], heldout[order[n : 2 * n]]
    out: dict = {"sample_size": n}
    try:
        for name, pool in (
            ("unfiltered", unfiltered),
            ("filtered", filtered),
            ("real_floor", None),
        ):
            q = other if pool is None else _subsample(pool, n, rng)
            result = mauve.compute_mauve(
                p_features=reference, q_features=q, seed=seed, verbose=False
            )
            out[name] = float(result.mauve)
    except Exception as exc:  # noqa: BLE001 (evaluation must not fail the stage)
        return {"error": f"MAUVE failed: {exc.__class__.__name__}"}
    return out


def plot_cluster_shares(
    path: Path, real: np.ndarray, before: np.ndarray, after: np.ndarray, noisy: np.ndarray | None
) -> Path:
    """Real (held-out) vs synthetic cluster shares before/after filtering, clusters sorted by the
    real share.  Non-private evaluation, like the metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def shares(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return x / x.sum() if x.sum() > 0 else x

    order = np.argsort(-shares(real), kind="stable")
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    xs = np.arange(len(order))
    ax.plot(xs, shares(real)[order], color="black", lw=2, label="real (held-out)")
    ax.plot(xs, shares(before)[order], color="tab:red", lw=1, alpha=0.8, label="synthetic before")
    ax.plot(xs, shares(after)[order], color="tab:blue", lw=1, alpha=0.8, label="synthetic after")
    if noisy is not None:
        ax.plot(xs, shares(noisy)[order], color="tab:green", lw=1, ls=":", label="noisy release")
    ax.set_xlabel("cluster (sorted by real share)")
    ax.set_ylabel("share")
    ax.set_title(f"Cluster shares: evaluation only ({EVALUATION}), not DP", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def evaluate(
    heldout: np.ndarray,
    unfiltered: np.ndarray,
    filtered: np.ndarray,
    heldout_labels: np.ndarray,
    unfiltered_labels: np.ndarray,
    filtered_labels: np.ndarray,
    num_clusters: int,
    noisy_shares: np.ndarray | None,
    repeats: int,
    seed: int,
    with_mauve: bool,
    plot_path: Path | None,
) -> dict:
    """All metrics as one JSON-able dict (see the module docstring for what is not DP)."""
    out: dict = {
        "evaluation": EVALUATION,
        "note": "Computed from held-out real records without noise: NOT differentially "
        "private. For evaluating the filter only; never used by a DP step.",
        "heldout_records": int(len(heldout)),
    }
    if len(heldout) < 2 * MIN_FED_SIZE:
        out["skipped"] = "too few held-out records (set data.heldout_fraction)"
        return out
    rng = np.random.default_rng(seed)
    real_h = np.bincount(heldout_labels, minlength=num_clusters)
    before_h = np.bincount(unfiltered_labels, minlength=num_clusters)
    after_h = np.bincount(filtered_labels, minlength=num_clusters)
    out["tv"] = {
        "unfiltered": tv_distance(real_h, before_h),
        "filtered": tv_distance(real_h, after_h),
    }
    if noisy_shares is not None:
        out["tv"]["noisy_release"] = tv_distance(real_h, noisy_shares)
    fed = fed_metrics(heldout, unfiltered, filtered, repeats, rng)
    out["fed"] = fed if fed is not None else {"skipped": "too few records"}
    probe = probe_metrics(heldout, unfiltered, filtered, repeats, seed)
    out["probe"] = probe if probe is not None else {"skipped": "too few records"}
    out["mauve"] = mauve_metrics(heldout, unfiltered, filtered, seed) if with_mauve else None
    if plot_path is not None:
        plot_cluster_shares(plot_path, real_h, before_h, after_h, noisy_shares)
        out["plot"] = plot_path.name
    return out
