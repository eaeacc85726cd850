"""RDP amplification by Poisson subsampling for an arbitrary base mechanism.

dp-accounting's RDP accountant only knows the *Gaussian* under Poisson sampling (Mironov, Talwar
& Zhang 2019, exact for that mechanism).  The distributed Skellam mechanism is not Gaussian, so
we use the general upper bound of Zhu & Wang, "Poisson Subsampled Rényi Differential Privacy"
(ICML 2019, Theorem 6), valid for any mechanism with RDP ``ε(·)`` under add/remove-one
neighbouring and integer ``α >= 2``:

    ε'(α) <= 1/(α-1) · log( (1-q)^(α-1) (αq - q + 1)
                            + C(α,2) q^2 (1-q)^(α-2) e^{ε(2)}
                            + 3 Σ_{j=3..α} C(α,j) q^j (1-q)^(α-j) e^{(j-1) ε(j)} ).

The factor 3 on the higher-order terms makes it looser than the exact Gaussian computation; for
small ``q`` those terms are ``O(q^3)`` and the bound is nearly tight.  Subsampling never hurts,
so we also cap at the un-subsampled ``ε(α)``.

Everything is evaluated in log space (``gammaln`` binomials, ``logsumexp``): the raw terms
under/overflow for ``α`` in the hundreds and ``q`` around 1e-3.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant
from scipy.special import gammaln, logsumexp

__all__ = ["default_orders", "poisson_subsampled_rdp", "rdp_to_epsilon"]


def default_orders() -> np.ndarray:
    """Integer RDP orders 2..256 plus a few larger ones (the bound needs integers).

    Large orders matter only for very small ε (the optimal order is about
    ``1 + log(1/δ)/ε``); 1024 covers ε down to ~0.01 at δ = 1e-5.
    """
    return np.concatenate(
        [np.arange(2, 257), np.array([288, 320, 384, 448, 512, 640, 768, 1024])]
    ).astype(np.int64)


def _log_comb(n: int, k: np.ndarray) -> np.ndarray:
    return gammaln(n + 1.0) - gammaln(k + 1.0) - gammaln(n - k + 1.0)


def poisson_subsampled_rdp(
    orders: np.ndarray,
    base_rdp: Callable[[np.ndarray], np.ndarray],
    q: float,
) -> np.ndarray:
    """Zhu-Wang upper bound on the RDP of the Poisson-subsampled mechanism, per order.

    ``orders`` are integers >= 2.  ``base_rdp`` maps an array of integer orders (float64
    ``2, 3, ..., max(orders)``) to the base mechanism's RDP at those orders; it is called once.
    ``q`` is the Poisson sampling rate.
    """
    orders_arr = np.asarray(orders)
    if orders_arr.ndim != 1 or orders_arr.size == 0:
        raise ValueError("orders must be a non-empty 1-D array")
    if np.any(orders_arr < 2) or np.any(orders_arr != np.round(orders_arr)):
        raise ValueError("the Zhu-Wang bound needs integer orders >= 2")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    int_orders = orders_arr.astype(np.int64)
    if q == 0.0:
        return np.zeros(int_orders.shape)
    js = np.arange(2, int(int_orders.max()) + 1)
    eps = np.asarray(base_rdp(js.astype(np.float64)), dtype=np.float64)
    if eps.shape != js.shape:
        raise ValueError("base_rdp must return one value per order")
    if np.any(eps < 0):
        raise ValueError("base RDP must be non-negative")
    base_at = eps[int_orders - 2]
    if q == 1.0:
        return base_at.copy()

    log_q = np.log(q)
    log_1mq = np.log1p(-q)
    out = np.empty(int_orders.shape)
    for i, a in enumerate(int_orders):
        a = int(a)
        head = [
            (a - 1) * log_1mq + np.log1p((a - 1) * q),
            _log_comb(a, np.array(2.0)) + 2 * log_q + (a - 2) * log_1mq + eps[0],
        ]
        j = np.arange(3, a + 1, dtype=np.float64)
        tail = (
            np.log(3.0)
            + _log_comb(a, j)
            + j * log_q
            + (a - j) * log_1mq
            + (j - 1.0) * eps[j.astype(np.int64) - 2]
        )
        log_total = logsumexp(np.concatenate([np.array(head, dtype=np.float64), tail]))
        out[i] = min(log_total / (a - 1), base_at[i])
    return out


def rdp_to_epsilon(orders: np.ndarray, rdp: np.ndarray, delta: float) -> float:
    """Smallest ε over the orders for the given δ, via dp-accounting's RDP-to-(ε, δ) conversion.

    Delegates to ``dp_accounting.rdp.rdp_privacy_accountant.compute_epsilon`` (the improved
    conversion of Balle et al. 2020 / Asoodeh et al. 2021) so that Skellam and Gaussian budgets
    go through identical code.
    """
    eps, _ = rdp_privacy_accountant.compute_epsilon(
        [float(o) for o in np.asarray(orders)], [float(r) for r in np.asarray(rdp)], delta
    )
    return float(eps)
