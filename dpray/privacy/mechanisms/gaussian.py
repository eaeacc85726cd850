"""The Gaussian mechanism: its noise draws, their randomness and its ledger events, in one place.

Every Gaussian release of dpray draws its noise here:

* the DP filter's vote vector (``filter``: one release of L2 sensitivity 1, :func:`gaussian_release`);
* Private Evolution's vote vector, once per round (``train-generator``, :func:`gaussian_release`);
* central DP-SGD (``train.noise: central``): rank 0 adds N(0, σ²C²) to the summed clipped
  gradients every step (:func:`add_gaussian_noise_`; a Poisson-subsampled Gaussian).

(Secure aggregation's integer Skellam shares are drawn in :mod:`dpray.privacy.secure_agg.skellam`
and accounted in :mod:`dpray.privacy.mechanisms.skellam`.)

Randomness policy: the noise always comes from a generator seeded from the OS CSPRNG
(:func:`secret_rng`, :func:`secret_torch_generator`), never from a config seed, a rank or a step:
anyone who knew the seed could regenerate the noise and subtract it.  The ``rng``/``generator``
arguments default to a fresh secret generator; they exist so that tests can check the noise's
distribution, and the stages pass nothing but the generators made here.

The event constructors give the ledger what each release spends: :func:`gaussian_event` (one or
``count`` releases with noise std ``sigma`` and L2 sensitivity ``sensitivity``) and
:func:`subsampled_gaussian_event` (``steps`` Poisson-subsampled releases, DP-SGD).
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

import numpy as np

from dpray.privacy.events import GaussianEvent, PoissonSubsampledGaussianEvent

if TYPE_CHECKING:
    import torch

__all__ = [
    "add_gaussian_noise_",
    "gaussian_event",
    "gaussian_release",
    "secret_rng",
    "secret_torch_generator",
    "subsampled_gaussian_event",
]


def secret_rng() -> np.random.Generator:
    """A NumPy generator seeded from the OS.  Noise must never come from a public (config) seed:
    anyone who knows the seed could regenerate the noise and subtract it."""
    return np.random.default_rng(secrets.randbits(128))


def secret_torch_generator(device: str = "cpu") -> torch.Generator:
    """A torch generator seeded from the OS (same policy as :func:`secret_rng`)."""
    import torch

    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63))
    return generator


def gaussian_release(
    values: np.ndarray, sigma: float, rng: np.random.Generator | None = None
) -> np.ndarray:
    """``values + N(0, sigma^2)`` per coordinate: the DP release (``sigma`` is the absolute std).

    ``rng`` defaults to a fresh :func:`secret_rng`.
    """
    if sigma < 0:
        raise ValueError("sigma must be >= 0")
    rng = secret_rng() if rng is None else rng
    return np.asarray(values, dtype=np.float64) + rng.normal(0.0, sigma, size=np.shape(values))


def add_gaussian_noise_(
    tensor: torch.Tensor, std: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Add N(0, std^2) to every coordinate of ``tensor`` in place and return it.

    The noise is drawn in float32 on the generator's device (CPU by default: a fresh
    :func:`secret_torch_generator`) and moved to ``tensor``'s device.  ``std == 0`` adds nothing.
    """
    import torch

    if std < 0:
        raise ValueError("std must be >= 0")
    if std == 0:
        return tensor
    generator = secret_torch_generator() if generator is None else generator
    noise = torch.randn(
        tensor.shape, generator=generator, dtype=torch.float32, device=generator.device
    )
    tensor += noise.to(device=tensor.device, dtype=tensor.dtype) * std
    return tensor


def gaussian_event(
    stage: str, sigma: float, sensitivity: float, count: int = 1, run_id: str = ""
) -> GaussianEvent:
    """``count`` Gaussian releases with noise std ``sigma`` and L2 sensitivity ``sensitivity``."""
    if sensitivity <= 0:
        raise ValueError("sensitivity must be > 0")
    return GaussianEvent(stage, noise_multiplier=sigma / sensitivity, count=count, run_id=run_id)


def subsampled_gaussian_event(
    stage: str, noise_multiplier: float, sampling_rate: float, steps: int, run_id: str = ""
) -> PoissonSubsampledGaussianEvent:
    """``steps`` Poisson(``sampling_rate``)-subsampled Gaussian releases (central DP-SGD).

    ``noise_multiplier`` is σ: the noise std over the clipping norm C (the sensitivity).
    """
    return PoissonSubsampledGaussianEvent(
        stage,
        noise_multiplier=noise_multiplier,
        sampling_rate=sampling_rate,
        steps=steps,
        run_id=run_id,
    )
