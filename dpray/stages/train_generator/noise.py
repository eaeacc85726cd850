"""The two noise schemes for the clipped gradient sum across Ray Train workers.

``central`` (baseline; Opacus' DDP semantics): rank 0 alone adds N(0, σ²C²) to its sum (drawn by
:mod:`dpray.privacy.mechanisms.gaussian`), then one float all-reduce.  Rank 0 (and the all-reduce) see un-noised partial sums of the others.

``secure`` (default with more than one worker): each worker rotates, scales and stochastically
rounds its sum, adds an integer Skellam noise share, reduces mod 2^b and adds pairwise masks from
X25519-agreed seeds; an int64 all-reduce reveals only the noisy total.  No single worker holds
the full noise or sees another worker's un-noised sum.  See
:mod:`dpray.privacy.secure_agg.aggregator` for the threat model: honest-but-curious workers; a
coalition of W - t workers learns the honest workers' sum only with at least the full noise on it;
masks do not tolerate dropouts, so a lost worker aborts the step (Ray Train then restarts from
the last checkpoint, and the step counter keeps counting).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist

from dpray.privacy.mechanisms.gaussian import add_gaussian_noise_, secret_torch_generator
from dpray.privacy.secure_agg import kernels
from dpray.privacy.secure_agg.aggregator import (
    SecureAggConfig,
    all_reduce_int64,
    decode,
    encode_with_offset,
    exchange_public_keys,
    pairwise_seeds,
    prepare_share,
    private_generator,
)
from dpray.privacy.secure_agg.masks import generate_keypair

log = logging.getLogger(__name__)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class CentralAggregator:
    """Rank 0 adds the Gaussian noise; a float all-reduce sums the workers.

    The noise is drawn by the Gaussian mechanism (:mod:`dpray.privacy.mechanisms.gaussian`) from
    a generator seeded from the OS.
    """

    name = "central"

    def __init__(self, noise_multiplier: float, clip_norm: float) -> None:
        self.std = noise_multiplier * clip_norm
        self.rank, self.world = _world()
        self.generator = secret_torch_generator()

    def prefetch(self, step: int) -> None:
        """Nothing to prepare: the Gaussian is drawn at aggregation time."""

    def __call__(self, local_sum: torch.Tensor, step: int) -> torch.Tensor:
        total = local_sum.detach().to(torch.float32).clone()
        if self.rank == 0 and self.std > 0:
            add_gaussian_noise_(total, self.std, self.generator)
        if self.world > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total


class SecureAggregator:
    """Skellam shares + pairwise masks + integer all-reduce (see module docstring)."""

    name = "secure"

    def __init__(
        self,
        dim: int,
        noise_multiplier: float,
        clip_norm: float,
        max_units_per_worker: int,
        bits: int = 40,
        min_honest_workers: int | None = None,
        session: bytes = b"",
    ) -> None:
        self.rank, self.world = _world()
        self.cfg = SecureAggConfig.create(
            dim=dim,
            num_workers=self.world,
            noise_multiplier=noise_multiplier,
            clip_norm=clip_norm,
            max_norm=clip_norm * max(1, max_units_per_worker),
            bits=bits,
            min_honest_workers=min_honest_workers,
            rotation_seed=int.from_bytes(session[:7], "little"),
        )
        self.generator = private_generator()
        self.offset_generator = private_generator()  # used only by the prefetch thread
        private_key, public_key = generate_keypair()
        publics = exchange_public_keys(public_key) if self.world > 1 else [public_key]
        self.seeds = pairwise_seeds(self.rank, private_key, publics, b"dpray-train|" + session)
        # The noise share, masks and rounding words do not depend on the gradient: the training
        # loop has the next step's drawn on a side thread while its forward/backward runs
        # (torch releases the GIL), see prefetch().
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="secure-agg")
        self._pending: dict[int, Future] = {}
        if kernels.backend() != "compiled" and self.rank == 0:
            # same values, more CPU: e.g. an install without a C compiler, or a Ray job whose
            # working_dir upload (which skips git-ignored build outputs) shadows the installed dpray
            log.warning(
                "secure aggregation: the compiled PTRS kernel (dpray.privacy.secure_agg._kernels) "
                "is not built here; the noise shares are drawn by its numpy form (the same "
                "values, ~1.6x its CPU)"
            )

    def _share_future(self, step: int) -> Future:
        return self._pool.submit(
            prepare_share, self.cfg, self.rank, step, self.seeds, self.offset_generator
        )

    def prefetch(self, step: int) -> None:
        """Start drawing the data-independent part of ``step``'s payload on the side thread.

        Call it once the previous step's update is done (the training loop does, right after
        ``apply_update``): started earlier, the draw competes for the CPU and the GIL with the
        decode and the optimizer's many small calls (measured on 2 cores: the update took 30 ms
        instead of 14); from there it overlaps the next forward/backward pass.  A step that
        was not prefetched draws its share inline."""
        if step not in self._pending:
            self._pending[step] = self._share_future(step)

    def __call__(self, local_sum: torch.Tensor, step: int) -> torch.Tensor:
        future = self._pending.pop(step, None) or self._share_future(step)
        share = future.result()
        if share.step != step:  # a share serves one payload only
            raise RuntimeError(f"secure aggregation: share for step {share.step} used at {step}")
        payload = encode_with_offset(
            local_sum, self.cfg, share.offset, self.generator, rounding_words=share.rounding_words
        )
        device = local_sum.device
        if self.world > 1:
            payload = payload.to(device)
            all_reduce_int64(payload, self.cfg.bits)
        return decode(payload, self.cfg, dtype=torch.float32).to(device)


def make_aggregator(
    scheme: str,
    *,
    dim: int,
    noise_multiplier: float,
    clip_norm: float,
    max_units_per_worker: int,
    bits: int = 40,
    min_honest_workers: int | None = None,
    session: bytes = b"",
):
    """Dispatch on ``train.noise``; raises ``ValueError`` for an unknown scheme."""
    if scheme == "central":
        return CentralAggregator(noise_multiplier, clip_norm)
    if scheme == "secure":
        return SecureAggregator(
            dim,
            noise_multiplier,
            clip_norm,
            max_units_per_worker,
            bits=bits,
            min_honest_workers=min_honest_workers,
            session=session,
        )
    raise ValueError(f"unknown noise scheme '{scheme}' (central, secure)")


def secure_event_fields(agg: SecureAggregator) -> dict:
    """The public parameters the ledger records for a Skellam event."""
    cfg = agg.cfg
    return {
        "scale": float(cfg.scale),
        "bits": int(cfg.bits),
        "dim": int(cfg.padded_dim),
        "min_honest_workers": int(cfg.min_honest_workers),
    }


__all__ = [
    "CentralAggregator",
    "SecureAggregator",
    "make_aggregator",
    "secure_event_fields",
]
