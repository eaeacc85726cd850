"""Distributed DP-SGD noise via secure aggregation: encode on each worker, decode the sum.

Pipeline per step (worker ``i`` holds ``x_i``, the SUM of its clipped per-example gradients)::

    encode:  rotate -> ×scale -> stochastic round -> + Skellam share -> mod 2^b -> + mask mod 2^b
    all-reduce (int64 SUM over W workers), then mod 2^b
    decode:  mod 2^b -> signed -> ÷scale -> unrotate

The decoded vector is ``Σ_i x_i + N`` where ``N`` is (the inverse rotation of) Skellam noise with
per-coordinate variance ``≥ (σ·C)^2`` contributed by the honest workers, plus rounding error below
``sqrt(D·W)/scale`` in L2.  No single party ever holds the un-noised sum.  Privacy accounting for
this mechanism is in :mod:`dpray.privacy.mechanisms.skellam`; the unrotation is post-processing,
so the accounting is done on the rotated integer sum.

Threat model
------------
* Parties: the ``W`` training workers, which run an int64 all-reduce among themselves.  There is
  no separate server; whoever observes all-reduce traffic (peers holding partial sums in a ring
  or tree, the network) plays the aggregator.
* Honest-but-curious: every worker follows the protocol (correct encoding, its full noise share,
  correct masks, authentic public key) but may try to infer others' data from anything it sees.
  Malicious deviations -- omitting noise, wrong masks, poisoned inputs, key substitution inside
  the process group -- are out of scope.
* A single worker's payload is uniformly distributed in ``Z_{2^b}^D`` to anyone missing at least
  one of that worker's ``W - 1`` pairwise seeds (:mod:`~dpray.privacy.secure_agg.masks`); the
  same holds for any partial sum that does not contain all ``W`` payloads.
* A coalition of up to ``W - t`` workers (``t = min_honest_workers``) can subtract its own
  inputs, noise shares and masks from the final sum.  What remains is the sum of the honest
  workers' quantized inputs plus their ``≥ t`` Skellam shares, i.e. at least the full central
  noise ``Sk`` of variance ``(s·σ·C)^2``: the DP guarantee holds for the honest workers' data.
  Masks between two honest workers stay unknown, so individual honest payloads stay hidden.
* The rounding and noise randomness must be private to each worker: it comes from the worker's
  own :class:`~dpray.privacy.secure_agg.csprng.SecureRandom` (:func:`private_generator`: the
  ChaCha20 keystream under a fresh 256-bit key from the OS), so a peer can neither predict nor
  reconstruct another worker's share; the rotation seed is public and shared.
* ``min_honest_workers`` defaults to ``W - 1`` (at least 1): one curious worker -- the usual
  cross-silo case, where each worker is a data holder that knows its own share -- learns the
  others' sum only under the full noise.
* No dropout tolerance: seeds are not secret-shared (unlike Bonawitz et al.), so if any worker's
  payload is missing the masks do not cancel and the step must be aborted.  A retried step must
  use a new ``step`` value (round counter): reusing (seed, step) for two payloads leaks their
  difference.
* Not covered: timing and other side channels, and the floating-point Poisson sampler caveat in
  :mod:`~dpray.privacy.secure_agg.skellam`.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from dpray.privacy.secure_agg.buffers import empty_buffer, scratch
from dpray.privacy.secure_agg.csprng import SecureRandom, words_to_uniform
from dpray.privacy.secure_agg.masks import public_key_from_private, shared_seed, worker_mask
from dpray.privacy.secure_agg.quantize import (
    MAX_BITS,
    choose_scale,
    stochastic_round,
    stochastic_round_,
)
from dpray.privacy.secure_agg.rotation import padded_dim, rotate, unrotate_
from dpray.privacy.secure_agg.skellam import max_scale_for_sampler, share_lambda, skellam_noise

__all__ = [
    "SecureAggConfig",
    "default_min_honest_workers",
    "private_generator",
    "pairwise_seeds",
    "quantize_share",
    "encode",
    "encode_with_offset",
    "data_independent_offset",
    "PreparedShare",
    "prepare_share",
    "decode",
    "simulate_round",
    "exchange_public_keys",
    "all_reduce_int64",
    "benchmark_encode",
]


@dataclass(frozen=True)
class SecureAggConfig:
    """Public parameters shared by all workers (identical on every rank).

    ``scale`` is usually obtained through :meth:`create`.  ``noise_multiplier`` (``σ``) and
    ``clip_norm`` (``C``, per example) define the central noise std ``σ·C``;
    ``min_honest_workers`` (``t``) is how many workers' noise shares alone must already supply
    it.  ``dim`` is the unpadded vector length, ``rotation_seed`` the public rotation seed.
    """

    bits: int
    scale: float
    noise_multiplier: float
    clip_norm: float
    min_honest_workers: int
    num_workers: int
    rotation_seed: int
    dim: int

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be in [2, {MAX_BITS}], got {self.bits}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.num_workers * (1 << self.bits) >= 1 << 63:
            raise ValueError("num_workers * 2^bits must be < 2^63 for the int64 all-reduce")
        if not 1 <= self.min_honest_workers <= self.num_workers:
            raise ValueError("min_honest_workers must be in [1, num_workers]")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"scale must be finite and > 0, got {self.scale}")
        if self.noise_multiplier < 0 or self.clip_norm < 0:
            raise ValueError("noise_multiplier and clip_norm must be >= 0")
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")

    @classmethod
    def create(
        cls,
        *,
        dim: int,
        num_workers: int,
        noise_multiplier: float,
        clip_norm: float,
        max_norm: float,
        bits: int = 40,
        min_honest_workers: int | None = None,
        rotation_seed: int = 0,
        k: float | None = None,
        wrap_prob: float = 1e-6,
    ) -> SecureAggConfig:
        """Config with the largest safe scale.

        ``max_norm`` bounds the L2 norm of one worker's input (``clip_norm`` × max examples per
        worker per step).  The scale is ``min`` of :func:`choose_scale` (no modular wrap; the
        per-worker noise std is ``σ·C/sqrt(t)``) and :func:`max_scale_for_sampler` (keeps
        the Poisson sampler in its accurate range).  ``min_honest_workers`` defaults to
        :func:`default_min_honest_workers` (``W - 1``, at least 1).
        """
        t = default_min_honest_workers(num_workers, min_honest_workers)
        noise_std = noise_multiplier * clip_norm / math.sqrt(t)
        scale = min(
            choose_scale(bits, dim, num_workers, max_norm, noise_std, k, wrap_prob=wrap_prob),
            max_scale_for_sampler(noise_multiplier, clip_norm, t),
        )
        return cls(bits, scale, noise_multiplier, clip_norm, t, num_workers, rotation_seed, dim)

    @property
    def padded_dim(self) -> int:
        return padded_dim(self.dim)

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def share_lambda(self) -> float:
        """Skellam parameter of one worker's noise share (0 when noise is off)."""
        if self.noise_multiplier == 0 or self.clip_norm == 0:
            return 0.0
        return share_lambda(
            self.scale, self.noise_multiplier, self.clip_norm, self.min_honest_workers
        )


def default_min_honest_workers(num_workers: int, requested: int | None = None) -> int:
    """``t``: ``requested`` if given, else ``W - 1`` (at least 1): one curious worker tolerated."""
    if requested is not None:
        return int(requested)
    return max(1, int(num_workers) - 1)


def private_generator() -> SecureRandom:
    """A worker's source for rounding and noise: ChaCha20 keyed with 256 bits from the OS.

    Peers must not be able to predict a worker's noise share (they could subtract it), so this is
    a cryptographic generator, never a Mersenne Twister, and never seeded from the rank, the step
    or the rotation seed.
    """
    return SecureRandom()


def pairwise_seeds(
    rank: int, private_key: bytes, public_keys: Sequence[bytes], context: bytes
) -> dict[int, bytes]:
    """``{peer: shared_seed(...)}`` for every other rank, from the all-gathered public keys."""
    return {
        peer: shared_seed(private_key, pub, context)
        for peer, pub in enumerate(public_keys)
        if peer != rank
    }


def quantize_share(x: torch.Tensor, cfg: SecureAggConfig, generator: SecureRandom) -> torch.Tensor:
    """Signed, pre-modular integer share ``round(s·R x) + Sk(λ)`` of length ``D``; int64.

    Exposed for diagnostics and tests (e.g. checking that totals stay far from the wrap
    boundary).  Never send it: it is neither masked nor reduced.
    """
    if x.dim() != 1 or x.shape[0] != cfg.dim:
        raise ValueError(f"expected a 1-D tensor of length {cfg.dim}, got {tuple(x.shape)}")
    rotated = rotate(x.detach().to("cpu"), cfg.rotation_seed, gain=cfg.scale)
    share = stochastic_round_(rotated, generator)
    lam = cfg.share_lambda
    if lam > 0:
        share.add_(skellam_noise(share.shape, lam, generator))
    return share


def data_independent_offset(
    cfg: SecureAggConfig,
    rank: int,
    step: int,
    seeds_by_peer: dict[int, bytes],
    generator: SecureRandom,
) -> torch.Tensor:
    """The part of a payload that does not depend on the gradient: Skellam share + mask mod 2^b.

    Computing it ahead (e.g. on a side thread during the backward pass) takes the noise
    sampling -- most of the encode time -- off the step's critical path.  The result must be
    used for exactly one payload (``step``), and kept as private as the noise itself.
    """
    if not 0 <= rank < cfg.num_workers:
        raise ValueError(f"rank {rank} out of range for {cfg.num_workers} workers")
    expected = set(range(cfg.num_workers)) - {rank}
    if set(seeds_by_peer) != expected:
        raise ValueError(f"seeds_by_peer must cover exactly the ranks {sorted(expected)}")
    lam = cfg.share_lambda
    if lam > 0:
        offset = skellam_noise((cfg.padded_dim,), lam, generator)
    else:
        offset = torch.zeros(cfg.padded_dim, dtype=torch.int64)
    if seeds_by_peer:  # share (|.| ~ 2^41 at most) + mask (< 2^b <= 2^48) fits in an int64
        offset.add_(worker_mask(rank, seeds_by_peer, step, cfg.padded_dim, cfg.bits))
    # one reduction mod 2^b at the end (two's complement: also right for negative shares)
    return offset.bitwise_and_(cfg.modulus - 1)


@dataclass(frozen=True)
class PreparedShare:
    """Everything of one payload that does not depend on the gradient, drawn ahead of the step.

    ``offset``: the Skellam share plus masks mod ``2^b`` (:func:`data_independent_offset`);
    ``rounding_words``: the raw 64-bit words whose uniforms decide the stochastic rounding.
    Both are as secret as the noise and serve exactly one payload (``step``).
    """

    step: int
    offset: torch.Tensor
    rounding_words: np.ndarray


def prepare_share(
    cfg: SecureAggConfig,
    rank: int,
    step: int,
    seeds_by_peer: dict[int, bytes],
    generator: SecureRandom,
) -> PreparedShare:
    """:func:`data_independent_offset` plus the rounding words: what a side thread draws for
    ``step`` while the gradient is computed, leaving only arithmetic on the critical path."""
    offset = data_independent_offset(cfg, rank, step, seeds_by_peer, generator)
    words = generator.words_into(np.empty(cfg.padded_dim, dtype=np.uint64))  # outlives the call
    return PreparedShare(step, offset, words)


ROUND_CHUNK = 1 << 15
"""Coordinates per pass of the fused rounding/decoding loops: a few 256 KiB temporaries that
stay in L2, instead of eight full-length passes through memory."""


def _round_offset_mod(
    rotated: np.ndarray, words: np.ndarray, offset: np.ndarray, mask: int, out: np.ndarray
) -> np.ndarray:
    """``out = (stochastic_round(rotated) + offset) & mask``, chunk by chunk (int64).

    The rounding is :func:`~dpray.privacy.secure_agg.quantize.stochastic_round_`'s: up iff the
    uniform from ``words`` is below the fractional part.  Consumes ``rotated`` and ``words``."""
    n = len(rotated)
    floor = scratch("fused-floor", min(n, ROUND_CHUNK), np.float64)
    uniform = scratch("fused-uniform", min(n, ROUND_CHUNK), np.float64)
    up = scratch("fused-up", min(n, ROUND_CHUNK), np.bool_)
    for start in range(0, n, ROUND_CHUNK):
        stop = min(start + ROUND_CHUNK, n)
        m = stop - start
        x, f, u, b, o = rotated[start:stop], floor[:m], uniform[:m], up[:m], out[start:stop]
        np.floor(x, out=f)
        np.subtract(x, f, out=x)  # the fractional part, in [0, 1]
        words_to_uniform(words[start:stop], u)
        np.less(u, x, out=b)
        np.add(f, b, out=f)
        o[...] = f  # integral values: the cast is exact
        np.add(o, offset[start:stop], out=o)
        np.bitwise_and(o, mask, out=o)  # two's complement: also right for negative values
    return out


def encode_with_offset(
    x: torch.Tensor,
    cfg: SecureAggConfig,
    offset: torch.Tensor,
    generator: SecureRandom,
    rounding_words: np.ndarray | None = None,
) -> torch.Tensor:
    """Payload ``round(s·R x) + offset mod 2^b`` from a :func:`data_independent_offset`.

    ``rounding_words`` (a :class:`PreparedShare`'s, consumed) decide the rounding; without them
    the words are drawn from ``generator`` here."""
    if x.dim() != 1 or x.shape[0] != cfg.dim:
        raise ValueError(f"expected a 1-D tensor of length {cfg.dim}, got {tuple(x.shape)}")
    big_d = cfg.padded_dim
    if offset.dtype != torch.int64 or offset.shape != (big_d,):
        raise ValueError(f"offset must be an int64 tensor of length {big_d}")
    if rounding_words is None:
        rounding_words = generator.words_into(scratch("round-words", big_d, np.uint64))
    elif rounding_words.dtype != np.uint64 or rounding_words.shape != (big_d,):
        raise ValueError(f"rounding_words must be {big_d} uint64 words")
    work = torch.from_numpy(scratch("encode-rotated", big_d, np.float64))
    rotated = rotate(x.detach().to("cpu"), cfg.rotation_seed, gain=cfg.scale, out=work)
    payload = empty_buffer(big_d, torch.int64)
    _round_offset_mod(
        rotated.numpy(), rounding_words, offset.cpu().numpy(), cfg.modulus - 1, payload.numpy()
    )
    return payload


def encode(
    x: torch.Tensor,
    cfg: SecureAggConfig,
    rank: int,
    step: int,
    seeds_by_peer: dict[int, bytes],
    generator: SecureRandom,
) -> torch.Tensor:
    """One worker's masked payload, int64 in ``[0, 2^b)``, length ``D``, on CPU.

    ``seeds_by_peer`` must hold a seed for every other rank (no dropout tolerance).  ``step``
    must be unique per payload (see :mod:`~dpray.privacy.secure_agg.masks`).  Move the result to
    the collective's device before :func:`all_reduce_int64`.
    """
    offset = data_independent_offset(cfg, rank, step, seeds_by_peer, generator)
    return encode_with_offset(x, cfg, offset, generator)


def decode(
    total: torch.Tensor, cfg: SecureAggConfig, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Noisy sum ``Σ_i x_i + noise`` of length ``dim`` from the summed payloads, as ``dtype``.

    Computed in float64 whatever ``dtype`` (the training step asks for float32: the cast rides
    on the last pass instead of a separate copy).

    Accepts the raw int64 all-reduce result (reduced mod ``2^b`` here, which relies on two's
    complement: ``v & (2^b - 1) = v mod 2^b`` also for negative ``v``).
    """
    if total.dtype != torch.int64 or total.dim() != 1 or total.shape[0] != cfg.padded_dim:
        raise ValueError(f"expected an int64 tensor of length {cfg.padded_dim}")
    half, mask = cfg.modulus // 2, cfg.modulus - 1
    residues = total.to("cpu").numpy()
    work = scratch("decode-work", cfg.padded_dim, np.float64)  # consumed by unrotate_
    signed = scratch("decode-signed", min(len(work), ROUND_CHUNK), np.int64)
    for start in range(0, len(work), ROUND_CHUNK):
        stop = min(start + ROUND_CHUNK, len(work))
        v = signed[: stop - start]
        # the signed representative in [-2^(b-1), 2^(b-1)): ((v + half) mod 2^b) - half
        np.add(residues[start:stop], half, out=v)
        np.bitwise_and(v, mask, out=v)
        np.subtract(v, half, out=v)
        work[start:stop] = v  # |v| < 2^(b-1) <= 2^47: exact in float64
    return unrotate_(
        torch.from_numpy(work), cfg.rotation_seed, cfg.dim, gain=1.0 / cfg.scale, dtype=dtype
    )


def _sim_private_key(seed: int, rank: int) -> bytes:
    """Deterministic X25519 private key for simulations (X25519 clamps any 32 bytes)."""
    return hashlib.sha256(f"dpray-simulate-round|{seed}|{rank}".encode()).digest()


def simulate_round(
    xs: Sequence[torch.Tensor], cfg: SecureAggConfig, step: int, seed: int
) -> torch.Tensor:
    """Run the whole protocol in-process for ``len(xs) == cfg.num_workers`` workers.

    Deterministic in ``seed`` (keys and generators are derived from it), which is what tests and
    benchmarks need -- and exactly what a real deployment must *not* do.
    """
    if len(xs) != cfg.num_workers:
        raise ValueError(f"got {len(xs)} inputs for {cfg.num_workers} workers")
    privates = [_sim_private_key(seed, r) for r in range(cfg.num_workers)]
    publics = [public_key_from_private(p) for p in privates]
    context = f"simulate_round|{seed}".encode()
    total = torch.zeros(cfg.padded_dim, dtype=torch.int64)
    for rank, x in enumerate(xs):
        gen_key = hashlib.sha256(f"dpray-simulate-gen|{seed}|{rank}".encode()).digest()
        gen = SecureRandom.from_key(gen_key)
        seeds = pairwise_seeds(rank, privates[rank], publics, context)
        total.add_(encode(x, cfg, rank, step, seeds, gen))
    return decode(total, cfg)


def exchange_public_keys(pub: bytes, group: dist.ProcessGroup | None = None) -> list[bytes]:
    """All-gather every rank's 32-byte X25519 public key (index = rank in ``group``).

    Authenticity comes from the process group itself (honest-but-curious model).  With the NCCL
    backend ``torch.cuda.set_device`` must have been called, as for any ``all_gather_object``.
    """
    gathered: list[bytes | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, bytes(pub), group=group)
    keys: list[bytes] = []
    for rank, key in enumerate(gathered):
        if not isinstance(key, bytes) or len(key) != 32:
            raise ValueError(f"rank {rank} sent an invalid public key")
        keys.append(key)
    return keys


def all_reduce_int64(
    payload: torch.Tensor, bits: int, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """In-place int64 SUM all-reduce of the payloads; the caller applies ``mod 2^bits``.

    Each payload is in ``[0, 2^bits)``, so the sum of ``W`` of them fits in int64 iff
    ``W·2^bits < 2^63`` -- checked here rather than relying on wrap-around, which is undefined
    for signed integers in C++ backends.
    """
    if payload.dtype != torch.int64:
        raise TypeError(f"payload must be int64, got {payload.dtype}")
    world = dist.get_world_size(group)
    if world * (1 << bits) >= 1 << 63:
        raise ValueError(f"{world} workers x 2^{bits} would overflow int64")
    dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=group)
    return payload


def benchmark_encode(
    dim: int = 1_000_000, num_workers: int = 4, repeats: int = 5, noise: bool = True
) -> dict[str, float]:
    """Median wall-clock milliseconds of each encode stage for one worker.

    Stages: ``rotate`` (sign flip + Hadamard), ``quantize`` (scale + stochastic rounding),
    ``noise`` (Skellam share), ``mask`` (ChaCha20 masks for ``num_workers - 1`` peers),
    ``encode`` (everything, as one call), and the split a training step uses: ``offset`` (the
    data-independent part, drawn on the side thread), ``encode_with_offset`` and ``decode`` (on
    the step's critical path).  ``noise=False`` times the noise-free encode.
    """
    torch.manual_seed(0)
    x = torch.randn(dim, dtype=torch.float64)
    x.mul_(10.0 / x.norm())
    cfg = SecureAggConfig.create(
        dim=dim,
        num_workers=num_workers,
        noise_multiplier=1.0 if noise else 0.0,
        clip_norm=1.0,
        max_norm=10.0,
    )
    seeds = {p: hashlib.sha256(bytes([p])).digest() for p in range(1, num_workers)}
    gen = SecureRandom.from_key(bytes(32))  # a benchmark: a fixed key is fine here
    big_d = cfg.padded_dim

    def timed(fn) -> float:
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)

    rotated = rotate(x, cfg.rotation_seed)
    offset = data_independent_offset(cfg, 0, 9, seeds, gen)
    payload = encode_with_offset(x, cfg, offset.clone(), gen)
    return {
        "dim": float(dim),
        "padded_dim": float(big_d),
        "rotate": timed(lambda: rotate(x, cfg.rotation_seed)),
        "quantize": timed(lambda: stochastic_round(rotated * cfg.scale, gen)),
        "noise": timed(lambda: skellam_noise(big_d, cfg.share_lambda, gen)) if noise else 0.0,
        "mask": timed(lambda: worker_mask(0, seeds, 7, big_d, cfg.bits)),
        "encode": timed(lambda: encode(x, cfg, 0, 7, seeds, gen)),
        "offset": timed(lambda: data_independent_offset(cfg, 0, 8, seeds, gen)),
        "encode_with_offset": timed(lambda: encode_with_offset(x, cfg, offset.clone(), gen)),
        "decode": timed(lambda: decode(payload, cfg)),
    }


if __name__ == "__main__":  # python -m dpray.privacy.secure_agg.aggregator [DIM [WORKERS]]
    import sys

    torch.set_num_threads(1)  # as each of two training workers on a 2-core machine
    args = [int(a) for a in sys.argv[1:3]]
    dim, workers = (args + [1_000_000, 4][len(args) :])[:2]
    for with_noise in (False, True):
        timings = benchmark_encode(dim, workers, noise=with_noise)
        print(f"noise={with_noise}:", {k: round(v, 1) for k, v in timings.items()})
