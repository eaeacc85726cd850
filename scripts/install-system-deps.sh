#!/usr/bin/env bash
# Install the system packages dpray's test suite needs beyond pip: headless Chromium, which
# tests/test_report.py uses to render the HTML report (marker `browser`).
#
# Why a script: the README's test command (which .ci/run runs verbatim) must pass on a fresh
# machine as written, and pip cannot install a browser. It does nothing when Chromium is already
# on PATH, so running it on every test run costs nothing.
#
# Supported: Debian/Ubuntu (apt-get; as root, or through sudo). Elsewhere it stops with a
# one-line message saying what to install, instead of a test failing 25 minutes later.
# Usage: bash scripts/install-system-deps.sh
set -euo pipefail

log() { printf '[install-system-deps] %s\n' "$*" >&2; }

have_chromium() { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }

if have_chromium; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  log "chromium is not installed and apt-get is not available: install Chromium (a \`chromium\` or \`chromium-browser\` on PATH) and rerun"
  exit 1
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    log "chromium is not installed; run as root (or install sudo): apt-get install chromium"
    exit 1
  fi
  SUDO=(sudo)
fi
log "installing chromium with apt-get (headless report rendering test)"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q >/dev/null
# Debian names the package chromium; Ubuntu's is chromium-browser.
"${SUDO[@]}" apt-get install -y -q chromium >/dev/null \
  || "${SUDO[@]}" apt-get install -y -q chromium-browser >/dev/null
if ! have_chromium; then
  log "apt-get finished but no chromium is on PATH; install Chromium by hand and rerun"
  exit 1
fi
log "chromium installed: $(command -v chromium || command -v chromium-browser)"
