"""Sampling throughput: batched hf ÷ a naive one-prompt-at-a-time loop, and vLLM ÷ batched hf.

Everything runs on one model, one prompt (the generator's: BOS, no template) and one set of
sampling settings (temperature 1, top_p 0.95, no top-k, 32 new tokens).  The hf cases are
interleaved (naive, batch 32, batch 64, naive, ...) and medians are reported, so background load
on a shared machine hits every case alike and the ratios stay honest.

* naive: ``model.generate`` on one prompt at a time (what a simple script does);
* batched hf: :class:`dpray.stages.sample.hf.HFSampler` (left padding, KV cache, inference mode,
  merged adapter) at batch sizes 32 and 64;
* vLLM: :class:`dpray.stages.sample.vllm_backend.VLLMSampler` in the separate environment of
  ``scripts/setup_vllm_cpu.sh`` (run as a subprocess of this script; skipped when absent).
  Engine start-up is timed separately and not counted in samples/s.
* with ``--adapter`` and ``--vllm-adapter-modes``: vLLM serving the adapter as a LoRA request
  vs merged into the base once (``sample.merge_adapter``), both with the fused sampler,
  alternating, each in a fresh engine: ``merged_over_lora`` says which is faster.

Usage: ``python -m benchmarks.sample [--model SPEC] [--adapter DIR] [--repeats 3]``.
Writes ``benchmarks/results/sample.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
# Team anchors measured earlier on this kind of machine (SmolLM2-135M, 32 new tokens).
ANCHORS = {"batch32_vs_naive": 7.9, "batch64_vs_naive": 9.1, "batch64_samples_per_s": 6.4}


def settings(args, batch_size: int):
    from dpray.stages.sample.backends import SamplingSettings

    return SamplingSettings(
        temperature=1.0,
        top_p=0.95,
        top_k=0,
        max_new_tokens=args.new_tokens,
        batch_size=batch_size,
        threads=args.threads,
    )


def spec_for(args):
    """A generator spec for the benchmark model: BOS as the prompt, like the trained generator."""
    from transformers import AutoTokenizer

    from dpray.models import resolve_causal_lm
    from dpray.stages.sample.backends import GeneratorSpec
    from dpray.stages.train_generator.data import generator_prompt_ids

    base = resolve_causal_lm(args.model)
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    rank = 8
    if args.adapter:
        rank = int(json.loads((Path(args.adapter) / "adapter_config.json").read_text())["r"])
    return GeneratorSpec(
        base_model=args.model or "packaged:smollm2",
        base_path=str(base),
        adapter_dir=args.adapter or "",
        prompt_ids=tuple(generator_prompt_ids(tokenizer, "")),
        template="",
        adapter_sha256="benchmark",
        lora_r=rank,
    )


def run_hf(args, spec) -> dict:
    """Interleaved naive and batched hf runs; medians of samples/s."""
    import torch

    from dpray.stages.sample.hf import HFSampler, load_merged_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_merged_model(spec.base_path, spec.adapter_dir or None, "cpu")
    samplers = {
        bs: HFSampler(spec, settings(args, bs), model=(model, tokenizer)) for bs in (32, 64)
    }
    any_sampler = samplers[32]
    prompt = list(spec.prompt_ids)

    def naive(seed: int) -> int:
        for i in range(args.naive_prompts):
            torch.manual_seed(seed + i)
            ids = torch.tensor([prompt])
            with torch.inference_mode():
                model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    generation_config=any_sampler.generation_config,
                )
        return args.naive_prompts

    def batched(bs: int, seed: int) -> int:
        return len(samplers[bs].generate_batch([prompt] * bs, seed))

    cases = {
        "naive": naive,
        "hf_batch32": lambda seed: batched(32, seed),
        "hf_batch64": lambda seed: batched(64, seed),
    }
    batched(32, 10**6)  # warm-up: first-call allocations, thread pools
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for rep in range(args.repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            count = fn(1000 * rep)
            rates[name].append(count / (time.perf_counter() - start))
            print(f"  rep {rep + 1}/{args.repeats} {name}: {rates[name][-1]:.2f} samples/s")
    return {
        name: {"samples_per_s": values, "median": statistics.median(values)}
        for name, values in rates.items()
    }


def run_vllm(args, spec, merge: bool | None = None) -> dict:
    """Run this script's ``--vllm-worker`` mode in the vLLM environment; parse its JSON line.

    ``merge`` (an adapter given): True merges it into the base, False serves it as a LoRA
    request, both with vLLM's fused sampler; None keeps the backend's defaults."""
    python = Path(args.vllm_python)
    if not python.exists():
        return {"skipped": f"{python} not found (scripts/setup_vllm_cpu.sh builds it)"}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(spec.to_dict(), handle)
    cmd = [
        str(python),
        "-m",
        "benchmarks.sample",
        "--vllm-worker",
        handle.name,
        "--vllm-samples",
        str(args.vllm_samples),
        "--new-tokens",
        str(args.new_tokens),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if merge is not None:
        cmd += ["--merge", "on" if merge else "off"]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    finally:
        os.unlink(handle.name)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("VLLM_RESULT "):
            return json.loads(line[len("VLLM_RESULT ") :])
    return {"failed": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}


def vllm_worker(args) -> None:
    """Inside the vLLM environment: start the engine, time one generate over N prompts."""
    from importlib import metadata

    from dpray.stages.sample.backends import GeneratorSpec
    from dpray.stages.sample.vllm_backend import VLLMSampler

    spec = GeneratorSpec.from_dict(json.loads(Path(args.vllm_worker).read_text()))
    if args.threads:  # the same cores as the hf cases (vllm-cpu binds its OpenMP threads)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    chosen = settings(args, 32)
    if args.merge is not None:  # the fused sampler in both modes: only the adapter differs
        chosen = replace(chosen, merge_adapter=args.merge == "on", deterministic=False)
    start = time.perf_counter()
    sampler = VLLMSampler(spec, chosen)
    startup = time.perf_counter() - start
    prompt = list(spec.prompt_ids)
    sampler.sample(prompt, 8, seed=10**6)  # warm-up
    start = time.perf_counter()
    out = sampler.sample(prompt, args.vllm_samples, seed=0)
    seconds = time.perf_counter() - start
    result = {
        "samples": len(out),
        "seconds": round(seconds, 3),
        "samples_per_s": len(out) / seconds,
        "startup_s": round(startup, 1),
        "merged_adapter": bool(spec.adapter_dir and chosen.merge_adapter),
        "vllm": next((metadata.version(d) for d in ("vllm-cpu", "vllm") if _installed(d)), None),
        "torch": metadata.version("torch"),
    }
    print("VLLM_RESULT " + json.dumps(result), flush=True)


def _installed(dist: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def adapter_modes(args, spec) -> dict:
    """vLLM with the adapter merged vs as a LoRA request, alternating rounds (medians)."""
    runs: dict[str, list[dict]] = {"merged": [], "lora_request": []}
    for _ in range(args.vllm_adapter_modes):
        for name, merge in (("lora_request", False), ("merged", True)):
            result = run_vllm(args, spec, merge=merge)
            if "samples_per_s" not in result:
                return {"failed": name, **result}
            runs[name].append(result)
            print(f"  vLLM {name}: {result['samples_per_s']:.2f} samples/s", flush=True)
    out: dict = {
        name: {
            "samples_per_s": [r["samples_per_s"] for r in results],
            "median": statistics.median(r["samples_per_s"] for r in results),
            "startup_s": [r["startup_s"] for r in results],
        }
        for name, results in runs.items()
    }
    out["merged_over_lora"] = out["merged"]["median"] / out["lora_request"]["median"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="generator spec (default packaged SmolLM2)")
    parser.add_argument("--adapter", default=None, help="a PEFT LoRA adapter dir to merge")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-prompts", type=int, default=6, help="prompts per naive run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default all)")
    parser.add_argument(
        "--vllm",
        choices=("auto", "off"),
        default="auto",
        help="auto: run the vLLM case when its environment exists",
    )
    parser.add_argument("--vllm-python", default=str(DEFAULT_VLLM_PYTHON))
    parser.add_argument("--vllm-samples", type=int, default=128)
    parser.add_argument(
        "--vllm-adapter-modes",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="with --adapter: ROUNDS alternating vLLM runs with the adapter merged and as a "
        "LoRA request (0: off)",
    )
    parser.add_argument("--name", default="sample", help="result file name")
    parser.add_argument("--vllm-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--merge", choices=("on", "off"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.vllm_worker:
        vllm_worker(args)
        return

    import torch

    from benchmarks.common import print_table, write_result

    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    spec = spec_for(args)
    print(
        f"model {spec.base_path}, {args.new_tokens} new tokens, {torch.get_num_threads()} threads"
    )
    hf = run_hf(args, spec)
    naive = hf["naive"]["median"]
    figures: dict = {
        "naive_samples_per_s": naive,
        "hf_batch32_samples_per_s": hf["hf_batch32"]["median"],
        "hf_batch64_samples_per_s": hf["hf_batch64"]["median"],
        "batch32_vs_naive": hf["hf_batch32"]["median"] / naive,
        "batch64_vs_naive": hf["hf_batch64"]["median"] / naive,
        "runs": hf,
        "anchors": ANCHORS,
    }
    best_hf = max(figures["hf_batch32_samples_per_s"], figures["hf_batch64_samples_per_s"])
    vllm = run_vllm(args, spec) if args.vllm == "auto" else {"skipped": "--vllm off"}
    figures["vllm"] = vllm
    if "samples_per_s" in vllm:
        figures["vllm_vs_best_hf"] = vllm["samples_per_s"] / best_hf
    if args.vllm_adapter_modes and args.adapter and args.vllm == "auto":
        figures["vllm_adapter"] = adapter_modes(args, spec)
    config = {
        "model": spec.base_model,
        "adapter": args.adapter,
        "new_tokens": args.new_tokens,
        "temperature": 1.0,
        "top_p": 0.95,
        "top_k": 0,
        "repeats": args.repeats,
        "naive_prompts": args.naive_prompts,
        "vllm_samples": args.vllm_samples,
        "vllm_adapter_modes": args.vllm_adapter_modes,
        "threads": torch.get_num_threads(),
        # Other work on the machine skews absolute figures (less so the interleaved ratios).
        "loadavg_1m_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
    }
    path = write_result(args.name, figures, config)
    rows = [
        ("naive loop", f"{naive:.2f} samples/s"),
        (
            "hf batch 32",
            f"{figures['hf_batch32_samples_per_s']:.2f} samples/s  "
            f"({figures['batch32_vs_naive']:.1f}x naive; anchor {ANCHORS['batch32_vs_naive']}x)",
        ),
        (
            "hf batch 64",
            f"{figures['hf_batch64_samples_per_s']:.2f} samples/s  "
            f"({figures['batch64_vs_naive']:.1f}x naive; anchor {ANCHORS['batch64_vs_naive']}x)",
        ),
    ]
    if "samples_per_s" in vllm:
        rows.append(
            (
                "vLLM (CPU)" if not torch.cuda.is_available() else "vLLM",
                f"{vllm['samples_per_s']:.2f} samples/s  ({figures['vllm_vs_best_hf']:.2f}x "
                f"best hf; engine start {vllm['startup_s']} s, not counted)",
            )
        )
    else:
        rows.append(("vLLM", json.dumps({k: v for k, v in vllm.items() if k != "stderr_tail"})))
    modes = figures.get("vllm_adapter")
    if modes and "merged_over_lora" in modes:
        rows.append(
            (
                "vLLM adapter merged vs LoRA request",
                f"{modes['merged']['median']:.2f} vs {modes['lora_request']['median']:.2f} "
                f"samples/s ({modes['merged_over_lora']:.2f}x)",
            )
        )
    print_table("sampling throughput (median of interleaved runs)", rows)
    print(f"\nwrote {path.relative_to(REPO)}")


if __name__ == "__main__":  # vLLM spawns processes: the guard keeps them from re-running main
    sys.exit(main())
