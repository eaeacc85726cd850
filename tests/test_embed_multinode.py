"""The streamed embed stage on a two-node local Ray cluster, with the real (tiny) encoder.

`cluster/local.sh up --workers 2` starts a head with 0 CPUs and two 1-CPU worker nodes (as
``test_filter_multinode`` does).  A driver process joins it and runs the embed stage's streamed
path (``stage.embed_sets``, small chunks, so several sorted windows) on 300 synthetic and 50
real texts, in blocks of several encoder batches.  The default actor pool (one per CPU of the alive nodes) must have embedded on both
nodes (the stage counts the nodes its actors reported), and the vectors must equal a direct
in-process encode of the same texts with the same traced encoder and the in-memory Ray path
(``encode.embed_texts``), up to float32 rounding (batches pad differently).  `local.sh down` runs
in a finally and must leave no process of the sessions it started.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.two_nodes import run_driver_on_two_nodes

pytestmark = pytest.mark.slow  # three Ray nodes start and stop, two actor pools: 72 s at nice 19


def driver(root: str, model: str, out_path: str) -> None:
    """Run in a subprocess joined to the cluster (``RAY_ADDRESS``): the stage, then references."""
    import ray

    from dpray.config import config_from_tree
    from dpray.rundir import RunDir, read_json
    from dpray.stages.embed import stage, stream
    from dpray.stages.embed.encode import embed_texts, make_encoder
    from dpray.stages.embed.store import read_set
    from tests.test_embed import _texts

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    config = config_from_tree(
        {
            "run_dir": str(Path(root) / "run"),
            "data": {"path": str(Path(root) / "unused.jsonl")},
            "privacy": {"epsilon": 4.0, "delta": 1e-5},
            "embed": {"model": model, "batch_size": 16},
        }
    )
    run_dir = RunDir(config.run_dir)
    synthetic = _texts("lima_1k.jsonl", 0, 300)
    folder = run_dir.public("sample")
    for number, start in enumerate((0, 180)):
        texts = synthetic[start : start + 180] if start == 0 else synthetic[start:]
        ids = [f"s{start + i}" for i in range(len(texts))]
        pq.write_table(pa.table({"text": texts, "sample_id": ids}), folder / f"s-{number}.parquet")
    real = _texts("dolly15k_rows0-6399.jsonl", 0, 50)
    pq.write_table(
        pa.table({"id": [f"r{i}" for i in range(50)], "text": real, "user_id": ["u"] * 50}),
        run_dir.private("ingest") / "instructions.parquet",
    )
    # blocks of several row groups (mixing windows), as at 100k texts (e.g. 23 groups, 2 actors)
    stream.MIN_BLOCKS_PER_ACTOR = 2
    assert stream.groups_per_block(23, 2) == 5
    stage.embed_sets(config, run_dir, chunk_rows=100)
    ids, vectors = read_set(run_dir.root / "embed" / "synthetic")
    _, real_vectors = read_set(run_dir.private("embed") / "real")
    direct = make_encoder(model, "cpu", 1, "traced")
    in_memory = embed_texts(synthetic, model, 16)
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    result = {
        "worker_nodes": len(nodes),
        "actor_nodes": read_json(run_dir.private("embed") / "report.json")["actor_nodes"],
        "sample_ids": ids.column("sample_id").to_pylist(),
        "shape": list(vectors.shape),
        "diff_direct": float(np.abs(vectors - direct(synthetic, 16)).max()),
        "diff_in_memory": float(np.abs(vectors - in_memory).max()),
        "diff_real": float(np.abs(real_vectors - direct(real, 16)).max()),
    }
    Path(out_path).write_text(json.dumps(result))
    ray.shutdown()


def test_streamed_embedding_on_two_nodes_equals_a_direct_encode(tmp_path):
    from dpray.models import make_tiny_sentence_encoder

    model = make_tiny_sentence_encoder(tmp_path / "tiny", hidden_size=32)
    out = tmp_path / "result.json"
    run_driver_on_two_nodes(
        tmp_path,
        "from tests.test_embed_multinode import driver; "
        f"driver({str(tmp_path)!r}, {str(model)!r}, {str(out)!r})",
    )

    result = json.loads(out.read_text())
    assert result["worker_nodes"] == 2
    assert result["actor_nodes"] == 2  # the default pool spans both nodes, and both embedded
    assert result["sample_ids"] == [f"s{i}" for i in range(300)]
    assert result["shape"] == [300, 32]
    assert result["diff_direct"] < 1e-5
    assert result["diff_in_memory"] < 1e-5
    assert result["diff_real"] < 1e-5
