"""Randomized Hadamard rotation for distributed DP aggregation.

Why rotate at all: each worker quantizes its (clipped, summed) gradient to integers and the
integers are summed modulo 2^b.  The modulus must cover the largest *coordinate* of the total,
while the privacy analysis only controls its *L2 norm*.  A gradient can concentrate its norm in
a handful of coordinates; a random rotation ``R = H · diag(signs) / sqrt(D)`` spreads any vector
of norm ``c`` so that every rotated coordinate is sub-Gaussian with variance proxy ``c^2 / D``
(a Rademacher sum with coefficients ``x_i / sqrt(D)``).  That is what makes the scale heuristic
in :mod:`dpray.privacy.secure_agg.quantize` valid, following Kairouz, Liu & Steinke (2021, DDG)
and Agarwal, Kairouz & Liu (2021, Skellam).

``R`` is orthogonal, so it preserves L2 norms (the DP sensitivity is unchanged) and its inverse
is ``diag(signs) · H / sqrt(D)``.  All workers must use the same seed (the signs are public and
shared), otherwise the rotated vectors cannot be summed.

The Walsh-Hadamard transform is computed in float64 (a 40-bit quantizer needs the 53-bit
mantissa) as a Kronecker product of small dense Hadamard blocks: ``H_D = H_m1 ⊗ ... ⊗ H_mr``.
The vector is viewed as an ``r``-dimensional array (one axis per factor, row-major), and each
pass multiplies one axis by its block with a single (batched) matmul into a second buffer, so the
cost is ``O(D · m · log D / log m)`` -- still ``O(D log D)`` for the fixed block size -- in ``r``
BLAS calls and no transposed copies: for D = 2^20 on a 2-core VM ~15 ms, against ~40 ms for
matmul-then-transpose passes and ~360 ms for ``log2 D`` Python-level butterfly passes.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from dpray.privacy.secure_agg.buffers import empty_buffer, scratch

__all__ = ["padded_dim", "rademacher_signs", "fwht", "rotate", "unrotate", "unrotate_"]

# log2 of the largest dense Hadamard block used per pass.  16x16 and 32x32 blocks were the
# fastest on the 2-core CPU this was tuned on (fewer passes vs. more flops per pass; 8x8 and
# 128x128 were ~2x slower at D = 2^20).
_BLOCK_LOG2 = 4


def padded_dim(d: int) -> int:
    """Smallest power of two >= ``d`` (the Hadamard transform needs a power-of-two length)."""
    if d < 1:
        raise ValueError(f"dimension must be >= 1, got {d}")
    return 1 << (d - 1).bit_length()


@lru_cache(maxsize=32)
def _hadamard_block(k: int, normalized: bool) -> torch.Tensor:
    """Sylvester Hadamard matrix of size 2^k, float64, entries ±1 (or ±2^(-k/2) if normalized)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(k):
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h / math.sqrt(1 << k) if normalized else h


def _block_bits(total: int) -> list[int]:
    """Split ``log2 D`` into the fewest factors of at most ``_BLOCK_LOG2`` bits, evenly."""
    count = -(-total // _BLOCK_LOG2)
    return [total // count + (1 if i < total % count else 0) for i in range(count)]


def _fwht_(a: torch.Tensor, normalized: bool, gain: float = 1.0) -> torch.Tensor:
    """In-place Walsh-Hadamard transform of a contiguous float64 power-of-two vector.

    Index ``i`` is written in mixed-radix digits (``D = m_1 · ... · m_r``, most significant
    first) and ``H_D`` acts on each digit independently.  Pass ``j`` views the data as
    ``(before, m_j, after)`` and multiplies the middle axis by ``H_{m_j}`` (a plain matmul when
    ``before`` or ``after`` is 1, a broadcast batched one otherwise), writing into the other of
    two buffers; no transposes are needed since every pass leaves the digit order alone.  With
    ``normalized`` each block carries ``1/sqrt(m)``, so no separate ``1/sqrt(D)`` pass; a
    ``gain`` other than 1 is folded into the first block the same way.
    """
    n = a.shape[0]
    if n == 1:
        return a.mul_(gain) if gain != 1.0 else a
    if a.device.type == "cpu":
        other = torch.from_numpy(scratch("fwht", n, a.dtype))  # never escapes: copied back
    else:
        other = torch.empty_like(a)
    src, dst = a, other
    before = 1
    for k in _block_bits(n.bit_length() - 1):
        m = 1 << k
        after = n // (before * m)
        h = _hadamard_block(k, normalized).to(device=a.device)
        if before == 1 and gain != 1.0:
            h = h * gain
        if after == 1:  # rows of length m: x·H (H is symmetric)
            torch.mm(src.view(before, m), h, out=dst.view(before, m))
        elif before == 1:
            torch.mm(h, src.view(m, after), out=dst.view(m, after))
        else:
            torch.matmul(h, src.view(before, m, after), out=dst.view(before, m, after))
        src, dst = dst, src
        before *= m
    if src is not a:  # an odd number of passes ends in the scratch buffer
        a.copy_(src)
    return a


def _check_power_of_two(n: int) -> None:
    if n == 0 or n & (n - 1):
        raise ValueError(f"length must be a power of two, got {n}")


def fwht(x: torch.Tensor, normalized: bool = False) -> torch.Tensor:
    """Walsh-Hadamard transform ``H_D x`` (``/ sqrt(D)`` if ``normalized``) of a 1-D tensor.

    ``H_D`` is symmetric with ``H_D H_D = D·I``, so the normalized transform is its own inverse.
    Returns a new float64 tensor; ``x`` is not modified.
    """
    if x.dim() != 1:
        raise ValueError("fwht expects a 1-D tensor")
    _check_power_of_two(x.shape[0])
    return _fwht_(x.to(torch.float64, copy=True).contiguous(), normalized)


@lru_cache(maxsize=2)
def _signs(seed: int, size: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    bits = torch.randint(0, 2, (size,), generator=gen, dtype=torch.int8)
    return bits.to(torch.float64).mul_(2.0).sub_(1.0)


def rademacher_signs(seed: int, size: int) -> torch.Tensor:
    """The public ±1 diagonal of the rotation, from a CPU ``torch.Generator`` seeded by ``seed``.

    Drawn on CPU so every worker gets identical signs regardless of its device (all workers
    must also run the same torch version: the generator's stream is not a stable API).  The seed is
    fixed for a run, so the vector is cached (drawing and converting 2^20 signs costs about as
    much as the transform).  Cached as float64 (8·D bytes, half of what one rotation allocates
    anyway) because multiplying by int8 signs is ~2x slower.  The returned tensor is shared --
    treat it as read-only.
    """
    return _signs(int(seed), int(size))


def rotate(
    x: torch.Tensor, seed: int, gain: float = 1.0, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``gain · H · diag(signs) · pad(x) / sqrt(D)``, float64 of length ``D = padded_dim(len(x))``.

    ``gain`` (e.g. the quantization scale) rides on the first Hadamard block: no extra pass.
    ``x`` may be float32; it is widened inside the sign multiplication, without a copy.  The
    result goes into ``out`` (contiguous float64 of length ``D`` on ``x``'s device) when given.
    """
    if x.dim() != 1:
        raise ValueError("rotate expects a 1-D tensor")
    d = x.shape[0]
    big_d = padded_dim(d)
    signs = rademacher_signs(seed, big_d).to(x.device)
    if out is None:
        out = empty_buffer(big_d, torch.float64, x.device)
    elif out.shape != (big_d,) or out.dtype != torch.float64 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float64 tensor of length {big_d}")
    out[d:].zero_()
    torch.mul(x.detach(), signs[:d], out=out[:d])
    return _fwht_(out, normalized=True, gain=gain)


def unrotate(
    y: torch.Tensor, seed: int, d: int, gain: float = 1.0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Exact inverse of :func:`rotate` (for ``gain = 1``): ``(diag(signs) · H · y / sqrt(D))[:d]``.

    Computed in float64 and returned as ``dtype`` (a fresh tensor of length ``d``; the cast
    rides on the last multiplication); ``gain`` multiplies the result (it rides on the first
    Hadamard block).  ``y`` may be any real or integer dtype and is not modified.
    """
    if y.dim() != 1:
        raise ValueError("unrotate expects a 1-D tensor")
    big_d = y.shape[0]
    if big_d != padded_dim(d):
        raise ValueError(f"length {big_d} is not padded_dim({d}) = {padded_dim(d)}")
    if y.device.type == "cpu":  # a temporary: the result is written to a fresh tensor below
        work = torch.from_numpy(scratch("unrotate", big_d, torch.float64))
    else:
        work = torch.empty(big_d, dtype=torch.float64, device=y.device)
    work.copy_(y)
    return unrotate_(work, seed, d, gain=gain, dtype=dtype)


def unrotate_(
    work: torch.Tensor, seed: int, d: int, gain: float = 1.0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """:func:`unrotate` of a contiguous float64 ``work`` vector that it consumes (overwrites):
    for callers that have just written the rotated values into a buffer of their own."""
    big_d = work.shape[0]
    if work.dtype != torch.float64 or work.dim() != 1 or not work.is_contiguous():
        raise ValueError("unrotate_ needs a contiguous 1-D float64 tensor")
    if big_d != padded_dim(d):
        raise ValueError(f"length {big_d} is not padded_dim({d}) = {padded_dim(d)}")
    _fwht_(work, normalized=True, gain=gain)
    signs = rademacher_signs(seed, big_d).to(work.device)
    return torch.mul(work[:d], signs[:d], out=empty_buffer(d, dtype, work.device))
