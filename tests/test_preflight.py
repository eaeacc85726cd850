"""The CLI's error boundary and preflight: one line, naming what to fix, a documented exit code.

Each failure named in issue #15 is provoked through ``dpray.cli.main`` (the command a user
types); none starts Ray or loads a model, so the file runs in seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import dpray
from dpray.cli import build_parser, main
from dpray.errors import (
    EXIT_CLUSTER,
    EXIT_CODES,
    EXIT_CONFIG,
    EXIT_MISSING_INPUT,
    EXIT_RESOURCES,
    EXIT_RUN_DIR,
    EXIT_UNEXPECTED,
    classify,
)

REPO = Path(__file__).resolve().parents[1]
SECRET = "zebra-umbrella private instruction 4711"


@pytest.fixture(autouse=True)
def _no_cluster_env(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def smoke(tmp_path: Path, **changes) -> Path:
    """jobs/smoke.yaml with its run directory under tmp_path (and ``section.key`` changes)."""
    tree = yaml.safe_load((REPO / "jobs" / "smoke.yaml").read_text())
    tree["run_dir"] = str(tmp_path / "run")
    for key, value in changes.items():
        section, _, name = key.partition("__")
        tree.setdefault(section, {})[name] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("dpray:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"dpray {dpray.__version__}"


def test_help_documents_every_exit_code():
    text = build_parser().format_help()
    assert "exit codes:" in text
    for code in EXIT_CODES:
        assert f"  {code:>3}  " in text
    readme = (REPO / "README.md").read_text()
    for code in EXIT_CODES:
        assert f"| {code} |" in readme, f"README lacks exit code {code}"


def test_model_path_that_does_not_exist(tmp_path, capsys):
    cfg = smoke(tmp_path, train__model=str(tmp_path / "no-such-model"))
    assert main(["train-generator", str(cfg)]) == EXIT_CONFIG
    line = one_line(capsys.readouterr().err)
    assert "train.model" in line and "no-such-model" in line and "does not exist" in line


@pytest.mark.parametrize(
    ("stage", "producer"),
    [
        ("train-generator", "ingest"),
        ("sample", "train-generator"),
        ("annotate", "filter"),
        ("evaluate", "ingest"),
    ],
)
def test_earlier_stage_output_missing(tmp_path, capsys, stage, producer):
    cfg = smoke(tmp_path)
    assert main([stage, str(cfg)]) == EXIT_MISSING_INPUT
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"dpray: missing input: {stage}: RUN_DIR/")
    assert f"run `dpray {producer} CONFIG`" in line


def test_missing_file_inside_the_run_is_named_at_the_boundary(tmp_path):
    missing = FileNotFoundError(2, "No such file", str(tmp_path / "generator" / "generator.json"))
    code, label, message = classify(missing, tmp_path)
    assert code == EXIT_MISSING_INPUT and "`dpray train-generator CONFIG`" in message


def test_gpus_asked_on_a_machine_without_them(tmp_path, capsys, monkeypatch):
    import dpray.preflight as preflight

    monkeypatch.setattr(preflight, "local_gpu_count", lambda: 0)
    cfg = smoke(tmp_path, train__use_gpu=True, embed__use_gpu=False)
    assert main(["run", str(cfg)]) == EXIT_RESOURCES
    line = one_line(capsys.readouterr().err)
    assert "train.use_gpu" in line and "--address" in line


def test_ray_address_that_does_not_answer_fails_fast(tmp_path, capsys):
    cfg = smoke(tmp_path)
    start = time.monotonic()
    assert main(["run", str(cfg), "--address", "127.0.0.1:1"]) == EXIT_CLUSTER
    assert time.monotonic() - start < 10
    line = one_line(capsys.readouterr().err)
    assert "127.0.0.1:1 does not answer" in line


def test_ray_address_as_a_command_exits_within_seconds(tmp_path):
    """The issue's case, as typed: ``dpray run … --address 127.0.0.1:1`` hung for minutes."""
    cfg = smoke(tmp_path)
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "dpray", "run", str(cfg), "--address", "127.0.0.1:1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == EXIT_CLUSTER, done.stderr[-2000:]
    assert "does not answer" in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - start < 90  # imports on a loaded 2-core machine; no Ray start


def test_read_only_run_directory(tmp_path, capsys):
    cfg = smoke(tmp_path)
    assert main(["ingest", str(cfg), "--run-dir", "/proc/dpray-run"]) == EXIT_RUN_DIR
    line = one_line(capsys.readouterr().err)
    assert "/proc" in line and "not writable" in line and "--run-dir" in line


def test_read_only_private_zone(tmp_path, capsys):
    if shutil.which("id") and subprocess.run(["id", "-u"], capture_output=True).stdout == b"0\n":
        pytest.skip("root writes through permission bits")
    run = tmp_path / "run"
    (run / "private" / "logs").mkdir(parents=True)
    (run / "private").chmod(0o500)
    try:
        assert main(["ingest", str(smoke(tmp_path))]) == EXIT_RUN_DIR
    finally:
        (run / "private").chmod(0o700)
    assert "not writable" in one_line(capsys.readouterr().err)


def test_corrupted_parquet_in_the_run_directory_is_named(tmp_path, capsys):
    cfg = smoke(tmp_path)
    run = tmp_path / "run"
    (run / "private" / "ingest").mkdir(parents=True)
    (run / "sample").mkdir()
    for path in (
        run / "private" / "ingest" / "instructions.parquet",
        run / "sample" / "part-0.parquet",
    ):
        path.write_bytes(b"PAR1" + SECRET.encode() * 3)  # cut short: no footer
    assert main(["embed", str(cfg)]) == EXIT_RUN_DIR
    err = capsys.readouterr().err
    line = one_line(err)
    assert ".parquet is not a readable Parquet file" in line and "--force" in line
    assert SECRET not in err


def test_unexpected_error_prints_its_class_only(tmp_path, capsys, monkeypatch):
    import dpray.cli as cli

    def boom(args):
        raise RuntimeError(SECRET)

    monkeypatch.setattr(cli, "_cmd_budget", boom)
    assert main(["budget", str(tmp_path)]) == EXIT_UNEXPECTED
    err = capsys.readouterr().err
    assert "unexpected error: RuntimeError" in one_line(err) and "--debug" in err
    assert SECRET not in err

    assert main(["--debug", "budget", str(tmp_path)]) == EXIT_UNEXPECTED
    assert "Traceback" in capsys.readouterr().err


def test_missing_sample_shards_are_named_by_their_pattern(tmp_path, capsys):
    cfg = smoke(tmp_path)
    (tmp_path / "run" / "private" / "ingest").mkdir(parents=True)
    (tmp_path / "run" / "private" / "ingest" / "instructions.parquet").write_bytes(b"")
    (tmp_path / "run" / "sample").mkdir()
    assert main(["embed", str(cfg)]) == EXIT_MISSING_INPUT
    line = one_line(capsys.readouterr().err)
    assert "RUN_DIR/sample/part-*.parquet matches no file" in line
    assert "run `dpray sample CONFIG`" in line


def test_ray_connection_error_is_one_line():
    exc = ConnectionError("Could not find any running Ray instance.\nPlease specify the one ...")
    code, label, message = classify(exc)
    assert code == EXIT_CLUSTER and label == "Ray cluster"
    assert message.startswith("Could not find any running Ray instance.") and "\n" not in message
