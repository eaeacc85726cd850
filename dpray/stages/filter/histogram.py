"""The DP math of the filter, pure and separately tested: votes, sensitivity, noise, shares.

Both filter methods release one vector of vote totals (per cluster, or per synthetic candidate)
with the Gaussian mechanism.  What makes that DP is a bound on how much one privacy unit (a
record, or a user at ``privacy.unit: user``) can move the vector: every unit's contribution is
scaled here so that its L2 norm is at most :data:`SENSITIVITY`, whatever the unit did.  Adding or
removing one unit then changes the vector by at most that much in L2, and adding
N(0, sigma^2) per bin is a Gaussian mechanism with noise multiplier ``sigma / SENSITIVITY``,
which is what the ledger composes.

Two ways of scaling a unit's raw vote counts ``v`` (non-negative, over bins):

* ``split`` -- ``v / ||v||_1``: one vote per unit, spread over its records in proportion.  Its L2
  norm is ``||v||_2 / ||v||_1 <= 1``.  The cluster histogram uses it, so the histogram counts
  units and its shares estimate the average user's distribution (users with many records are
  not weighted up).
* ``l2`` -- ``v / ||v||_2``: L2 norm exactly 1, the most signal the sensitivity allows.  The
  nearest-neighbour vote uses it (a record voting for k distinct candidates gives each
  ``1/sqrt(k)``, as in Private Evolution).

Nothing here touches files, configs or the ledger, and nothing here draws noise: the release
(``gaussian_release``), its secret OS-seeded generator (``secret_rng``) and its ledger event
(``gaussian_event``) are the Gaussian mechanism's, in :mod:`dpray.privacy.mechanisms.gaussian`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

# re-exported: benchmarks/filter.py draws its noise generator through this module
from dpray.privacy.mechanisms.gaussian import secret_rng  # noqa: F401

SENSITIVITY = 1.0
"""L2 sensitivity of every released vote vector (each unit's contribution has norm <= 1)."""

Scheme = Literal["split", "l2"]


def unit_votes(
    units: np.ndarray, bins: np.ndarray, num_bins: int, scheme: Scheme = "split"
) -> np.ndarray:
    """Vote totals over ``num_bins`` with every unit's contribution scaled to L2 norm <= 1.

    ``units``: (n,) the privacy unit of each record (any integer labels).  ``bins``: (n,) or
    (n, k), the bin(s) each record votes for; repeated bins within a unit add up before scaling.
    Returns a float64 vector of length ``num_bins``.
    """
    units = np.asarray(units)
    bins = np.asarray(bins, dtype=np.int64)
    if bins.ndim == 1:
        bins = bins[:, None]
    if bins.shape[0] != units.shape[0]:
        raise ValueError("units and bins must have one row per record")
    if bins.size and (bins.min() < 0 or bins.max() >= num_bins):
        raise ValueError("bin index out of range")
    if units.size == 0:
        return np.zeros(num_bins)
    _, unit_index = np.unique(units, return_inverse=True)
    unit_index = np.repeat(unit_index.reshape(-1), bins.shape[1])
    flat_bins = bins.reshape(-1)
    # Raw counts per (unit, bin) pair: one sort instead of a dense units x bins matrix.
    pairs = unit_index * np.int64(num_bins) + flat_bins
    pair_keys, counts = np.unique(pairs, return_counts=True)
    pair_unit = pair_keys // num_bins
    pair_bin = pair_keys % num_bins
    counts = counts.astype(np.float64)
    if scheme == "split":
        norms = np.bincount(pair_unit, weights=counts)
    elif scheme == "l2":
        norms = np.sqrt(np.bincount(pair_unit, weights=counts**2))
    else:
        raise ValueError(f"unknown scheme {scheme!r}")
    weights = counts / norms[pair_unit]
    return np.bincount(pair_bin, weights=weights, minlength=num_bins)


def max_unit_contribution(
    units: np.ndarray, bins: np.ndarray, num_bins: int, scheme: Scheme = "split"
) -> float:
    """Largest L2 norm of one unit's contribution (<= SENSITIVITY by construction; for tests)."""
    largest = 0.0
    units = np.asarray(units)
    bins = np.asarray(bins)
    for unit in np.unique(units):
        mine = units == unit
        largest = max(
            largest, float(np.linalg.norm(unit_votes(units[mine], bins[mine], num_bins, scheme)))
        )
    return largest


def to_shares(noisy: np.ndarray, fallback: np.ndarray | None = None) -> np.ndarray:
    """Clamp a noisy release at 0 and normalise to shares (post-processing: free).

    When noise wipes out every bin, fall back to ``fallback`` (e.g. the synthetic set's own
    shares, which are public) or uniform: the release then carries no usable signal.
    """
    clamped = np.clip(np.asarray(noisy, dtype=np.float64), 0.0, None)
    total = clamped.sum()
    if total > 0:
        return clamped / total
    if fallback is not None and np.sum(fallback) > 0:
        fallback = np.asarray(fallback, dtype=np.float64)
        return fallback / fallback.sum()
    return np.full(len(clamped), 1.0 / max(1, len(clamped)))


def noise_multiplier(sigma: float, sensitivity: float = SENSITIVITY) -> float:
    """The ledger's noise multiplier for absolute noise std ``sigma``."""
    return sigma / sensitivity
