"""A cryptographically secure random source for secure aggregation's noise and rounding.

A worker's Skellam noise share and its stochastic rounding must be unpredictable to its peers:
whoever can predict a share can subtract it from the aggregate.  A Mersenne Twister (what
``torch.Generator`` is on CPU) is not: 624 consecutive outputs give away its whole future, and a
32- or 64-bit seed can be searched.  :class:`SecureRandom` instead reads the ChaCha20 keystream
(RFC 8439, via ``cryptography``) under a 256-bit key from the OS (``secrets.token_bytes``): its
output is indistinguishable from uniform to anyone without the key, and the key never leaves the
object (it is not logged, pickled or checkpointed).

On top of the uniform words it draws (vectorised numpy over cache-sized chunks; the Poisson
rejection rounds in a small C kernel, ``_kernels.c``, when the install compiled it):

* uniforms in the open interval (0, 1) (53 random bits each);
* Poisson(λ) by Hörmann's transformed rejection with squeeze (PTRS, 1993; what numpy and torch
  use for λ >= 10), with the acceptance test written so that it stays accurate for the large λ
  of secure aggregation (up to 2^40): ``k log λ - λ - log k!`` is computed as
  ``d - k·log1p(d/λ) - ½ log(2πk) - (Stirling series)`` with ``d = k - λ`` for ``k >= 10``,
  which avoids the cancellation of two ~λ·log λ terms that the textbook form suffers;
  for λ < 10 by inversion of the CDF (truncated where the tail mass is below 2^-64);
* Skellam(λ) = Poisson(λ) - Poisson(λ).

``SecureRandom.from_key`` builds a deterministic stream from a caller's key, for simulations and
tests only; a worker always uses the OS-keyed default constructor.
"""

from __future__ import annotations

import math
import secrets
import struct
import threading
import time

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from dpray.privacy.secure_agg import kernels
from dpray.privacy.secure_agg.buffers import scratch

__all__ = ["SecureRandom", "keystream_into", "words_to_uniform"]

_ZERO_BLOCK = bytes(1 << 18)  # ChaCha20 keystream = encryption of zeros, 256 KiB at a time
_STIRLING_MIN = 10.0  # log k! by the Stirling series at k >= 10 (error < 1e-12)
_SMALL_LAMBDA = 10.0  # below: inversion; at and above: PTRS


def keystream_into(encryptor, out: np.ndarray) -> None:
    """Fill ``out`` (a contiguous numpy array) with the next bytes of a stream cipher's keystream.

    The keystream is the encryption of zeros.  They are read from one shared 256 KiB block of
    zeros, slice by slice, rather than from a fresh ``np.zeros`` of the output's size: for a
    large array that calloc comes from recycled heap memory and is zero-filled page by page (as
    much work as the cipher itself), while the shared block stays in cache.  A stream cipher
    encrypts slice by slice exactly as in one call, so the bytes are the same.

    ``update_into`` holds the GIL (~80 µs per slice).  Between slices the GIL is offered to other
    threads (``time.sleep(0)``): the noise share is drawn on a side thread while the training
    thread runs many short torch calls, each of which gives the GIL up and needs it back; a side
    thread that never lets go makes each of them wait for Python's 5 ms switch interval.
    """
    view = memoryview(out).cast("B")
    zeros = memoryview(_ZERO_BLOCK)
    total = len(view)
    for start in range(0, total, len(zeros)):
        if start:
            time.sleep(0)  # lets a waiting thread take the GIL (~1 µs when none waits)
        stop = min(start + len(zeros), total)
        written = encryptor.update_into(zeros[: stop - start], view[start:stop])
        if written != stop - start:  # a stream cipher never buffers; guard against API surprises
            raise RuntimeError(f"ChaCha20 produced {written} bytes, expected {stop - start}")


class SecureRandom:
    """ChaCha20-keystream random source (see the module docstring).  Thread-safe."""

    def __init__(self) -> None:
        self._init(secrets.token_bytes(32))

    @classmethod
    def from_key(cls, key: bytes) -> SecureRandom:
        """A deterministic stream from a 32-byte key: simulations and tests only."""
        if len(key) != 32:
            raise ValueError("key must be 32 bytes")
        obj = cls.__new__(cls)
        obj._init(bytes(key))
        return obj

    def _init(self, key: bytes) -> None:
        self._key = key  # stays in this object (see __repr__ and __reduce__)
        self._encryptor = self._encryptor_at(0)
        self._lock = threading.Lock()
        self.words_drawn = 0

    def _encryptor_at(self, word: int):
        """A ChaCha20 encryptor positioned at keystream word ``word`` (byte ``8·word``).

        The 16-byte ChaCha20 "nonce" of ``cryptography`` is the 32-bit block counter followed by
        the 96-bit nonce, and OpenSSL carries the counter into the next 32 bits, so our stream
        (nonce words ``0, 0, "srnd"``) is one 64-bit block counter: block ``k`` starts at the
        nonce ``pack("<QI4s", k, 0, "srnd")`` (tests check the carry against one long stream).
        """
        block, skip = divmod(8 * word, 64)
        nonce = struct.pack("<QI4s", block, 0, b"srnd")
        encryptor = Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()
        if skip:
            encryptor.update(bytes(skip))
        return encryptor

    def __repr__(self) -> str:  # never show the key
        return "SecureRandom(ChaCha20, OS-keyed)"

    def __reduce__(self):
        raise TypeError("a SecureRandom holds a secret key and must not be pickled")

    # ----------------------------------------------------------------------------- raw output

    def random_words(self, count: int) -> np.ndarray:
        """``count`` uniform uint64 words (the next ``8·count`` keystream bytes)."""
        return self._words_into(np.empty(int(count), dtype="<u8"))

    def words_into(self, out: np.ndarray) -> np.ndarray:
        """Fill the uint64 array ``out`` with the next ``out.size`` words; returns it."""
        if out.dtype != np.uint64 or not out.flags.c_contiguous:
            raise TypeError("words_into needs a contiguous uint64 array")
        return self._words_into(out)

    def _words_into(self, out: np.ndarray) -> np.ndarray:
        if out.size:
            with self._lock:
                end = self.words_drawn + out.size
                try:
                    keystream_into(self._encryptor, out)
                except BaseException:
                    # stopped part-way: continue after every word this call was given, so that
                    # no later draw can reuse keystream whose fate is unknown
                    self._encryptor = self._encryptor_at(end)
                    raise
                finally:
                    self.words_drawn = end
        return out

    def uniform(self, count: int) -> torch.Tensor:
        """``count`` float64 uniforms in the open interval (0, 1), 53 random bits each."""
        return torch.from_numpy(self._uniform(count))

    def uniform_into(self, out: np.ndarray) -> np.ndarray:
        """Fill the float64 array ``out`` with uniforms as :meth:`uniform` draws them."""
        words = self._words_into(scratch("uniform-words", out.size, np.uint64))
        return _words_to_uniform(words, out)

    def _uniform(self, count: int) -> np.ndarray:
        return self.uniform_into(np.empty(count))

    # ------------------------------------------------------------------------------ Poisson

    def poisson(self, shape: tuple[int, ...] | torch.Size | int, lam: float) -> torch.Tensor:
        """i.i.d. Poisson(``lam``) draws as an int64 tensor of ``shape``."""
        if isinstance(shape, int):
            shape = (shape,)
        shape = tuple(int(s) for s in shape)
        if lam < 0 or not math.isfinite(lam):
            raise ValueError(f"lam must be finite and >= 0, got {lam}")
        count = math.prod(shape)
        if lam == 0 or count == 0:
            return torch.zeros(shape, dtype=torch.int64)
        if lam < _SMALL_LAMBDA:
            flat = self._poisson_inversion(count, float(lam))
        else:
            flat = self._poisson_ptrs(count, float(lam))
        return torch.from_numpy(flat).view(shape)

    def skellam(self, shape: tuple[int, ...] | torch.Size | int, lam: float) -> torch.Tensor:
        """i.i.d. Skellam(``lam``) = Poisson(lam) - Poisson(lam), int64, variance ``2·lam``."""
        return self.poisson(shape, lam).sub_(self.poisson(shape, lam))

    def _poisson_inversion(self, count: int, lam: float) -> np.ndarray:
        # The CDF up to where the remaining tail is below 2^-64 (for lam < 10: k < 60).
        pmf = [math.exp(-lam)]
        cdf = [pmf[0]]
        while 1.0 - cdf[-1] > 2.0**-64 and len(cdf) < 200:
            pmf.append(pmf[-1] * lam / len(cdf))
            cdf.append(cdf[-1] + pmf[-1])
        k = np.searchsorted(np.asarray(cdf), self._uniform(count), side="left")
        return np.minimum(k, len(cdf) - 1).astype(np.int64)

    def _poisson_ptrs(self, count: int, lam: float) -> np.ndarray:
        """PTRS, vectorised: each round draws ``m`` uniforms ``u`` then ``m`` uniforms ``v``
        for the ``m`` draws still open, and every draw whose candidate is rejected is redrawn in
        the next round.

        A round's arithmetic runs in the compiled kernel (``_kernels.c``: one pass per element,
        GIL released) or, without a C build, chunk by chunk over cache-sized
        slices in numpy (:func:`_ptrs_chunk`); either does the exact acceptance test (two logs
        and :func:`_log_poisson_pmf`) only on the ~20% of candidates that miss the quick
        acceptance.  The stream consumption and every floating-point operation per draw are
        those of the whole-array form, so the output is bit-identical to it for the same key
        (tests/test_secure_agg.py keeps that form as the oracle and checks both rounds).
        """
        consts = _PtrsConstants(lam)
        out = np.empty(count, dtype=np.int64)
        todo: np.ndarray | None = None  # None: every index (the first round)
        while todo is None or todo.size:
            m = count if todo is None else todo.size
            draws = out if todo is None else np.empty(m, dtype=np.int64)
            accept = scratch("ptrs-accept", m, np.bool_)
            if kernels.use_compiled():  # one pass per element, without the GIL
                rejected = scratch("ptrs-rejected", m, np.int64)
                n_rejected = self._compiled_ptrs_round(m, consts, draws, accept, rejected)
                if todo is None:
                    todo = rejected[:n_rejected].copy()
                    continue
            else:
                # the stream: m words for u, then m for v (temporaries: never leave this function)
                u_words = self._words_into(scratch("ptrs-u", m, np.uint64))
                v_words = self._words_into(scratch("ptrs-v", m, np.uint64))
                for start in range(0, m, _CHUNK):
                    stop = min(start + _CHUNK, m)
                    accept[start:stop] = _ptrs_chunk(
                        u_words[start:stop], v_words[start:stop], consts, draws[start:stop]
                    )
            if todo is None:
                todo = np.flatnonzero(~accept)
            else:
                out[todo[accept]] = draws[accept]
                todo = todo[~accept]
        return out

    def _compiled_ptrs_round(
        self,
        m: int,
        consts: _PtrsConstants,
        draws: np.ndarray,
        accept: np.ndarray,
        rejected: np.ndarray,
    ) -> int:
        """One PTRS round of ``m`` candidates in the C kernel; returns how many were rejected.

        It reads the same stream words as the numpy round (``m`` for ``u``, then ``m`` for
        ``v``), but block by block from two positions at once -- the ``u`` block from here, the
        ``v`` block from ``m`` words ahead -- so each block's words are still in the L2 cache
        when the kernel reads them, instead of 16 MiB going out to memory and back per 2^20
        draws.  The GIL is held only while a block's keystream is made (~40 µs)."""
        block = min(m, _FUSED_BLOCK)
        u_words = scratch("ptrs-u", block, np.uint64)
        v_words = scratch("ptrs-v", block, np.uint64)
        n_rejected = 0
        with self._lock:
            end = self.words_drawn + 2 * m
            u_stream, v_stream = self._encryptor, self._encryptor_at(self.words_drawn + m)
            try:
                for start in range(0, m, block):
                    stop = min(start + block, m)
                    u, v = u_words[: stop - start], v_words[: stop - start]
                    keystream_into(u_stream, u)
                    keystream_into(v_stream, v)
                    n_rejected += kernels.compiled.ptrs_round(
                        u,
                        v,
                        *consts.kernel_args,
                        _LOG_FACTORIAL,
                        draws[start:stop],
                        accept[start:stop],
                        rejected[n_rejected:],
                        start,
                    )
            except BaseException:
                # stopped part-way: the u stream must not run on into the v words already
                # drawn, so the stream continues after both, as it does after a whole round
                v_stream = self._encryptor_at(end)
                raise
            finally:
                # a whole round leaves the u stream where the v stream began and the v stream
                # at the end: continue from there
                self._encryptor = v_stream
                self.words_drawn = end
        return n_rejected


_CHUNK = 1 << 15  # draws per slice: a few float64 scratch arrays of 256 KiB stay in L2
_FUSED_BLOCK = 1 << 15  # compiled round: 256 KiB of u and of v words per block, in L2


class _PtrsConstants:
    """Hörmann's PTRS constants for one ``λ`` (>= 10)."""

    def __init__(self, lam: float) -> None:
        self.lam = lam
        self.loglam = math.log(lam)
        slam = math.sqrt(lam)
        self.b = 0.931 + 2.53 * slam
        self.a = -0.059 + 0.02483 * self.b
        self.log_invalpha = math.log(1.1239 + 1.1328 / (self.b - 3.4))
        self.vr = 0.9277 - 3.6224 / (self.b - 2.0)
        self.kernel_args = (lam, self.loglam, self.a, self.b, self.log_invalpha, self.vr)


def words_to_uniform(words: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Uniforms in (0, 1) from raw words, as :meth:`SecureRandom.uniform` makes them (``words``
    is overwritten)."""
    return _words_to_uniform(words, out)


def _words_to_uniform(words: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``((w >> 11) + 0.5) / 2^53`` into ``out`` (float64); ``words`` is overwritten."""
    np.right_shift(words, np.uint64(11), out=words)
    np.add(words, 0.5, out=out)
    out *= 1.0 / (1 << 53)
    return out


def _ptrs_chunk(
    u_words: np.ndarray, v_words: np.ndarray, c: _PtrsConstants, draws: np.ndarray
) -> np.ndarray:
    """One PTRS round on a slice: candidates into ``draws`` (int64), returns the accept mask.

    Rejected entries of ``draws`` are left as 0 (their candidate may not fit an int64).  Each
    expression is evaluated in the same order as the whole-array form (e.g.
    ``((2a / us + b) · u + λ) + 0.43``), so the accepted values are bit-identical to it.
    """
    u = _words_to_uniform(u_words, np.empty(u_words.size))
    v = _words_to_uniform(v_words, np.empty(v_words.size))
    u -= 0.5
    us = np.abs(u)
    np.subtract(0.5, us, out=us)
    k = np.divide(2.0 * c.a, us)
    k += c.b
    k *= u
    k += c.lam
    k += 0.43
    np.floor(k, out=k)
    accept = us >= 0.07
    accept &= v <= c.vr
    slow = np.flatnonzero(~accept)
    if slow.size:
        ks, uss, vs = k[slow], us[slow], v[slow]
        reject = (ks < 0) | ((uss < 0.013) & (vs > uss))
        lhs = np.log(vs) + c.log_invalpha - np.log(c.a / (uss * uss) + c.b)
        accept[slow] = ~reject & (lhs <= _log_poisson_pmf(ks, c.lam, c.loglam))
    k *= accept  # zero the rejected candidates (finite: us > 0) before the int64 cast
    np.copyto(draws, k, casting="unsafe")
    return accept


_LOG_FACTORIAL = np.array([math.lgamma(k + 1.0) for k in range(int(_STIRLING_MIN))])


def _log_poisson_pmf(k: np.ndarray, lam: float, loglam: float) -> np.ndarray:
    """``k·log λ - λ - log k!`` (float64), accurate for large λ (see the module docstring).

    Entries with ``k < 0`` are meaningless (the caller rejects them first).
    """
    kk = np.maximum(k, 0.0)
    big = np.maximum(kk, _STIRLING_MIN)
    d = big - lam
    inv = 1.0 / big
    inv2 = inv * inv
    series = inv * (1.0 / 12.0 - inv2 * (1.0 / 360.0 - inv2 / 1260.0))
    out = d - big * np.log1p(d / lam) - 0.5 * np.log(2.0 * math.pi * big) - series
    small = kk < _STIRLING_MIN
    if small.any():
        ks = kk[small]
        out[small] = ks * loglam - lam - _LOG_FACTORIAL[ks.astype(np.int64)]
    return out
