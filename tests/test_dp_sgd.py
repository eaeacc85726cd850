"""DP-SGD step: oracle against a one-example-at-a-time loop, equivalence with a plain step and
across workers, sampling and packing."""

from __future__ import annotations

import copy
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dpray.stages.train_generator.data import (
    PoissonSampler,
    collate,
    pack_micro_batches,
    poisson_sample,
    shard_units,
)
from dpray.stages.train_generator.dp_sgd import (
    apply_update,
    clipped_sum,
    per_example_loss,
    plain_step,
    trainable_parameters,
    wrap_for_per_sample_grads,
)
from dpray.stages.train_generator.noise import CentralAggregator, SecureAggregator
from tests.train_helpers import batch_of, random_units, tiny_lora_model


def naive_clipped_sum(model, units, unit_ids, clip):
    """One unit at a time, one example at a time: plain autograd, sum the unit, clip, add."""
    params = trainable_parameters(model)
    total = torch.zeros(sum(p.numel() for p in params))
    for u in unit_ids:
        unit_grad = torch.zeros_like(total)
        for seq in units[u]:
            batch = collate([seq], [u], 1, 0)
            model.zero_grad(set_to_none=True)
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            per_example_loss(out.logits, batch.labels).sum().backward()
            unit_grad += torch.cat([p.grad.flatten() for p in params])
        norm = unit_grad.norm()
        total += unit_grad * min(1.0, clip / (float(norm) + 1e-6))
    model.zero_grad(set_to_none=True)
    return total


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
@pytest.mark.parametrize("per_unit, clip", [(1, 0.05), (3, 0.05), (1, 1e6)])
def test_clipped_sum_matches_naive_loop(mode, per_unit, clip):
    model = tiny_lora_model()
    units = random_units(6, per_unit=per_unit)
    expected = naive_clipped_sum(model, units, list(range(6)), clip)
    gsm = wrap_for_per_sample_grads(model, mode)
    params = trainable_parameters(model)
    batches = [batch_of(units, [0, 1, 2]), batch_of(units, [3, 4, 5])]
    local = clipped_sum(gsm, params, batches, clip)
    assert torch.allclose(local.vector, expected, atol=1e-6, rtol=1e-4)
    assert local.units == 6 and local.examples == 6 * per_unit
    if clip < 1:
        assert local.clipped_units == 6  # tiny C clips everything: the test exercises clipping


def test_dp_step_without_noise_equals_plain_step():
    units = random_units(8)
    batches = [batch_of(units, [0, 1, 2, 3]), batch_of(units, [4, 5, 6, 7])]
    expected_batch = 10.0  # q·n, deliberately not the realised 8

    plain = tiny_lora_model()
    plain_opt = torch.optim.AdamW(trainable_parameters(plain), lr=1e-2)
    plain_step(plain, plain_opt, batches, expected_batch)

    private = tiny_lora_model()
    params = trainable_parameters(private)
    opt = torch.optim.AdamW(params, lr=1e-2)
    gsm = wrap_for_per_sample_grads(private)
    local = clipped_sum(gsm, params, batches, clip_norm=1e9)
    noisy = CentralAggregator(noise_multiplier=0.0, clip_norm=1e9)(local.vector, step=0)
    apply_update(opt, params, noisy, expected_batch)
    for a, b in zip(trainable_parameters(plain), params, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_central_noise_std_is_sigma_c():
    agg = CentralAggregator(noise_multiplier=1.5, clip_norm=0.4)
    zero = torch.zeros(200_000)
    assert float(agg(zero, 0).std()) == pytest.approx(0.6, rel=0.02)


# ------------------------------------------------------------------ multi-worker equivalence
def _worker(rank, world, store, scheme, units, result_path):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = tiny_lora_model()
    params = trainable_parameters(model)
    gsm = wrap_for_per_sample_grads(model)
    mine = shard_units(len(units), rank, world).tolist()
    local = clipped_sum(gsm, params, [batch_of(units, mine)], clip_norm=0.05)
    dim = local.vector.numel()
    if scheme == "central":
        agg = CentralAggregator(noise_multiplier=0.0, clip_norm=0.05)
    else:
        agg = SecureAggregator(
            dim, noise_multiplier=0.0, clip_norm=0.05, max_units_per_worker=8, session=b"t" * 16
        )
    total = agg(local.vector, step=0)
    if rank == 0:
        torch.save(total, result_path)
    dist.destroy_process_group()


def _run_workers(world, scheme, units):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "total.pt")
        mp.spawn(
            _worker,
            args=(world, os.path.join(tmp, "store"), scheme, units, out),
            nprocs=world,
            join=True,
        )
        return torch.load(out)


@pytest.mark.parametrize("scheme", ["central", "secure"])
def test_two_workers_equal_one_worker_on_same_batch(scheme):
    units = random_units(8, seed=3)
    model = tiny_lora_model()
    single = clipped_sum(
        wrap_for_per_sample_grads(model),
        trainable_parameters(model),
        [batch_of(units, list(range(8)))],
        clip_norm=0.05,
    ).vector
    total = _run_workers(2, scheme, units)
    if scheme == "central":
        assert torch.allclose(total, single, atol=1e-6)
    else:
        # rounding only: each of 2 workers' coordinates is off by < 1/scale
        assert float((total - single).abs().max()) < 1e-6


# ------------------------------------------------------------------ sampling and packing
def test_poisson_sampling_rate_and_independence():
    n, q = 20_000, 0.03
    counts = [len(poisson_sample(n, q, seed=7, step=s, rank=0)) for s in range(50)]
    assert np.mean(counts) == pytest.approx(n * q, rel=0.03)
    assert np.std(counts) > 0  # the realised batch size varies (Poisson, not fixed batches)
    a = poisson_sample(n, q, seed=7, step=0, rank=0)
    assert not np.array_equal(a, poisson_sample(n, q, seed=7, step=1, rank=0))
    assert np.array_equal(a, poisson_sample(n, q, seed=7, step=0, rank=0))


def test_each_attempt_samples_its_steps_from_fresh_secret_randomness():
    # issue #14, defect 1: a step redone after a restart must not reuse the lost attempt's
    # batch (the ledger counts it as a fresh subsampled step)
    shard, q = shard_units(40_000, 1, 2), 0.03
    lost, restarted = PoissonSampler(shard, q, rank=1), PoissonSampler(shard, q, rank=1)
    for step in range(3):
        a, b = lost(step), restarted(step)
        assert not np.array_equal(a, b)
        assert set(a.tolist()) <= set(shard.tolist()) and set(b.tolist()) <= set(shard.tolist())
    # still Poisson sampling: each unit joins independently with rate q
    counts = [len(lost(s)) for s in range(40)]
    assert np.mean(counts) == pytest.approx(len(shard) * q, rel=0.03)
    overlap = len(np.intersect1d(lost(7), restarted(7)))
    assert overlap == pytest.approx(len(shard) * q * q, abs=6 * np.sqrt(len(shard) * q * q))
    assert "seed" not in repr(lost)


def test_shards_partition_units():
    shards = [shard_units(11, r, 3) for r in range(3)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(11))


def test_pack_never_splits_a_unit():
    sizes = [3, 3, 2, 4, 1, 4, 4]
    groups = pack_micro_batches(sizes, max_rows=6)
    assert sorted(u for g in groups for u in g) == list(range(len(sizes)))
    assert all(sum(sizes[u] for u in g) <= 6 for g in groups)
    with pytest.raises(ValueError, match="micro_batch_size"):
        pack_micro_batches([7], max_rows=6)


def test_collate_masks_prompt_and_padding():
    batch = collate([np.array([1, 5, 6, 2]), np.array([1, 7, 2])], [0, 1], prompt_len=1, pad_id=0)
    assert batch.labels.tolist() == [[-100, 5, 6, 2], [-100, 7, 2, -100]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch.num_units == 2 and batch.num_tokens == 5


def test_deepcopy_of_model_is_independent():
    model = tiny_lora_model()
    clone = copy.deepcopy(model)
    assert all(
        torch.equal(a, b)
        for a, b in zip(trainable_parameters(model), trainable_parameters(clone), strict=True)
    )
