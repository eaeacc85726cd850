"""KubeRay manifests in cluster/ against the CRD schemas; job configs in jobs/ against the config.

The CRD schemas (``../shared/schemas/kuberay/*.yaml.gz``) accept unknown fields: Kubernetes prunes
them silently.  Here every object schema that lists its properties is made strict, so a misspelled
or misplaced field fails instead of vanishing on ``kubectl apply``.
"""

from __future__ import annotations

import copy
import gzip
import re
import shlex
from functools import cache
from pathlib import Path

import pytest
import yaml

from dpray.config import load_config

jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "schemas" / "kuberay"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml.gz", "RayCluster": "ray.io_rayclusters.yaml.gz"}
MANIFESTS = sorted(
    p for p in CLUSTER.glob("*.yaml") if yaml.safe_load(p.read_text())["kind"] in CRD_FILES
)
JOB_CONFIGS = sorted((REPO / "jobs").glob("*.yaml"))
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
RUNTIME_ENV_KEYS = {
    "env_vars",
    "working_dir",
    "py_modules",
    "pip",
    "uv",
    "conda",
    "container",
    "image_uri",
    "excludes",
    "config",
    "nsight",
    "py_executable",
}


# ------------------------------------------------------------------------------------ schemas


def strict(node: object) -> object:
    """Make a CRD's OpenAPI schema strict and plain JSON Schema, in place.

    * an object schema with ``properties`` and neither ``additionalProperties`` nor
      ``x-kubernetes-preserve-unknown-fields`` gets ``additionalProperties: false``;
    * ``x-kubernetes-int-or-string`` accepts an integer or a string;
    * ``nullable: true`` also accepts null.

    Walks the schema keywords only, so a field that happens to be called ``properties`` or
    ``items`` is never mistaken for a keyword.
    """
    if not isinstance(node, dict):
        return node
    if node.get("x-kubernetes-int-or-string") and "type" not in node and "anyOf" not in node:
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and isinstance(node.get("type"), str):
        node["type"] = [node["type"], "null"]
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        node["additionalProperties"] = False
    for child in (node.get("properties") or {}).values():
        strict(child)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            strict(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        for child in node.get(key) or []:
            strict(child)
    return node


@cache
def crd(kind: str) -> dict:
    path = SCHEMAS / CRD_FILES[kind]
    if not path.exists():
        pytest.skip(f"{path} not available")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@cache
def _validator(kind: str):
    definition = crd(kind)
    assert definition["spec"]["names"]["kind"] == kind
    (version,) = [v for v in definition["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def errors(manifest: dict) -> list[str]:
    """Schema violations of one manifest, as 'path: message' lines (empty when valid)."""
    found = []
    if manifest.get("apiVersion") != "ray.io/v1":
        found.append(f"apiVersion: {manifest.get('apiVersion')!r} is not 'ray.io/v1'")
    validator = _validator(manifest["kind"])
    for err in sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path)):
        where = ".".join(str(p) for p in err.absolute_path) or "<root>"
        found.append(f"{where}: {err.message}")
    return found


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def pod_groups(manifest: dict) -> list[tuple[str, dict]]:
    spec = cluster_spec(manifest)
    groups = [("head", spec["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    return groups


def test_manifests_found():
    kinds = {load(p)["kind"] for p in MANIFESTS}
    assert kinds == {"RayJob", "RayCluster"}
    names = {p.name for p in MANIFESTS}
    assert {"rayjob-pipeline.yaml", "raycluster.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_valid_against_crd(path):
    manifest = load(path)
    assert errors(manifest) == []
    name = manifest["metadata"]["name"]
    assert DNS_LABEL.match(name) and len(name) <= 47, name  # KubeRay appends suffixes


# One mutation per line: (description, function that breaks a valid RayJob in place).
BREAKAGES = [
    (
        "top-level spec field",
        lambda m: m["spec"].update(rayClusterSpecs=m["spec"].pop("rayClusterSpec")),
    ),
    ("entrypoint type", lambda m: m["spec"].update(entrypoint=["dpray", "run"])),
    ("deadline type", lambda m: m["spec"].update(activeDeadlineSeconds="3 days")),
    ("cluster spec field", lambda m: cluster_spec(m).update(enableInTreeAutoScaling=True)),
    ("worker group field", lambda m: cluster_spec(m)["workerGroupSpecs"][0].update(maxReplica=8)),
    ("missing required", lambda m: cluster_spec(m)["workerGroupSpecs"][0].pop("groupName")),
    (
        "container field",
        lambda m: cluster_spec(m)["headGroupSpec"]["template"]["spec"]["containers"][0].update(
            volumeMount=[{"name": "data", "mountPath": "/data"}]
        ),
    ),
    (
        "resources field",
        lambda m: cluster_spec(m)["workerGroupSpecs"][-1]["template"]["spec"]["containers"][0][
            "resources"
        ].update(limit={"nvidia.com/gpu": 1}),
    ),
    (
        "volume source field",
        lambda m: cluster_spec(m)["headGroupSpec"]["template"]["spec"]["volumes"][0].update(
            persistentVolumeClaims={"claimName": "dpray-data"}
        ),
    ),
    (
        "rayStartParams value type",
        lambda m: cluster_spec(m)["headGroupSpec"]["rayStartParams"].update(**{"num-cpus": 0}),
    ),
    ("apiVersion", lambda m: m.update(apiVersion="ray.io/v1alpha")),
]


@pytest.mark.parametrize("what, breaks", BREAKAGES, ids=[b[0] for b in BREAKAGES])
def test_broken_field_fails(what, breaks):
    manifest = load(CLUSTER / "rayjob-pipeline.yaml")
    assert errors(manifest) == []
    breaks(manifest)
    assert errors(manifest), f"a broken {what} passed validation"


def test_strict_keeps_open_maps_open():
    """Maps (labels, limits, rayStartParams) and preserve-unknown-fields nodes stay open."""
    manifest = load(CLUSTER / "rayjob-pipeline.yaml")
    manifest["metadata"]["labels"]["any.example/label"] = "x"
    head = cluster_spec(manifest)["headGroupSpec"]
    head["rayStartParams"]["object-store-memory"] = "1000000000"
    head["template"]["spec"]["containers"][0]["resources"]["limits"]["example.com/fpga"] = 1
    assert errors(manifest) == []


# --------------------------------------------------------------------------- manifest content


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_cluster_shape(path):
    """CPU head, a GPU group with nvidia.com/gpu limits, autoscaling bounds, the data volume."""
    manifest = load(path)
    spec = cluster_spec(manifest)
    assert spec["enableInTreeAutoscaling"] is True
    gpu_groups = 0
    for name, group in pod_groups(manifest):
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        limits = container["resources"]["limits"]
        if name == "head":
            assert "nvidia.com/gpu" not in limits
        else:
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            gpu_groups += "nvidia.com/gpu" in limits
            if "nvidia.com/gpu" in limits:
                assert (
                    container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
                )
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert mounts["data"] == "/data"
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] == pvc_name()
        assert set(mounts) <= set(volumes)
    assert gpu_groups >= 1


def pvc_name() -> str:
    pvc = load(CLUSTER / "pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim"
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    return pvc["metadata"]["name"]


RAYJOBS = [p for p in MANIFESTS if load(p)["kind"] == "RayJob"]


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_lifecycle_and_entrypoint(path):
    """Retries, deadline and cleanup are set; the entrypoint is a valid dpray command whose
    config is in the image (/app/jobs -> jobs/) and whose run dir is on the mounted volume."""
    from dpray.cli import build_parser
    from dpray.stages import STAGE_ORDER

    spec = load(path)["spec"]
    assert spec["backoffLimit"] >= 0
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] >= 0

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) <= RUNTIME_ENV_KEYS
    assert all(isinstance(v, str) for v in runtime_env.get("env_vars", {}).values())

    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "dpray"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run"
    config_path = Path(args.config)
    assert config_path.parts[:3] == ("/", "app", "jobs")
    config = load_config(REPO / "jobs" / config_path.name, [f"run_dir={args.run_dir}"])
    assert config.run_dir.startswith("/data/")
    if args.stages:
        assert set(args.stages.split(",")) <= set(STAGE_ORDER)


def test_versions_agree():
    """rayVersion of every manifest = the Dockerfile's RAY_VERSION = the tested Ray pin."""
    pin = re.search(r"^ray==(\S+)$", (REPO / "constraints-cpu.txt").read_text(), re.M)
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    arg = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M)
    assert pin and arg and arg.group(1) == pin.group(1)
    for path in MANIFESTS:
        assert cluster_spec(load(path))["rayVersion"] == arg.group(1), path.name
    images = {
        c["image"]
        for path in MANIFESTS
        for _, group in pod_groups(load(path))
        for c in group["template"]["spec"]["containers"]
    }
    assert len(images) == 1, images


def test_dockerfile_installs_vllm_before_torch_users():
    """vLLM pins its own torch: it must be installed first, and later installs constrained."""
    lines = [line.strip() for line in (CLUSTER / "Dockerfile").read_text().splitlines()]
    text = "\n".join(lines)
    assert re.search(r"^FROM nvidia/cuda:\S+", text, re.M)
    vllm = text.index('pip install "vllm')
    for later in ("deepspeed", '"/app[vllm]"'):
        assert text.index(later) > vllm
    assert text.count("-c /opt/torch-pins.txt") >= 2
    assert "ray[default" in text  # the dashboard and job API KubeRay submits through


def test_dockerfile_builds_the_compiled_noise_kernel():
    """The image copies setup.py (it builds the C kernels) and refuses an image without them."""
    text = (CLUSTER / "Dockerfile").read_text()
    copy = next(line for line in text.splitlines() if line.startswith("COPY pyproject.toml"))
    assert "setup.py" in copy.split()
    assert "build-essential" in text and "backend() == 'compiled'" in text


# -------------------------------------------------------------------------------- job configs


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_job_config_loads(path):
    config = load_config(path)
    assert config.run_dir


def test_paper_config_has_the_papers_settings():
    c = load_config(REPO / "jobs" / "paper.yaml")
    assert (c.train.lora_r, c.train.lora_alpha) == (8, 16)
    assert set(c.train.lora_targets) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert c.train.expected_batch_size == 4096 and c.train.epochs == 10
    assert c.train.learning_rate == 1e-3 and c.train.clip_norm == 0.5
    assert c.train.use_gpu and c.train.num_workers > 1
    assert 5.5 <= c.privacy.epsilon <= 6.5 and c.privacy.delta == 5e-7
    assert c.sample.top_p == 0.95 and c.sample.temperature == 1.0
    assert c.sample.num_samples >= 200_000
    assert c.filter.num_clusters == 1000 and c.filter.pca_variance == 0.9
    assert c.filter.sigma == 10.0
    scale = load_config(REPO / "jobs" / "scale.yaml")
    assert scale.sample.num_samples >= 1_000_000
