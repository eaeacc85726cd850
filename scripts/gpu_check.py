"""The one prepared GPU check (#16): every GPU path of dpray, on one GPU, in about 8 minutes.

It is what a session with a lent GPU runs first.  It needs the repository and its install
commands only: data is the project's own demo corpus (``demo://``), models are the packaged
SmolLM2-135M-Instruct and MiniLM, and every step is a real ``dpray`` command on the recipe of
``jobs/smoke.yaml`` with GPU overrides:

1. DP-SGD, central noise, one worker on the GPU (``ingest,train-generator``);
2. DP-SGD, secure noise, two workers -- when the machine has two GPUs (NCCL places one rank per
   GPU, so one GPU cannot host both: the table says so);
3. sampling a few hundred instructions from the trained adapter with vLLM, then the same with
   HF transformers (``--force``: sampling spends no privacy) for the speed ratio;
4. embed, DP filter, annotate (vLLM teacher) and one DeepSpeed SFT step;
5. one reward-model step and one PPO step (DeepSpeed).

Peak GPU memory is sampled with ``nvidia-smi`` while each step runs.  The table goes to stdout
and ``OUT/gpu_check.json`` (``--out``, default ``$OUT`` when set, else ``runs/gpu-check``).

``--dry`` runs nowhere: it builds the same commands and configs and checks them with
``dpray plan`` against the GPU node shapes of ``cluster/rayjob-pipeline.yaml`` (no GPU, no
weights, seconds), then prints the table of what would run.  CI runs it
(``tests/test_gpu_check.py``).

    scripts/gpu_check.sh            # on a GPU machine
    scripts/gpu_check.sh --dry      # anywhere: the plumbing
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "jobs" / "smoke.yaml"
MANIFEST = REPO / "cluster" / "rayjob-pipeline.yaml"
STEP_TIMEOUT_S = 300

COMMON = [
    "data.path=demo://?n=2000&seed=1",
    "ray.num_cpus=null",
    "generator.strategy=dp_finetune",
    "train.model=packaged:smollm2",
    "train.use_gpu=true",
    "train.num_workers=1",
    "train.noise=central",
    "train.steps=6",
    "train.expected_batch_size=64",
    "train.micro_batch_size=32",
    "train.max_tokens=96",
    "train.checkpoint_every=6",
    "sample.backend=vllm",
    "sample.num_samples=400",
    "sample.max_new_tokens=64",
    "sample.drop_truncated=true",
    "sample.shard_size=400",
    "sample.num_actors=1",
    "embed.use_gpu=true",
    "embed.backend=sentence-transformers",
    "filter.num_clusters=8",
    "filter.target_size=100",
    "annotate.teacher=packaged:smollm2",
    "annotate.student=packaged:smollm2",
    "annotate.backend=vllm",
    "annotate.max_new_tokens=64",
    "sft.model=packaged:smollm2",
    "sft.use_gpu=true",
    "sft.deepspeed=2",
    "sft.max_steps=1",
    "reward.model=packaged:smollm2",
    "reward.use_gpu=true",
    "reward.max_steps=1",
    "ppo.use_gpu=true",
    "ppo.deepspeed=2",
    "ppo.max_steps=1",
]
SECURE = ["train.num_workers=2", "train.noise=secure"]


@dataclass
class Step:
    """One row of the table: a ``dpray`` command and what it measured."""

    name: str
    stages: str
    run_dir: str
    extra: list[str] = field(default_factory=list)
    force: bool = False
    needs_gpus: int = 1
    status: str = "pending"
    seconds: float | None = None
    stage_seconds: dict = field(default_factory=dict)
    peak_gpu_mib: int | None = None
    note: str = ""


def steps() -> list[Step]:
    return [
        Step("DP-SGD central, 1 worker", "ingest,train-generator", "central"),
        Step("DP-SGD secure, 2 workers", "ingest,train-generator", "secure", SECURE, needs_gpus=2),
        Step("sample 400, vLLM", "sample", "central"),
        Step("sample 400, HF", "sample", "central", ["sample.backend=hf"], force=True),
        Step("embed+filter+annotate+SFT (DeepSpeed)", "embed,filter,annotate,sft", "central"),
        Step("reward + PPO (DeepSpeed)", "reward,ppo", "central"),
    ]


def dpray_command(verb: str, step: Step, work: Path) -> list[str]:
    cmd = [sys.executable, "-m", "dpray", verb, str(BASE_CONFIG)]
    cmd += ["--run-dir", str(work / step.run_dir), "--stages", step.stages]
    for item in [*COMMON, *step.extra]:
        cmd += ["--set", item]
    if verb == "run" and step.force:
        cmd.append("--force")
    return cmd


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


class GpuMemory:
    """Peak used GPU memory (MiB, all GPUs summed) sampled by ``nvidia-smi`` every 0.5 s."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> GpuMemory:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def _poll(self) -> None:
        query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            try:
                out = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout
                self.peak = max(self.peak, sum(int(v) for v in out.split() if v.isdigit()))
            except (OSError, subprocess.SubprocessError):
                return
            self._stop.wait(0.5)


def stage_seconds(run_dir: Path, stages: str) -> dict:
    """Wall seconds of each stage from the run's own ``timings/stages.json`` ({stage: s})."""
    path = run_dir / "timings" / "stages.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    return {name: round(float(timings[name]), 1) for name in stages.split(",") if name in timings}


def dp_step_seconds(run_dir: Path) -> float | None:
    """Median DP-SGD step time (demo data: the project's own corpus, nothing private)."""
    path = run_dir / "private" / "train" / "metrics.jsonl"
    if not path.exists():
        return None
    times = sorted(
        json.loads(line)["step_seconds"]
        for line in path.read_text().splitlines()
        if line.strip() and "step_seconds" in line
    )
    return round(times[len(times) // 2], 2) if times else None


def run_step(step: Step, work: Path, log: Path, gpus: int) -> None:
    if gpus < step.needs_gpus:
        step.status = "skipped"
        step.note = (
            f"needs {step.needs_gpus} GPUs, this machine has {gpus} (NCCL places one rank per GPU)"
        )
        return
    cmd = dpray_command("run", step, work)
    start = time.perf_counter()
    with GpuMemory() as memory, log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        try:
            code = subprocess.run(
                cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=STEP_TIMEOUT_S
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    step.seconds = round(time.perf_counter() - start, 1)
    step.peak_gpu_mib = memory.peak or None
    step.stage_seconds = stage_seconds(work / step.run_dir, step.stages)
    step.status = "ok" if code == 0 else f"failed ({code})"
    if "train-generator" in step.stages and code == 0:
        median = dp_step_seconds(work / step.run_dir)
        step.note = f"median DP step {median} s" if median is not None else ""


CHAIN = [
    "ingest",
    "train-generator",
    "sample",
    "embed",
    "filter",
    "annotate",
    "sft",
    "reward",
    "ppo",
]


def plan_steps(rows: list[Step], work: Path, log: Path) -> None:
    """``--dry``: each distinct config checked once by ``dpray plan`` on the GPU node shapes.

    Steps that share overrides share a plan of the stage chain up to their last stage (a
    stage-only plan would find no earlier output in the empty run directory).
    """
    groups: dict[tuple, list[Step]] = {}
    for step in rows:
        groups.setdefault((tuple(step.extra), step.run_dir), []).append(step)
    for group in groups.values():
        last = max(CHAIN.index(stage) for step in group for stage in step.stages.split(","))
        cmd = dpray_command("plan", group[0], work)
        cmd[cmd.index("--stages") + 1] = ",".join(CHAIN[: last + 1])
        cmd += ["--quick", "--cluster", str(MANIFEST)]
        with log.open("a") as out:
            out.write(f"\n$ {' '.join(cmd)}\n")
            out.flush()
            code = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
        for step in group:
            step.status = "planned" if code == 0 else f"plan failed ({code})"


def ratio_note(rows: list[Step]) -> str | None:
    by_name = {s.name: s for s in rows}
    vllm, hf = by_name.get("sample 400, vLLM"), by_name.get("sample 400, HF")
    if not (vllm and hf and vllm.status == hf.status == "ok"):
        return None
    v, h = vllm.stage_seconds.get("sample"), hf.stage_seconds.get("sample")
    if not v or not h:
        return None
    return f"vLLM sampling is {h / v:.1f}x HF ({v:.1f} s vs {h:.1f} s for 400 instructions)"


def table(rows: list[Step]) -> str:
    lines = [
        "| step | status | seconds | stage seconds | peak GPU MiB | note |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in rows:
        stages = ", ".join(f"{k} {v}" for k, v in s.stage_seconds.items())
        lines.append(
            f"| {s.name} | {s.status} | {s.seconds if s.seconds is not None else ''} | "
            f"{stages} | {s.peak_gpu_mib or ''} | {s.note} |"
        )
    return "\n".join(lines)


def environment() -> dict:
    info: dict = {"python": sys.version.split()[0]}
    for module in ("torch", "transformers", "ray", "vllm", "deepspeed", "trl", "peft", "opacus"):
        try:
            info[module] = __import__(module).__version__
        except Exception as error:  # absent or broken: say which
            info[module] = f"unavailable ({type(error).__name__})"
    try:
        import torch

        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["cuda"] = torch.version.cuda
    except Exception:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="plan every step; run nothing")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "runs" / "gpu-check"))
    parser.add_argument("--work", default=None, help="run directories (default OUT/../work)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else REPO / "runs" / "gpu-check-work"
    shutil.rmtree(work, ignore_errors=True)  # a fresh pipeline every time
    work.mkdir(parents=True)
    log = out / "gpu_check.log"
    log.write_text("")
    env = environment()
    gpus = gpu_count()
    print(f"gpu_check: {'dry (plan only)' if args.dry else f'{gpus} GPU(s)'}; {env}", flush=True)
    if not args.dry and gpus == 0:
        print("gpu_check: no GPU visible to torch; use --dry for the plumbing", file=sys.stderr)
        return 2
    rows = steps()
    started = time.perf_counter()
    if args.dry:
        plan_steps(rows, work, log)
    for step in rows:
        if not args.dry:
            run_step(step, work, log, gpus)
        print(f"gpu_check: {step.name}: {step.status} {step.seconds or ''}", flush=True)
    note = ratio_note(rows)
    result = {
        "dry": args.dry,
        "environment": env,
        "seconds": round(time.perf_counter() - started, 1),
        "steps": [s.__dict__ for s in rows],
        "vllm_over_hf": note,
    }
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    print(table(rows))
    if note:
        print(note)
    print(f"total {result['seconds']} s; log {log}; result {out / 'gpu_check.json'}")
    bad = [s for s in rows if s.status.startswith(("failed", "plan failed"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
