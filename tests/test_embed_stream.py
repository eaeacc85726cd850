"""The out-of-core embed stage (``stage.embed_sets`` + ``stream``) without Ray: a counting fake
encoder stands in for the actor pool, so these run in seconds.

* the streamed outputs equal what the in-memory stage wrote (one ``np.save`` of every vector in
  row order, one ids table): ``synthetic.npy`` byte for byte, the ids table row for row;
* a rerun embeds only new texts, and duplicates are embedded once;
* the driver's memory does not grow with the number of candidates (tracemalloc peak at 4x the
  candidates), and no window sent to the encoder is larger than a chunk.

The real encoder on Ray runs in ``test_embed_stream_ray`` (one node) and
``test_embed_multinode`` (two nodes)."""

from __future__ import annotations

import hashlib
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpray.config import config_from_tree
from dpray.rundir import RunDir, read_json
from dpray.stages.embed import digests, stage, stream
from dpray.stages.embed.digests import DigestIndex, first_unique, pack
from dpray.stages.embed.encode import PoolSettings
from dpray.stages.embed.store import EmbeddingCache, read_set, text_hash

DIM = 8


def fake_vector(text: str) -> np.ndarray:
    """A deterministic unit vector per text (what a real encoder would be, without the model)."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


class FakePool:
    """Replaces ``encode_queues``: reads the queue files row group by row group, as actors do."""

    def __init__(self) -> None:
        self.calls = 0
        self.texts = 0
        self.largest_group = 0

    def __call__(self, queues, model_path, batch_size, pool=None, nodes=None):
        for q, (path, groups) in enumerate(queues):
            if not groups:
                continue
            handle = pq.ParquetFile(path)
            assert handle.metadata.num_row_groups == groups
            for g in range(groups):
                table = handle.read_row_group(g)
                texts = table.column("text").to_pylist()
                self.calls += 1
                self.texts += len(texts)
                self.largest_group = max(self.largest_group, len(texts))
                if nodes is not None:
                    nodes.update(["fake-node"] * len(texts))
                vectors = np.stack([fake_vector(t) for t in texts])
                yield q, table.column("hash").to_pylist(), vectors


@pytest.fixture
def fake_encoder(monkeypatch, tmp_path):
    """A model directory that resolves, the sentence-transformers backend, character lengths,
    and :class:`FakePool` in place of Ray."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    pool = FakePool()
    monkeypatch.setattr(stage, "resolve_backend", lambda *a, **k: "sentence-transformers")
    monkeypatch.setattr(
        stage, "length_function", lambda *a: lambda texts: np.array([len(t) for t in texts])
    )
    settings = PoolSettings(1, None, 1, "sentence-transformers", None)
    monkeypatch.setattr(stage, "pool_settings", lambda *a, **k: settings)
    monkeypatch.setattr(stage, "encode_queues", pool)
    return model, pool


def _config(tmp_path: Path, model: Path, batch_size: int = 16):
    return config_from_tree(
        {
            "run_dir": str(tmp_path / "run"),
            "data": {"path": str(tmp_path / "unused.jsonl")},
            "privacy": {"epsilon": 4.0, "delta": 1e-5},
            "embed": {"model": str(model), "batch_size": batch_size},
        }
    )


def _texts(n: int, offset: int = 0) -> list[str]:
    """Distinct texts of varied length, with every 7th a repeat of an earlier one."""
    out = []
    for i in range(offset, offset + n):
        out.append(out[-5] if i % 7 == 6 and len(out) > 5 else f"task {i} " + "word " * (i % 23))
    return out


def _write_inputs(run_dir: RunDir, shards: list[list[str]], real: int = 40) -> None:
    folder = run_dir.public("sample")
    start = 0
    for number, texts in enumerate(shards):
        ids = [f"s{start + i}" for i in range(len(texts))]
        pq.write_table(
            pa.table({"text": texts, "sample_id": ids}), folder / f"shard-{number:05d}.parquet"
        )
        start += len(texts)
    for name, count in (("instructions", real), ("heldout", real // 4)):
        texts = [f"real {name} {i} " + "x " * (i % 5) for i in range(count)]
        table = pa.table(
            {"id": [f"r{i}" for i in range(count)], "text": texts, "user_id": ["u"] * count}
        )
        pq.write_table(table, run_dir.private("ingest") / f"{name}.parquet")


def test_digest_index_first_value_wins_across_segments_and_merges():
    hashes = [text_hash(str(i)) for i in range(50)]
    keys = pack(hashes)
    index = DigestIndex()
    for start in range(0, 50, 5):  # ten segments of five: merged as they come
        index.add(keys[start : start + 5], np.arange(start, start + 5))
    index.add(keys[:10], np.full(10, 999))  # later values of the same digests lose
    assert index.lookup(keys).tolist() == list(range(50))
    assert len(index._segments) < 5 and len(index) == 50  # merged: repeats stored once
    assert index.lookup(pack([text_hash("absent")])).tolist() == [-1]
    assert first_unique(pack([hashes[3], hashes[1], hashes[3]])).tolist() == [0, 1]
    with pytest.raises(ValueError):
        pack(["abc"])


def test_blocks_hold_several_batches_only_where_every_actor_keeps_dozens():
    assert stream.groups_per_block(10, 2) == 1  # small runs: one batch a block
    assert stream.groups_per_block(1563, 2) == 8  # 100k texts at batch 64: 196 blocks
    assert stream.groups_per_block(200, 2) == 3
    assert stream.groups_per_block(10**6, 64) == stream.MAX_GROUPS_PER_BLOCK
    assert stream.groups_per_block(5, 0) == 1


def test_work_goes_heaviest_first_across_windows(tmp_path):
    """Each window's queue starts with its longest texts; the actors get the groups with the
    most text bytes first whatever window they came from, every group exactly once."""
    lengths = lambda texts: np.array([len(t) for t in texts])  # noqa: E731
    queues = []
    for q, sizes in enumerate(([5, 300, 40, 7, 90], [1000, 2, 60], [])):
        queue = stream.TextQueue(tmp_path / f"q{q}.parquet", 2, lengths)
        texts = ["x" * n for n in sizes]
        queue.put([f"{q}-{i}" for i in range(len(texts))], texts)
        queues.append((queue.path, queue.close()))
    work = stream.heaviest_first(queues)
    assert sorted(work) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    bytes_of = {
        (q, g): pq.ParquetFile(path).metadata.row_group(g).total_byte_size
        for q, (path, groups) in enumerate(queues)
        for g in range(groups)
    }
    assert work[0] == (1, 0)  # the 1000-character text's batch, from the second window
    assert [bytes_of[w] for w in work] == sorted(bytes_of.values(), reverse=True)
    assert stream.heaviest_first([]) == []


def test_streamed_stage_writes_what_the_in_memory_stage_wrote(fake_encoder, tmp_path):
    model, pool = fake_encoder
    config = _config(tmp_path, model)
    run_dir = RunDir(config.run_dir)
    synthetic = _texts(700)
    _write_inputs(run_dir, [synthetic[:300], synthetic[300:]])

    result = stage.embed_sets(config, run_dir, chunk_rows=128)
    distinct = len(set(synthetic))
    assert result.summary["synthetic_rows"] == 700
    assert result.summary["synthetic_embedded_now"] == distinct < 700  # repeats embedded once
    assert pool.largest_group <= 16

    # What the in-memory stage wrote: np.save of the rows' vectors, one ids table.
    expected = np.stack([fake_vector(t) for t in synthetic])
    reference = tmp_path / "reference.npy"
    np.save(reference, expected)
    out = run_dir.root / "embed" / "synthetic"
    assert out.with_suffix(".npy").read_bytes() == reference.read_bytes()
    ids = pq.read_table(out.with_suffix(".parquet"))
    assert ids.column_names == ["sample_id", "text_hash"]
    assert ids.column("sample_id").to_pylist() == [f"s{i}" for i in range(700)]
    assert ids.column("text_hash").to_pylist() == [text_hash(t) for t in synthetic]
    real_ids, real_vectors = read_set(run_dir.private("embed") / "real")
    real_texts = pq.read_table(run_dir.private("ingest") / "instructions.parquet")["text"]
    assert real_ids.column_names == ["id", "user_id", "text_hash"]
    assert np.array_equal(real_vectors, np.stack([fake_vector(t) for t in real_texts.to_pylist()]))
    # The queues are gone; the synthetic cache holds each distinct text once.
    key = result.summary["model_key"]
    assert not list((run_dir.root / "embed_cache" / key).glob("*queue*"))
    assert not list((run_dir.private_root / "embed_cache" / key).glob("*queue*"))
    cache = EmbeddingCache(run_dir.root / "embed_cache" / key)
    assert len(cache.missing([text_hash(t) for t in synthetic])) == 0

    # A rerun with one more shard embeds only that shard's new texts.
    more = _texts(200, offset=700)
    _write_inputs(run_dir, [synthetic[:300], synthetic[300:], more])
    before = pool.texts
    again = stage.embed_sets(config, run_dir, chunk_rows=128)
    assert again.summary["synthetic_rows"] == 900
    assert again.summary["synthetic_embedded_now"] == pool.texts - before
    assert pool.texts - before == len(set(more) - set(synthetic))
    assert read_json(run_dir.private("embed") / "report.json")["embedded_now"]["real"] == 0
    _, vectors = read_set(out)
    assert np.array_equal(vectors, np.stack([fake_vector(t) for t in synthetic + more]))


def _peak_bytes(tmp_path: Path, model: Path, n: int, chunk: int) -> int:
    """Peak traced bytes of one stage run over ``n`` candidates of ~300 characters each."""
    config = _config(tmp_path / str(n), model, batch_size=32)
    run_dir = RunDir(config.run_dir)
    texts = [t + " padding" * 36 for t in _texts(n)]
    _write_inputs(run_dir, [texts[i : i + 2000] for i in range(0, n, 2000)], real=8)
    tracemalloc.start()
    try:
        stage.embed_sets(config, run_dir, chunk_rows=chunk)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_driver_memory_does_not_grow_with_the_candidates(fake_encoder, tmp_path, monkeypatch):
    """Holding the candidates' texts would cost > 300 bytes each (and their vectors 1.5 kB at
    384 dimensions); the streamed stage grows by the digest index's 40 bytes a distinct text,
    with merges bounded by the segment size (small here, so the test sees the bound)."""
    model, _ = fake_encoder
    windows: list[int] = []
    put = stream.TextQueue.put

    def counting_put(self, hashes, texts):
        windows.append(len(texts))
        put(self, hashes, texts)

    monkeypatch.setattr(stream.TextQueue, "put", counting_put)
    monkeypatch.setattr(digests, "SEGMENT_ROWS", 2048)
    _peak_bytes(tmp_path, model, 300, chunk=256)  # first-call imports and caches
    small = _peak_bytes(tmp_path, model, 4000, chunk=256)
    large = _peak_bytes(tmp_path, model, 16000, chunk=256)
    assert max(windows) <= 256
    per_candidate = (large - small) / 12000
    assert per_candidate < 64, (small, large)
