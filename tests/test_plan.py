"""``dpray plan``: every shipped config plans cleanly; what would fail later fails here.

Plans start no Ray (no address is given) and load no model weights; ``--quick`` solves σ with the
RDP accountant so the whole file takes seconds of CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dpray.cli import main
from dpray.errors import EXIT_CONFIG, EXIT_RESOURCES

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
CONFIGS = sorted((REPO / "jobs").glob("*.yaml")) + sorted((REPO / "dpray/configs").glob("*.yaml"))
MANIFEST = REPO / "cluster" / "rayjob-pipeline.yaml"
CLUSTER_CONFIGS = {"paper.yaml", "scale.yaml"}
"""Configs whose data and model live on the cluster's volume (/data): planned here with local
stand-ins for those two FILL IN values; everything else as shipped."""
MODEL_STAND_INS = [
    item
    for key in (
        "train.model",
        "annotate.teacher",
        "annotate.student",
        "sft.model",
        "reward.model",
        "evaluate.base_model",
    )
    for item in ("--set", f"{key}=packaged:smollm2")
]
"""The cluster configs' FILL IN model folders (/data/models/...), stood in for by the packaged
model (plan reads config.json only)."""
STAND_INS = [
    "--set",
    f"data.path={SHARED / 'dolly15k_rows0-6399.jsonl'}",
    *MODEL_STAND_INS,
]
COMMANDS = {"audit-sharegpt.yaml": ["--stages", "ingest"]}
"""Configs that are not `dpray run` configs, planned for the stages their header documents
(audit-sharegpt: `dpray ingest` then `dpray audit mia`)."""


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)  # shipped configs name data relative to the repository root
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def plan(capsys, config: Path, tmp_path: Path, *extra: str) -> tuple[int, dict]:
    argv = ["plan", str(config), "--run-dir", str(tmp_path / "run"), "--json", "--quick", *extra]
    code = main(argv)
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_plans(config, tmp_path, capsys):
    needs_shared = "../shared" in config.read_text() or config.name in CLUSTER_CONFIGS
    if needs_shared and not SHARED.is_dir():
        pytest.skip(f"{SHARED} not available")
    extra = STAND_INS if config.name in CLUSTER_CONFIGS else []
    extra = extra + COMMANDS.get(config.name, [])
    code, result = plan(capsys, config, tmp_path, *extra)
    assert code == 0, result["problems"]
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    stages = {s["name"]: s for s in result["stages"]}
    if "filter" in stages:
        assert stages["filter"]["dp"]["sigma"]
    assert result["data"]["rows"] > 0
    assert result["driver"]["head_request"].endswith("Gi")


def test_plan_refuses_evaluation_without_data(tmp_path, capsys):
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not available")
    paper = REPO / "jobs" / "paper.yaml"
    code, result = plan(capsys, paper, tmp_path, *STAND_INS, "--set", "data.heldout_fraction=0")
    assert code == EXIT_CONFIG
    assert "data.heldout_fraction" in result["problems"][0]["message"]


RAYJOBS = sorted((REPO / "cluster").glob("rayjob-*.yaml"))


@pytest.mark.parametrize("manifest", RAYJOBS, ids=lambda p: p.name)
def test_head_pod_memory_is_what_plan_says(manifest, tmp_path, capsys):
    """Each RayJob's head requests the memory `dpray plan` gives for the stages its entrypoint
    runs on paper.yaml's ~180k instructions (stand-ins: a demo source of that size, the packaged
    model)."""
    spec = yaml.safe_load(manifest.read_text())["spec"]
    entry = spec["entrypoint"].split()
    assert entry[:3] == ["dpray", "run", "/app/jobs/paper.yaml"], entry
    stages = (
        entry[entry.index("--stages") : entry.index("--stages") + 2] if "--stages" in entry else []
    )
    code, result = plan(
        capsys,
        REPO / "jobs" / "paper.yaml",
        tmp_path,
        "--set",
        "data.path=demo://?n=180000",
        *MODEL_STAND_INS,
        "--cluster",
        str(manifest),
        *stages,
    )
    # a stage job alone finds no earlier stage's output in this empty run dir (exit 6); that is
    # all that may be wrong
    assert {p["exit_code"] for p in result["problems"]} <= {6}, result["problems"]
    assert code == (6 if result["problems"] else 0)
    head = spec["rayClusterSpec"]["headGroupSpec"]
    resources = head["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"]["memory"] == result["driver"]["head_request"]
    assert resources["limits"]["memory"] == result["driver"]["head_request"]


def test_plan_finds_no_node_for_a_gpu_worker(tmp_path, capsys):
    manifest = yaml.safe_load(MANIFEST.read_text())
    groups = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"] = [
        g for g in groups if g["groupName"] != "gpu"
    ]
    path = tmp_path / "cpu-only.yaml"
    path.write_text(yaml.safe_dump(manifest))
    code, result = plan(
        capsys,
        REPO / "jobs" / "smoke.yaml",
        tmp_path,
        "--set",
        "train.use_gpu=true",
        "--cluster",
        str(path),
    )
    assert code == EXIT_RESOURCES
    assert "train-generator asks for 2 workers with 1 GPU each" in result["problems"][0]["message"]


def test_plan_text_names_each_stage(tmp_path, capsys):
    code = main(["plan", "jobs/smoke.yaml", "--run-dir", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert code == 0
    assert "filter" in out and "DP: sigma" in out and "driver memory" in out
    assert "KubeRay head pod memory request" in out


def test_plan_reads_the_nodes_of_an_address(tmp_path, capsys, monkeypatch):
    """With --address, plan checks the stages against ``ray.nodes()`` (here a stand-in list of
    the alive nodes; the address itself must answer, as a listening socket does)."""
    import socket

    import dpray.plan as plan_module

    nodes = [{"name": "cpu-node", "CPU": 4.0, "GPU": 0.0, "memory": 8 * 2**30}]
    monkeypatch.setattr(plan_module, "ray_node_shapes", lambda address: nodes)
    with socket.create_server(("127.0.0.1", 0)) as server:
        address = f"127.0.0.1:{server.getsockname()[1]}"
        argv = ["--set", "train.use_gpu=true", "--address", address]
        code, result = plan(capsys, REPO / "jobs" / "smoke.yaml", tmp_path, *argv)
    assert code == EXIT_RESOURCES
    assert result["nodes"] == f"1 alive node(s) at {address}"
    assert "no alive Ray node has a GPU" in result["problems"][0]["message"]


def test_plan_counts_the_gpus_of_a_tensor_parallel_teacher(tmp_path, capsys):
    """A vLLM teacher with tensor_parallel_size 2 asks each annotate actor for 2 GPUs of one
    node; the pipeline manifest's GPU nodes have 1 each, so the plan says no node fits."""
    code, result = plan(
        capsys,
        REPO / "jobs" / "smoke.yaml",
        tmp_path,
        "--set",
        "annotate.backend=vllm",
        "--set",
        "annotate.tensor_parallel_size=2",
        "--cluster",
        str(MANIFEST),
    )
    assert code == EXIT_RESOURCES
    messages = [p["message"] for p in result["problems"]]
    assert any("annotate asks for" in m and "2 GPU" in m for m in messages), messages
    stage = next(s for s in result["stages"] if s["name"] == "annotate")
    assert "2 GPU" in stage["resources"]


def test_scale_job_fits_the_pipeline_head(tmp_path, capsys):
    """jobs/scale.yaml's millions of candidates: the DP filter streams them, so its driver fits
    the 6Gi head of cluster/rayjob-pipeline.yaml (it asked for 18Gi while it held them all)."""
    code, result = plan(
        capsys,
        REPO / "jobs" / "scale.yaml",
        tmp_path,
        "--set",
        "data.path=demo://?n=100000",
        *MODEL_STAND_INS,
        "--cluster",
        str(MANIFEST),
    )
    assert code == 0, result["problems"]
    assert float(result["driver"]["gib"]) <= 4.0
