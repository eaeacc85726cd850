"""Pairwise additive masks that cancel in the sum (Bonawitz et al. 2017, without dropout recovery).

Every pair of workers ``i < j`` agrees on a 32-byte seed via X25519 + HKDF-SHA256.  For each
round the seed is expanded with ChaCha20 into a vector ``m_ij`` uniform in ``Z_{2^b}^D``.
Worker ``i`` adds ``Σ_{j>i} m_ij - Σ_{j<i} m_ji`` (mod ``2^b``) to its payload.  Every ``m_ij``
enters the total once with ``+`` (from ``i``) and once with ``-`` (from ``j``), so the masks
cancel exactly and the modular sum of payloads equals the modular sum of unmasked shares.  A
single payload, however, is uniformly distributed to anyone who lacks at least one of its
worker's pairwise seeds (see the threat model in :mod:`dpray.privacy.secure_agg.aggregator`).

Uniformity: the keystream is read as little-endian uint64 words and reduced mod ``2^b`` by a bit
mask; since ``2^b`` divides ``2^64`` every residue is equally likely (no modulo bias).  Arithmetic
is done in numpy uint64, which wraps mod ``2^64``; because ``2^b | 2^64`` the final bit mask
gives the exact result mod ``2^b``.

Round separation: the ChaCha20 nonce is derived from ``step``.  A (seed, step) pair must never
mask two different payloads -- whoever sees both learns their difference.  If a step is aborted
and retried, the caller must advance ``step`` (it is a round counter, not the optimizer step).
"""

from __future__ import annotations

import struct

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dpray.privacy.secure_agg.buffers import scratch
from dpray.privacy.secure_agg.csprng import keystream_into

__all__ = [
    "generate_keypair",
    "public_key_from_private",
    "shared_seed",
    "pairwise_mask",
    "worker_mask",
]

_HKDF_LABEL = b"dpray/secure_agg/pairwise-seed/v1|"
_MAX_BITS = 62  # values must stay non-negative in int64


def _raw_public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(
        encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw
    )


def generate_keypair() -> tuple[bytes, bytes]:
    """Fresh X25519 key pair as raw 32-byte ``(private, public)``.

    Generate a new pair per training run (or per key-exchange epoch) so that seeds from one run
    cannot be replayed in another.
    """
    private = X25519PrivateKey.generate()
    private_raw = private.private_bytes(
        encoding=serialization.Encoding.Raw,
        format=serialization.PrivateFormat.Raw,
        encryption_algorithm=serialization.NoEncryption(),
    )
    return private_raw, _raw_public(private)


def public_key_from_private(private_key: bytes) -> bytes:
    """Raw public key belonging to a raw X25519 private key."""
    return _raw_public(X25519PrivateKey.from_private_bytes(private_key))


def shared_seed(my_private: bytes, their_public: bytes, context: bytes) -> bytes:
    """Symmetric 32-byte seed for the pair (me, them): ``HKDF-SHA256(X25519(me, them))``.

    ``shared_seed(a_priv, b_pub, ctx) == shared_seed(b_priv, a_pub, ctx)``.  The HKDF ``info``
    binds ``context`` (use e.g. the run id) and the two public keys in sorted order, so the seed is
    tied to this exact pair and run (as in libsodium's ``crypto_kx``).  The raw Diffie-Hellman
    output is never used directly as a key because it is not uniformly distributed.
    """
    private = X25519PrivateKey.from_private_bytes(my_private)
    peer = X25519PublicKey.from_public_bytes(their_public)
    secret = private.exchange(peer)
    lo, hi = sorted((_raw_public(private), bytes(their_public)))
    info = _HKDF_LABEL + struct.pack("<I", len(context)) + bytes(context) + lo + hi
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _keystream_u64(seed32: bytes, step: int, dim: int, out: np.ndarray | None = None) -> np.ndarray:
    """``dim`` uint64 words of ChaCha20 keystream for (seed, step), little-endian (into ``out``).

    cryptography's ChaCha20 takes a 16-byte nonce = 4-byte little-endian block counter (start at
    0) + 12-byte nonce; we use ``step`` (8 bytes) + a 4-byte domain tag.  The 32-bit counter
    allows 2^32 blocks of 64 bytes, i.e. up to 2^35 words per (seed, step).

    The keystream is the encryption of zeros, written straight into the output array with
    ``update_into`` (:func:`~dpray.privacy.secure_agg.csprng.keystream_into`): ~3x faster than
    ``update(bytes(8 * dim))``, which allocates and zero-fills the input and then copies the
    ciphertext into a new ``bytes`` object.
    """
    if len(seed32) != 32:
        raise ValueError(f"seed must be 32 bytes, got {len(seed32)}")
    if not 0 <= step < 1 << 64:
        raise ValueError(f"step must be in [0, 2^64), got {step}")
    if dim > 1 << 35:
        raise ValueError("dim too large for one ChaCha20 stream")
    nonce = struct.pack("<IQ4s", 0, step, b"mask")
    encryptor = Cipher(algorithms.ChaCha20(bytes(seed32), nonce), mode=None).encryptor()
    out = np.empty(dim, dtype="<u8") if out is None else out
    keystream_into(encryptor, out)
    return out


def _check_bits(bits: int) -> int:
    if not 1 <= bits <= _MAX_BITS:
        raise ValueError(f"bits must be in [1, {_MAX_BITS}], got {bits}")
    return (1 << bits) - 1


def pairwise_mask(seed32: bytes, step: int, dim: int, bits: int) -> torch.Tensor:
    """Mask ``m_ij`` for one pair and round: ``dim`` values uniform in ``[0, 2^bits)``, int64."""
    low = np.uint64(_check_bits(bits))
    words = _keystream_u64(seed32, step, dim)
    np.bitwise_and(words, low, out=words)
    return torch.from_numpy(words.view(np.int64))


def worker_mask(
    rank: int, seeds_by_peer: dict[int, bytes], step: int, dim: int, bits: int
) -> torch.Tensor:
    """``Σ_{j>rank} m_{rank,j} - Σ_{j<rank} m_{j,rank} mod 2^bits`` as int64 in ``[0, 2^bits)``.

    ``seeds_by_peer`` maps every *other* rank to the seed shared with it (symmetric, so
    ``m_ij`` computed by ``i`` and by ``j`` is the same vector).  Summed over all ranks the result
    is exactly 0 mod ``2^bits``.  An empty dict (a single worker) gives the zero mask.
    """
    low = np.uint64(_check_bits(bits))
    if rank in seeds_by_peer:
        raise ValueError(f"seeds_by_peer must not contain the worker's own rank {rank}")
    acc = np.zeros(dim, dtype=np.uint64)
    for peer in sorted(seeds_by_peer):
        words = _keystream_u64(
            seeds_by_peer[peer], step, dim, scratch("mask-words", dim, np.uint64)
        )
        if peer > rank:
            np.add(acc, words, out=acc)  # wraps mod 2^64, harmless since 2^b | 2^64
        else:
            np.subtract(acc, words, out=acc)
    np.bitwise_and(acc, low, out=acc)
    return torch.from_numpy(acc.view(np.int64))
