#!/usr/bin/env bash
# The one prepared GPU check (#16): DP-SGD (central; secure with two GPUs), vLLM vs HF sampling
# from the trained adapter, one DeepSpeed SFT step, one PPO step; prints a table.  ~8 min on one
# GPU.  --dry checks the plumbing anywhere (dpray plan on the GPU node shapes, seconds).
#   scripts/gpu_check.sh [--dry] [--out DIR]
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec python scripts/gpu_check.py "$@"
