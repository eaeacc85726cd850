"""RDP of the distributed discrete Skellam mechanism (Agarwal, Kairouz & Liu, NeurIPS 2021).

The released quantity (see :mod:`dpray.privacy.secure_agg.aggregator`) is the integer vector
``Σ_i round(s·R x_i) + Sk`` where ``Sk`` has per-coordinate variance ``V >= (s·σ·C)^2`` (the honest
workers' shares; a sum of Skellams is Skellam).  Adding or removing one example changes one
worker's input by at most ``C`` in L2, hence the *rounded* integer vector by at most

    Δ2 = s·C + sqrt(D)

(with the rounding randomness coupled as ``floor(v + U)``, each coordinate's rounding error
moves by less than 1; Rényi divergence is jointly quasi-convex, so the bound for every fixed
``U`` carries over to the mixture).  For integer vectors ``|v_j| <= v_j^2``, and Cauchy-Schwarz
gives ``‖v‖_1 <= sqrt(D)‖v‖_2``, hence

    Δ1 = min(sqrt(D)·Δ2, Δ2^2).

Their RDP bound for the multi-dimensional Skellam mechanism, written with ``V`` the
per-coordinate variance (each Poisson has mean ``V/2``), gives for integer vectors and ``α > 1``

    ε(α) = α Δ2^2 / (2V) + min( ((2α - 1) Δ2^2 + 6 Δ1) / (4 V^2),  3 Δ1 / (2V) ).

The first term is exactly the Gaussian mechanism's RDP with std ``sqrt(V)`` and sensitivity
``Δ2``; the second is the price of discreteness, negligible when ``V`` is large (i.e. the
scale ``s`` is large).  For large ``s`` the whole thing tends to the Gaussian RDP ``α/(2σ^2)``.
The rotation, the modular reduction (when no wrap occurs) and the decoding are post-processing.
"""

from __future__ import annotations

import numpy as np

from dpray.privacy.events import PoissonSubsampledSkellamEvent
from dpray.privacy.mechanisms.subsampling import (
    default_orders,
    poisson_subsampled_rdp,
    rdp_to_epsilon,
)

__all__ = [
    "skellam_sensitivities",
    "skellam_rdp",
    "skellam_dpsgd_epsilon",
    "subsampled_skellam_event",
]


def skellam_sensitivities(clip_norm: float, scale: float, dim: int) -> tuple[float, float]:
    """``(Δ1, Δ2)`` of the rounded, scaled input in integer units (see the module docstring).

    ``dim`` is the number of quantized coordinates, i.e. the *padded* dimension ``D``.
    """
    if clip_norm < 0 or scale <= 0 or dim < 1:
        raise ValueError("need clip_norm >= 0, scale > 0, dim >= 1")
    l2 = scale * clip_norm + np.sqrt(dim)
    l1 = min(np.sqrt(dim) * l2, l2 * l2)
    return float(l1), float(l2)


def skellam_rdp(
    orders: np.ndarray | float,
    noise_multiplier: float,
    clip_norm: float,
    scale: float,
    dim: int,
) -> np.ndarray:
    """RDP ``ε(α)`` of one (un-subsampled) release of the distributed Skellam mechanism.

    ``noise_multiplier`` σ and ``clip_norm`` C define the central variance
    ``V = (s·σ·C)^2`` in scaled integer units; ``dim`` is the padded dimension ``D`` (the number
    of coordinates that get rounded).  Orders must be > 1; integer orders are what the
    subsampling bound in :mod:`dpray.privacy.mechanisms.subsampling` evaluates.
    """
    alpha = np.asarray(orders, dtype=np.float64)
    if np.any(alpha <= 1):
        raise ValueError("RDP orders must be > 1")
    if noise_multiplier <= 0 or clip_norm <= 0:
        return np.full(alpha.shape, np.inf)
    l1, l2 = skellam_sensitivities(clip_norm, scale, dim)
    var = (scale * noise_multiplier * clip_norm) ** 2
    gaussian_part = alpha * l2**2 / (2.0 * var)
    discrete_part = np.minimum(
        ((2.0 * alpha - 1.0) * l2**2 + 6.0 * l1) / (4.0 * var**2), 3.0 * l1 / (2.0 * var)
    )
    return gaussian_part + discrete_part


def skellam_dpsgd_epsilon(
    noise_multiplier: float,
    clip_norm: float,
    scale: float,
    dim: int,
    sampling_rate: float,
    steps: int,
    delta: float,
    orders: np.ndarray | None = None,
) -> float:
    """ε after ``steps`` Poisson-subsampled Skellam DP-SGD steps (Zhu-Wang bound, composed in RDP).

    ``dim`` is the padded dimension ``D``.
    """
    orders = default_orders() if orders is None else np.asarray(orders)

    def base(alphas: np.ndarray) -> np.ndarray:
        return skellam_rdp(alphas, noise_multiplier, clip_norm, scale, dim)

    per_step = poisson_subsampled_rdp(orders, base, sampling_rate)
    return rdp_to_epsilon(orders, steps * per_step, delta)


def subsampled_skellam_event(
    stage: str,
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    *,
    clip_norm: float,
    scale: float,
    bits: int,
    dim: int,
    min_honest_workers: int,
    run_id: str = "",
) -> PoissonSubsampledSkellamEvent:
    """The ledger event of ``steps`` Poisson-subsampled secure-aggregation DP-SGD steps.

    The noise itself (each worker's Skellam share) is drawn in
    :mod:`dpray.privacy.secure_agg.skellam` from the worker's OS-seeded generator
    (:func:`dpray.privacy.secure_agg.aggregator.private_generator`).
    """
    return PoissonSubsampledSkellamEvent(
        stage,
        noise_multiplier=noise_multiplier,
        sampling_rate=sampling_rate,
        steps=steps,
        clip_norm=clip_norm,
        scale=scale,
        bits=bits,
        dim=dim,
        min_honest_workers=min_honest_workers,
        run_id=run_id,
    )
