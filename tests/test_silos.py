"""Secure mode as cross-silo training (issue #14, defect 4): partitions written at ingest, each
user in exactly one; t = min_honest_workers defaults to W - 1; the secure-mode noise and
rounding come from a cryptographic generator; workers can be pinned to their silo's nodes.

The end-to-end check (each Ray Train worker received only its own partition, the driver's plan
holds no record) is in ``tests/test_train_partitions.py``.
"""

from __future__ import annotations

import json
import math
import pickle
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy import stats

from dpray.config import ConfigError, config_from_tree
from dpray.io import partitions as parts
from dpray.privacy.secure_agg import aggregator as agg
from dpray.privacy.secure_agg.csprng import SecureRandom
from dpray.privacy.secure_agg.quantize import stochastic_round
from dpray.privacy.secure_agg.skellam import MAX_LAMBDA, skellam_noise
from dpray.resources import WorkerShape
from dpray.rundir import RunDir
from dpray.stages import ingest
from tests.conftest import base_tree

# ----------------------------------------------------------------------- ingest partitions


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _partitions(run_dir: RunDir) -> tuple[dict, list[list[dict]]]:
    directory = run_dir.private("ingest") / parts.DIRNAME
    manifest = parts.read_manifest(directory)
    tables = [
        pq.read_table(parts.partition_path(directory, k)).to_pylist()
        for k in range(manifest["count"])
    ]
    return manifest, tables


def _user_rows(users: int, per_user: int, **extra):
    return [
        {"id": f"r{u}-{i}", "user": f"u{u}", "text": f"user {u} asks question {i}", **extra}
        for u in range(users)
        for i in range(per_user)
    ]


def _assert_each_user_in_one_partition(run_dir: RunDir, tables: list[list[dict]]) -> None:
    owner: dict[str, int] = {}
    for k, table in enumerate(tables):
        for row in table:
            assert owner.setdefault(row["user_id"], k) == k, "a user is in two partitions"
    union = sorted(r["id"] for t in tables for r in t)
    everything = pq.read_table(run_dir.private("ingest") / "instructions.parquet")
    assert union == sorted(everything.column("id").to_pylist())  # nothing lost, nothing twice


def test_hash_partitions_default_to_one_per_worker_each_user_in_one(tmp_path):
    data = _write(tmp_path / "d.jsonl", _user_rows(60, 3))
    tree = base_tree(tmp_path / "run", data, user_field="user")
    tree["privacy"].update({"unit": "user", "max_records_per_user": 3})
    tree["train"] = {"num_workers": 3}
    config = config_from_tree(tree)
    run_dir = RunDir(config.run_dir)
    result = ingest.run(config, run_dir)
    manifest, tables = _partitions(run_dir)
    assert manifest["by"] == "hash" and manifest["count"] == 3 == result.summary["partitions"]
    assert manifest["units"] == 60 and manifest["unit"] == "user"
    assert set(manifest) == {"by", "count", "files", "unit", "units"}  # no per-silo counts
    assert all(len(t) > 0 for t in tables)
    _assert_each_user_in_one_partition(run_dir, tables)
    # deterministic: a keyed hash of the user id alone
    key = parts.partition_key(config.seed)
    for k, table in enumerate(tables):
        assert {parts.hash_partition(r["user_id"], key, 3) for r in table} <= {k}
    # the partition files are private (under private/), the public report has no partition data
    assert run_dir.is_private(parts.partition_path(run_dir.private("ingest") / "partitions", 0))
    # and the resolved count is part of ingest's marker: more workers re-partition
    more = config.model_copy(update={"train": config.train.model_copy(update={"num_workers": 4})})
    sections = ingest.STAGE.sections
    assert config.section_hash(*sections) != more.section_hash(*sections)


def test_partition_field_is_honoured_and_conflicts_dropped(tmp_path):
    rows = [
        {"id": "a", "user": "u1", "site": "clinic-b", "text": "first of user one"},
        {"id": "b", "user": "u1", "site": "clinic-b", "text": "second of user one"},
        {"id": "c", "user": "u1", "site": "clinic-a", "text": "user one elsewhere"},  # conflict
        {"id": "d", "user": "u2", "site": "clinic-a", "text": "user two asks"},
        {"id": "e", "user": "u3", "text": "no silo named"},  # missing partition
        {"id": "f", "user": "u4", "site": "clinic-c", "text": "user four asks"},
        {"id": "g", "user": "u5", "site": "clinic-a", "text": "user five asks"},
    ]
    data = _write(tmp_path / "d.jsonl", rows)
    tree = base_tree(tmp_path / "run", data, user_field="user", partition_field="site")
    tree["privacy"].update({"unit": "user"})
    config = config_from_tree(tree)
    run_dir = RunDir(config.run_dir)
    result = ingest.run(config, run_dir)
    assert result.summary["dropped"] == {"missing_partition": 1, "partition_conflict": 1}
    manifest, tables = _partitions(run_dir)
    assert manifest["by"] == "field" and manifest["names"] == ["clinic-a", "clinic-b", "clinic-c"]
    assert [sorted(r["id"] for r in t) for t in tables] == [["d", "g"], ["a", "b"], ["f"]]
    _assert_each_user_in_one_partition(run_dir, tables)
    report = json.loads((run_dir.root / "ingest" / "report.json").read_text())
    assert "clinic" not in json.dumps(report)  # silo names stay private


def test_one_path_per_silo(tmp_path):
    silo_a = _write(tmp_path / "a.jsonl", _user_rows(4, 2))
    other = [{"user": f"v{i}", "text": f"a question from silo b, {i}"} for i in range(3)]
    silo_b = _write(tmp_path / "b.jsonl", other)
    tree = base_tree(tmp_path / "run", silo_a, id_field=None, user_field="user")
    tree["data"]["path"] = [str(silo_a), str(silo_b)]
    config = config_from_tree(tree)
    run_dir = RunDir(config.run_dir)
    ingest.run(config, run_dir)
    manifest, tables = _partitions(run_dir)
    assert manifest["by"] == "path" and manifest["count"] == 2
    assert {r["id"].split(":")[0] for r in tables[0]} == {"a.jsonl"}
    assert {r["id"].split(":")[0] for r in tables[1]} == {"b.jsonl"}
    assert [len(t) for t in tables] == [8, 3]
    _assert_each_user_in_one_partition(run_dir, tables)


def test_partitions_are_defined_one_way_only(tmp_path):
    tree = base_tree(tmp_path / "run", tmp_path / "x.jsonl", partition_field="site", partitions=3)
    with pytest.raises(ConfigError, match="one way only"):
        config_from_tree(tree)


# ----------------------------------------------------------------------- min_honest_workers


@pytest.mark.parametrize(("workers", "expected"), [(1, 1), (2, 1), (3, 2), (8, 7)])
def test_min_honest_workers_defaults_to_w_minus_1(workers, expected):
    cfg = agg.SecureAggConfig.create(
        dim=64, num_workers=workers, noise_multiplier=1.0, clip_norm=1.0, max_norm=4.0
    )
    assert cfg.min_honest_workers == expected
    # each share carries 1/t of the central variance: any t shares alone give (s·σ·C)^2
    assert 2 * expected * cfg.share_lambda == pytest.approx((cfg.scale * 1.0 * 1.0) ** 2)
    explicit = agg.SecureAggConfig.create(
        dim=64,
        num_workers=workers,
        noise_multiplier=1.0,
        clip_norm=1.0,
        max_norm=4.0,
        min_honest_workers=workers,
    )
    assert explicit.min_honest_workers == workers


def test_stage_records_w_minus_1_in_the_ledger_event():
    from dpray.stages.train_generator.stage import secure_fields_for

    plan = SimpleNamespace(
        noise="secure",
        num_workers=3,
        noise_multiplier=1.0,
        clip_norm=0.5,
        secure_bits=40,
        min_honest_workers=None,
    )
    assert secure_fields_for(plan, dim=1000, num_units=500)["min_honest_workers"] == 2


def test_min_honest_workers_above_w_is_a_config_error(tmp_path):
    tree = base_tree(tmp_path / "run", tmp_path / "x.jsonl")
    tree["train"] = {"num_workers": 2, "min_honest_workers": 3}
    with pytest.raises(ConfigError, match="min_honest_workers"):
        config_from_tree(tree)


# ----------------------------------------------------------------------- CSPRNG


def test_secure_noise_and_rounding_come_from_the_csprng():
    assert isinstance(agg.private_generator(), SecureRandom)
    from dpray.stages.train_generator.noise import SecureAggregator

    worker = SecureAggregator(
        dim=100, noise_multiplier=1.0, clip_norm=1.0, max_units_per_worker=4, session=b"x" * 16
    )
    assert isinstance(worker.generator, SecureRandom)
    assert isinstance(worker.offset_generator, SecureRandom)
    # a Mersenne Twister (torch.Generator) or the global RNG is refused
    for bad in (torch.Generator().manual_seed(0), None):
        with pytest.raises(TypeError):
            skellam_noise(8, 100.0, bad)
        with pytest.raises(TypeError):
            stochastic_round(torch.full((4,), 0.5, dtype=torch.float64), bad)
    with pytest.raises(TypeError):
        pickle.dumps(agg.private_generator())  # the key never leaves the worker


def test_two_workers_with_the_same_config_draw_different_noise():
    torch.manual_seed(0)
    first = skellam_noise(4096, 1e6, agg.private_generator())
    torch.manual_seed(0)  # the global torch seed plays no part
    second = skellam_noise(4096, 1e6, agg.private_generator())
    assert not torch.equal(first, second)
    cfg = agg.SecureAggConfig.create(
        dim=256, num_workers=2, noise_multiplier=1.0, clip_norm=1.0, max_norm=4.0
    )
    seeds = {1: bytes(32)}
    a = agg.data_independent_offset(cfg, 0, 3, seeds, agg.private_generator())
    b = agg.data_independent_offset(cfg, 0, 3, seeds, agg.private_generator())
    assert not torch.equal(a, b)  # same rank, step and pairwise seeds: still a fresh share


@pytest.mark.parametrize("lam", [0.7, 4.0, 10.0, 37.5, 1e4])
def test_csprng_poisson_matches_the_distribution(lam):
    draws = SecureRandom().poisson(400_000, lam).numpy()
    counts = np.bincount(draws)
    expected = stats.poisson.pmf(np.arange(len(counts)), lam) * draws.size
    keep = expected > 20
    obs, exp = counts[keep], expected[keep]
    assert stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-4


def test_csprng_skellam_variance_at_the_largest_share():
    z = SecureRandom().skellam(200_000, MAX_LAMBDA).double()
    assert z.var().item() == pytest.approx(2 * MAX_LAMBDA, rel=0.02)
    assert abs(z.mean().item()) < 5 * math.sqrt(2 * MAX_LAMBDA / z.numel())


def test_csprng_uniform_is_open_and_uniform():
    u = SecureRandom().uniform(200_000).numpy()
    assert u.min() > 0.0 and u.max() < 1.0
    assert stats.kstest(u, "uniform").pvalue > 1e-4
    keyed = SecureRandom.from_key(bytes(range(32)))
    assert torch.equal(keyed.uniform(5), SecureRandom.from_key(bytes(range(32))).uniform(5))


# ----------------------------------------------------------------------- node pinning


def test_partition_for_labels_needs_exactly_one_match():
    selectors = [{"dpray-silo": "a"}, {"dpray-silo": "b"}]
    assert parts.partition_for_labels({"dpray-silo": "b", "zone": "x"}, selectors) == 1
    with pytest.raises(ValueError, match="match 0"):
        parts.partition_for_labels({"zone": "x"}, selectors)
    with pytest.raises(ValueError, match="match 2"):
        parts.partition_for_labels({"dpray-silo": "a"}, [{"dpray-silo": "a"}, {}])
    assert parts.assigned_partitions(1, 2, 5) == [1, 3]


def test_pinned_worker_reads_the_partition_its_node_is_labelled_with(monkeypatch):
    import ray

    from dpray.stages.train_generator.worker import my_partitions

    class Context:
        def get_node_labels(self):
            return {"dpray-silo": "b"}

    monkeypatch.setattr(ray, "get_runtime_context", lambda: Context())
    labels = ({"dpray-silo": "a"}, {"dpray-silo": "b"})
    plan = SimpleNamespace(partition_count=2, partition_labels=labels)
    assert my_partitions(plan, rank=0, world=1) == [1]  # by its node, not by its rank
    unpinned = SimpleNamespace(partition_count=2, partition_labels=None)
    assert my_partitions(unpinned, rank=0, world=1) == [0, 1]


def test_partition_labels_become_ray_train_label_selectors(tmp_path, monkeypatch):
    import ray.train.torch

    from dpray.stages.train_generator import stage

    seen = {}

    class FakeTrainer:
        def __init__(self, loop, train_loop_config, scaling_config, **kwargs):
            seen["plan"], seen["scaling"] = train_loop_config, scaling_config

        def fit(self):
            raise RuntimeError("not training in this test")

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", FakeTrainer)
    tree = base_tree(tmp_path / "run", tmp_path / "x.jsonl")
    labels = [{"dpray-silo": "a"}, {"dpray-silo": "b"}]
    tree["train"] = {"num_workers": 2, "partition_labels": labels}
    config = config_from_tree(tree)
    plan = SimpleNamespace(run_id="r", partitions_dir="/p", partition_count=2, private_dir="/x")
    with pytest.raises(RuntimeError, match="not training"):
        stage._launch(plan, config.train, WorkerShape(2, 1))
    assert seen["scaling"].label_selector == labels
    assert seen["plan"] == {"plan": plan}  # the typed plan only: no data reference
    with pytest.raises(ConfigError, match="one partition per worker"):
        bad = dict(tree, train={"num_workers": 3, "partition_labels": labels})
        config_from_tree(bad)
