"""End to end: `dpray run` on a small config, seconds per stage, and the cost of a no-op rerun.

Runs ``python -m dpray run CONFIG --run-dir TMP`` in a subprocess (a local Ray inside the run
directory, as a user would), reads the stage timings the pipeline records in
``RUN_DIR/timings/stages.json``, then runs the same command again: every stage is then skipped
(unchanged config and inputs), so the rerun measures the fixed cost (interpreter, imports,
fingerprints of the inputs) against a full run.

    python -m benchmarks.e2e                              # jobs/smoke.yaml, every stage
    python -m benchmarks.e2e --stages ingest,train-generator

Writes ``benchmarks/results/e2e.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import print_table, write_result

REPO = Path(__file__).resolve().parents[1]


def dpray_run(config: str, run_dir: Path, stages: str | None, log: Path) -> float:
    cmd = [sys.executable, "-m", "dpray", "run", config, "--run-dir", str(run_dir)]
    if stages:
        cmd += ["--stages", stages]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray, always
    start = time.perf_counter()
    with log.open("a") as out:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"dpray run failed (exit {done.returncode}); log tail:\n{tail}")
    return seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/smoke.yaml")
    parser.add_argument("--stages", default=None, help="comma-separated subset (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    args = parser.parse_args(argv)

    # short, private and not under the shared /tmp/ray: dpray puts Ray's session in the run dir
    root = Path.home() / ".cache" / "dpray"
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="e2e-", dir=root))
    run_dir = work / "run"
    log = work / "dpray.log"
    try:
        first = dpray_run(args.config, run_dir, args.stages, log)
        stages = json.loads((run_dir / "timings" / "stages.json").read_text())
        rerun = dpray_run(args.config, run_dir, args.stages, log)
        after = json.loads((run_dir / "timings" / "stages.json").read_text())
        if after != stages:
            raise SystemExit(f"the rerun was not a no-op: timings changed {stages} -> {after}")
    finally:
        if args.keep:
            print(f"run directory kept: {run_dir}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    in_stages = sum(stages.values())
    figures = {
        "stage_seconds": stages,
        "total_seconds": round(first, 2),
        "stage_share": {k: v / first for k, v in stages.items()},
        "outside_stages_seconds": round(first - in_stages, 2),
        "rerun_seconds": round(rerun, 2),
        "rerun_over_first": rerun / first,
    }
    config = {"config": args.config, "stages": args.stages or "all", "cpus": os.cpu_count()}
    path = write_result("e2e", figures, config)
    rows = [(name, f"{sec:8.1f} s  ({sec / first:5.1%})") for name, sec in stages.items()]
    rows += [
        ("outside stages (start-up, Ray)", f"{first - in_stages:8.1f} s"),
        ("total", f"{first:8.1f} s"),
        ("rerun, all skipped", f"{rerun:8.1f} s  ({rerun / first:.2f}x the first run)"),
    ]
    print_table(f"dpray run {args.config} (stages: {args.stages or 'all'})", rows)
    print(f"\nresults: {path}")
    return figures


if __name__ == "__main__":
    main()
