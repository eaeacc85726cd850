"""A multi-node Ray cluster on this machine: the smoke job on it, and a worker node lost mid-sample.

`cluster/local.sh up --workers 3` starts a head with 0 CPUs (so nothing but the driver runs on
it, as on Kubernetes) and three worker nodes of 1 CPU each, every one with its own temp dir,
process session and resource ``node_i``, all with the cluster's own auth token.  On it:

1. ``ray job submit -- python -m dpray run smoke.yaml --stages ingest,train-generator`` (the job
   API; the job's driver runs on the head, which has no CPU for anything else);
2. ``dpray run smoke.yaml --address 127.0.0.1:PORT``: the whole pipeline (reusing the job's two
   stages), during which the worker node hosting a sampling actor is stopped
   (``local.sh stop-node``) once the first draw shard is written: Ray restarts the actor on
   the spare node and retries its shard (``sample``'s ``max_restarts``/``max_task_retries``), the
   run still writes the requested count, and every later stage runs on the two nodes left.

The finished run is also CI's end-to-end check of the whole pipeline on small data (what
``test_e2e`` did in a local Ray of its own): ledger within target with the DP stages' events,
leak scan clean, public and private reports rendered, every public Parquet folder loadable as
one dataset; and a second ``dpray run`` of the same run directory skips every completed stage.

Three worker nodes, not two: an actor lost with its node is restarted where there is room (on
Kubernetes the autoscaler replaces the node), so the spare 1-CPU node is that room here.
`local.sh down` runs in a finally and must leave no process of the sessions it started.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dpray.stages import STAGE_ORDER
from tests.test_generator_strategies import (
    assert_samples_from_exactly_the_training_prompt,
    tiny_tokenizer,
)
from tests.test_local_cluster import (
    job_api_available,
    local_cluster_env,
    read_state,
    session_pids,
)
from tests.test_output_schemas import assert_one_schema_per_folder

REPO = Path(__file__).resolve().parents[1]
LOCAL_SH = REPO / "cluster" / "local.sh"
SMOKE = REPO / "jobs" / "smoke.yaml"
WORKERS = 3
# Every stage sizes its actors and workers from the alive nodes' shapes (dpray.resources), so
# the smoke config runs as is; only sampling is shaped for the node loss:
SIZES = [
    *("--set", "sample.num_actors=2"),  # 2 sampling actors: the third node stays free
    *("--set", "sample.shard_size=10"),  # shards small enough to stop a node between them
]
SAMPLES = 120  # smoke.yaml's sample.num_samples: 12+ shards of 10 draws, most still to do when
# the first one is written and the node goes

pytestmark = pytest.mark.slow


def short_state_dir() -> Path:
    """A fresh directory under the temp dir, short enough for worker nodes' socket paths."""
    path = Path(tempfile.gettempdir()) / f"rm-{secrets.token_hex(4)}"
    assert len(str(path)) <= 37, path
    return path


def sampling_actor_node(sids: list[str]) -> int | None:
    """The worker node (1-based) whose session holds a live sampling actor process, if any."""
    out = subprocess.run(["ps", "-eo", "sid=,args="], capture_output=True, text=True).stdout
    for line in out.splitlines():
        sid, _, args = line.strip().partition(" ")
        if "SamplingActor" in args and sid in sids:
            return sids.index(sid) + 1
    return None


def tail(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:]


def new_draw_shards(run_dir: Path, since: float) -> list[Path]:
    """Draw shards written since ``since`` (wherever the sample stage keeps them)."""
    found = []
    for path in run_dir.rglob("draw-*.parquet"):
        try:
            if path.stat().st_mtime > since:
                found.append(path)
        except FileNotFoundError:  # replaced while we looked
            pass
    return found


def test_smoke_on_three_nodes_and_a_node_lost_mid_sample(tmp_path):
    state_dir = short_state_dir()
    env = local_cluster_env(
        state_dir,
        DPRAY_LOCAL_WORKER_CPUS="1",
        DPRAY_LOCAL_OBJECT_STORE_BYTES=str(256 * 1024**2),
    )
    use_job_api = job_api_available()
    env["DPRAY_LOCAL_DASHBOARD"] = "true" if use_job_api else "false"
    client_env = env | {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(state_dir / "auth_token"),
    }
    run_dir = tmp_path / "run"
    log = tmp_path / "dpray.log"
    timings: dict[str, float] = {}
    state: dict = {}

    def local(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            ["bash", str(LOCAL_SH), *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check:
            assert done.returncode == 0, f"local.sh {args}: {done.stdout}\n{done.stderr}"
        return done

    def dpray(*args: str) -> list[str]:
        return [sys.executable, "-m", "dpray", "run", str(SMOKE), "--run-dir", str(run_dir), *args]

    def driver(cmd: list[str], step: str, extra_env: dict | None = None) -> None:
        start = time.monotonic()
        with log.open("a") as out:
            done = subprocess.run(
                cmd,
                env=client_env | (extra_env or {}),
                cwd=REPO,
                stdout=out,
                stderr=out,
                timeout=900,
            )
        timings[step] = time.monotonic() - start
        assert done.returncode == 0, f"{step} failed; log tail:\n{log.read_text()[-4000:]}"

    try:
        start = time.monotonic()
        local("up", "--workers", str(WORKERS))
        timings["up"] = time.monotonic() - start
        state = read_state(state_dir / "local.state")
        address = state["RAY_LOCAL_GCS"]
        assert address.startswith("127.0.0.1:")
        node_sids = state["RAY_LOCAL_NODE_SIDS"].split()
        assert len(node_sids) == WORKERS and all(session_pids(s) for s in node_sids)

        # 1. the job API (or, without ray[default], a driver joining through RAY_ADDRESS)
        first = dpray("--address", "auto", "--stages", "ingest,train-generator", *SIZES)
        if use_job_api:
            ray_cli = [sys.executable, "-m", "ray.scripts.scripts", "job"]
            api = ["--address", state["RAY_LOCAL_DASHBOARD"]]
            job_id = f"dpray-multinode-{secrets.token_hex(4)}"
            # dpray as the job's code, whether or not it is installed (the image has it on K8s)
            code = ["--runtime-env-json", json.dumps({"env_vars": {"PYTHONPATH": str(REPO)}})]
            submit = [*ray_cli, "submit", *api, "--submission-id", job_id, *code, "--", *first]
            driver(submit, "job")
            status = subprocess.run(
                [*ray_cli, "status", *api, job_id],
                env=client_env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert f"job '{job_id}' succeeded" in (status.stdout + status.stderr).lower()
        else:
            print("ray[default] is not installed: no `ray job submit`; the driver joins instead")
            driver(first, "job", extra_env={"RAY_ADDRESS": address})
        assert (run_dir / "generator" / "adapter" / "adapter_config.json").exists()

        # 2. the whole smoke pipeline, driver on the 0-CPU head; a worker node lost mid-sample
        pipeline = tmp_path / "pipeline.log"
        start, wall_start = time.monotonic(), time.time()
        with pipeline.open("w") as out:
            proc = subprocess.Popen(
                dpray("--address", address, *SIZES),
                env=client_env,
                cwd=REPO,
                stdout=out,
                stderr=out,
            )
            try:
                node = None
                deadline = time.monotonic() + 900
                while proc.poll() is None and time.monotonic() < deadline:
                    node = node or sampling_actor_node(node_sids)
                    if node and new_draw_shards(run_dir, since=wall_start):
                        break
                    time.sleep(0.2)
                assert proc.poll() is None, f"ended before sample drew:\n{tail(pipeline)}"
                assert node, "no sampling actor on a worker node"
                local("stop-node", str(node))
                stopped_at = time.monotonic() - start
                shards_then = len(new_draw_shards(run_dir, since=wall_start))
                rc = proc.wait(timeout=900)
            finally:
                if proc.poll() is None:
                    proc.kill()
        timings["pipeline"] = time.monotonic() - start
        assert rc == 0, f"the run failed after node {node} was stopped:\n{tail(pipeline)}"
        report = json.loads((run_dir / "sample" / "report.json").read_text())
        assert report["written"] == report["requested"] == SAMPLES
        planned = report["shards"]["planned"]
        assert shards_then < planned, f"node {node} was stopped after sampling ({shards_then})"
        # every stage ran, those after sample on the nodes that were left
        done = json.loads((run_dir / "timings" / "stages.json").read_text())
        assert [name for name in STAGE_ORDER if name not in done] == []
        print(f"node {node} stopped {stopped_at:.0f} s in, {shards_then}/{planned} shards drawn")
        assert_pipeline_outputs(run_dir, pipeline.read_text())

        # 3. a second run of the same run directory skips every completed stage
        before = log.stat().st_size
        driver(dpray("--address", address, *SIZES), "rerun")
        said = log.read_bytes()[before:].decode(errors="replace")
        assert said.count("already done") >= 8, said[-4000:]
    finally:
        down = local("down", check=False)
        sids = [state.get("RAY_LOCAL_SID"), *state.get("RAY_LOCAL_NODE_SIDS", "").split()]
        leftover = [pid for sid in sids if sid for pid in session_pids(sid)]
        shutil.rmtree(state_dir, ignore_errors=True)
        print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    assert down.returncode == 0, down.stdout + down.stderr
    assert leftover == [], f"left running: {leftover}"


def assert_pipeline_outputs(run: Path, console: str) -> None:
    """What a finished smoke run must hold (the end-to-end check of the whole pipeline)."""
    assert f"outputs in {run}" in console and "report:" in console
    ledger = json.loads((run / "ledger.json").read_text())
    stages = {e["stage"] for e in ledger["events"]}
    assert {"train-generator", "filter"} <= stages
    assert ledger["spent"]["epsilon"] <= ledger["target"]["epsilon"] + 1e-9
    leaks = json.loads((run / "audit" / "leaks.json").read_text())
    assert leaks["leaks_total"] == 0 and leaks["files_scanned"] > 5
    # no public file holds a statistic of real records that the ledger does not cover (#14)
    assert leaks["nondp_statistics_total"] == 0, leaks["nondp_statistics_by_file"]
    page = (run / "report" / "index.html").read_text()
    assert "Privacy ledger" in page and "has not run" not in page.split("Privacy audit")[0]
    private_page = (run / "private" / "report" / "index.html").read_text()
    assert "Win rate" in private_page and "Probe accuracy" in private_page
    for path in (
        "generator/adapter",
        "filter/filtered.parquet",
        "sft",
        "private/evaluate/win_rates.json",
        "private/filter/metrics.json",
    ):
        assert (run / path).exists(), path
    # every public folder of Parquet files loads as one dataset (issue #15)
    checked = assert_one_schema_per_folder(run, load_with_datasets=True)
    assert {"sample", "sample_draws", "filter", "annotate/pairs"} <= set(checked)
    # the dp_finetune generator samples from exactly its training prompt
    assert_samples_from_exactly_the_training_prompt(run, tiny_tokenizer())
