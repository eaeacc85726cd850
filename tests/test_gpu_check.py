"""scripts/gpu_check.sh (#16 item 5): its dry mode plans every GPU step on the KubeRay GPU node
shapes, and the table it prints reads the runs' own timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import gpu_check  # noqa: E402


def test_dry_mode_plans_every_step(tmp_path: Path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run(
        [str(REPO / "scripts" / "gpu_check.sh"), "--dry", "--out", str(out), "--work", str(work)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["dry"] is True
    names = [s["name"] for s in result["steps"]]
    assert names == [s.name for s in gpu_check.steps()]
    assert {s["status"] for s in result["steps"]} == {"planned"}
    assert "| DP-SGD central, 1 worker | planned |" in proc.stdout
    log = (out / "gpu_check.log").read_text()
    assert "1 DP-SGD worker(s) x (1 CPU, 1 GPU)" in log  # planned on the GPU node shape
    assert "noise secure" in log
    assert not (work / "central" / "ledger.json").exists()  # a dry run runs nothing


def test_a_step_that_needs_two_gpus_says_so_on_one(tmp_path: Path):
    secure = next(s for s in gpu_check.steps() if s.needs_gpus == 2)
    gpu_check.run_step(secure, tmp_path, tmp_path / "log", gpus=1)
    assert secure.status == "skipped" and "needs 2 GPUs" in secure.note


def test_table_and_ratio_from_the_runs_timings(tmp_path: Path):
    rows = gpu_check.steps()
    vllm, hf = rows[2], rows[3]
    for step, seconds in ((vllm, 4.0), (hf, 30.0)):
        step.status, step.stage_seconds = "ok", {"sample": seconds}
    assert gpu_check.ratio_note(rows).startswith("vLLM sampling is 7.5x HF")
    run = tmp_path / "central"
    (run / "timings").mkdir(parents=True)
    (run / "timings" / "stages.json").write_text(json.dumps({"sample": 3.21, "embed": 9.0}))
    assert gpu_check.stage_seconds(run, "sample") == {"sample": 3.2}
    (run / "private" / "train").mkdir(parents=True)
    lines = [json.dumps({"step": i, "step_seconds": s}) for i, s in enumerate([3.0, 1.0, 2.0])]
    (run / "private" / "train" / "metrics.jsonl").write_text("\n".join(lines))
    assert gpu_check.dp_step_seconds(run) == 2.0
    assert "| sample 400, HF | ok |" in gpu_check.table(rows)
