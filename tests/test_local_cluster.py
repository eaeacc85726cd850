"""cluster/local.sh: a loopback single-node Ray, the smoke job submitted to it, and a clean stop.

`local.sh up` starts Ray (own temp dir, own auth token, free ports, dashboard on 127.0.0.1); a Ray
job (`ray job submit`, which goes through the dashboard's job API) then plans the smoke config
against the cluster (`dpray plan --address auto`, which reads the alive nodes' shapes) and runs its
ingest stage; the job must succeed, the plan must have seen the one node, and the run directory
must hold the ingested data and an empty ledger.  `local.sh down` runs in a finally and must leave
no process of the session it started.  (Training and the whole pipeline on a cluster, through the
job API too, are ``tests/test_multinode.py``'s.)

The job API needs the dashboard, whose packages come with ``ray[default]``.  Where they are missing
the test says so and runs the same command as a driver that joins the cluster through
RAY_ADDRESS instead (what `dpray run --address auto` does on a cluster node).
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LOCAL_SH = REPO / "cluster" / "local.sh"
STAGES = "ingest"

pytestmark = pytest.mark.slow


def job_api_available() -> bool:
    try:
        importlib.import_module("ray.dashboard.modules.job.job_head")
    except ImportError:
        return False
    return True


def short_state_dir() -> Path:
    """A fresh directory short enough for Ray's unix socket paths (local.sh allows 48 chars)."""
    name = f"rl-{secrets.token_hex(4)}"
    candidate = Path.home() / ".cache" / "dpray" / name
    if len(str(candidate)) > 40:
        candidate = Path(tempfile.gettempdir()) / name
    return candidate


def session_pids(sid: str) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    return [int(pid) for pid, s in (line.split() for line in out.splitlines()) if s == sid]


def local_cluster_env(state_dir: Path, **settings: str) -> dict[str, str]:
    """The environment for ``cluster/local.sh`` and its clients: this process's, without an
    inherited Ray address or auth token, with the cluster state in ``state_dir``, no usage
    stats, and ``settings`` (``DPRAY_LOCAL_*``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.pop("RAY_API_SERVER_ADDRESS", None)
    env.update(
        PYTHON=sys.executable,
        DPRAY_LOCAL_RAY_DIR=str(state_dir),
        RAY_USAGE_STATS_ENABLED="0",
        **settings,
    )
    return env


def read_state(path: Path) -> dict:
    state = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition("=")
        state[key] = value.strip("'")
    return state


def test_smoke_job_on_local_cluster(tmp_path):
    state_dir = short_state_dir()
    env = local_cluster_env(
        state_dir,
        DPRAY_LOCAL_NUM_CPUS="2",  # the smoke config plans 2 training workers of 1 CPU each
        DPRAY_LOCAL_OBJECT_STORE_BYTES=str(512 * 1024**2),
    )
    use_job_api = job_api_available()
    env["DPRAY_LOCAL_DASHBOARD"] = "true" if use_job_api else "false"
    run_dir = tmp_path / "run"
    log = tmp_path / "job.log"
    state = {}

    def local(cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            ["bash", str(LOCAL_SH), cmd],
            env=env,
            cwd=tmp_path,  # the cluster must not depend on the directory it was started from
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check:
            assert done.returncode == 0, f"local.sh {cmd}: {done.stdout}\n{done.stderr}"
        return done

    try:
        local("up")
        state = read_state(state_dir / "local.state")
        assert state["RAY_LOCAL_GCS"].startswith("127.0.0.1:")
        assert session_pids(state["RAY_LOCAL_SID"]), "nothing running in the started session"
        assert local("status").stdout.startswith("running")

        smoke_yaml = str(REPO / "jobs" / "smoke.yaml")
        plan = f"{shlex.quote(sys.executable)} -m dpray plan {shlex.quote(smoke_yaml)}"
        plan += f" --run-dir {shlex.quote(str(run_dir))} --address auto --quick"
        run = f"{shlex.quote(sys.executable)} -m dpray run {shlex.quote(smoke_yaml)}"
        run += f" --run-dir {shlex.quote(str(run_dir))} --address auto --stages {STAGES}"
        # one job: the plan (node shapes read from the cluster), then the stage
        dpray = ["bash", "-c", f"{plan} && {run}"]
        client_env = env | {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(state_dir / "auth_token"),
        }
        ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
        start = time.monotonic()
        with log.open("w") as out:
            if use_job_api:
                assert state["RAY_LOCAL_DASHBOARD"].startswith("http://127.0.0.1:")
                address = ["--address", state["RAY_LOCAL_DASHBOARD"]]
                job_id = f"dpray-smoke-{secrets.token_hex(4)}"
                # dpray as the job's code, whether or not it is installed (the image has it on K8s)
                code = ["--runtime-env-json", json.dumps({"env_vars": {"PYTHONPATH": str(REPO)}})]
                submit = ray_cli + ["job", "submit", *address, "--submission-id", job_id, *code]
                submit += ["--"]
                done = subprocess.run(
                    submit + dpray, env=client_env, cwd=REPO, stdout=out, stderr=out, timeout=900
                )
                status = subprocess.run(
                    ray_cli + ["job", "status", *address, job_id],
                    env=client_env,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                out.write(status.stdout + status.stderr)
                said = (status.stdout + status.stderr).lower()
                ok = done.returncode == 0 and f"job '{job_id}' succeeded" in said
            else:
                print(
                    "ray[default] is not installed: no dashboard, so no `ray job submit`; "
                    "running the driver against the cluster through RAY_ADDRESS instead"
                )
                driver_env = client_env | {"RAY_ADDRESS": state["RAY_LOCAL_GCS"]}
                done = subprocess.run(
                    dpray, env=driver_env, cwd=REPO, stdout=out, stderr=out, timeout=900
                )
                ok = done.returncode == 0
        seconds = time.monotonic() - start
        assert ok, f"job failed after {seconds:.0f} s; log tail:\n{log.read_text()[-4000:]}"
        print(f"smoke job ({'ray job submit' if use_job_api else 'driver'}) took {seconds:.0f} s")

        # the plan saw this cluster's one node; ingest wrote its data and a ledger, spending nothing
        said = log.read_text()
        assert "node shapes: 1 alive node(s) at" in said, said[-4000:]
        assert (run_dir / "private" / "ingest" / "instructions.parquet").exists()
        ledger = json.loads((run_dir / "ledger.json").read_text())
        smoke = yaml.safe_load((REPO / "jobs" / "smoke.yaml").read_text())
        assert ledger["target"]["epsilon"] == smoke["privacy"]["epsilon"]
        assert ledger["events"] == []
        # the job ran on the started cluster: its Ray session lives in our state dir, not the run
        assert not (run_dir / "private" / ".ray").exists()
    finally:
        down = local("down", check=False)
        leftover = session_pids(state["RAY_LOCAL_SID"]) if state.get("RAY_LOCAL_SID") else []
        recorded = [int(p) for p in state.get("RAY_LOCAL_PIDS", "").split()]
        still = [p for p in recorded if _alive_in_session(p, state.get("RAY_LOCAL_SID"))]
        shutil.rmtree(state_dir, ignore_errors=True)
    assert down.returncode == 0, down.stdout + down.stderr
    assert leftover == [] and still == [], f"left running: {leftover or still}"
    assert local("status", check=False).returncode == 3


def _alive_in_session(pid: int, sid: str | None) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0] != "Z" and fields[3] == sid  # state, ppid, pgrp, session
