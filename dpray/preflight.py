"""Checks that run before Ray starts, so that common mistakes fail in seconds, not after hours.

Each check yields :class:`~dpray.errors.DprayError` s whose one-line message names what to fix (a
config key, a file in the run directory, an address).  ``dpray run`` and the stage commands stop
at the first (:func:`preflight`); ``dpray plan`` lists them all (:func:`problems`).  What is
checked: the run directory can be written; the config's sections agree with each other; every
model a stage will load exists; the earlier stages' outputs a stage reads are there; no Parquet
file in the run directory is corrupted; GPUs asked for exist when Ray is local; a Ray address
answers.  Nothing here reads a record's text, so no message can quote one.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from dpray.config import ConfigError, DprayConfig
from dpray.errors import (
    ClusterUnreachableError,
    DprayError,
    MissingInputError,
    ModelNotFoundError,
    ResourceError,
    RunDirError,
    missing_input_message,
    producer,
)

ADDRESS_TIMEOUT_S = 3.0

REQUIRED_INPUTS: dict[str, tuple[str, ...]] = {
    "train-generator": ("ledger.json", "private/ingest/instructions.parquet"),
    "sample": ("generator/generator.json",),
    "embed": ("private/ingest/instructions.parquet", "sample/part-*.parquet"),
    "filter": ("ledger.json", "embed/synthetic.npy", "private/embed/real.npy"),
    "annotate": ("filter/filtered.parquet",),
    "sft": ("annotate/pairs/train.parquet",),
    "reward": ("annotate/preferences/train.parquet",),
    "ppo": ("sft/model",),
    "evaluate": (),
}
"""Files of earlier stages (relative to the run directory; globs need one match) that a stage
cannot run without.  Optional inputs (an SFT model evaluate may compare) are not listed."""

MODEL_KEYS: dict[str, tuple[str, ...]] = {
    "train-generator": ("train.model",),
    "sample": ("train.model",),
    "embed": ("embed.model",),
    "annotate": ("annotate.teacher", "annotate.student", "annotate.judge_model"),
    "sft": ("sft.model",),
    "reward": ("reward.model", "reward.pretrained"),
    "ppo": ("ppo.policy", "ppo.reward_model"),
    "evaluate": ("evaluate.base_model", "evaluate.judge_model"),
}
"""The config keys naming a model each stage loads."""


def stages_to_run(config: DprayConfig, stages: Iterable[str] | None = None) -> list[str]:
    """The stages a command runs, in pipeline order (as :func:`dpray.pipeline.run_pipeline`)."""
    from dpray.stages import STAGE_ORDER

    names = list(stages) if stages else [n for n in STAGE_ORDER if n not in config.skip_stages]
    unknown = sorted(set(names) - set(STAGE_ORDER))
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; known: {STAGE_ORDER}")
    return names


def get_key(config: DprayConfig, key: str):
    node = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


# ------------------------------------------------------------------------------- the checks


def _writable(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (a real probe: permission bits do not tell
    about read-only mounts, nor about root)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".dpray-probe-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


def check_run_dir(root: str | Path) -> Iterator[DprayError]:
    """The run directory, or the nearest folder above it that exists, can be written."""
    root = Path(root).expanduser()
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        yield RunDirError(f"{existing} is not a directory (run_dir, --run-dir)")
        return
    for folder in (existing, root / "private", root / "private" / "logs"):
        if folder.is_dir() and not _writable(folder):
            where = "" if folder != existing or existing == root else f" (cannot create {root})"
            yield RunDirError(f"{folder} is not writable{where}; set run_dir or --run-dir")
            return


def check_config(config: DprayConfig, stages: list[str]) -> Iterator[DprayError | ConfigError]:
    """Cross-section checks the per-section validators cannot make."""
    evaluates = "evaluate" in stages
    if evaluates and not config.evaluate.data_path and config.data.heldout_fraction == 0:
        yield ConfigError(
            "evaluate needs real instructions: set data.heldout_fraction > 0 or "
            "evaluate.data_path, or add evaluate to skip_stages"
        )
    if "evaluate" in stages and config.evaluate.data_path:
        path = Path(config.evaluate.data_path).expanduser()
        if not path.exists():
            yield ConfigError(f"evaluate.data_path: {path} does not exist")


def check_data(config: DprayConfig, stages: list[str]) -> Iterator[ConfigError]:
    if "ingest" not in stages:
        return
    for path in config.data.paths:
        if "://" in path:
            continue
        if not Path(path).expanduser().exists():
            yield ConfigError(f"data.path: {path} does not exist")


def model_problem(key: str, spec: str | None) -> str | None:
    """Why ``spec`` (the value of config ``key``) cannot be loaded here, or None.

    Side-effect free: no GGUF conversion, no tiny-model build, no hub access."""
    from dpray.models import loader

    if not spec or spec.startswith(("http://", "https://", loader.TINY_PREFIX)):
        return None
    if spec.startswith(loader.PACKAGED_PREFIX):
        which = spec[len(loader.PACKAGED_PREFIX) :].strip().lower()
        try:
            if which in loader.PACKAGED_GENERATORS:
                loader.packaged_smollm2_gguf()
            elif which in loader.PACKAGED_ENCODERS:
                loader.packaged_minilm_dir()
            else:
                known = loader.PACKAGED_GENERATORS + loader.PACKAGED_ENCODERS
                return f"{key}: unknown packaged model {spec!r}; known: " + ", ".join(
                    loader.PACKAGED_PREFIX + k for k in known
                )
        except loader.ModelSpecError as exc:
            return f"{key}: {exc}"
        return None
    if Path(spec).expanduser().exists():
        return None
    if spec.lower().endswith(".gguf") or spec.startswith((".", "~", os.sep)) or "\\" in spec:
        return f"{key}: model path {spec} does not exist"
    if loader.existing_model_dir(spec) is None:
        return (
            f"{key}: {spec!r} is not a local path and not in the local Hugging Face cache "
            "(dpray never downloads models at run time)"
        )
    return None


def check_models(config: DprayConfig, stages: list[str]) -> Iterator[DprayError]:
    seen: set[str] = set()
    for stage in stages:
        for key in MODEL_KEYS.get(stage, ()):
            if key in seen:
                continue
            seen.add(key)
            problem = model_problem(key, get_key(config, key))
            if problem:
                yield ModelNotFoundError(problem)


def required_inputs(config: DprayConfig, stage: str) -> list[str]:
    paths = list(REQUIRED_INPUTS.get(stage, ()))
    if stage == "reward" and config.reward.pretrained:
        paths = []
    if stage == "ppo":
        paths = [] if config.ppo.policy else paths
        if not config.ppo.reward_model:
            paths.append("reward/reward.json")
    if stage == "evaluate":
        if not config.evaluate.data_path:
            paths.append("private/ingest/heldout.parquet")
        if config.evaluate.judge == "reward_model" and not config.evaluate.judge_model:
            paths.append("reward/reward.json")
    return paths


def check_inputs(config: DprayConfig, root: Path, stages: list[str]) -> Iterator[DprayError]:
    """Each stage's required inputs exist, unless an earlier stage of this command writes them."""
    for index, stage in enumerate(stages):
        earlier = set(stages[:index])
        for relative in required_inputs(config, stage):
            if producer(Path(relative)) in earlier:
                continue
            if "*" in relative:
                found = any(root.glob(relative))
            else:
                found = (root / relative).exists()
            if not found:
                message = missing_input_message(root / relative, root)
                if "*" in relative:
                    message = message.replace(" does not exist", " matches no file", 1)
                yield MissingInputError(f"{stage}: {message}")


def check_parquet(root: Path) -> Iterator[DprayError]:
    """Every Parquet file in the run directory has a readable footer (a cut-short or garbled file
    fails here, named, instead of deep inside a Ray task)."""
    if not root.is_dir():
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in {".ray", "ray_results"}]
        for name in files:
            if not name.endswith(".parquet"):
                continue
            path = Path(folder) / name
            try:
                pq.ParquetFile(path).close()
            except (pa.ArrowException, OSError):
                relative = path.relative_to(root)
                stage = producer(relative)
                rerun = f"; delete it and rerun `dpray {stage} CONFIG --force`" if stage else ""
                yield RunDirError(f"{path} is not a readable Parquet file (corrupted){rerun}")


def gpu_keys(config: DprayConfig, stages: list[str]) -> list[str]:
    """The config keys that ask for GPUs in these stages."""
    keys = []
    strategy = config.generator.resolved_strategy(config.train.use_gpu)
    if "train-generator" in stages and config.train.use_gpu and strategy == "dp_finetune":
        keys.append("train.use_gpu")
    if "embed" in stages and config.embed.use_gpu:
        keys.append("embed.use_gpu")
    for name in ("sft", "reward", "ppo"):
        if name in stages and getattr(config, name).use_gpu:
            keys.append(f"{name}.use_gpu")
    return keys


def local_gpu_count() -> int:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_gpus(config: DprayConfig, stages: list[str], address: str | None) -> Iterator[DprayError]:
    """With a local Ray, GPUs asked for must exist here (Ray Train would wait for them forever).
    Against a cluster, the per-node check happens once connected (:mod:`dpray.resources`)."""
    if address:
        return
    keys = gpu_keys(config, stages)
    if keys and local_gpu_count() == 0:
        yield ResourceError(
            f"{', '.join(keys)}: GPUs asked for, but this machine has none and no Ray address "
            "is given; set them to false, or pass --address of a cluster with GPUs"
        )


def ray_address(config: DprayConfig) -> str | None:
    """The address ``ensure_ray`` will use: the config's (or --address), else RAY_ADDRESS."""
    return config.ray.address or os.environ.get("RAY_ADDRESS") or None


def host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` to probe for an address, or None where Ray resolves it (``auto``)."""
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.split("/", 1)[0]
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_address(address: str | None, timeout: float = ADDRESS_TIMEOUT_S) -> Iterator[DprayError]:
    """A TCP connect to the address's port: Ray's own client retries for minutes."""
    if not address:
        return
    target = host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
        yield ClusterUnreachableError(
            f"Ray address {address} does not answer ({reason} after at most {timeout:g} s); "
            "check --address, ray.address or RAY_ADDRESS"
        )


# ------------------------------------------------------------------------------------ running


def problems(
    config: DprayConfig,
    stages: list[str],
    run_root: Path,
    check_cluster: bool = True,
    local: bool = True,
) -> list[Exception]:
    """Every problem found (``dpray plan`` lists them all)."""
    found: list[Exception] = []
    found += check_run_dir(run_root)
    found += check_config(config, stages)
    found += check_data(config, stages)
    found += check_models(config, stages)
    found += check_inputs(config, run_root, stages)
    found += check_parquet(run_root)
    address = ray_address(config)
    if local:  # planned against a described cluster: its node shapes are checked instead
        found += check_gpus(config, stages, address)
    if check_cluster:
        found += check_address(address)
    return found


def preflight(config: DprayConfig, stages: list[str], run_root: Path) -> None:
    """Raise the first problem (the CLI prints its one line and exits with its code)."""
    for check in (
        lambda: check_run_dir(run_root),
        lambda: check_config(config, stages),
        lambda: check_models(config, stages),
        lambda: check_inputs(config, run_root, stages),
        lambda: check_parquet(run_root),
        lambda: check_gpus(config, stages, ray_address(config)),
        lambda: check_address(ray_address(config)),
    ):
        for problem in check():
            raise problem
