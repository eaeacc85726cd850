"""Skellam RDP, Zhu-Wang Poisson subsampling, and comparison with dp-accounting's Gaussian.

Measured gaps (δ = 1e-5, D = 2^20, s ≈ 7e10 from choose_scale(b=40, d=1e6, n=4, C=1)):

    (σ, q, T)            PLD Gauss   RDP Gauss   Skellam   Sk/PLD   Sk/RDP
    (1.0, 0.01, 1000)      1.828       2.101      2.450    1.34     1.17
    (0.8, 0.05, 200)       7.702       8.743     11.330    1.47     1.30
    (2.0, 0.001, 10000)    0.174       0.201      0.221    1.27     1.10
    (1.0, 0.001, 10000)    0.476       0.788      0.811    1.70     1.03

Where the gap comes from (so nobody "fixes" it by loosening the Skellam analysis):

* Discreteness and rounding cost almost nothing: at this scale the Skellam ε equals the
  Zhu-Wang bound applied to the plain Gaussian RDP α/(2σ²) to 4 digits (and is < 0.5% above it
  even at the sampler-capped s ~ 1e6).
* The Zhu-Wang general subsampling bound (Thm 6) is looser than dp-accounting's exact
  sampled-Gaussian RDP (Mironov et al. 2019): the j >= 3 binomial terms carry a factor 3 because
  for a general mechanism the "remove" direction D_α(μ0 ‖ (1-q)μ0 + qμ1) is not known to be
  dominated by the "add" direction -- true for the Gaussian, unproven for Skellam.  That costs
  10-30% in ε (up to ~90% at σ = 4, q = 0.01 where large orders dominate).
* RDP -> (ε, δ) conversion is looser than the PLD accountant by another 13-65%.

So the "within 10%" target holds against the RDP Gaussian accountant only in the small-q
regimes ((2.0, 0.001, 10000): +9.7%, (1.0, 0.001, 10000): +3%), and against PLD in none.  The
other regimes are pinned below documented ceilings as regression guards.
"""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from dpray.privacy.mechanisms.skellam import (
    skellam_dpsgd_epsilon,
    skellam_rdp,
    skellam_sensitivities,
)
from dpray.privacy.mechanisms.subsampling import (
    default_orders,
    poisson_subsampled_rdp,
    rdp_to_epsilon,
)
from dpray.privacy.secure_agg.quantize import choose_scale
from dpray.privacy.secure_agg.rotation import padded_dim

DELTA = 1e-5
DIM = padded_dim(10**6)
# the scale the modulus allows for b = 40, d = 1e6, 4 workers, C = 1 (noise share σ/sqrt(4))
LARGE_SCALE = {sigma: choose_scale(40, 10**6, 4, 1.0, sigma / 2) for sigma in (0.8, 1.0, 2.0)}


def _gaussian_event(sigma: float, q: float, steps: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )


def _gaussian_eps(sigma: float, q: float, steps: int) -> tuple[float, float]:
    event = _gaussian_event(sigma, q, steps)
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(event)
    rdp = rdp_privacy_accountant.RdpAccountant()  # dp-accounting's own (fractional) orders
    rdp.compose(event)
    return pld.get_epsilon(DELTA), rdp.get_epsilon(DELTA)


# (σ, q, T, max Skellam/PLD ratio, max Skellam/RDP ratio); ceilings are the measured ratio
# rounded up by ~0.05 -- see the module docstring for why 1.10 is not reachable everywhere.
SETTINGS = [
    (1.0, 0.01, 1000, 1.40, 1.22),
    (0.8, 0.05, 200, 1.52, 1.35),
    (2.0, 0.001, 10000, 1.32, 1.10),  # the brief's 10% target holds here (measured 1.097)
]


@pytest.mark.parametrize(("sigma", "q", "steps", "max_vs_pld", "max_vs_rdp"), SETTINGS)
def test_skellam_epsilon_vs_gaussian(sigma, q, steps, max_vs_pld, max_vs_rdp):
    eps_pld, eps_rdp = _gaussian_eps(sigma, q, steps)
    eps_sk = skellam_dpsgd_epsilon(sigma, 1.0, LARGE_SCALE[sigma], DIM, q, steps, DELTA)
    # a discrete mechanism with inflated sensitivity, analysed more loosely, is never cheaper
    assert eps_sk >= eps_pld
    assert eps_sk >= eps_rdp
    assert eps_sk <= max_vs_pld * eps_pld
    assert eps_sk <= max_vs_rdp * eps_rdp


def test_skellam_within_ten_percent_of_rdp_gaussian_at_small_q():
    sigma, q, steps = 1.0, 0.001, 10000
    _, eps_rdp = _gaussian_eps(sigma, q, steps)
    eps_sk = skellam_dpsgd_epsilon(sigma, 1.0, LARGE_SCALE[sigma], DIM, q, steps, DELTA)
    assert eps_rdp <= eps_sk <= 1.10 * eps_rdp


@pytest.mark.parametrize(("sigma", "q", "steps"), [(s, q, t) for s, q, t, *_ in SETTINGS])
def test_gap_is_subsampling_analysis_not_discreteness(sigma, q, steps):
    orders = default_orders()
    zw_gauss = poisson_subsampled_rdp(orders, lambda a: a / (2 * sigma**2), q)
    eps_zw_gauss = rdp_to_epsilon(orders, steps * zw_gauss, DELTA)
    eps_sk = skellam_dpsgd_epsilon(sigma, 1.0, LARGE_SCALE[sigma], DIM, q, steps, DELTA)
    assert eps_zw_gauss <= eps_sk <= eps_zw_gauss * (1 + 1e-4)
    # even at the torch.poisson-capped scale (~1e6) discreteness costs < 1%
    eps_small_scale = skellam_dpsgd_epsilon(sigma, 1.0, 2.0**20, DIM, q, steps, DELTA)
    assert eps_sk <= eps_small_scale <= eps_zw_gauss * 1.01


@pytest.mark.parametrize(("sigma", "q", "steps", "eps_ratio_ceiling"), [
    (1.0, 0.01, 1000, 1.20), (0.8, 0.05, 200, 1.33), (2.0, 0.001, 10000, 1.12),
    (4.0, 0.01, 1000, 2.0),  # large orders dominate, where the factor 3 bites hardest
])  # fmt: skip
def test_zhu_wang_with_gaussian_base_bounds_dp_accounting(sigma, q, steps, eps_ratio_ceiling):
    orders = default_orders()
    exact = rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(
        q, sigma, orders.astype(np.float64)
    )
    zw = poisson_subsampled_rdp(orders, lambda a: a / (2 * sigma**2), q)
    assert np.all(zw >= exact * (1 - 1e-10))  # a valid upper bound at every order
    # α = 2 has no j >= 3 terms, so the general bound is exact there
    assert zw[0] == pytest.approx(exact[0], rel=1e-9)
    # and close in ε terms (the factor 3 on j >= 3 terms is the whole difference)
    eps_exact = rdp_to_epsilon(orders, steps * exact, DELTA)
    eps_zw = rdp_to_epsilon(orders, steps * zw, DELTA)
    assert eps_exact * (1 - 1e-9) <= eps_zw <= eps_ratio_ceiling * eps_exact


def test_subsampling_edge_cases_and_stability():
    orders = default_orders()
    base = lambda a: a / 2.0  # noqa: E731  (σ = 1 Gaussian)
    assert np.all(poisson_subsampled_rdp(orders, base, 0.0) == 0)
    np.testing.assert_allclose(poisson_subsampled_rdp(orders, base, 1.0), orders / 2.0)
    tiny = poisson_subsampled_rdp(orders, base, 1e-6)
    assert np.all(np.isfinite(tiny)) and np.all(tiny >= 0)
    # for q -> 0 the subsampled Gaussian RDP behaves like q² α (e^{1/σ²} - 1) / 2 at small α
    assert tiny[0] == pytest.approx(1e-12 * (np.e - 1), rel=1e-3)
    # monotone in q and capped by the base RDP
    lo = poisson_subsampled_rdp(orders, base, 0.01)
    hi = poisson_subsampled_rdp(orders, base, 0.1)
    assert np.all(lo <= hi) and np.all(hi <= orders / 2.0 + 1e-12)
    with pytest.raises(ValueError):
        poisson_subsampled_rdp(np.array([1.5, 2.0]), base, 0.1)


def test_skellam_rdp_formula_and_limits():
    s, sigma, c, d = 1e4, 1.0, 1.0, 2**10
    l1, l2 = skellam_sensitivities(c, s, d)
    assert l2 == pytest.approx(s * c + np.sqrt(d))
    assert l1 == pytest.approx(min(np.sqrt(d) * l2, l2**2))
    alpha = np.array([2.0, 8.0, 64.0])
    var = (s * sigma * c) ** 2
    expected = alpha * l2**2 / (2 * var) + np.minimum(
        ((2 * alpha - 1) * l2**2 + 6 * l1) / (4 * var**2), 3 * l1 / (2 * var)
    )
    np.testing.assert_allclose(skellam_rdp(alpha, sigma, c, s, d), expected, rtol=1e-12)
    # larger scale -> approaches the Gaussian RDP α/(2σ²) from above
    gauss = alpha / (2 * sigma**2)
    prev = np.inf
    for scale in (1e3, 1e5, 1e7, 1e10):
        r = skellam_rdp(alpha, sigma, c, scale, d)
        assert np.all(r >= gauss) and r[1] < prev
        prev = r[1]
    np.testing.assert_allclose(skellam_rdp(alpha, sigma, c, 1e10, d), gauss, rtol=1e-5)
    assert np.all(np.isinf(skellam_rdp(alpha, 0.0, c, s, d)))


def test_rdp_to_epsilon_uses_dp_accounting_conversion():
    orders = default_orders()
    rdp = 100 * rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(
        0.02, 1.1, orders.astype(np.float64)
    )
    expected, _ = rdp_privacy_accountant.compute_epsilon(list(orders), list(rdp), DELTA)
    assert rdp_to_epsilon(orders, rdp, DELTA) == pytest.approx(expected, rel=1e-12)
    acc = rdp_privacy_accountant.RdpAccountant(list(orders.astype(float)))
    acc.compose(_gaussian_event(1.1, 0.02, 100))
    assert rdp_to_epsilon(orders, rdp, DELTA) == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
