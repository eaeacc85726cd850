"""The out-of-core filter: rows read from disk in chunks give what the whole arrays gave.

Small arrays only (no model, no Ray cluster): the two-node Ray check is
``test_filter_multinode.py``; the memory bound at 1M-10M candidates is ``benchmarks.filter
--scale``'s business, not a test's.
"""

from __future__ import annotations

import pickle
import sys
import types

import faiss
import numpy as np
import pytest

from dpray.config import FilterConfig, config_from_tree
from dpray.stages.filter import assign, core
from dpray.stages.filter.cluster import fit_clusters, fit_pca, kmeans_sample
from dpray.stages.filter.rows import NpyRows, chunk_ranges
from dpray.stages.filter.stage import run as run_filter
from tests.test_filter import REAL_WEIGHTS, SYNTH_WEIGHTS, K, _stage_run_dir, mixture

PRIVACY = {"epsilon": 4.0, "delta": 1e-5}


@pytest.fixture()
def on_disk(tmp_path):
    synthetic, _ = mixture(3000, SYNTH_WEIGHTS, seed=21)
    real, _ = mixture(700, REAL_WEIGHTS, seed=22)
    np.save(tmp_path / "synthetic.npy", synthetic)
    np.save(tmp_path / "real.npy", real)
    return synthetic, real, NpyRows(tmp_path / "synthetic.npy"), NpyRows(tmp_path / "real.npy")


def test_npy_rows_read_and_take_match_the_array(tmp_path):
    x = np.random.default_rng(0).normal(size=(101, 7))  # float64 on disk: read as float32
    np.save(tmp_path / "x.npy", x)
    rows = NpyRows(tmp_path / "x.npy")
    assert len(rows) == 101 and rows.dim == 7
    assert np.array_equal(rows.read(10, 55), x[10:55].astype(np.float32))
    assert rows.read(100, 200).shape == (1, 7) and rows.read(5, 5).shape == (0, 7)
    picked = np.array([0, 1, 2, 40, 41, 99, 100])
    assert np.array_equal(rows.take(picked), x[picked].astype(np.float32))
    with pytest.raises(ValueError, match="sorted"):
        rows.take(np.array([3, 2]))
    again = pickle.loads(pickle.dumps(rows))  # a task reopens it
    assert np.array_equal(again.read(0, 3), rows.read(0, 3))
    np.save(tmp_path / "bad.npy", np.zeros(5))
    with pytest.raises(ValueError, match="2-D"):
        NpyRows(tmp_path / "bad.npy")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_npy_rows_take_gathers_across_map_windows(tmp_path, monkeypatch, dtype):
    """Windows smaller than the file (and not aligned to pages or rows' runs): the gather maps
    each window at its page-aligned offset and still returns exactly the rows asked for."""
    from dpray.stages.filter import rows as rows_module

    x = np.random.default_rng(1).normal(size=(5000, 13)).astype(dtype)
    np.save(tmp_path / "x.npy", x)
    rows = NpyRows(tmp_path / "x.npy")
    monkeypatch.setattr(rows_module, "TAKE_WINDOW_BYTES", 7_777)  # ~75 or ~150 rows a window
    rng = np.random.default_rng(2)
    for picked in (
        np.sort(rng.choice(5000, size=900, replace=False)),
        np.arange(4990, 5000),
        np.array([0]),
        np.array([4999]),
        np.array([0, 4999]),
    ):
        assert np.array_equal(rows.take(picked), x[picked].astype(np.float32))


def test_chunk_ranges_cover_every_row_once():
    assert chunk_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_ranges(0, 4) == []


def test_kmeans_sample_is_the_subsample_faiss_draws_itself():
    """Training on our gathered sample == training faiss on the whole projected array."""
    x = np.random.default_rng(1).normal(size=(3000, 8)).astype(np.float32)
    k = 4  # 4 x 256 = 1024 < 3000: faiss subsamples
    whole = faiss.Kmeans(8, k, niter=5, seed=5, verbose=False)
    whole.train(x)
    sample = kmeans_sample(len(x), k, 5)
    assert len(sample) == k * 256 and len(np.unique(sample)) == len(sample)
    ours = faiss.Kmeans(8, k, niter=5, seed=5, verbose=False)
    ours.train(x[sample])
    assert np.array_equal(whole.centroids, ours.centroids)
    assert kmeans_sample(1000, k, 5) is None  # small sets train on every row


@pytest.mark.parametrize("chunk", [97, 1000])
def test_chunked_fit_and_assignment_equal_the_whole_array(on_disk, chunk):
    synthetic, real, syn_rows, real_rows = on_disk
    whole = fit_clusters(synthetic, K, 0.9, seed=3, chunk_size=10**6)
    chunked = fit_clusters(syn_rows, K, 0.9, seed=3, chunk_size=chunk)
    assert np.array_equal(whole.synthetic_labels, chunked.synthetic_labels)
    assert np.allclose(whole.centroids, chunked.centroids, atol=1e-6)
    assert np.array_equal(whole.assign(real), chunked.assign(real_rows, chunk))
    assert chunked.assignment == {"mode": "local", "chunks": -(-3000 // chunk)}
    pca_a = fit_pca(synthetic, 0.9, np.random.default_rng(0))
    pca_b = fit_pca(syn_rows, 0.9, np.random.default_rng(0))
    assert np.array_equal(pca_a.components, pca_b.components)


def test_cluster_filter_from_disk_in_chunks_selects_the_same_set(on_disk):
    synthetic, real, syn_rows, real_rows = on_disk
    units = np.arange(len(real))

    def run(s, r, chunk):
        fc = FilterConfig(num_clusters=K, target_size=400, sigma=3.0, chunk_size=chunk)
        return core.cluster_filter(s, r, units, fc, 3.0, np.random.default_rng(7))

    whole, chunked = run(synthetic, real, 10**6), run(syn_rows, real_rows, 128)
    assert np.array_equal(whole.selected, chunked.selected)
    assert np.array_equal(whole.exact, chunked.exact)
    assert np.array_equal(whole.noisy, chunked.noisy)


def test_distributed_setting_resolves_without_starting_ray(monkeypatch):
    fake = types.SimpleNamespace(is_initialized=lambda: False)
    monkeypatch.setitem(sys.modules, "ray", fake)
    assert assign.use_ray(False, 10**7, 100) is False
    assert assign.use_ray("auto", 10**7, 100) is False  # not connected: the chunk loop
    with pytest.raises(RuntimeError, match="connected Ray"):
        assign.use_ray(True, 10, 100)
    fake.is_initialized = lambda: True
    assert assign.use_ray(True, 10, 100) is True  # asked for: even one chunk, one node
    monkeypatch.setattr(assign, "cluster_nodes_with_cpus", lambda: 1)
    assert assign.use_ray("auto", 10**7, 100) is False  # one node: no gain
    monkeypatch.setattr(assign, "cluster_nodes_with_cpus", lambda: 2)
    assert assign.use_ray("auto", 10**7, 100) is True
    assert assign.use_ray("auto", 100, 100) is False  # one chunk: nothing to spread


def test_filter_config_distributed_and_chunk_size():
    def cfg(**kw):
        return config_from_tree(
            {"data": {"path": "demo://"}, "privacy": PRIVACY, "filter": kw}
        ).filter

    assert cfg().distributed == "auto" and cfg().chunk_size == 65536
    assert cfg(distributed=True).distributed is True
    assert cfg(distributed=False, chunk_size=10).distributed is False
    with pytest.raises(Exception, match="distributed"):
        cfg(distributed="sometimes")
    with pytest.raises(Exception, match="chunk_size"):
        cfg(chunk_size=0)


def test_stage_reads_from_disk_and_reports_the_assignment(tmp_path):
    config, run_dir = _stage_run_dir(tmp_path, sigma=5.0, metrics=False, chunk_size=700)
    result = run_filter(config, run_dir)
    assert result.summary["assignment"] == {"mode": "local", "chunks": 5}
    assert result.summary["selection"]["selected"] == 500
