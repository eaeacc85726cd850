#!/usr/bin/env bash
# tests/test_gpu.py on a lent GPU machine, in one command (from the repository root):
#   bash scripts/gpu_tests.sh [PYTEST ARGS, e.g. -k dp_sgd]
# Installs the carried wheels of .whl/ (scripts/gpu_wheels.sh fetches them here; the device call
# names .whl in `carry`) into /tmp/site, prints the GPU and the versions, then runs the gpu-marked
# tests.  The log goes to $OUT/gpu_check.log when $OUT is set (the device tool brings it back).
# Not scripts/gpu_check.sh: that one runs the whole pipeline through Ray and vLLM.
# GPU_TESTS_TIMEOUT: seconds per test (pytest-timeout, default 420); GPU_TESTS_TOTAL: seconds
# for the whole pytest run (default 430), so the log's end is written before the call's limit.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO" || exit 1
LOG="${OUT:+$OUT/gpu_check.log}"
LOG="${LOG:-/tmp/gpu_check.log}"
SITE=/tmp/site

main() {
  start=$SECONDS
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/*.whl || return 1
  fi
  export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  if ! python3 -c "import pydantic" 2>/dev/null && compgen -G ".whl/fallback/*.whl" >/dev/null; then
    echo "pydantic does not import with this machine's typing_extensions: installing the fallback"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/fallback/*.whl || return 1
  fi
  echo "wheels installed in $((SECONDS - start)) s"

  nvidia-smi || echo "nvidia-smi failed"
  python3 - <<'EOF'
import importlib
import sys

import torch

print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| available", torch.cuda.is_available(), "| devices", torch.cuda.device_count())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0),
          "| bf16", torch.cuda.is_bf16_supported())
for name in ("transformers", "peft", "accelerate", "sentence_transformers", "tokenizers",
             "pyarrow", "typing_extensions", "attr", "pydantic", "opacus", "dp_accounting",
             "cryptography", "datasets", "trl", "deepspeed"):
    try:
        module = importlib.import_module(name)
        print(f"  {name} {getattr(module, '__version__', '?')} ({module.__file__})")
    except Exception as exc:  # report, and let the tests say what it breaks
        print(f"  {name}: {type(exc).__name__}: {exc}")
EOF

  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
  export TOKENIZERS_PARALLELISM=false TRL_EXPERIMENTAL_SILENCE=1
  timeout -k 10 "${GPU_TESTS_TOTAL:-430}" python3 -m pytest -q -s -m gpu tests/test_gpu.py \
    -p no:cacheprovider --timeout "${GPU_TESTS_TIMEOUT:-420}" -rA "$@"
  rc=$?
  echo "pytest exit $rc after $((SECONDS - start)) s"
  return $rc
}

main "$@" 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
