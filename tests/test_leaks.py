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


# --------------------------------------------- public-origin text is not a leak (#14, defect 7)
def _base_model(folder, vocab):
    """A stand-in public base model: config.json and a tokenizer.json with ``vocab``."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    tokenizer = {
        "added_tokens": [{"id": 0, "content": "<|im_start|>"}],
        "model": {"type": "BPE", "vocab": {word: i for i, word in enumerate(vocab)}},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return folder


def test_private_text_standing_in_the_base_model_is_public_origin(tmp_path):
    """Short private prompts ("hello!") equal vocabulary entries of the base model's tokenizer,
    which every fine-tuned model folder carries: public origin, not a leak.  A planted canary in
    the same copied file still fails the run."""
    import pytest

    from dpray.config import config_from_tree
    from dpray.pipeline import LeakError, final_leak_scan
    from tests.conftest import base_tree

    base = _base_model(tmp_path / "base", ["hello", "thanks", "Ġhello", "<|im_end|>"])
    canary = (
        f"my name is jane doe and my account number {make_canary()} was charged twice last week"
    )
    run_dir = _run_dir(tmp_path, ["hello!", "Thanks", canary])
    tree = base_tree(run_dir.root, tmp_path / "unused.jsonl")
    for key in ("train", "sft", "reward"):
        tree[key] = {"model": str(base)}
    config = config_from_tree(tree)
    for stage in ("sft", "reward", "ppo"):
        model = run_dir.public(stage) / "model"
        model.mkdir()
        (model / "tokenizer.json").write_text((base / "tokenizer.json").read_text())
    report = final_leak_scan(config, run_dir)
    assert report["leaks_total"] == 0
    assert report["public_origin_total"] == 6  # hello and thanks, in three copied tokenizers
    assert set(report["public_origin_by_file"]) == {
        f"{stage}/model/tokenizer.json" for stage in ("sft", "reward", "ppo")
    }
    assert json.loads((run_dir.root / "audit" / "leaks.json").read_text())["leaks_total"] == 0
    # `dpray audit leaks --config` knows the same public inputs
    import yaml

    from dpray.cli import main

    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tree))
    assert main(["audit", "leaks", str(run_dir.root), "--config", str(tmp_path / "run.yaml")]) == 0
    # text of a public evaluation set (evaluate.data_path) is public origin too ...
    (run_dir.public("evaluate") / "answers.json").write_text(json.dumps({"q": canary}))
    public_set = tmp_path / "eval.jsonl"
    public_set.write_text(json.dumps({"instruction": canary}) + "\n")
    with_eval = config_from_tree(tree, [f"evaluate.data_path={public_set}"])
    assert final_leak_scan(with_eval, run_dir)["leaks_total"] == 0
    # ... but an "evaluation set" that is the private data itself excuses nothing
    tree_private = {**tree, "data": {**tree["data"], "path": str(public_set)}}
    same = config_from_tree(tree_private, [f"evaluate.data_path={public_set}"])
    with pytest.raises(LeakError, match="evaluate/answers.json"):
        final_leak_scan(same, run_dir)
    (run_dir.public("evaluate") / "answers.json").unlink()
    # the same file with a private sentence planted in it is still a leak
    leaky = json.loads((base / "tokenizer.json").read_text())
    leaky["note"] = canary
    (run_dir.public("sft") / "model" / "tokenizer.json").write_text(json.dumps(leaky))
    with pytest.raises(LeakError, match="sft/model/tokenizer.json"):
        final_leak_scan(config, run_dir)


def test_packaged_tokenizer_copy_is_public_origin_without_a_config(tmp_path, capsys):
    """The reported case: `dpray audit leaks` on a run whose model folders carry SmolLM2's
    tokenizer, with "hello!" among the private prompts (base models found without a config)."""
    import pytest

    from dpray.cli import main
    from dpray.models import existing_model_dir

    smollm2 = existing_model_dir("packaged:smollm2")
    if smollm2 is None:
        pytest.skip("packaged:smollm2 is not converted in this cache")
    canary = f"please forward the wire transfer code {make_canary()} to my brother tomorrow at noon"
    run_dir = _run_dir(tmp_path, ["hello!", canary])
    model = run_dir.public("sft") / "model"
    model.mkdir()
    (model / "tokenizer.json").write_bytes((smollm2 / "tokenizer.json").read_bytes())
    assert main(["audit", "leaks", str(run_dir.root)]) == 0
    report = json.loads((run_dir.root / "audit" / "leaks.json").read_text())
    assert report["leaks_total"] == 0 and report["public_origin_total"] >= 1
    (run_dir.public("report") / "index.html").write_text(f"<p>{canary}</p>")
    assert main(["audit", "leaks", str(run_dir.root)]) == 5


def test_nondp_statistics_outside_private_are_leaks(tmp_path):
    """#14 defect 5: files of statistics of real records that the ledger does not cover fail the
    scan outside private/ (an older dpray wrote them there), and pass inside it."""
    run_dir = _run_dir(tmp_path, [f"my doctor said {make_canary()} about my blood pressure"])
    clean = scan(run_dir, min_tokens=6)
    assert clean.leak_count == 0 and clean.statistics == {}
    (run_dir.public("filter") / "metrics.json").write_text(json.dumps({"probe": {"filtered": 0.7}}))
    (run_dir.public("audit") / "mia.json").write_text(json.dumps({"results": {}}))
    (run_dir.public("generator") / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "epsilon": 0.1, "step_seconds": 2.5}) + "\n"
    )
    (run_dir.public("evaluate") / "win_rates.json").write_text(
        json.dumps({"source": "heldout", "public_data": False, "comparisons": {}})
    )
    report = scan(run_dir, min_tokens=6)
    assert set(report.statistics) == {
        "filter/metrics.json",
        "audit/mia.json",
        "generator/metrics.jsonl",
        "evaluate/win_rates.json",
    }
    assert "step_seconds" in report.statistics["generator/metrics.jsonl"]
    assert report.leak_count == 4 and report.to_dict()["nondp_statistics_total"] == 4

    # the same files where they belong, or public by declaration / by content, are fine
    for rel in ("filter/metrics.json", "audit/mia.json"):
        (run_dir.root / rel).rename(run_dir.private(rel.split("/")[0]) / rel.split("/")[1])
    (run_dir.root / "generator" / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "epsilon": 0.1}) + "\n"
    )
    (run_dir.root / "evaluate" / "win_rates.json").write_text(
        json.dumps({"source": "bench.jsonl", "public_data": True, "comparisons": {}})
    )
    after = scan(run_dir, min_tokens=6)
    assert after.statistics == {} and after.leak_count == 0
