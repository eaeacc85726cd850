"""Distributed Skellam noise shares.

Why Skellam: secure aggregation sums integers, so the DP noise must be integer too, and the
noise of the *sum* must have a known distribution even though it is added in pieces by different
workers.  ``Sk(λ) = Poisson(λ) - Poisson(λ)`` is integer, symmetric, has variance ``2λ`` and is
closed under summation: ``Σ_i Sk(λ_i) = Sk(Σ_i λ_i)`` (Agarwal, Kairouz & Liu, NeurIPS 2021).

Each of the ``W`` workers adds an independent share ``Sk(λ)`` with
``λ = (s·σ·C)^2 / (2t)`` where ``t = min_honest_workers``.  Any ``t`` honest workers together add
``Sk(t·λ)``, whose variance ``2tλ = (s·σ·C)^2`` is exactly the central DP-SGD noise variance
(``σ`` = noise multiplier, ``C`` = per-example clip norm, ``s`` = quantization scale).  With
``t = W`` the total is exactly that; with ``t < W`` the total is ``W/t`` times larger (the price
of tolerating ``W - t`` curious workers that know -- and could subtract -- their own shares).

Randomness: every share is drawn from the worker's :class:`~dpray.privacy.secure_agg.csprng.
SecureRandom` (the ChaCha20 keystream under a 256-bit key from the OS), never from a Mersenne
Twister such as ``torch.Generator``: a peer able to predict a share could subtract it.  Anything
else passed as the generator is refused.

Sampler limits: the Poisson draws use Hörmann's PTRS rejection sampler in float64 (see
:mod:`~dpray.privacy.secure_agg.csprng`; its acceptance test avoids the ``λ·ln(λ)·2^-52``
cancellation of the textbook form).  Scales chosen purely by the modulus
(:func:`~dpray.privacy.secure_agg.quantize.choose_scale` with ``b = 40``) imply ``λ ~ 1e20``,
where float64 can no longer represent the candidates' spacing, so we refuse
``λ > MAX_LAMBDA = 2^40`` and callers cap the scale with :func:`max_scale_for_sampler`.  At
``2^40`` the measured variance matches Skellam to within sampling error.  This is a
floating-point sampler, not a constant-time exact discrete sampler; deployments facing a strong
adversary should swap one in behind :func:`skellam_noise`.
"""

from __future__ import annotations

import math

import torch

from dpray.privacy.secure_agg.csprng import SecureRandom

__all__ = ["MAX_LAMBDA", "skellam_noise", "share_lambda", "max_scale_for_sampler"]

MAX_LAMBDA = float(2**40)


def skellam_noise(
    shape: tuple[int, ...] | torch.Size | int,
    lam: float,
    generator: SecureRandom,
) -> torch.Tensor:
    """Draw i.i.d. ``Poisson(lam) - Poisson(lam)`` (variance ``2·lam``) as an int64 tensor.

    ``generator`` must be the worker's own :class:`SecureRandom`: anyone who can predict a
    worker's share can subtract it from the aggregate.
    """
    if not isinstance(generator, SecureRandom):
        raise TypeError(
            "Skellam shares must be drawn from a SecureRandom (ChaCha20, OS-keyed), not from "
            f"{type(generator).__name__}"
        )
    if isinstance(shape, int):
        shape = (shape,)
    if lam < 0 or not math.isfinite(lam):
        raise ValueError(f"lam must be finite and >= 0, got {lam}")
    if lam > MAX_LAMBDA:
        raise ValueError(
            f"lam={lam:.3g} exceeds MAX_LAMBDA={MAX_LAMBDA:.3g}: the float64 sampler is "
            "inaccurate there; lower the quantization scale (see max_scale_for_sampler)"
        )
    if lam == 0:
        return torch.zeros(shape, dtype=torch.int64)
    first = generator.poisson(tuple(shape), float(lam))
    return first.sub_(generator.poisson(tuple(shape), float(lam)))


def share_lambda(
    scale: float, noise_multiplier: float, clip_norm: float, min_honest_workers: int
) -> float:
    """Per-worker Skellam parameter ``λ = (s·σ·C)^2 / (2t)``.

    ``t`` honest shares sum to ``Sk(tλ)`` with variance ``(s·σ·C)^2``: the central Gaussian
    DP-SGD variance expressed in scaled (integer) units.
    """
    if min_honest_workers < 1:
        raise ValueError(f"min_honest_workers must be >= 1, got {min_honest_workers}")
    if scale <= 0 or noise_multiplier < 0 or clip_norm < 0:
        raise ValueError("need scale > 0, noise_multiplier >= 0, clip_norm >= 0")
    return (scale * noise_multiplier * clip_norm) ** 2 / (2.0 * min_honest_workers)


def max_scale_for_sampler(
    noise_multiplier: float, clip_norm: float, min_honest_workers: int
) -> float:
    """Largest scale whose share ``λ`` stays <= :data:`MAX_LAMBDA` (``inf`` without noise).

    The cap costs nothing measurable in privacy: at the cap ``s·C = sqrt(2 t MAX_LAMBDA)/σ``
    ``≈ 1.5e6·sqrt(t)/σ``, so the rounding inflation ``sqrt(D)`` of the sensitivity is ~0.07% for
    ``D = 2^20`` and ~0.7% for ``D = 2^27`` (at ``σ = 1, t = 1``).
    """
    if noise_multiplier == 0 or clip_norm == 0:
        return math.inf
    # The (1 - 1e-9) keeps share_lambda(cap) <= MAX_LAMBDA despite float rounding.
    cap = math.sqrt(2.0 * min_honest_workers * MAX_LAMBDA) / (noise_multiplier * clip_norm)
    return cap * (1.0 - 1e-9)
