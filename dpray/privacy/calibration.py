"""Solve the noise multiplier that spends a given epsilon, with dp-accounting.

The training stage calls :func:`solve_noise_multiplier` with a factory ``σ -> event`` and the
events already in the ledger: σ is the smallest value whose composition with them stays within
the stage's epsilon.  For events dp-accounting knows, its ``calibrate_dp_mechanism`` does the
search with the PLD accountant (the accountant the ledger reports); for RDP-only events (Skellam)
the same monotone bisection runs on the ledger's own composition.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from dpray.privacy.events import PrivacyEvent
from dpray.privacy.ledger import _pld_epsilon, compose


class CalibrationError(ValueError):
    """No noise multiplier in the search range meets the target."""


def solve_noise_multiplier(
    make_event: Callable[[float], PrivacyEvent],
    target_epsilon: float,
    delta: float,
    existing: Sequence[PrivacyEvent] = (),
    low: float = 0.05,
    high: float = 500.0,
    tol: float = 1e-3,
) -> float:
    """Smallest σ with ε(existing + make_event(σ)) ≤ target_epsilon at ``delta``."""
    if target_epsilon <= 0:
        raise CalibrationError("no epsilon left to spend")
    if compose(list(existing) + [make_event(high)], delta).epsilon > target_epsilon:
        raise CalibrationError(
            f"even noise multiplier {high} exceeds epsilon {target_epsilon:.4g}; "
            "lower the steps or sampling rate, or raise the budget"
        )

    def eps(sigma: float, fast: bool) -> float:
        return compose(list(existing) + [make_event(sigma)], delta, fast=fast).epsilon

    # RDP (fast, never below PLD) brackets the answer from above ...
    sigma_rdp = _bisect(lambda s: eps(s, True) <= target_epsilon, low, high, tol)
    probe = make_event(1.0)
    if not all(e.dp_event() is not None for e in [*existing, probe]):
        return sigma_rdp  # RDP is the accountant the ledger reports for this composition

    # ... then PLD, the reported accountant, tightens it (PLD's epsilon is never larger).  The
    # search uses a coarse (pessimistic, so never smaller) discretisation; the answer is then
    # checked with the ledger's own accountant and nudged up if needed.
    def coarse_ok(sigma: float) -> bool:
        return _pld_epsilon(list(existing) + [make_event(sigma)], delta, 1e-3) <= target_epsilon

    lo = sigma_rdp * 0.3 if not coarse_ok(sigma_rdp * 0.3) else low
    sigma = _bisect(coarse_ok, lo, sigma_rdp, tol)
    while eps(sigma, False) > target_epsilon:
        sigma *= 1.0 + tol
    return sigma


def _bisect(ok: Callable[[float], bool], lo: float, hi: float, tol: float) -> float:
    """Smallest value in [lo, hi] (to relative ``tol``) for which monotone ``ok`` holds."""
    while hi - lo > tol * hi:
        mid = 0.5 * (lo + hi)
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return float(hi)
