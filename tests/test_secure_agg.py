"""Secure noise aggregation: rotation, quantization, Skellam shares, masks, encode/decode."""

from __future__ import annotations

import hashlib
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.linalg import hadamard

from dpray.privacy.secure_agg import aggregator as agg
from dpray.privacy.secure_agg import csprng, kernels
from dpray.privacy.secure_agg.aggregator import (
    SecureAggConfig,
    encode,
    pairwise_seeds,
    quantize_share,
    simulate_round,
)
from dpray.privacy.secure_agg.csprng import SecureRandom
from dpray.privacy.secure_agg.masks import (
    generate_keypair,
    pairwise_mask,
    public_key_from_private,
    shared_seed,
    worker_mask,
)
from dpray.privacy.secure_agg.quantize import choose_scale, stochastic_round, wrap_k
from dpray.privacy.secure_agg.rotation import fwht, padded_dim, rotate, unrotate
from dpray.privacy.secure_agg.skellam import (
    MAX_LAMBDA,
    max_scale_for_sampler,
    share_lambda,
    skellam_noise,
)


def _gen(seed: int) -> torch.Generator:
    """Test inputs only (public data); noise and rounding draw from a SecureRandom."""
    return torch.Generator().manual_seed(seed)


def _srng(seed: int) -> SecureRandom:
    return SecureRandom.from_key(hashlib.sha256(f"test-srng|{seed}".encode()).digest())


def _keys(num_workers: int) -> tuple[list[bytes], list[bytes]]:
    # deterministic keys (X25519 accepts any 32 bytes) keep the statistical tests reproducible
    privs = [hashlib.sha256(f"test-key|{r}".encode()).digest() for r in range(num_workers)]
    return privs, [public_key_from_private(p) for p in privs]


def _all_seeds(num_workers: int, context: bytes = b"test") -> list[dict[int, bytes]]:
    privs, pubs = _keys(num_workers)
    return [pairwise_seeds(r, privs[r], pubs, context) for r in range(num_workers)]


# ----------------------------------------------------------------------------- rotation


def test_padded_dim():
    assert [padded_dim(d) for d in (1, 2, 3, 4, 5, 1000, 1024, 1025)] == [
        1, 2, 4, 4, 8, 1024, 1024, 2048,
    ]  # fmt: skip
    with pytest.raises(ValueError):
        padded_dim(0)


@pytest.mark.parametrize("n", [1, 2, 8, 64, 128, 2048])
def test_fwht_matches_dense_hadamard(n):
    x = torch.randn(n, dtype=torch.float64, generator=_gen(n))
    dense = torch.from_numpy(hadamard(n).astype(np.float64))
    torch.testing.assert_close(fwht(x), dense @ x, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        fwht(x, normalized=True), dense @ x / math.sqrt(n), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("d", [1, 3, 1000, 1024, 4097, 70_000])
def test_rotation_round_trip_and_norm(d):
    x = torch.randn(d, dtype=torch.float64, generator=_gen(d)) * 3.0
    y = rotate(x, seed=1234)
    assert y.shape == (padded_dim(d),) and y.dtype == torch.float64
    assert torch.allclose(unrotate(y, 1234, d), x, rtol=0, atol=1e-9)
    assert abs(y.norm().item() - x.norm().item()) <= 1e-9 * x.norm().item()
    # float32 input is promoted, not truncated
    assert torch.allclose(unrotate(rotate(x.float(), 1234), 1234, d), x.float().double(), atol=1e-9)


def test_rotation_spreads_a_spike_and_depends_on_seed():
    d = 4096
    spike = torch.zeros(d, dtype=torch.float64)
    spike[17] = 5.0
    y = rotate(spike, seed=7)
    # every coordinate of a rotated spike has the same magnitude ‖x‖/sqrt(D)
    assert torch.allclose(y.abs(), torch.full_like(y, 5.0 / math.sqrt(d)), atol=1e-12)
    assert not torch.allclose(y, rotate(spike, seed=8))
    assert torch.equal(y, rotate(spike, seed=7))
    with pytest.raises(ValueError):
        unrotate(y, 7, d + 1)


# ----------------------------------------------------------------------------- quantization


def test_stochastic_round_is_unbiased_and_integer():
    x = torch.tensor([-2.75, -0.5, 0.0, 0.1, 3.5, 7.999, 2.0**39 + 0.25], dtype=torch.float64)
    reps = 20_000
    rounded = stochastic_round(x.repeat(reps), _srng(0)).view(reps, -1)
    assert rounded.dtype == torch.int64
    assert torch.all((rounded == torch.floor(x).long()) | (rounded == torch.floor(x).long() + 1))
    frac = (x - torch.floor(x)).numpy()
    up = (rounded - torch.floor(x).long()).double().mean(0).numpy()
    # binomial standard error <= 0.5/sqrt(reps) = 0.0035; allow 5 sigma
    np.testing.assert_allclose(up, frac, atol=0.018)
    assert torch.all(rounded[:, 2] == 0)  # integers are never moved


def test_choose_scale_matches_tff_formula_and_documented_k():
    b, d, n, c, sig = 40, 10**6, 4, 8.0, 0.7
    big_d = padded_dim(d)
    tff = math.sqrt(2.0 ** (2 * b) - n * 4.9**2) / (
        2 * 4.9 * math.sqrt(c**2 * n**2 / big_d + n * sig**2)
    )
    assert choose_scale(b, d, n, c, sig, k=4.9) == pytest.approx(tff, rel=1e-12)
    k = wrap_k(d, 1e-6)
    assert 2 * big_d * math.exp(-(k**2) / 2) == pytest.approx(1e-6, rel=1e-9)
    assert choose_scale(b, d, n, c, sig) == pytest.approx(tff * 4.9 / k, rel=1e-9)
    with pytest.raises(ValueError):
        choose_scale(63, d, n, c, sig)  # beyond float64 / int64 headroom
    with pytest.raises(ValueError):
        choose_scale(3, d, 100, c, sig, k=4.9)  # rounding alone wraps


# ----------------------------------------------------------------------------- Skellam


def test_skellam_noise_moments_and_limits():
    lam = 12345.6
    z = skellam_noise((200_000,), lam, _srng(3))
    assert z.dtype == torch.int64
    zf = z.double()
    assert abs(zf.mean().item()) < 5 * math.sqrt(2 * lam / z.numel())
    assert zf.var().item() == pytest.approx(2 * lam, rel=0.02)
    big = skellam_noise(100_000, MAX_LAMBDA, _srng(4)).double()
    assert big.var().item() == pytest.approx(2 * MAX_LAMBDA, rel=0.03)
    assert torch.equal(skellam_noise(5, 0.0, _srng(0)), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError):
        skellam_noise(5, MAX_LAMBDA * 1.01, _srng(0))


def test_share_lambda_total_variance():
    s, sig, c = 1e5, 1.1, 0.5
    for t in (1, 3, 8):
        assert 2 * t * share_lambda(s, sig, c, t) == pytest.approx((s * sig * c) ** 2)
        cap = max_scale_for_sampler(sig, c, t)
        assert share_lambda(cap, sig, c, t) <= MAX_LAMBDA


# ----------------------------------------------------------------------------- masks


def test_shared_seed_is_symmetric_and_context_bound():
    (a_priv, a_pub), (b_priv, b_pub), (c_priv, c_pub) = (generate_keypair() for _ in range(3))
    assert public_key_from_private(a_priv) == a_pub
    ab = shared_seed(a_priv, b_pub, b"run-1")
    assert len(ab) == 32
    assert ab == shared_seed(b_priv, a_pub, b"run-1")
    assert ab != shared_seed(a_priv, b_pub, b"run-2")
    assert ab != shared_seed(a_priv, c_pub, b"run-1")


@pytest.mark.parametrize("num_workers", [2, 3, 4])
@pytest.mark.parametrize("bits", [40, 13])
def test_worker_masks_cancel_exactly(num_workers, bits):
    dim = 3001
    seeds = _all_seeds(num_workers)
    masks = [worker_mask(r, seeds[r], 5, dim, bits) for r in range(num_workers)]
    for m in masks:
        assert m.dtype == torch.int64 and m.min() >= 0 and m.max() < 2**bits
        assert m.abs().sum() > 0
    total = torch.stack(masks).sum(0)  # no int64 overflow: W * 2^b < 2^63
    assert torch.equal(total % (2**bits), torch.zeros(dim, dtype=torch.int64))
    # a different round gives unrelated masks
    assert not torch.equal(masks[0], worker_mask(0, seeds[0], 6, dim, bits))


def test_pairwise_mask_range_and_determinism():
    seed = bytes(range(32))
    m = pairwise_mask(seed, 3, 10_000, 40)
    assert torch.equal(m, pairwise_mask(seed, 3, 10_000, 40))
    assert m.min() >= 0 and m.max() < 2**40 and m.max() > 2**39
    assert not torch.equal(m, pairwise_mask(seed, 4, 10_000, 40))


# ----------------------------------------------------------------------------- encode / decode


def _unit_inputs(num_workers: int, dim: int, norm: float, seed: int) -> list[torch.Tensor]:
    g = _gen(seed)
    xs = []
    for _ in range(num_workers):
        x = torch.randn(dim, dtype=torch.float64, generator=g)
        xs.append(x * (norm / x.norm()))
    return xs


@pytest.mark.parametrize("scale", [None, 50.0])
def test_decode_within_rounding_bound_without_noise(scale):
    num_workers, dim, max_norm = 3, 5000, 4.0
    cfg = SecureAggConfig.create(
        dim=dim, num_workers=num_workers, noise_multiplier=0.0, clip_norm=1.0, max_norm=max_norm
    )
    if scale is not None:  # a deliberately coarse scale makes the rounding error visible
        cfg = SecureAggConfig(40, scale, 0.0, 1.0, num_workers, num_workers, 0, dim)
    xs = _unit_inputs(num_workers, dim, max_norm, seed=1)
    plain = torch.stack(xs).sum(0)
    out = simulate_round(xs, cfg, step=1, seed=11)
    err = (out - plain).norm().item()
    big_d = cfg.padded_dim
    # RMS rounding error is <= sqrt(D W / 4)/s; sqrt(D W)/s leaves a 2x margin.  The hard
    # (worst-case) bound is W sqrt(D)/s since each worker errs by < 1/s per coordinate.
    assert err <= math.sqrt(big_d * num_workers) / cfg.scale
    assert err <= num_workers * math.sqrt(big_d) / cfg.scale
    if scale is not None:
        assert err > 0.1 * math.sqrt(big_d * num_workers / 12) / cfg.scale  # it really rounds


def test_rounding_is_unbiased_across_rounds():
    cfg = SecureAggConfig(40, 4.0, 0.0, 1.0, 2, 2, 0, 256)
    xs = _unit_inputs(2, 256, 1.0, seed=2)
    plain = torch.stack(xs).sum(0)
    errs = torch.stack([simulate_round(xs, cfg, step=s, seed=s) - plain for s in range(200)])
    # per-round per-coordinate error std <= sqrt(2/4)/4 ≈ 0.18; the mean of 200 is ~0.0125
    assert errs.mean(0).abs().max().item() < 0.07
    assert errs.std().item() > 0.05


@pytest.mark.parametrize(("num_workers", "honest"), [(3, 3), (4, 2)])
def test_decoded_noise_std_matches_sigma_c(num_workers, honest):
    dim, sigma, clip = 2**16, 1.3, 0.5
    cfg = SecureAggConfig.create(
        dim=dim,
        num_workers=num_workers,
        noise_multiplier=sigma,
        clip_norm=clip,
        max_norm=clip * 32,
        min_honest_workers=honest,
    )
    xs = _unit_inputs(num_workers, dim, clip * 32, seed=3)
    noise = simulate_round(xs, cfg, step=0, seed=5) - torch.stack(xs).sum(0)
    expected = sigma * clip * math.sqrt(num_workers / honest)  # honest ones alone give σC
    assert noise.std().item() == pytest.approx(expected, rel=0.05)
    assert abs(noise.mean().item()) < 5 * expected / math.sqrt(dim)


def test_single_payload_is_uniform_but_unmasked_share_is_not():
    num_workers, dim, bits = 3, 2**16, 40
    cfg = SecureAggConfig.create(
        dim=dim, num_workers=num_workers, noise_multiplier=1.0, clip_norm=1.0, max_norm=16.0
    )
    seeds = _all_seeds(num_workers)
    x = _unit_inputs(1, dim, 16.0, seed=4)[0]
    payload = encode(x, cfg, 0, 9, seeds[0], _srng(1))
    assert payload.min() >= 0 and payload.max() < 2**bits
    low = (payload & 0xFF).numpy()
    high = (payload >> (bits - 8)).numpy()
    for byte in (low, high):
        counts = np.bincount(byte, minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-3
    # the same test has power: the unmasked share sits near 0 mod 2^b
    share_high = ((quantize_share(x, cfg, _srng(1)) & (2**bits - 1)) >> (bits - 8)).numpy()
    assert stats.chisquare(np.bincount(share_high, minlength=256)).pvalue < 1e-12


def test_no_modular_wrap_in_normal_configurations():
    num_workers, dim, clip, batch = 4, 2**15, 1.0, 64
    max_norm = clip * batch
    # worst case for the modulus: every worker's input at full norm, all aligned
    x = _unit_inputs(1, dim, max_norm, seed=6)[0]
    half = 2.0 ** (40 - 1)

    cfg = SecureAggConfig.create(
        dim=dim, num_workers=num_workers, noise_multiplier=1.0, clip_norm=clip, max_norm=max_norm
    )
    total = sum(quantize_share(x, cfg, _srng(r)) for r in range(num_workers))
    assert total.abs().max().item() < half / 1e3  # sampler-capped scale: far from the edge

    # the uncapped choose_scale scale (noise replaced by Gaussian of the same variance, since
    # the Poisson sampler cannot sample its λ ~ 1e20): still no wrap, by the union-bound margin
    noise_std = 1.0 * clip / math.sqrt(num_workers)
    s = choose_scale(40, dim, num_workers, max_norm, noise_std)
    g, rounding = _gen(7), _srng(7)
    total = torch.zeros(padded_dim(dim), dtype=torch.float64)
    for _ in range(num_workers):
        total += stochastic_round(rotate(x, 0) * s, rounding).double()
        total += torch.randn(padded_dim(dim), dtype=torch.float64, generator=g) * s * noise_std
    peak = total.abs().max().item()
    assert peak < half
    # ≈ (max of D Gaussians ≈ 4.5 sd) / k; comfortably inside the range
    assert peak < 0.8 * half


def test_encode_validates_inputs():
    cfg = SecureAggConfig.create(
        dim=100, num_workers=3, noise_multiplier=1.0, clip_norm=1.0, max_norm=1.0
    )
    seeds = _all_seeds(3)
    x = torch.zeros(100)
    with pytest.raises(ValueError):
        encode(x, cfg, 0, 0, {1: seeds[0][1]}, _srng(0))  # a missing peer: masks cannot cancel
    with pytest.raises(ValueError):
        encode(torch.zeros(99), cfg, 0, 0, seeds[0], _srng(0))
    with pytest.raises(ValueError):
        SecureAggConfig(40, 1.0, 1.0, 1.0, 1, 2**23, 0, 10)  # W * 2^40 >= 2^63
    with pytest.raises(ValueError):
        SecureAggConfig(40, 1.0, 1.0, 1.0, 4, 3, 0, 10)  # t > W


def test_single_worker_round_trip():
    cfg = SecureAggConfig.create(
        dim=777, num_workers=1, noise_multiplier=0.0, clip_norm=1.0, max_norm=2.0
    )
    x = _unit_inputs(1, 777, 2.0, seed=8)[0]
    assert torch.allclose(simulate_round([x], cfg, 0, 0), x, atol=1e-9)


def test_distributed_helpers_single_process_gloo():
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no existing default group")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        _, pub = generate_keypair()
        assert agg.exchange_public_keys(pub) == [pub]
        payload = torch.arange(10, dtype=torch.int64)
        assert torch.equal(agg.all_reduce_int64(payload.clone(), bits=40), payload)
        with pytest.raises(TypeError):
            agg.all_reduce_int64(payload.float(), bits=40)
        with pytest.raises(ValueError):
            agg.all_reduce_int64(payload, bits=63)
    finally:
        dist.destroy_process_group()


def test_benchmark_encode_smoke():
    timings = agg.benchmark_encode(dim=5000, num_workers=3, repeats=1)
    assert {"rotate", "quantize", "noise", "mask", "encode", "offset", "decode"} <= set(timings)
    assert all(v >= 0 for v in timings.values())


def _two_rank_config(world: int) -> SecureAggConfig:
    return SecureAggConfig.create(
        dim=1000, num_workers=world, noise_multiplier=0.0, clip_norm=1.0, max_norm=2.0
    )


def _two_rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = _two_rank_config(world)
        priv, pub = generate_keypair()
        publics = agg.exchange_public_keys(pub)
        seeds = pairwise_seeds(rank, priv, publics, b"two-rank-test")
        x = _unit_inputs(world, 1000, 2.0, seed=9)[rank]
        payload = encode(x, cfg, rank, 0, seeds, agg.private_generator())
        torch.save(payload.clone(), f"{out_dir}/payload{rank}.pt")
        total = agg.all_reduce_int64(payload, cfg.bits)
        torch.save(agg.decode(total, cfg), f"{out_dir}/decoded{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_round(tmp_path):
    """Real key exchange + int64 all-reduce across processes: masks cancel, outputs agree."""
    world = 2
    torch.multiprocessing.spawn(
        _two_rank_worker,
        args=(world, str(tmp_path / "init"), str(tmp_path)),
        nprocs=world,
        join=True,
    )
    cfg = _two_rank_config(world)
    plain = torch.stack(_unit_inputs(world, 1000, 2.0, seed=9)).sum(0)
    decoded = [torch.load(tmp_path / f"decoded{r}.pt") for r in range(world)]
    assert torch.equal(decoded[0], decoded[1])
    assert torch.allclose(decoded[0], plain, atol=1e-9)
    # a payload on its own decodes to garbage: the mask hides the worker's input
    alone = agg.decode(torch.load(tmp_path / "payload0.pt"), cfg)
    assert (alone - plain).abs().max() > 1.0


# ------------------------------------------------------------- fast paths vs their references


def _reference_ptrs(gen: SecureRandom, count: int, lam: float) -> np.ndarray:
    """The whole-array PTRS sampler that csprng's chunked one replaced (the oracle)."""
    from dpray.privacy.secure_agg.csprng import _log_poisson_pmf

    slam, loglam = math.sqrt(lam), math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    log_invalpha = math.log(1.1239 + 1.1328 / (b - 3.4))
    vr = 0.9277 - 3.6224 / (b - 2.0)
    out = np.empty(count, dtype=np.int64)
    todo = np.arange(count)
    while todo.size:
        m = todo.size
        u = (gen.random_words(m) >> np.uint64(11)).astype(np.float64)
        u += 0.5
        u *= 1.0 / (1 << 53)
        u -= 0.5
        v = (gen.random_words(m) >> np.uint64(11)).astype(np.float64)
        v += 0.5
        v *= 1.0 / (1 << 53)
        us = 0.5 - np.abs(u)
        k = np.floor((2.0 * a / us + b) * u + lam + 0.43)
        quick = (us >= 0.07) & (v <= vr)
        reject = (k < 0) | ((us < 0.013) & (v > us))
        lhs = np.log(v) + log_invalpha - np.log(a / (us * us) + b)
        accept = quick | (~reject & (lhs <= _log_poisson_pmf(k, lam, loglam)))
        out[todo[accept]] = k[accept].astype(np.int64)
        todo = todo[~accept]
    return out


@pytest.mark.parametrize("backend", ["compiled", "numpy"])
@pytest.mark.parametrize("lam", [10.0, 37.5, 1e4, 3e9, MAX_LAMBDA])
def test_chunked_poisson_is_bit_identical_to_the_whole_array_sampler(lam, backend, monkeypatch):
    # both rounds: the compiled kernel (_kernels.c) and the numpy chunks it falls back to
    if backend == "compiled":
        _require_compiled_kernels()
    monkeypatch.setattr(kernels, "BACKEND", backend)
    # more draws than one chunk, so chunk edges and several rejection rounds are exercised
    count = 3 * (1 << 15) + 17
    gen, oracle = _srng(21), _srng(21)
    fast = gen.poisson(count, lam).numpy()
    assert np.array_equal(fast, _reference_ptrs(oracle, count, lam))
    # and both left the stream at the same place
    assert gen.words_drawn == oracle.words_drawn
    assert np.array_equal(gen.random_words(5), oracle.random_words(5))
    # the same key gives the same draws; another key does not
    assert np.array_equal(fast, _srng(21).poisson(count, lam).numpy())
    assert not np.array_equal(fast, _srng(22).poisson(count, lam).numpy())


def test_the_stream_can_be_opened_at_any_word():
    """SecureRandom reads two positions of its stream at once (the compiled PTRS round): a
    stream opened at word w is the one long stream from word w, also past 2^32 blocks."""
    gen = _srng(40)
    long = gen.random_words(1000)
    for word in (0, 1, 7, 8, 9, 513, 992):
        opened = gen._encryptor_at(word).update(bytes(64))
        assert opened == long[word : word + 8].tobytes()
    # OpenSSL carries the 32-bit block counter into the next nonce word: block 2^32 - 1 then
    # block 2^32 in one stream equal the two blocks opened separately
    last = (2**32 - 1) * 8  # words per 64-byte block: 8
    across = gen._encryptor_at(last).update(bytes(128))
    assert across[64:] == gen._encryptor_at(last + 8).update(bytes(64))
    assert across[64:] != gen._encryptor_at(0).update(bytes(64))  # no wrap to block 0


@pytest.mark.parametrize("where", ["keystream", "kernel"])
def test_a_draw_that_fails_part_way_never_reuses_the_stream(where, monkeypatch):
    """If a draw stops part-way (an exception between blocks), the generator continues after
    every word that draw was given: the u stream must not run on into the v words, and no later
    draw may read keystream whose use is unknown."""
    _require_compiled_kernels()
    count = 3 * csprng._FUSED_BLOCK
    gen = _srng(41)
    calls = {"n": 0}
    real_keystream, real_kernel = csprng.keystream_into, kernels.compiled.ptrs_round

    def failing_keystream(encryptor, out):
        calls["n"] += 1
        if calls["n"] == 3:  # the second block's u words
            raise RuntimeError("injected")
        return real_keystream(encryptor, out)

    def failing_kernel(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected")
        return real_kernel(*args)

    if where == "keystream":
        monkeypatch.setattr(csprng, "keystream_into", failing_keystream)
    else:
        monkeypatch.setattr(kernels, "compiled", SimpleNamespace(ptrs_round=failing_kernel))
    with pytest.raises(RuntimeError, match="injected"):
        gen.poisson(count, 1e6)
    monkeypatch.undo()
    assert gen.words_drawn == 2 * count
    after = gen.random_words(4).tobytes()
    assert after == _srng(41)._encryptor_at(2 * count).update(bytes(32))

    # the same for a plain word draw that stops part-way
    words = np.empty(1 << 16, np.uint64)  # 512 KiB: two 256 KiB keystream slices
    monkeypatch.setattr(csprng, "_ZERO_BLOCK", bytes(1 << 18))
    slices = {"n": 0}

    class Failing:
        def __init__(self, inner):
            self.inner = inner

        def update_into(self, data, buf):
            slices["n"] += 1
            if slices["n"] == 2:
                raise RuntimeError("injected")
            return self.inner.update_into(data, buf)

    gen._encryptor = Failing(gen._encryptor)
    with pytest.raises(RuntimeError, match="injected"):
        gen.words_into(words)
    assert gen.words_drawn == 2 * count + 4 + words.size
    end = gen.words_drawn
    assert gen.random_words(2).tobytes() == _srng(41)._encryptor_at(end).update(bytes(16))


def _require_compiled_kernels() -> None:
    # Not a skip: an install that silently failed to build the kernels should fail here (CI and
    # developer installs compile them; only a machine without a C compiler runs the numpy forms).
    assert kernels.compiled is not None, (
        "dpray.privacy.secure_agg._kernels is not built: reinstall with a C compiler "
        "(pip install -e .); the numpy forms are being used"
    )


def test_the_compiled_kernels_are_built_and_used():
    _require_compiled_kernels()
    assert kernels.backend() == "compiled"


@pytest.mark.parametrize("lam", [12.0, 1e4, MAX_LAMBDA])
def test_compiled_ptrs_round_matches_the_numpy_round_on_millions_of_draws(lam):
    """One round over 2^21 candidates, same words: the same draws, acceptances and rejected
    positions (the C library's log and numpy's may differ in the last bit; this checks that no
    acceptance test on these draws sits that close)."""
    _require_compiled_kernels()
    m = 1 << 21
    gen = _srng(31)
    u_words, v_words = gen.random_words(m), gen.random_words(m)
    consts = csprng._PtrsConstants(lam)
    draws, accept = np.empty(m, np.int64), np.empty(m, np.bool_)
    rejected = np.empty(m, np.int64)
    n_rejected = kernels.compiled.ptrs_round(
        u_words, v_words, *consts.kernel_args, csprng._LOG_FACTORIAL, draws, accept, rejected
    )
    want_draws, want_accept = np.empty(m, np.int64), np.empty(m, np.bool_)
    for start in range(0, m, csprng._CHUNK):
        stop = start + csprng._CHUNK
        want_accept[start:stop] = csprng._ptrs_chunk(
            u_words[start:stop].copy(), v_words[start:stop].copy(), consts, want_draws[start:stop]
        )
    assert np.array_equal(accept, want_accept)
    assert np.array_equal(draws, want_draws)
    assert np.array_equal(rejected[:n_rejected], np.flatnonzero(~want_accept))
    assert 0.05 < n_rejected / m < 0.3  # PTRS rejects ~11% at large λ, ~23% at λ = 12


def test_compiled_ptrs_round_checks_its_buffers():
    _require_compiled_kernels()
    ptrs_round = kernels.compiled.ptrs_round
    consts = csprng._PtrsConstants(100.0)
    m = 64
    words = np.zeros(m, np.uint64)
    table = csprng._LOG_FACTORIAL

    def call(
        u=words, v=words, lam_args=consts.kernel_args, tab=table, out=None, acc=None, rej=None
    ):
        out = np.empty(m, np.int64) if out is None else out
        acc = np.empty(m, np.bool_) if acc is None else acc
        rej = np.empty(m, np.int64) if rej is None else rej
        return ptrs_round(u, v, *lam_args, tab, out, acc, rej)

    call()  # well-formed
    with pytest.raises(ValueError, match="v_words"):
        call(v=np.zeros(m - 1, np.uint64))
    with pytest.raises(ValueError, match="draws"):
        call(out=np.empty(m, np.int32))
    with pytest.raises(ValueError, match="draws: expected items of format"):
        call(out=np.empty(m, np.float64))  # right size, wrong type
    with pytest.raises(ValueError, match="u_words: expected items of format"):
        call(u=np.zeros(m, np.int64))
    with pytest.raises(ValueError, match="accept"):
        call(acc=np.empty(m, np.int8))
    with pytest.raises(ValueError, match="rejected"):
        call(rej=np.empty(m - 1, np.int64))
    with pytest.raises(ValueError, match="log_factorial"):
        call(tab=table[:5])
    with pytest.raises(ValueError, match="lam"):
        call(lam_args=(5.0, *consts.kernel_args[1:]))
    read_only = np.empty(m, np.int64)
    read_only.flags.writeable = False
    with pytest.raises((BufferError, ValueError, TypeError)):
        call(out=read_only)
    with pytest.raises(ValueError):  # not contiguous
        call(u=np.zeros(2 * m, np.uint64)[::2])


def test_a_round_decodes_the_same_under_both_backends(monkeypatch):
    """The whole protocol (noise, encode, sum, decode) gives the same bits with either backend."""
    _require_compiled_kernels()
    cfg = SecureAggConfig.create(
        dim=5000, num_workers=3, noise_multiplier=1.0, clip_norm=1.0, max_norm=4.0
    )
    xs = [torch.randn(5000, generator=_gen(35 + i)) for i in range(3)]
    monkeypatch.setattr(kernels, "BACKEND", "compiled")
    reference = simulate_round(xs, cfg, step=3, seed=9)
    monkeypatch.setattr(kernels, "BACKEND", "numpy")
    assert torch.equal(simulate_round(xs, cfg, step=3, seed=9), reference)


def test_skellam_at_the_training_share_size_is_skellam():
    lam = 0.9 * MAX_LAMBDA  # training shares sit at the sampler's cap
    z = skellam_noise(100_000, lam, _srng(23)).double().numpy()
    sd = math.sqrt(2 * lam)
    assert abs(z.mean()) < 5 * sd / math.sqrt(z.size)
    assert z.var() == pytest.approx(2 * lam, rel=0.03)
    # at this λ Skellam/sd is N(0, 1) to within O(1/λ) (far below what 1e5 draws resolve);
    # chi-square on 20 equiprobable bins
    edges = stats.norm.ppf(np.linspace(0, 1, 21)[1:-1]) * sd
    counts = np.bincount(np.searchsorted(edges, z), minlength=20)
    assert stats.chisquare(counts).pvalue > 1e-4


def test_rotation_gain_rides_on_the_transform():
    d = 3000
    x = torch.randn(d, generator=_gen(24))  # float32 in, as the aggregator passes it
    y = rotate(x, seed=5, gain=123.5)
    torch.testing.assert_close(y, rotate(x.double(), seed=5) * 123.5, rtol=1e-12, atol=1e-9)
    back = unrotate(y, 5, d, gain=1 / 123.5)
    torch.testing.assert_close(back, x.double(), rtol=0, atol=1e-9)
    ints = torch.round(y).to(torch.int64)  # integer input is widened, not truncated
    torch.testing.assert_close(unrotate(ints, 5, d), unrotate(ints.double(), 5, d))


def test_decode_signed_residue_matches_the_where_form():
    cfg = SecureAggConfig(40, 3.0, 0.0, 1.0, 3, 3, 0, 1000)
    mod, big_d = cfg.modulus, cfg.padded_dim
    g = _gen(25)
    total = torch.randint(0, 3 * mod, (big_d,), generator=g, dtype=torch.int64)
    total[:6] = torch.tensor([0, mod // 2 - 1, mod // 2, mod - 1, mod, 3 * mod - 1])
    v = total.bitwise_and(mod - 1)
    signed = torch.where(v >= mod // 2, v - mod, v)
    expected = unrotate(signed.double() / cfg.scale, cfg.rotation_seed, cfg.dim)
    kept = total.clone()
    torch.testing.assert_close(agg.decode(total, cfg), expected, rtol=1e-12, atol=1e-6)
    assert torch.equal(total, kept)  # the all-reduce result is not modified


def test_keystream_in_slices_is_the_one_shot_keystream():
    import struct

    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    from dpray.privacy.secure_agg.csprng import keystream_into

    def encryptor():
        nonce = struct.pack("<IQ4s", 0, 3, b"test")
        return Cipher(algorithms.ChaCha20(bytes(range(32)), nonce), mode=None).encryptor()

    n = (1 << 20) // 8 * 2 + 3  # words: two full 1 MiB slices and a partial one
    sliced = np.empty(n, dtype="<u8")
    keystream_into(encryptor(), sliced)
    assert sliced.tobytes() == encryptor().update(bytes(8 * n))


def test_scratch_is_reused_per_thread_and_slot_and_capped():
    import threading

    from dpray.privacy.secure_agg import buffers

    a = buffers.scratch("t-a", 1000, np.float64)
    assert buffers.scratch("t-a", 500, np.float64).base is a.base  # same memory, shorter view
    assert not np.shares_memory(a, buffers.scratch("t-b", 1000, np.float64))
    assert buffers.scratch("t-a", 1000, np.int64).dtype == np.int64  # another dtype: new array
    other = {}
    thread = threading.Thread(target=lambda: other.update(x=buffers.scratch("t-a", 1000, "f8")))
    thread.start()
    thread.join()
    assert not np.shares_memory(other["x"], buffers.scratch("t-a", 1000, np.float64))
    big = buffers.MAX_SCRATCH_BYTES // 8 + 1
    assert not np.shares_memory(
        buffers.scratch("t-c", big, np.float64), buffers.scratch("t-c", big, np.float64)
    )


def test_step_outputs_survive_the_next_step():
    """Offsets, payloads and decoded sums are fresh memory: scratch reuse never reaches them."""
    cfg = SecureAggConfig.create(
        dim=3000, num_workers=2, noise_multiplier=1.0, clip_norm=1.0, max_norm=4.0
    )
    seeds = _all_seeds(2)[0]
    x = _unit_inputs(1, 3000, 2.0, seed=26)[0]
    kept = []
    for step in range(2):
        offset = agg.data_independent_offset(cfg, 0, step, seeds, _srng(step))
        payload = agg.encode_with_offset(x, cfg, offset.clone(), _srng(10 + step))
        decoded = agg.decode(payload, cfg)
        kept.append([t.clone() for t in (offset, payload, decoded)] + [offset, payload, decoded])
    for copies_and_live in kept:
        copies, live = copies_and_live[:3], copies_and_live[3:]
        assert all(torch.equal(c, t) for c, t in zip(copies, live, strict=True))
    first, second = kept[0][3:], kept[1][3:]
    assert not any(np.shares_memory(a.numpy(), b.numpy()) for a in first for b in second)


def test_aggregator_draws_the_next_share_only_when_asked():
    """The training loop asks for step + 1's share after the update (prefetch); the aggregator
    itself starts nothing, and a step nobody prefetched still gets a fresh share."""
    from dpray.stages.train_generator.noise import SecureAggregator

    dim, sigma = 4000, 0.5
    worker = SecureAggregator(
        dim, noise_multiplier=sigma, clip_norm=1.0, max_units_per_worker=4, session=b"s" * 16
    )
    x = _unit_inputs(1, dim, 2.0, seed=27)[0].float()
    worker.prefetch(0)
    for step in range(3):
        noisy = worker(x, step)
        assert worker._pending == {}  # nothing drawn behind the caller's back
        assert noisy.dtype == torch.float32 and noisy.shape == (dim,)
        assert (noisy - x).std().item() == pytest.approx(sigma, rel=0.1)  # one worker: t = 1
        if step == 0:
            worker.prefetch(step + 1)
            assert set(worker._pending) == {1}


def test_fused_encode_and_decode_equal_the_step_by_step_forms():
    """encode_with_offset (chunked rounding + offset + mod) and decode (chunked signed residues
    into the unrotation) give bit for bit what rotate -> stochastic_round_ -> add -> mod and
    unrotate(signed residues) give, for drawn and for pre-drawn rounding words."""
    from dpray.privacy.secure_agg.quantize import stochastic_round_

    for dim in (3, 1000, 70_001):  # one chunk, and several with a short last one
        cfg = SecureAggConfig.create(
            dim=dim, num_workers=2, noise_multiplier=1.0, clip_norm=1.0, max_norm=4.0
        )
        seeds = _all_seeds(2)
        x = _unit_inputs(1, dim, 2.0, seed=31)[0]
        offset = agg.data_independent_offset(cfg, 0, 5, seeds[0], _srng(1))
        reference = stochastic_round_(rotate(x, cfg.rotation_seed, gain=cfg.scale), _srng(2))
        reference = reference.add_(offset).bitwise_and_(cfg.modulus - 1)
        drawn = agg.encode_with_offset(x, cfg, offset.clone(), _srng(2))
        words = _srng(2).random_words(cfg.padded_dim)
        given = agg.encode_with_offset(x, cfg, offset.clone(), _srng(99), rounding_words=words)
        assert torch.equal(drawn, reference) and torch.equal(given, reference)
        total = reference.clone().add_(agg.encode(x, cfg, 1, 5, seeds[1], _srng(3)))
        half = cfg.modulus // 2
        signed = (total + half).bitwise_and_(cfg.modulus - 1).sub_(half)
        expected = unrotate(signed, cfg.rotation_seed, dim, gain=1.0 / cfg.scale)
        assert torch.equal(agg.decode(total, cfg), expected)
        assert torch.equal(agg.decode(total, cfg, torch.float32), expected.float())
    with pytest.raises(ValueError, match="rounding_words"):
        agg.encode_with_offset(x, cfg, offset, _srng(2), rounding_words=words[:-1])


def test_prepared_shares_are_fresh_and_serve_one_step():
    cfg = SecureAggConfig.create(
        dim=500, num_workers=2, noise_multiplier=1.0, clip_norm=1.0, max_norm=4.0
    )
    seeds = _all_seeds(2)[0]
    gen = agg.private_generator()
    a, b = (agg.prepare_share(cfg, 0, 7, seeds, gen) for _ in range(2))
    assert a.step == b.step == 7 and a.rounding_words.shape == (cfg.padded_dim,)
    assert not np.shares_memory(a.rounding_words, b.rounding_words)
    assert not np.array_equal(a.rounding_words, b.rounding_words)
    assert not torch.equal(a.offset, b.offset)


def test_a_secure_aggregator_without_the_compiled_kernel_says_so(monkeypatch):
    import logging

    from dpray.stages.train_generator.noise import SecureAggregator

    # a handler on the module's logger itself: the CLI's logging setup (run by other tests in
    # the same session) stops dpray's records from reaching the root logger, where caplog listens
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("dpray.stages.train_generator.noise")
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "level", logging.WARNING)
    try:

        def build():
            return SecureAggregator(
                4096, noise_multiplier=1.0, clip_norm=1.0, max_units_per_worker=4
            )

        build()
        assert not records
        monkeypatch.setattr(kernels, "BACKEND", "numpy")
        build()
    finally:
        logger.removeHandler(handler)
    assert any("compiled PTRS kernel" in r.getMessage() for r in records)
