"""``dpray plan``: what a run would ask for, spend, write and take -- without running it.

A dry run for the person about to pay for GPU days: the config is validated (cross-section checks
too), model and data paths resolved, the input rows counted (file metadata and line counts, no
record is parsed), the preflight checks of :mod:`dpray.preflight` run, and every stage is listed
with the resources it asks per worker, the DP parameters the ledger would record (σ, q, steps, ε,
δ -- solved by the same calibration code the stages call, against the run's ledger if it exists),
the expected output sizes and a time estimate read from ``benchmarks/results`` where one was
measured for these settings.  It also says how much memory the driver needs: the driver only
plans, reads the data (ingest) and runs the DP filter; model weights load in Ray workers only.
With ``--address`` the per-worker requests are checked against the cluster's nodes
(``ray.nodes()``), with ``--cluster MANIFEST`` against a KubeRay manifest's worker groups.
Nothing is written, no model weights are loaded, Ray is not started without an address.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from dpray.config import ConfigError, DprayConfig
from dpray.errors import classify

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
GIB = 1024**3
DRIVER_BASE_GIB = 2.0
"""Python, torch, transformers, pyarrow, the Ray driver and a tokenizer (measured ~0.5 GiB
resident on 2 cores; the rest is headroom for Ray's object-store client and log buffers)."""
HEAD_RAY_GIB = 2.0
"""GCS, raylet, dashboard and the job supervisor beside the driver on a KubeRay head pod."""
INGEST_BYTES_FACTOR = 6
"""Ingest holds every record as Python objects in the driver: about this many bytes per input
byte."""


@dataclass
class StagePlan:
    name: str
    resources: str
    dp: dict | None = None
    outputs: str = ""
    estimate: str = "no estimate"


@dataclass
class Plan:
    config_run_dir: str
    stages: list[StagePlan] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    driver: dict = field(default_factory=dict)
    nodes: str = "not checked (pass --address or --cluster)"
    problems: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return self.problems[0]["exit_code"] if self.problems else 0

    def add_problem(self, exc: Exception) -> None:
        known = classify(exc, Path(self.config_run_dir))
        code, label, message = known if known else (1, "error", type(exc).__name__)
        self.problems.append({"exit_code": code, "label": label, "message": message})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    def format(self) -> str:
        lines = [f"run directory: {self.config_run_dir}"]
        lines.append(f"data: {self.data.get('summary', 'not read')}")
        for stage in self.stages:
            lines.append(f"\n{stage.name}")
            lines.append(f"  resources: {stage.resources}")
            if stage.dp:
                lines.append("  DP: " + ", ".join(f"{k} {v}" for k, v in stage.dp.items()))
            if stage.outputs:
                lines.append(f"  outputs:   {stage.outputs}")
            lines.append(f"  time:      {stage.estimate}")
        d = self.driver
        lines.append(
            f"\ndriver memory: ~{d.get('gib', '?')} GiB ({d.get('why', '')}); "
            f"KubeRay head pod memory request: {d.get('head_request', '?')}"
        )
        lines.append(f"node shapes: {self.nodes}")
        for note in self.notes:
            lines.append(f"note: {note}")
        if self.problems:
            lines.append("")
            for p in self.problems:
                lines.append(f"PROBLEM (exit {p['exit_code']}) {p['label']}: {p['message']}")
        else:
            lines.append("\nno problems found")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ data


def count_rows(path: str) -> tuple[int | None, int]:
    """``(rows, bytes)`` of one data.path without parsing records (None rows: unknown)."""
    if path.startswith("demo://"):
        query = parse_qs(urlparse(path).query)
        return int(query.get("n", ["3000"])[0]), 0
    if "://" in path:
        return None, 0
    root = Path(path).expanduser()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    rows, size = 0, 0
    for file in files:
        suffix = file.suffix.lower()
        size += file.stat().st_size
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            rows += pq.ParquetFile(file).metadata.num_rows
        elif suffix in (".jsonl", ".csv"):
            with file.open("rb") as handle:
                count = sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
            rows += max(0, count - 1) if suffix == ".csv" else count
        elif suffix == ".json":
            data = json.loads(file.read_text(encoding="utf-8"))
            rows += len(data) if isinstance(data, list) else 1
    return rows, size


def _units(config: DprayConfig, run_root: Path, rows: int | None) -> tuple[int | None, str]:
    """Privacy units: ingest's released count when it ran, else an upper bound from the rows."""
    manifest = run_root / "private" / "ingest" / "partitions" / "manifest.json"
    if manifest.is_file():
        return int(json.loads(manifest.read_text())["units"]), "from ingest"
    if rows is None:
        return None, "unknown"
    n = int(rows * (1 - config.data.heldout_fraction))
    kind = "users at most" if config.privacy.unit == "user" else "records at most"
    return n, f"{kind} (before ingest drops duplicates and bad rows)"


# ------------------------------------------------------------------------------------- DP


def _ledger(config: DprayConfig, run_root: Path, n: int):
    from dpray.privacy.ledger import Ledger

    path = run_root / "ledger.json"
    if path.is_file():
        return Ledger.load(path)
    delta = config.privacy.resolve_delta(n)
    return Ledger(path, config.privacy.unit, config.privacy.epsilon, delta)


def _solve(make_event, target: float, ledger, quick: bool) -> float:
    from dpray.privacy.calibration import CalibrationError, _bisect, solve_noise_multiplier
    from dpray.privacy.ledger import BudgetExceededError, compose

    try:
        if not quick:
            return solve_noise_multiplier(make_event, target, ledger.target_delta, ledger.events)
        existing = list(ledger.events)
        if compose([*existing, make_event(500.0)], ledger.target_delta, fast=True).epsilon > target:
            raise CalibrationError(f"even noise multiplier 500 exceeds epsilon {target:.4g}")
        return _bisect(
            lambda s: (
                compose([*existing, make_event(s)], ledger.target_delta, fast=True).epsilon
                <= target
            ),
            0.05,
            500.0,
            1e-3,
        )
    except CalibrationError as exc:
        raise BudgetExceededError(str(exc)) from None


def _epsilon(ledger, quick: bool) -> float:
    from dpray.privacy.ledger import compose

    return compose(list(ledger.events), ledger.target_delta, fast=quick).epsilon


def _lora_dim(config: DprayConfig) -> int | None:
    """Trainable LoRA parameters, from the model's config.json only (no weights)."""
    from dpray.models.loader import existing_model_dir

    folder = existing_model_dir(config.train.model)
    if folder is None or not (folder / "config.json").is_file():
        return None
    cfg = json.loads((folder / "config.json").read_text())
    hidden = cfg.get("hidden_size")
    layers = cfg.get("num_hidden_layers")
    heads = cfg.get("num_attention_heads")
    if not (hidden and layers and heads):
        return None
    head_dim = cfg.get("head_dim") or hidden // heads
    kv = cfg.get("num_key_value_heads") or heads
    inter = cfg.get("intermediate_size") or 4 * hidden
    shapes = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv * head_dim),
        "v_proj": (hidden, kv * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    if any(t not in shapes for t in config.train.lora_targets):
        return None
    r = config.train.lora_r
    return layers * sum(r * sum(shapes[t]) for t in config.train.lora_targets)


def plan_dp(config: DprayConfig, n: int, run_root: Path, quick: bool) -> dict[str, dict]:
    """The DP parameters each spending stage would record, in pipeline order."""
    from dpray.privacy.mechanisms.gaussian import subsampled_gaussian_event
    from dpray.stages.filter.stage import resolve_sigma

    ledger = _ledger(config, run_root, n)
    share = config.privacy.train_share
    out: dict[str, dict] = {}
    strategy = config.generator.resolved_strategy(config.train.use_gpu)
    spent_before = _epsilon(ledger, quick) if ledger.events else 0.0
    if strategy == "dp_finetune":
        tc = config.train
        q = min(1.0, tc.expected_batch_size / n)
        steps = tc.steps or max(1, math.ceil(tc.epochs / q))
        planned = steps + tc.max_failures * tc.checkpoint_every
        noise = tc.noise if tc.noise != "auto" else ("secure" if tc.num_workers > 1 else "central")
        dim = _lora_dim(config) if noise == "secure" else None
        if noise == "secure" and dim is None:
            out["train-generator"] = {
                "q": f"{q:.4g}",
                "steps": f"{steps} (+{planned - steps} restart headroom)",
                "sigma": "solved at run time (secure noise needs the LoRA size; the model is "
                "not resolved on this machine yet)",
                "delta": f"{ledger.target_delta:.3g}",
            }
            out["filter"] = {"sigma": "solved at run time (after training's secure noise)"}
            return out
        else:

            def make_event(sigma: float):
                if noise != "secure":
                    return subsampled_gaussian_event("train-generator", sigma, q, planned)
                return _skellam_event(config, sigma, q, planned, dim, n)

            sigma = tc.noise_multiplier
            if sigma is None:
                sigma = _solve(make_event, share * ledger.target_epsilon, ledger, quick)
            ledger.events = (*ledger.events, make_event(sigma))
            out["train-generator"] = {
                "sigma": f"{sigma:.4g}",
                "q": f"{q:.4g}",
                "steps": f"{steps} (+{planned - steps} restart headroom)",
                "noise": noise,
                "epsilon": f"{_epsilon(ledger, quick) - spent_before:.4g}",
                "delta": f"{ledger.target_delta:.3g}",
            }
    elif strategy == "private_evolution":
        from dpray.stages.train_generator.strategies.private_evolution import round_event

        rounds = config.generator.pe_rounds
        mult = _solve(
            lambda m: round_event(m, rounds), share * ledger.target_epsilon, ledger, quick
        )
        ledger.events = (*ledger.events, round_event(mult, rounds))
        out["train-generator"] = {
            "sigma": f"{mult:.4g} (noise multiplier of each vote)",
            "rounds": str(rounds),
            "epsilon": f"{_epsilon(ledger, quick) - spent_before:.4g}",
            "delta": f"{ledger.target_delta:.3g}",
        }
    before_filter = _epsilon(ledger, quick) if ledger.events else 0.0
    from dpray.privacy.mechanisms.gaussian import gaussian_event
    from dpray.stages.filter import histogram

    def filter_event(multiplier: float):
        return gaussian_event("filter", multiplier * histogram.SENSITIVITY, histogram.SENSITIVITY)

    if quick and config.filter.sigma is None:
        sigma = _solve(filter_event, ledger.target_epsilon, ledger, quick) * histogram.SENSITIVITY
    else:
        sigma = resolve_sigma(config.filter.sigma, ledger)  # the stage's own calibration
    ledger.events = (*ledger.events, filter_event(sigma / histogram.SENSITIVITY))
    total = _epsilon(ledger, quick)
    out["filter"] = {
        "sigma": f"{sigma:.4g}",
        "epsilon": f"{total - before_filter:.4g}",
        "delta": f"{ledger.target_delta:.3g}",
        "total epsilon": f"{total:.4g} of {ledger.target_epsilon:g}",
    }
    if total > ledger.target_epsilon * (1 + 1e-9):
        from dpray.privacy.ledger import BudgetExceededError

        raise BudgetExceededError(
            f"the run would spend epsilon {total:.4g} > privacy.epsilon "
            f"{ledger.target_epsilon:g} (filter.sigma, train.noise_multiplier)"
        )
    return out


def _skellam_event(config: DprayConfig, sigma: float, q: float, steps: int, dim: int, n: int):
    """The secure-noise event, built as the workers build it (SecureAggConfig)."""
    from dpray.privacy.mechanisms.skellam import subsampled_skellam_event
    from dpray.privacy.secure_agg.aggregator import SecureAggConfig

    tc = config.train
    cfg = SecureAggConfig.create(
        dim=dim,
        num_workers=tc.num_workers,
        noise_multiplier=sigma,
        clip_norm=tc.clip_norm,
        max_norm=tc.clip_norm * max(1, n),
        bits=tc.secure_bits,
        min_honest_workers=tc.min_honest_workers,
    )
    return subsampled_skellam_event(
        "train-generator",
        noise_multiplier=sigma,
        sampling_rate=q,
        steps=steps,
        clip_norm=tc.clip_norm,
        scale=float(cfg.scale),
        bits=int(cfg.bits),
        dim=int(cfg.padded_dim),
        min_honest_workers=int(cfg.min_honest_workers),
    )


# ------------------------------------------------------------------------------- resources


@dataclass
class Ask:
    """One stage's request per worker/actor, and how many."""

    stage: str
    count: str
    cpus: float
    gpus: float
    workers: int = 1

    def text(self) -> str:
        if not self.cpus and not self.gpus:
            return self.count
        gpu = f", {self.gpus:g} GPU" if self.gpus else ""
        return f"{self.count} x ({self.cpus:g} CPU{gpu})"


def vllm_gpus(stage_config) -> float:
    """GPUs one generating actor asks for when the stage is set to vLLM: one engine spans
    ``tensor_parallel_size`` GPUs of one node (sample, annotate and evaluate alike; see
    ``dpray.stages.align.generate.actor_gpus``).  ``auto``/``hf`` pick their device from the
    nodes they land on, so they ask for no GPU a plan could check."""
    if getattr(stage_config, "backend", None) != "vllm":
        return 0.0
    return float(stage_config.tensor_parallel_size)


def asks(config: DprayConfig, stages: list[str]) -> dict[str, Ask]:
    strategy = config.generator.resolved_strategy(config.train.use_gpu)
    out: dict[str, Ask] = {}
    tc, sc = config.train, config.sample
    sample_gpus = vllm_gpus(sc)
    sample_count = str(sc.num_actors) if sc.num_actors else "one per GPU, else per core"
    for name in stages:
        if name == "train-generator" and strategy == "dp_finetune":
            ask = Ask(name, f"{tc.num_workers} DP-SGD worker(s)", 1, 1.0 if tc.use_gpu else 0)
            ask.workers = tc.num_workers
        elif name in ("train-generator", "sample"):
            ask = Ask(name, f"{sample_count} sampling actor(s)", 1, sample_gpus)
        elif name == "embed":
            count = str(config.embed.num_actors or "by cores")
            ask = Ask(name, f"{count} actor(s)", 1, 1.0 if config.embed.use_gpu else 0)
        elif name in ("sft", "reward", "ppo"):
            c = getattr(config, name)
            ask = Ask(name, f"{c.num_workers} Ray Train worker(s)", c.cpus_per_worker or 1, 0)
            ask.gpus, ask.workers = (1.0 if c.use_gpu else 0), c.num_workers
        elif name in ("annotate", "evaluate"):
            c = getattr(config, name)
            count = c.num_actors
            what = f"{count} generation actor(s)" if count else "generation actors (by GPUs/cores)"
            ask = Ask(name, what, 1, vllm_gpus(c))
        else:
            ask = Ask(name, "the driver", 0, 0)
        out[name] = ask
    return out


def parse_quantity(value) -> float:
    """A Kubernetes quantity (``8``, ``500m``, ``32Gi``, ``64G``) as a number (bytes for memory)."""
    text = str(value).strip()
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def manifest_shapes(path: str | Path) -> tuple[list[dict], dict]:
    """Worker node shapes ``{name, CPU, GPU, memory}`` and the head's, from a KubeRay manifest."""
    import yaml

    manifest = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    spec = manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]

    def shape(name: str, group: dict) -> dict:
        container = group["template"]["spec"]["containers"][0]
        res = container.get("resources", {})
        req = {**res.get("requests", {}), **res.get("limits", {})}
        params = group.get("rayStartParams") or {}
        cpus = parse_quantity(params.get("num-cpus", req.get("cpu", 0)))
        gpus = parse_quantity(params.get("num-gpus", req.get("nvidia.com/gpu", 0)))
        memory = parse_quantity(res.get("requests", {}).get("memory", req.get("memory", 0)))
        replicas = int(group.get("maxReplicas", group.get("replicas", 1)) or 1)
        return {"name": name, "CPU": cpus, "GPU": gpus, "memory": memory, "replicas": replicas}

    workers = [shape(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    return workers, shape("head", spec["headGroupSpec"])


def ray_node_shapes(address: str) -> list[dict]:
    """Alive nodes' resources, read from a running cluster (connects as a driver, briefly)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
    finally:
        if started:
            ray.shutdown()
    return [
        {
            "name": n.get("NodeManagerAddress", "node"),
            "CPU": n["Resources"].get("CPU", 0),
            "GPU": n["Resources"].get("GPU", 0),
            "memory": n["Resources"].get("memory", 0),
        }
        for n in nodes
    ]


def check_shapes(requests: dict[str, Ask], shapes: list[dict]) -> list[Exception]:
    """Each stage's workers fit the node shapes (else Ray waits for them forever), by
    :func:`dpray.resources.fit_workers`, the check the stages make once connected."""
    from dpray.errors import ResourceError
    from dpray.resources import NodeShape, fit_workers
    from dpray.resources import ResourceError as NoFit

    nodes = [
        NodeShape(cpus=float(s["CPU"]), gpus=float(s["GPU"]))
        for s in shapes
        for _ in range(int(s.get("replicas", 1)))
    ]
    problems: list[Exception] = []
    for ask in requests.values():
        if not ask.cpus and not ask.gpus:
            continue
        try:
            fit_workers(ask.stage, ask.workers, gpus=ask.gpus, cpus=int(ask.cpus), nodes=nodes)
        except NoFit as exc:
            problems.append(ResourceError(str(exc)))
    return problems


# ---------------------------------------------------------------------------- estimates


def _bench(name: str) -> dict | None:
    path = BENCHMARKS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _same_config(config: DprayConfig, reference: str) -> bool:
    from dpray.config import load_config

    path = Path(__file__).resolve().parents[1] / reference
    if not path.is_file():
        return False
    ref = load_config(path).model_dump(mode="json")
    mine = config.model_dump(mode="json")
    for tree in (ref, mine):
        tree.pop("run_dir", None)
        tree.pop("ray", None)
    return ref == mine


def estimates(config: DprayConfig, n: int | None, stages: list[str]) -> dict[str, str]:
    """Seconds per stage where a benchmark measured these settings, with its source."""
    out: dict[str, str] = {}
    e2e = _bench("e2e")
    if e2e and _same_config(config, e2e["config"]["config"]):
        cpus = e2e["config"].get("cpus")
        for name, seconds in e2e["figures"]["stage_seconds"].items():
            out[name] = f"~{seconds:.0f} s on {cpus} CPUs (benchmarks/results/e2e.json)"
        return out
    strategy = config.generator.resolved_strategy(config.train.use_gpu)
    tc = config.train
    step = _bench("train_step")
    if (
        step
        and strategy == "dp_finetune"
        and not tc.use_gpu
        and tc.model == step["config"]["model"]
        and n
    ):
        per_example = (
            step["figures"]["single_process"]["seconds"]["dp_hooks"] / step["config"]["batch"]
        )
        q = min(1.0, tc.expected_batch_size / n)
        steps = tc.steps or max(1, math.ceil(tc.epochs / q))
        tokens = tc.max_tokens / step["config"]["tokens"]
        seconds = steps * q * n * per_example * tokens / tc.num_workers
        cpus = step["config"]["threads"]
        out["train-generator"] = (
            f"~{_duration(seconds)} ({cpus} CPU threads per worker; "
            "benchmarks/results/train_step.json)"
        )
    sample = _bench("sample")
    sc = config.sample
    if sample and sc.backend != "vllm" and tc.model == sample["config"]["model"]:
        rate = sample["figures"]["hf_batch32_samples_per_s"]
        draws = sc.num_samples * sc.oversample * sc.max_new_tokens / sample["config"]["new_tokens"]
        out["sample"] = (
            f"~{_duration(draws / rate)} on {sample['config']['threads']} CPU threads "
            "(benchmarks/results/sample.json, hf backend)"
        )
    embed = _bench("embed")
    if embed and not config.embed.use_gpu and config.embed.model == embed["config"]["model"] and n:
        rate = embed["figures"]["ray"]["per_second"]
        out["embed"] = (
            f"~{_duration((n + sc.num_samples) / rate)} on {embed['config']['cpus']} CPUs "
            "(benchmarks/results/embed.json)"
        )
    sizes = {}
    for name in ("filter", "filter_1m", "filter_scale"):
        bench = _bench(name)
        if bench:
            for size, fig in bench["figures"]["sizes"].items():
                sizes[int(size)] = fig["filter"]["seconds"]
    if sizes and config.filter.method == "cluster":
        nearest = min(sizes, key=lambda s: abs(math.log(s) - math.log(max(sc.num_samples, 1))))
        out["filter"] = (
            f"~{_duration(sizes[nearest])} (measured at {nearest} candidates on 2 CPUs; "
            "benchmarks/results/filter*.json)"
        )
    return out


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _bytes(value: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def outputs(config: DprayConfig, n: int | None, data_bytes: int, stages: list[str]) -> dict:
    sc, fc = config.sample, config.filter
    text = sc.max_new_tokens * 4  # ~4 characters per token
    dim = _lora_dim(config)
    out = {
        "ingest": f"~{n if n is not None else '?'} records (private/ingest/, "
        f"≤ {_bytes(data_bytes)} of input)",
        "train-generator": (
            f"LoRA adapter ~{_bytes(dim * 4)} ({dim} parameters)"
            if dim
            else "LoRA adapter (size from the model at run time)"
        )
        + " or a generator.json",
        "sample": f"{sc.num_samples} instructions, ≤ {_bytes(sc.num_samples * text)} of text",
        "embed": f"{(n or 0) + sc.num_samples} vectors, ~{_bytes(((n or 0) + sc.num_samples) * 384 * 4)} (384-d float32)",
        "filter": f"{fc.target_size} instructions",
        "annotate": f"≤ {fc.target_size} pairs",
        "sft": "a model (LoRA adapter or full weights)",
        "reward": "a reward model",
        "ppo": "a policy model",
        "evaluate": f"{config.evaluate.max_instructions} answers per model",
        "report": "report/index.html",
    }
    return {name: out.get(name, "") for name in stages}


REAL_VECTOR_BYTES = 6 * 384 * 4
"""Driver bytes per real record in the DP filter: its vector, the projected copy and distances
(real records are assigned on the driver only; their exact counts never leave it)."""
CANDIDATE_ID_BYTES = 64
"""Driver bytes per candidate in the DP filter: its sample id and selection bookkeeping (the
vectors themselves stream from disk chunk by chunk, ``filter.chunk_size`` rows at a time)."""


def filter_memory_gib(n_real: int, candidates: int) -> tuple[float, str]:
    """The DP filter's peak on the driver: bounded by its chunk and models, not by the number of
    candidates (:mod:`dpray.stages.filter.rows`).  The bound is the peak
    ``python -m benchmarks.filter --scale`` measured at its largest size (10M candidates and
    100k real: 1.0 GB), plus the real records beyond the benchmark's and every candidate's id."""
    bounded, bench_real = 1.0 * GIB, 100_000
    bench = _bench("filter_scale")
    if bench:
        sizes = bench["figures"]["sizes"]
        largest = max(sizes, key=int)
        bounded = sizes[largest]["filter"]["peak_rss_mb"] * 2**20
        bench_real = int(bench["config"]["real"])
    total = bounded + max(0, n_real - bench_real) * REAL_VECTOR_BYTES
    total += candidates * CANDIDATE_ID_BYTES
    return total / GIB, f"the DP filter's {n_real} real + {candidates} streamed candidates"


def driver_memory(config: DprayConfig, n: int | None, data_bytes: int, stages: list[str]) -> dict:
    """What the driver process holds: its imports, ingest's records, the DP filter's peak."""
    ingest = data_bytes * INGEST_BYTES_FACTOR / GIB if "ingest" in stages else 0.0
    filt, what = filter_memory_gib(n or 0, config.sample.num_samples)
    if "filter" not in stages:
        filt = 0.0
    gib = math.ceil((DRIVER_BASE_GIB + max(ingest, filt)) * 2) / 2
    head = math.ceil(gib + HEAD_RAY_GIB)
    return {
        "gib": gib,
        "why": f"{DRIVER_BASE_GIB:g} GiB imports and tokenizer, + ingest ~{ingest:.1f} GiB "
        f"or {what} ~{filt:.1f} GiB; no model weights",
        "head_request": f"{head}Gi",
    }


# ----------------------------------------------------------------------------------- main


def make_plan(
    config: DprayConfig,
    stages: list[str] | None = None,
    address: str | None = None,
    cluster: str | None = None,
    quick: bool = False,
) -> Plan:
    from dpray.preflight import problems, stages_to_run

    names = stages_to_run(config, stages)
    run_root = Path(config.run_dir).expanduser().resolve()
    plan = Plan(str(run_root))
    for problem in problems(config, names, run_root, local=cluster is None):
        plan.add_problem(problem)

    rows, size = None, 0
    try:
        counted = [count_rows(p) for p in config.data.paths]
        rows = None if any(r is None for r, _ in counted) else sum(r for r, _ in counted)
        size = sum(s for _, s in counted)
    except (OSError, ValueError):
        pass  # a missing or unreadable data.path is already a problem above
    n, how = _units(config, run_root, rows)
    plan.data = {
        "rows": rows,
        "bytes": size,
        "units": n,
        "summary": f"{rows if rows is not None else 'unknown number of'} rows, {_bytes(size)}; "
        f"privacy units: {n if n is not None else '?'} {how}",
    }

    dp: dict[str, dict] = {}
    if n is not None:
        try:
            dp = plan_dp(config, n, run_root, quick)
        except Exception as exc:  # noqa: BLE001 - budget and config problems are listed
            plan.add_problem(exc)
    else:
        plan.notes.append("DP parameters need the number of privacy units (data not counted)")
    if quick and dp:
        plan.notes.append("--quick: sigma from the RDP accountant (an upper bound of the PLD one)")

    requests = asks(config, names)
    times = estimates(config, n, names)
    sizes = outputs(config, n, size, names)
    for name in names:
        ask = requests[name]
        plan.stages.append(
            StagePlan(
                name=name,
                resources=ask.text(),
                dp=dp.get(name),
                outputs=sizes.get(name, ""),
                estimate=times.get(name, "no estimate"),
            )
        )
    plan.driver = driver_memory(config, n, size, names)

    shapes: list[dict] = []
    if address:
        try:
            shapes = ray_node_shapes(address)
            plan.nodes = f"{len(shapes)} alive node(s) at {address}"
        except Exception as exc:  # noqa: BLE001
            from dpray.errors import ClusterUnreachableError

            plan.add_problem(ClusterUnreachableError(f"{address}: {type(exc).__name__}"))
    elif cluster:
        shapes, head = manifest_shapes(cluster)
        plan.nodes = f"{len(shapes)} worker group(s) in {cluster}"
        need = parse_quantity(plan.driver["head_request"])
        if head["memory"] and head["memory"] < need:
            from dpray.errors import ResourceError

            plan.add_problem(
                ResourceError(
                    f"{cluster}: head pod memory {_bytes(head['memory'])} is below the "
                    f"{plan.driver['head_request']} the driver and Ray's head processes need"
                )
            )
    if shapes:
        for problem in check_shapes(requests, shapes):
            plan.add_problem(problem)
    return plan


__all__ = ["Plan", "StagePlan", "make_plan", "count_rows", "manifest_shapes", "ConfigError"]
