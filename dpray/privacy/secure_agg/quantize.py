"""Unbiased integer quantization and the choice of the quantization scale.

Secure aggregation works on integers modulo ``2^b``; DP-SGD produces float gradients.  Each worker
maps its rotated vector ``v`` to ``stochastic_round(s · v)``.  Two constraints fix the scale ``s``:

* large ``s`` makes rounding error (at most 1 per coordinate, i.e. ``1/s`` in gradient units)
  negligible next to the DP noise, and shrinks the rounding inflation of the sensitivity
  (``Δ2 = s·C + sqrt(D)`` in :mod:`dpray.privacy.mechanisms.skellam`);
* small ``s`` keeps the signed total of all workers inside ``[-2^(b-1), 2^(b-1))`` so that the
  modular sum never wraps (a wrap turns one coordinate into garbage of size ``2^b / s`` that the
  inverse rotation then smears over the whole gradient).

:func:`choose_scale` picks the largest ``s`` compatible with the second constraint.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dpray.privacy.secure_agg.buffers import empty_buffer, scratch
from dpray.privacy.secure_agg.csprng import SecureRandom
from dpray.privacy.secure_agg.rotation import padded_dim

__all__ = ["MAX_BITS", "stochastic_round", "stochastic_round_", "wrap_k", "choose_scale"]

# float64 has a 53-bit mantissa.  Scaled values reach ~2^(b-1); keeping b <= 48 leaves at least
# six fractional bits, so stochastic rounding still sees the fractional part it has to round.
MAX_BITS = 48


def stochastic_round(x: torch.Tensor, generator: SecureRandom) -> torch.Tensor:
    """Round each entry to ``floor(x)`` or ``floor(x) + 1`` with ``E[round(x)] = x``; int64.

    Unbiasedness matters because the server *sums* the rounded vectors of all workers and of all
    steps: biased rounding would accumulate a drift, unbiased rounding only adds zero-mean error
    bounded by 1 per coordinate.  Rounds up with probability ``frac(x)`` using a uniform draw from
    ``generator`` (the worker's own :class:`~dpray.privacy.secure_agg.csprng.SecureRandom`; see
    ``aggregator.private_generator``).
    """
    return stochastic_round_(x.to(torch.float64, copy=True), generator)


def stochastic_round_(x: torch.Tensor, generator: SecureRandom) -> torch.Tensor:
    """:func:`stochastic_round` that consumes ``x`` (float64; overwritten) to save allocations."""
    if x.dtype != torch.float64:
        raise TypeError("stochastic_round_ needs a float64 tensor")
    if not isinstance(generator, SecureRandom):
        raise TypeError(f"rounding must draw from a SecureRandom, not {type(generator).__name__}")
    n = x.numel()
    floor = torch.floor(x, out=_temporary("round-floor", x))
    # exact for x >= 0 and x <= -1; for x in (-1, 0) x + 1 may round (bias < 2^-53)
    frac = x.sub_(floor)  # in [0, 1]
    u = torch.from_numpy(generator.uniform_into(scratch("round-uniform", n, np.float64)))
    u = u.view(x.shape).to(x.device)
    floor.add_(u.lt_(frac))  # lt_ writes 1.0 where u < frac, else 0.0
    out = empty_buffer(n, torch.int64, x.device).view(x.shape)
    return out.copy_(floor)  # integral values: the cast is exact


def _temporary(slot: str, like: torch.Tensor) -> torch.Tensor:
    """A scratch tensor shaped like ``like`` (see :func:`~.buffers.scratch`); never returned."""
    if like.device.type != "cpu":
        return torch.empty_like(like)
    return torch.from_numpy(scratch(slot, like.numel(), like.dtype)).view(like.shape)


def wrap_k(dim: int, wrap_prob: float = 1e-6) -> float:
    """Number of standard deviations ``k`` so that *no* coordinate of a ``dim``-vector wraps.

    Every coordinate of the total is sub-Gaussian (see :func:`choose_scale`), so
    ``P(|Z_j| > k·sqrt(V)) <= 2·exp(-k^2/2)``; a union bound over the ``D = padded_dim(dim)``
    coordinates gives ``P(any wrap) <= 2·D·exp(-k^2/2) = wrap_prob``.  For ``D = 2^20`` and
    ``wrap_prob = 1e-6`` this is ``k ≈ 7.5``.
    """
    if not 0.0 < wrap_prob < 1.0:
        raise ValueError(f"wrap_prob must be in (0, 1), got {wrap_prob}")
    return math.sqrt(2.0 * math.log(2.0 * padded_dim(dim) / wrap_prob))


def choose_scale(
    bits: int,
    dim: int,
    num_workers: int,
    max_norm: float,
    noise_std: float,
    k: float | None = None,
    *,
    wrap_prob: float = 1e-6,
) -> float:
    """Largest scale ``s`` such that the modular sum of ``num_workers`` shares does not wrap.

    Variables (all per step):

    * ``bits`` -- ``b``; the sum lives in ``Z_{2^b}``, decoded as signed ``[-2^(b-1), 2^(b-1))``.
    * ``dim`` -- ``d``, the unpadded gradient length; the rotation pads to ``D = padded_dim(d)``.
    * ``num_workers`` -- ``n``, the number of workers whose shares are summed.
    * ``max_norm`` -- ``c``, a bound on the L2 norm of *each worker's input vector*.  A worker's
      input is the SUM of its clipped per-example gradients, so pass
      ``clip_norm × (max examples per worker per step)``, not the per-example ``clip_norm``.
    * ``noise_std`` -- ``σ_ℓ``, the per-coordinate std of the noise *one worker* adds, in
      unscaled (gradient) units.  With :func:`~dpray.privacy.secure_agg.skellam.share_lambda`,
      ``σ_ℓ = noise_multiplier · clip_norm / sqrt(min_honest_workers)``.
    * ``k`` -- how many standard deviations of the total must fit in half the range.  ``None``
      (default) uses :func:`wrap_k` (``wrap_prob`` bounds the probability that *any* of the ``D``
      coordinates wraps).  ``k = 4.9`` reproduces TFF's heuristic, which bounds the wrap
      probability *per coordinate* by ~1e-6 (Gaussian tail); for ``D = 2^20`` that is about one
      wrapped coordinate per step, hence the union-bound default.

    Derivation (TFF's ``ddp`` heuristic with ``d`` replaced by the padded ``D``).  Coordinate
    ``j`` of the signed, pre-modular total is ``Z_j = Σ_i [s (R x_i)_j + e_ij + η_ij]``:

    * signal: ``Σ_i R x_i = R Σ_i x_i`` and ``‖Σ_i x_i‖ <= n·c``, so the rotated coordinate is
      sub-Gaussian with variance proxy ``s^2 n^2 c^2 / D``;
    * rounding: ``e_ij`` is zero-mean, in an interval of length 1 => proxy ``1/4`` each,
      ``n/4`` in total;
    * noise: ``n`` Skellam shares of variance ``s^2 σ_ℓ^2`` each (for the huge ``λ`` used here
      Skellam is Gaussian to within ``O(1/sqrt(λ))``), ``n s^2 σ_ℓ^2`` in total.

    So ``Z_j`` has variance proxy ``V = s^2 (n^2 c^2 / D + n σ_ℓ^2) + n/4``; requiring
    ``k·sqrt(V) <= 2^(b-1)``, i.e. ``4 k^2 V <= 2^(2b)``, and solving for ``s``:

        s = sqrt(2^(2b) - n k^2) / (2 k sqrt(n^2 c^2 / D + n σ_ℓ^2))

    The signal term is a worst case (all workers' inputs aligned and at full norm); real totals
    sit well inside the range.  Callers that sample Skellam noise with ``torch.poisson`` must
    additionally cap ``s`` (see ``skellam.max_scale_for_sampler``).
    """
    if not 2 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [2, {MAX_BITS}], got {bits}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if max_norm < 0 or noise_std < 0 or (max_norm == 0 and noise_std == 0):
        raise ValueError("need max_norm >= 0, noise_std >= 0 and not both zero")
    if num_workers * (1 << bits) >= 1 << 63:
        raise ValueError(f"{num_workers} workers x 2^{bits} overflows an int64 all-reduce")
    big_d = padded_dim(dim)
    if k is None:
        k = wrap_k(dim, wrap_prob)
    n = float(num_workers)
    headroom = 2.0 ** (2 * bits) - n * k * k
    if headroom <= 0:
        raise ValueError(
            f"bits={bits} too small: the rounding error of {num_workers} workers alone wraps"
        )
    spread = n * n * max_norm * max_norm / big_d + n * noise_std * noise_std
    return math.sqrt(headroom) / (2.0 * k * math.sqrt(spread))
