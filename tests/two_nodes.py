"""Run one driver script against a two-worker-node local Ray cluster (``cluster/local.sh``).

Shared by the multi-node tests of the filter and the embed stage: start the cluster (1 CPU per
worker node, a small object store, no dashboard), run ``python -c CODE`` as a client joined
through the cluster's address and auth token, stop the cluster in a ``finally`` and check that no
process of its sessions is left.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.test_local_cluster import (
    local_cluster_env,
    read_state,
    session_pids,
    short_state_dir,
)

REPO = Path(__file__).resolve().parents[1]
LOCAL_SH = REPO / "cluster" / "local.sh"


def run_driver_on_two_nodes(tmp_path: Path, code: str) -> None:
    """Run ``code`` as a driver on two 1-CPU worker nodes; assert it and the teardown succeed."""
    state_dir = short_state_dir()
    env = local_cluster_env(
        state_dir,
        DPRAY_LOCAL_WORKER_CPUS="1",
        DPRAY_LOCAL_OBJECT_STORE_BYTES=str(128 * 1024**2),
        DPRAY_LOCAL_DASHBOARD="false",
    )

    def local(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(LOCAL_SH), *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )

    state: dict = {}
    timings: dict[str, float] = {}
    start = time.monotonic()
    try:
        up = local("up", "--workers", "2")
        timings["up"] = time.monotonic() - start
        assert up.returncode == 0, up.stdout + up.stderr
        state = read_state(state_dir / "local.state")
        client_env = env | {
            "RAY_ADDRESS": state["RAY_LOCAL_GCS"],
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(state_dir / "auth_token"),
            "PYTHONPATH": str(REPO),  # the workers import dpray through the driver's sys.path
        }
        done = subprocess.run(
            [sys.executable, "-c", code],
            env=client_env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        timings["driver"] = time.monotonic() - start - timings["up"]
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    finally:
        lap = time.monotonic()
        down = local("down")
        timings["down"] = time.monotonic() - lap
        sids = [state.get("RAY_LOCAL_SID"), *state.get("RAY_LOCAL_NODE_SIDS", "").split()]
        leftover = [pid for sid in sids if sid for pid in session_pids(sid)]
        shutil.rmtree(state_dir, ignore_errors=True)
        print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    assert down.returncode == 0, down.stdout + down.stderr
    assert leftover == [], f"left running: {leftover}"
