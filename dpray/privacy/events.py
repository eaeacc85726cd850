"""Immutable privacy events: one per DP release, each naming its mechanism and noise.

Mirrors dp-accounting's design (events composed by a ledger) and Opacus' registry habit: every
mechanism is a small frozen dataclass registered under the ``mechanism`` name written to
``ledger.json``, so a ledger file can be re-read and recomputed by anyone.  Each event converts
itself to a dp-accounting ``DpEvent`` when dp-accounting knows the mechanism (then the ledger uses
the PLD accountant), or exposes its RDP curve when it does not (the Skellam mechanism of secure
aggregation), in which case the whole ledger is composed in RDP.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import dp_accounting
import numpy as np

EVENT_TYPES: dict[str, type[PrivacyEvent]] = {}


def register(cls: type[PrivacyEvent]) -> type[PrivacyEvent]:
    """Class decorator adding a mechanism to the registry under its ``mechanism`` name."""
    if cls.mechanism in EVENT_TYPES:
        raise ValueError(f"mechanism '{cls.mechanism}' registered twice")
    EVENT_TYPES[cls.mechanism] = cls
    return cls


@dataclass(frozen=True)
class PrivacyEvent:
    """Base of all events.  ``stage`` names who spent; ``run_id`` groups progress updates."""

    mechanism: ClassVar[str] = ""
    stage: str
    run_id: str = field(default="", kw_only=True)

    def dp_event(self) -> dp_accounting.DpEvent | None:
        """The dp-accounting event, or ``None`` when only an RDP curve is available."""
        return None

    def rdp(self, orders: np.ndarray) -> np.ndarray:
        """RDP epsilons at ``orders``; by default from dp-accounting's RDP accountant."""
        event = self.dp_event()
        if event is None:
            raise NotImplementedError(f"{self.mechanism} must implement rdp()")
        accountant = dp_accounting.rdp.RdpAccountant(orders=list(orders))
        accountant.compose(event)
        return np.asarray(accountant._rdp, dtype=float)  # noqa: SLF001 (documented state)

    def to_dict(self) -> dict:
        data = {"stage": self.stage, "mechanism": self.mechanism}
        for f in dataclasses.fields(self):
            if f.name not in ("stage",) and not (f.name == "run_id" and not self.run_id):
                data[f.name] = getattr(self, f.name)
        return data

    @staticmethod
    def from_dict(data: dict) -> PrivacyEvent:
        data = dict(data)
        mechanism = data.pop("mechanism", None)
        if mechanism not in EVENT_TYPES:
            known = ", ".join(sorted(EVENT_TYPES))
            raise ValueError(f"unknown mechanism '{mechanism}' (known: {known})")
        return EVENT_TYPES[mechanism](**data)

    def is_private(self) -> bool:
        """False for events that give no DP guarantee (zero noise)."""
        return True


@register
@dataclass(frozen=True)
class GaussianEvent(PrivacyEvent):
    """``count`` releases of a Gaussian mechanism with noise std = noise_multiplier * sensitivity."""

    mechanism: ClassVar[str] = "gaussian"
    noise_multiplier: float = 1.0
    count: int = 1

    def dp_event(self) -> dp_accounting.DpEvent:
        base = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        return base if self.count == 1 else dp_accounting.SelfComposedDpEvent(base, self.count)

    def is_private(self) -> bool:
        return self.noise_multiplier > 0


@register
@dataclass(frozen=True)
class PoissonSubsampledGaussianEvent(PrivacyEvent):
    """DP-SGD with the float Gaussian mechanism: ``steps`` Poisson(q)-subsampled releases."""

    mechanism: ClassVar[str] = "poisson_subsampled_gaussian"
    noise_multiplier: float = 1.0
    sampling_rate: float = 0.01
    steps: int = 0

    def dp_event(self) -> dp_accounting.DpEvent:
        sampled = dp_accounting.PoissonSampledDpEvent(
            self.sampling_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier)
        )
        return dp_accounting.SelfComposedDpEvent(sampled, self.steps)

    def is_private(self) -> bool:
        return self.noise_multiplier > 0 or self.steps == 0


@register
@dataclass(frozen=True)
class PoissonSubsampledSkellamEvent(PrivacyEvent):
    """DP-SGD with secure aggregation: integer Skellam noise on a scaled, rotated, rounded sum.

    dp-accounting has no Skellam event, so this event carries its own RDP curve: the distributed
    discrete Skellam bound (Agarwal, Kairouz, Liu 2021) lifted through Poisson subsampling with the
    general bound of Zhu & Wang (2019, Thm 6), composed over ``steps``.
    """

    mechanism: ClassVar[str] = "poisson_subsampled_skellam"
    noise_multiplier: float = 1.0
    sampling_rate: float = 0.01
    steps: int = 0
    scale: float = 1.0
    bits: int = 40
    dim: int = 1
    min_honest_workers: int = 1
    clip_norm: float = 1.0

    def rdp(self, orders: np.ndarray) -> np.ndarray:
        from dpray.privacy.mechanisms.skellam import skellam_rdp
        from dpray.privacy.mechanisms.subsampling import poisson_subsampled_rdp

        orders = np.asarray(orders)
        if self.steps == 0:
            return np.zeros_like(orders, dtype=float)

        def base(alphas: np.ndarray) -> np.ndarray:
            return skellam_rdp(alphas, self.noise_multiplier, self.clip_norm, self.scale, self.dim)

        return self.steps * poisson_subsampled_rdp(orders, base, self.sampling_rate)

    def is_private(self) -> bool:
        return self.noise_multiplier > 0 or self.steps == 0
