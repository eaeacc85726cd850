"""The train-generator driver never loads model weights (issue #15, item 1).

A RayJob's head pod has neither the memory nor the GPU for the base model: the driver plans
(parameter counts from the model config), the Ray Train workers load the model, and rank 0 saves
and verifies the adapter.  Here the driver runs in a subprocess whose data segment is capped
(``RLIMIT_DATA``, set after Ray has started, so Ray's own processes and the workers it spawns
are not capped) below what loading the model needs; train-generator must still pass, and loading
the model in that capped driver must fail (the cap is really below the model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dpray.models import make_tiny_causal_lm
from tests.conftest import REPO

HEADROOM_MB = 320  # what the capped driver may still allocate once Ray is up
MODEL_MB = 2 * HEADROOM_MB  # the model's fp32 weights: loading them cannot fit under the cap

SCRIPT = textwrap.dedent(
    """
    import json, os, resource, sys, tempfile
    from pathlib import Path

    import ray

    root = Path(os.path.expanduser("~/.cache/dpray")); root.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             _temp_dir=tempfile.mkdtemp(prefix="r", dir=root))

    import peft, ray.train.torch, transformers  # code is not what the cap is about
    from transformers import AutoModelForCausalLM
    from dpray.config import config_from_tree
    from dpray.pipeline import run_stage
    from dpray.rundir import RunDir
    from dpray.stages import STAGES

    tree, model, headroom = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    config = config_from_tree(tree)
    run_dir = RunDir(config.run_dir)
    run_stage(STAGES["ingest"], config, run_dir)

    def data_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024

    cap = data_bytes() + headroom * 2**20
    resource.setrlimit(resource.RLIMIT_DATA, (cap, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    result = run_stage(STAGES["train-generator"], config, run_dir)
    try:
        AutoModelForCausalLM.from_pretrained(model, local_files_only=True)
        loads = True
    except (MemoryError, RuntimeError):
        loads = False
    print("RESULT " + json.dumps({"summary": result.summary, "driver_loads_model": loads}))
    ray.shutdown()
    """
)


def _big_model(path: Path) -> Path:
    """A random Llama whose fp32 weights take ~MODEL_MB (wide MLPs, few tokens: quick to run)."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    make_tiny_causal_lm(path, hidden_size=64)  # the tokenizer and config to start from
    config = AutoConfig.from_pretrained(path)
    config.intermediate_size = MODEL_MB * 2**20 // (4 * 3 * 64 * config.num_hidden_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    assert model.num_parameters() * 4 >= MODEL_MB * 2**20
    model.save_pretrained(path, safe_serialization=True)
    return path


def test_parameter_count_from_the_config_matches_the_loaded_model(tmp_path):
    from dpray.stages.train_generator.adapter import build_lora_model
    from dpray.stages.train_generator.plan import LoraLayout, trainable_parameter_count

    model = str(make_tiny_causal_lm(tmp_path / "tiny", hidden_size=64))
    layout = LoraLayout(0, 4, 8, 0.0, ("q_proj", "v_proj"))
    loaded, _ = build_lora_model(model, layout)
    expected = sum(p.numel() for p in loaded.parameters() if p.requires_grad)
    assert trainable_parameter_count(model, layout) == expected > 0


@pytest.mark.slow
def test_train_generator_passes_with_the_driver_capped_below_the_model(tmp_path):
    model = _big_model(tmp_path / "big")
    data = tmp_path / "data.jsonl"
    with data.open("w") as handle:
        for i in range(40):
            handle.write(json.dumps({"id": str(i), "instruction": f"Write a note on topic {i}."}))
            handle.write("\n")
    tree = {
        "run_dir": str(tmp_path / "run"),
        "data": {"path": str(data), "text_field": "instruction", "id_field": "id"},
        "privacy": {"epsilon": 4.0, "delta": 1e-5},
        "generator": {"strategy": "dp_finetune"},
        "train": {
            "model": str(model),
            "steps": 1,
            "checkpoint_every": 1,
            "expected_batch_size": 4,
            "micro_batch_size": 4,
            "max_tokens": 32,
            "lora_targets": ["q_proj", "v_proj"],
        },
    }
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(tree), str(model), str(HEADROOM_MB)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["summary"]["executed_steps"] == 1
    assert result["summary"]["lora_tensors_changed"] > 0  # rank 0 saved and verified it
    assert result["summary"]["trainable_parameters"] > 0  # counted from the config
    assert not result["driver_loads_model"]  # the cap is below what loading the model needs
    assert (tmp_path / "run" / "generator" / "adapter" / "adapter_config.json").exists()


def test_loading_every_stage_imports_no_model_library():
    """Every ``dpray <stage>`` command and Ray job loads the whole stage registry
    (:func:`dpray.stages.load_stages`).  The heavy libraries belong to the code that builds or
    runs a model (Ray workers, or a stage's own run); a registry that imported them cost every
    command ~1.7 s and ~240 MB of driver memory (torch, opacus) before doing anything."""
    code = textwrap.dedent(
        """
        import sys
        import dpray.cli, dpray.pipeline
        from dpray.stages import load_stages
        load_stages()
        heavy = ("torch", "transformers", "trl", "peft", "opacus", "deepspeed",
                 "sentence_transformers", "vllm")
        loaded = [m for m in heavy if m in sys.modules]
        print(loaded)
        sys.exit(1 if loaded else 0)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
