"""The embed stage on Ray Data (tiny encoder, 2 CPUs), its cache, and embed -> filter end to end
with canaries planted in the real texts: none may reach a file outside ``private/``.

One Ray test on purpose: each Ray Data run starts a fresh actor pool (torch import per actor),
which dominates the time of a small run."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpray.config import config_from_tree
from dpray.models import make_tiny_sentence_encoder
from dpray.pipeline import run_stage
from dpray.rundir import RunDir, read_json
from dpray.stages import STAGES
from dpray.stages.embed.store import EmbeddingCache, read_set, text_hash, write_set
from tests.conftest import SHARED_DATA, make_canary


@pytest.fixture(scope="module")
def ray_local():
    import ray

    root = Path(os.path.expanduser("~/.cache/dpray"))
    root.mkdir(parents=True, exist_ok=True)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=tempfile.mkdtemp(prefix="r", dir=root),
        logging_level="WARNING",
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    return make_tiny_sentence_encoder(tmp_path_factory.mktemp("enc") / "tiny", hidden_size=32)


def _texts(name: str, start: int, count: int) -> list[str]:
    """Real human-written instructions from ../shared/data, or made-up ones without it."""
    path = SHARED_DATA / name
    if not path.exists():  # made-up texts, distinct per file (real and synthetic must differ)
        return [
            f"{name} instruction {i} " + "word " * (i % 17) for i in range(start, start + count)
        ]
    out = []
    with path.open() as handle:
        for index, line in enumerate(handle):
            if index >= start:
                out.append(json.loads(line)["instruction"])
            if len(out) == count:
                break
    return out


# ------------------------------------------------------------------------------ storage


def test_cache_embeds_only_new_hashes(tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    assert cache.dim() is None
    hashes = [text_hash(t) for t in ["a", "b", "a"]]
    assert cache.missing(hashes) == hashes[:2]
    cache.add(hashes[:2], np.eye(2, 3, dtype=np.float32))
    assert cache.missing(hashes + [text_hash("c")]) == [text_hash("c")]
    again = EmbeddingCache(tmp_path / "cache")  # a rerun reads the shards back
    assert again.dim() == 3
    assert again.gather(hashes, 3).tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 0]]


def test_sets_are_written_aligned_and_read_memory_mapped(tmp_path):
    ids = pa.table({"sample_id": ["x", "y"]})
    write_set(tmp_path / "s", ids, np.ones((2, 4), dtype=np.float32))
    table, vectors = read_set(tmp_path / "s")
    assert table.column("sample_id").to_pylist() == ["x", "y"]
    assert isinstance(vectors, np.memmap) and vectors.dtype == np.float32
    with pytest.raises(ValueError):
        write_set(tmp_path / "t", ids, np.ones((3, 4), dtype=np.float32))


# ------------------------------------------------------------------------------ stage


def _write_shard(run_dir: RunDir, name: str, texts: list[str], offset: int) -> None:
    folder = run_dir.public("sample")
    ids = [f"s{offset + i}" for i in range(len(texts))]
    pq.write_table(pa.table({"text": texts, "sample_id": ids}), folder / name)


def _public_content(path: Path) -> bytes:
    """A public file as searchable bytes: Parquet pages are compressed, so decode them first."""
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        return "\n".join(str(v) for col in table.columns for v in col.to_pylist()).encode()
    return path.read_bytes()


def _canary_scan(run_dir: RunDir, needles: list[str]) -> list[str]:
    """Public files containing any needle (raw bytes, Parquet decoded)."""
    hits = []
    for path in run_dir.public_files():
        blob = _public_content(path)
        if any(n.encode() in blob for n in needles):
            hits.append(str(path.relative_to(run_dir.root)))
    return hits


@pytest.mark.slow  # two Ray Data actor-pool starts: ~25 s idle, a minute on a busy 2-core box
def test_embed_then_filter_end_to_end_leaks_no_real_text(ray_local, tiny_encoder, tmp_path):
    from dpray.models import load_sentence_encoder

    canaries = [make_canary() for _ in range(8)]
    real = _texts("dolly15k_rows0-6399.jsonl", 100, 160)
    for i, canary in enumerate(canaries):
        real[i * 20] = f"{real[i * 20]} My account password is {canary}."
    data = tmp_path / "real.jsonl"
    with data.open("w") as handle:
        for i, text in enumerate(real):
            handle.write(json.dumps({"id": f"r{i}", "instruction": text}) + "\n")
    tree = {
        "run_dir": str(tmp_path / "run"),
        "data": {
            "path": str(data),
            "text_field": "instruction",
            "id_field": "id",
            "heldout_fraction": 0.3,
        },
        "privacy": {"epsilon": 4.0, "delta": 1e-5},
        "embed": {"model": str(tiny_encoder), "batch_size": 16, "num_actors": 2},
        "filter": {"sigma": 3.0, "target_size": 100, "mauve": False, "metrics_subsamples": 2},
    }
    config = config_from_tree(tree)
    run_dir = RunDir(config.run_dir)
    run_stage(STAGES["ingest"], config, run_dir)
    synthetic = _texts("lima_1k.jsonl", 0, 300)
    _write_shard(run_dir, "shard-00000.parquet", synthetic[:200], 0)

    first = run_stage(STAGES["embed"], config, run_dir)
    assert first.summary["synthetic_rows"] == 200
    assert first.summary["synthetic_embedded_now"] == 200
    ids, vectors = read_set(run_dir.root / "embed" / "synthetic")
    assert vectors.shape == (200, 32) and ids.column("sample_id").to_pylist()[0] == "s0"
    # Length-sorted Ray batches come back in input order and equal a bare encode.
    bare = load_sentence_encoder(str(tiny_encoder)).encode(
        synthetic[:200], normalize_embeddings=True
    )
    assert np.allclose(vectors, bare, atol=1e-4)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    real_ids, real_vectors = read_set(run_dir.private("embed") / "real")
    heldout_ids, _ = read_set(run_dir.private("embed") / "heldout")
    assert len(real_ids) + len(heldout_ids) == 160 and len(heldout_ids) > 20
    assert "text" not in real_ids.column_names
    assert np.allclose(np.linalg.norm(real_vectors, axis=1), 1.0, atol=1e-5)

    # A new shard: the rerun embeds only its 100 texts; nothing real is embedded again.
    _write_shard(run_dir, "shard-00001.parquet", synthetic[200:], 200)
    second = run_stage(STAGES["embed"], config, run_dir)
    assert second.summary["synthetic_rows"] == 300
    assert second.summary["synthetic_embedded_now"] == 100
    assert read_json(run_dir.private("embed") / "report.json")["embedded_now"]["real"] == 0
    ids2, vectors2 = read_set(run_dir.root / "embed" / "synthetic")
    assert np.array_equal(vectors2[:200], vectors)
    assert run_stage(STAGES["embed"], config, run_dir) is None  # unchanged inputs: skipped

    result = run_stage(STAGES["filter"], config, run_dir)
    assert result.summary["selection"]["selected"] == 100
    filtered = pq.read_table(run_dir.root / "filter" / "filtered.parquet")
    assert set(filtered.column("text").to_pylist()) <= set(synthetic)
    metrics = read_json(run_dir.private("filter") / "metrics.json")
    assert metrics["evaluation"] == "non-private, held-out real split"

    # Neither a real text (canaries) nor a real text's hash appears outside private/.
    real_hashes = [text_hash(t) for t in real]
    assert _canary_scan(run_dir, canaries) == []
    assert _canary_scan(run_dir, real_hashes) == []
    assert _canary_scan(run_dir, [real[1][:40]]) == []
    # ... while the scan does find what is there (it would catch a leak).
    assert _canary_scan(run_dir, [synthetic[0][:40]]) != []
    # Ray actors wrote under their own umask; the private zone is still owner-only (#14)
    from tests.test_ingest import _loose_paths

    assert _loose_paths(run_dir.private_root) == []

    # bfloat16 vectors are not float32's: embedded again under a cache key of their own, close to
    # them; back in float32 nothing is embedded again and the vectors are the first run's.
    bf16 = config_from_tree({**tree, "embed": {**tree["embed"], "precision": "bfloat16"}})
    third = run_stage(STAGES["embed"], bf16, run_dir)
    assert (
        third.summary["synthetic_embedded_now"] == 300 and third.summary["precision"] == "bfloat16"
    )
    _, vectors16 = read_set(run_dir.root / "embed" / "synthetic")
    assert vectors16.dtype == np.float32 and not np.array_equal(vectors16, vectors2)
    assert (vectors16 * vectors2).sum(axis=1).min() > 0.99
    assert np.allclose(np.linalg.norm(vectors16, axis=1), 1.0, atol=1e-5)
    fourth = run_stage(STAGES["embed"], config, run_dir)
    assert fourth.summary["synthetic_embedded_now"] == 0
    assert np.array_equal(read_set(run_dir.root / "embed" / "synthetic")[1], vectors2)
