#!/usr/bin/env bash
# The wheels the lent GPU machine lacks for tests/test_gpu.py, into .whl/ (git-ignored; carried
# with `carry: [".whl"]`).  That machine has torch, transformers, peft, accelerate,
# sentence-transformers, tokenizers, numpy, scipy, pyarrow, pandas, pytest(-timeout) and more
# (see the device notes' KINDS.md), but no pydantic, opacus, dp-accounting, cryptography, trl,
# datasets or deepspeed, and it cannot download anything.  Idempotent: a wheel already in .whl/
# is not fetched again.  Never add torch, transformers, numpy or another package the machine
# already has: installed with --upgrade --target they would shadow its own builds.
#   bash scripts/gpu_wheels.sh      # then, on the device: bash scripts/gpu_tests.sh
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
mkdir -p .whl

# name==version (one version each); every Requires-Dist of these that the machine lacks is here.
WHEELS=(
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
  opacus==1.6.0
  dp-accounting==0.6.0
  cryptography==48.0.0 cffi==2.0.0 pycparser==3.0
  trl==1.12.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  hjson==3.1.0
)
DEEPSPEED=0.19.8 # sdist only on PyPI: built here as a pure-Python wheel (no compiled ops)
# Installed there only if pydantic does not import without it (pydantic-core needs >= 4.14.1;
# the machine's own is very likely newer, and a carried one would shadow it).
FALLBACK=typing-extensions==4.15.0

have() { # is a wheel of this distribution (name==version) in .whl/ already?
  local name="${1%%==*}" version="${1##*==}"
  name="${name//-/_}"
  compgen -G ".whl/${name}-${version}-*.whl" >/dev/null ||
    compgen -G ".whl/${name,,}-${version}-*.whl" >/dev/null
}

download() { # download DIR SPEC...: binary wheels for CPython 3.12 on x86-64 Linux
  local dir="$1"
  shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_34_x86_64 --platform manylinux1_x86_64 -d "$dir" "$@" 2>&1 |
    { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

missing=()
for spec in "${WHEELS[@]}"; do
  have "$spec" || missing+=("$spec")
done
if ((${#missing[@]})); then
  download .whl "${missing[@]}"
fi
if ! compgen -G ".whl/fallback/typing_extensions-${FALLBACK##*==}-*.whl" >/dev/null; then
  download .whl/fallback "$FALLBACK"
fi
if ! have "deepspeed==$DEEPSPEED"; then
  DS_BUILD_OPS=0 nice -n 19 python3 -m pip wheel -q --no-deps --no-binary deepspeed \
    --no-build-isolation -w .whl "deepspeed==$DEEPSPEED" 2>&1 |
    { grep -v "is ignored: it is neither a file nor a directory" || true; }
fi

ls -1 .whl/*.whl .whl/fallback/*.whl
echo "total: $(du -ch .whl/*.whl .whl/fallback/*.whl | tail -1 | cut -f1)"
