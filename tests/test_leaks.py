"""The leak scan finds planted private text in public artifacts, and nothing in a clean run."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from dpray.audit.leaks import scan
from dpray.rundir import RunDir
from tests.conftest import make_canary


def _run_dir(tmp_path, texts):
    run_dir = RunDir(tmp_path / "run")
    pq.write_table(
        pa.table(
            {
                "id": [str(i) for i in range(len(texts))],
                "text": texts,
                "user_id": [str(i) for i in range(len(texts))],
            }
        ),
        run_dir.private("ingest") / "instructions.parquet",
    )
    return run_dir


def test_clean_run_has_no_leaks(tmp_path):
    private = [f"please help me write a letter to my landlord {make_canary()} about rent"]
    run_dir = _run_dir(tmp_path, private)
    (run_dir.public("ingest") / "report.json").write_text(json.dumps({"rows_in": 1}))
    pq.write_table(
        pa.table({"text": ["write a poem about cats"]}), run_dir.public("sample") / "part-0.parquet"
    )
    report = scan(run_dir, min_tokens=6)
    assert report.leak_count == 0 and report.to_dict()["memorised_total"] == 0
    assert report.files_scanned == 2 and report.private_texts == 1


def test_planted_leaks_are_caught_everywhere(tmp_path):
    canary = make_canary()
    long_text = f"my name is jane doe and my account number {canary} was charged twice last week"
    short_text = f"call {make_canary()}"
    run_dir = _run_dir(tmp_path, [long_text, short_text, "unrelated private text here"])
    # substring inside an HTML report
    (run_dir.public("report") / "index.html").write_text(
        f"<html><body><p>sample: ... account number {canary} was charged twice last ...</p>"
    )
    # an exact short value in a JSON file
    (run_dir.public("filter") / "noisy_histogram.json").write_text(
        json.dumps({"bins": [1, 2], "note": short_text.upper()})
    )
    # a synthetic generation reproducing a training instruction: memorisation, not a leak
    pq.write_table(
        pa.table({"text": [long_text, "fresh synthetic text"]}),
        run_dir.public("sample") / "part-0.parquet",
    )
    # private zone content is never scanned
    (run_dir.private("ingest") / "copy.txt").write_text(long_text)
    report = scan(run_dir, min_tokens=6).to_dict()
    assert report["leaks_by_file"] == {"report/index.html": 1, "filter/noisy_histogram.json": 1}
    assert report["memorised_by_file"] == {"sample/part-0.parquet": 1}
    # the report itself holds counts and file names only
    assert canary not in json.dumps(report)


def test_binary_artifacts_are_scanned_without_decoding_the_weights(tmp_path):
    """Checkpoint metadata and pickled strings are caught; tensor bytes are not read as text."""
    import torch
    from safetensors.torch import save_file

    canary = make_canary()
    private = f"my doctor said the biopsy code {canary} means I should call back on monday"
    run_dir = _run_dir(tmp_path, [private])
    weights = {"w": torch.randn(64, 64)}
    save_file(weights, run_dir.public("sft") / "clean.safetensors", metadata={"step": "3"})
    save_file(
        weights,
        run_dir.public("sft") / "leaky.safetensors",
        metadata={"note": f"example: biopsy code {canary} means I should call back"},
    )
    torch.save({"prompt": private, "w": weights["w"]}, run_dir.public("reward") / "state.pt")
    report = scan(run_dir, min_tokens=6).to_dict()
    assert report["leaks_by_file"] == {"sft/leaky.safetensors": 1, "reward/state.pt": 1}


def test_scan_refuses_to_pass_on_an_empty_or_missing_index(tmp_path):
    """A scan with nothing to compare against would report 0 leaks for anything (#14, defect 6)."""
    import pytest

    from dpray.audit.leaks import ScanInputError

    missing = RunDir(tmp_path / "missing")
    (missing.public("report") / "index.html").write_text("anything")
    with pytest.raises(ScanInputError, match="private/ingest"):
        scan(missing, min_tokens=6)
    empty = _run_dir(tmp_path / "empty", [])
    with pytest.raises(ScanInputError, match="empty"):
        scan(empty, min_tokens=6)
