"""Run the stage benchmarks, collect their results, print the headline ratios.

    python -m benchmarks                  # every benchmark at its default size (~15 min + quality)
    python -m benchmarks embed filter     # some of them
    python -m benchmarks filter_scale     # 1M-10M candidates out of core (by name only)
    python -m benchmarks --quick          # tiny sizes: a smoke check of the benchmarks themselves
    python -m benchmarks --list           # what would run, with which arguments

Each benchmark runs as ``python -m benchmarks.<module> ARGS`` in its own process, under a time
limit, and writes ``benchmarks/results/<name>.json`` (machine, versions, config, figures; every
ratio is measured against its baseline within that same run).  This runner then writes
``benchmarks/results/summary.json`` and prints each benchmark's headline ratios.  ``--quick``
leaves the full-size results alone: its results go to ``benchmarks/results/quick/`` and its summary
to ``benchmarks/results/summary-quick.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.common import RESULTS, machine

REPO = Path(__file__).resolve().parents[1]

# The suite, as data.  args: default sizes (all but `quality` together under 15 minutes on 2 CPU
# cores; `quality` runs two generate-and-filter pipelines on real data, about an hour);
# quick: seconds-sized; timeout: seconds at default size; headline: label -> dotted path into the
# result's "figures" (a ratio unless the label says otherwise).
BENCHMARKS: dict[str, dict] = {
    "train_step": {
        "module": "benchmarks.train_step",
        "what": "DP-SGD step vs plain LoRA step; secure vs central aggregation (2 workers)",
        "args": ["--repeats", "3"],  # SmolLM2-135M, 16 x 64 tokens
        "quick": ["--model", "tiny", "--repeats", "2"],
        "timeout": 420,
        "headline": {
            "DP step (Opacus hooks) / plain step": "single_process.ratio_dp_hooks_over_plain",
            "DP step (functorch) / plain step": "single_process.ratio_dp_functorch_over_plain",
            "secure / central aggregation step": "two_workers.ratio_secure_over_central",
        },
    },
    "sample": {
        "module": "benchmarks.sample",
        "what": "sampling throughput: batched hf vs a naive loop; vLLM vs batched hf",
        "args": ["--repeats", "2"],  # SmolLM2-135M; vLLM when .venv-vllm exists
        "quick": ["--model", "tiny:hidden=64", "--repeats", "1", "--naive-prompts", "2"]
        + ["--vllm", "off"],
        "timeout": 360,
        "headline": {
            "hf batch 32 / naive loop (samples/s)": "batch32_vs_naive",
            "hf batch 64 / naive loop (samples/s)": "batch64_vs_naive",
            "vLLM / best batched hf (samples/s)": "vllm_vs_best_hf",
        },
    },
    "embed": {
        "module": "benchmarks.embed",
        "what": "embedding: Ray Data pipeline of `dpray embed` vs bare model.encode",
        "args": ["--n", "3000"],
        "quick": ["--n", "200"],
        "timeout": 300,
        "headline": {"Ray pipeline / bare encode (texts/s)": "ray.ratio_to_bare"},
    },
    "filter": {
        "module": "benchmarks.filter",
        "what": "DP cluster filter vs bare faiss (PCA + k-means + assignment), and its growth",
        "args": ["--sizes", "30000,100000,300000", "--real", "30000"],
        "quick": ["--sizes", "5000,20000", "--real", "5000", "--k", "50"],
        "timeout": 300,
        "headline": {
            "filter / bare faiss, largest size (s)": "goals.filter_over_baseline_at_largest",
            "filter growth, smallest to largest size (s)": "growth.filter",
        },
    },
    "filter_scale": {
        "module": "benchmarks.filter",
        "what": "the out-of-core DP filter at 1M, 3M and 10M candidates (read from disk) vs bare "
        "faiss, peak RSS -- ~25 GB of disk and ~25 min: run by name only",
        "default": False,
        "args": ["--scale"],
        "quick": ["--scale", "--sizes", "20000,60000", "--real", "5000", "--k", "50"],
        "timeout": 3600,
        "headline": {
            "filter / bare faiss, largest size (s)": "goals.filter_over_baseline_at_largest",
            "filter peak RSS at the largest size (MB, not a ratio)": (
                "goals.filter_peak_rss_mb_at_largest"
            ),
            "filter growth, smallest to largest size (s)": "growth.filter",
        },
    },
    "quality": {
        "module": "benchmarks.quality",
        "what": "synthetic-instruction quality per generation strategy vs held-out real "
        "(probe accuracy, MAUVE, FED gap closed) at epsilon 4 -- the long one: about an hour per "
        "strategy and dataset at full size",
        # The suite's default: the in-the-wild mix, the two CPU strategies, 300 rows per set.
        "args": [
            "--datasets",
            "wild",
            "--strategies",
            "prompted",
            "private_evolution",
            "--n",
            "300",
            "--name",
            "quality_suite",
        ],
        "quick": ["--quick", "--datasets", "wild", "--strategies", "prompted"],
        "timeout": 5400,
        "headline": {
            "wild, prompted: filtered probe accuracy (0.5 = real)": (
                "wild.strategies.prompted.metrics.filtered.probe_accuracy"
            ),
            "wild, private_evolution: filtered probe accuracy (0.5 = real)": (
                "wild.strategies.private_evolution.metrics.filtered.probe_accuracy"
            ),
            "wild, real vs real probe accuracy": "wild.real_floor.probe_accuracy",
        },
    },
    "e2e": {
        "module": "benchmarks.e2e",
        "what": "`dpray run jobs/smoke.yaml` end to end: seconds per stage, no-op rerun",
        "args": [],
        "quick": ["--stages", "ingest,train-generator"],
        "timeout": 480,  # two pipeline runs: ~270 s on 2 idle cores
        "headline": {
            "total seconds (not a ratio)": "total_seconds",
            "no-op rerun / first run (s)": "rerun_over_first",
        },
    },
}


BY_NAME_ONLY = [name for name, spec in BENCHMARKS.items() if not spec.get("default", True)]
"""Benchmarks too big for the default suite (disk, time): they run when named."""


def dig(tree: object, dotted: str) -> object:
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _tee(stream, log) -> None:
    for line in stream:
        log.write(line)
        sys.stdout.write(line)
        sys.stdout.flush()


def run_one(name: str, spec: dict, quick: bool, log_dir: Path) -> dict:
    """Run one benchmark in a subprocess (its own process group, killed on timeout)."""
    args = spec["quick"] if quick else spec["args"]
    if importlib.util.find_spec(spec["module"]) is None:
        return {"status": f"missing: no module {spec['module']}", "seconds": 0.0, "args": args}
    timeout = 120 + spec["timeout"] // 3 if quick else spec["timeout"]
    result = RESULTS / f"{name}.json"
    backup = result.read_bytes() if quick and result.exists() else None
    cmd = [sys.executable, "-m", spec["module"], *args]
    log = log_dir / f"{name}.log"
    print(f"\n=== {name}: {' '.join(cmd[1:])}  (limit {timeout} s; log {log})", flush=True)
    start = time.time()
    status = "ok"
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        tee = threading.Thread(target=_tee, args=(proc.stdout, out), daemon=True)
        tee.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            status = f"timeout after {timeout} s"
            os.killpg(proc.pid, signal.SIGKILL)  # the process group of the process we started
            proc.wait()
        tee.join(timeout=10)
    seconds = time.time() - start
    if status == "ok" and proc.returncode != 0:
        status = f"failed (exit {proc.returncode})"
    fresh = result.exists() and result.stat().st_mtime >= start
    if status == "ok" and not fresh:
        status = f"no result written to {result.relative_to(REPO)}"
    entry: dict = {"status": status, "seconds": round(seconds, 1), "args": args}
    if fresh:
        data = json.loads(result.read_text())
        entry["headline"] = {
            label: dig(data["figures"], path) for label, path in spec["headline"].items()
        }
        entry["config"] = data.get("config")
        if quick:
            (RESULTS / "quick").mkdir(exist_ok=True)
            shutil.move(result, RESULTS / "quick" / result.name)
            entry["result"] = str((RESULTS / "quick" / result.name).relative_to(REPO))
        else:
            entry["result"] = str(result.relative_to(REPO))
    if backup is not None and not result.exists():
        result.write_bytes(backup)  # the full-size result stays where it was
    return entry


def fmt(value: object, label: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (int, float)):
        return f"{value:.1f}" if "not a ratio" in label else f"{value:.2f}x"
    return str(value)


def print_summary(summary: dict) -> None:
    rows = []
    for name, entry in summary["benchmarks"].items():
        first = (name, f"{entry['seconds']:.0f} s", entry["status"])
        headline = entry.get("headline") or {"": None}
        for i, (label, value) in enumerate(headline.items()):
            lead = first if i == 0 else ("", "", "")
            rows.append((*lead, label, fmt(value, label) if label else ""))
    head = ("benchmark", "time", "status", "headline", "value")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(5)]
    print(f"\nbenchmarks ({summary['mode']}; {summary['total_seconds']:.0f} s in all)")
    for row in [head, *rows]:
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "names",
        nargs="*",
        help=f"benchmarks to run (default all but {', '.join(BY_NAME_ONLY)}: {', '.join(BENCHMARKS)})",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, results under quick/")
    parser.add_argument("--list", action="store_true", help="print the suite and exit")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    names = args.names or [n for n in BENCHMARKS if n not in BY_NAME_ONLY]
    if args.list:
        for name in args.names or list(BENCHMARKS):
            spec = BENCHMARKS[name]
            run_args = spec["quick"] if args.quick else spec["args"]
            only = "  (by name only)" if name in BY_NAME_ONLY else ""
            print(
                f"{name:<12} python -m {spec['module']} {' '.join(run_args)}{only}\n"
                f"             {spec['what']}"
            )
        return 0

    RESULTS.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("DPRAY_CACHE_DIR", Path.home() / ".cache" / "dpray"))
    log_dir = cache / "benchmark-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    summary: dict = {
        "mode": "quick" if args.quick else "default",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(start)),
        "machine": machine(),
        "benchmarks": {},
    }
    for name in names:
        summary["benchmarks"][name] = run_one(name, BENCHMARKS[name], args.quick, log_dir)
        summary["total_seconds"] = round(time.time() - start, 1)
    path = RESULTS / ("summary-quick.json" if args.quick else "summary.json")
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    print(f"\nsummary: {path.relative_to(REPO)}")
    return 0 if all(e["status"] == "ok" for e in summary["benchmarks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
