"""The CLI: every command documents what it reads and writes; errors are one clear line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dpray.cli import build_parser, main
from dpray.stages import STAGES


def test_every_stage_has_a_subcommand_with_reads_and_writes(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001
    for name in STAGES:
        assert name in commands
        help_text = commands[name].format_help()
        assert "reads:" in help_text and "writes:" in help_text
    for name in ("run", "demo", "budget"):
        assert "reads:" in commands[name].format_help()


def test_python_m_dpray_help():
    proc = subprocess.run(
        [sys.executable, "-m", "dpray", "--help"], capture_output=True, text=True, check=True
    )
    assert "ingest" in proc.stdout and "train-generator" in proc.stdout


def test_config_error_exit_code(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {path: x.jsonl}\nprivacy: {epsilon: 1}\n")
    assert main(["ingest", str(cfg), "--set", "privacy.epsilon=-2"]) == 2
    assert "privacy.epsilon" in capsys.readouterr().err


def test_missing_data_path_is_a_data_error(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"run_dir: {tmp_path}/run\ndata: {{path: {tmp_path}/nope.jsonl}}\nprivacy: {{epsilon: 1}}\n"
    )
    assert main(["ingest", str(cfg)]) == 3
    assert "does not exist" in capsys.readouterr().err


def test_hf_source_without_hub_fails_clearly(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"run_dir: {tmp_path}/run\ndata: {{path: 'hf://nobody/none'}}\nprivacy: {{epsilon: 1}}\n"
    )
    assert main(["ingest", str(cfg)]) == 3
    err = capsys.readouterr().err
    assert "hf://nobody/none" in err and "hub" in err


def test_budget_without_ledger(tmp_path, capsys):
    assert main(["budget", str(tmp_path)]) == 2
    assert "no ledger" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["ingest", "--help"], ["budget", "--help"], ["demo", "--help"]])
def test_help_exits_zero(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0


def test_logging_follows_a_swapped_stderr_and_keeps_one_run_log(tmp_path, monkeypatch):
    """In-process callers (pytest, notebooks) swap and close ``sys.stderr``; dpray's handler must
    write to the current one.  And a second command in the same process logs to its own run's
    private log only."""
    import io
    import logging

    from dpray.cli import _configure_logging, _log_to_file
    from dpray.rundir import RunDir

    _configure_logging(logging.INFO)
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    logging.getLogger("dpray.test").info("one")
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("dpray.test").info("two")
    assert "two" in second.getvalue() and "Logging error" not in second.getvalue()

    runs = [RunDir(tmp_path / "a"), RunDir(tmp_path / "b")]
    for run in runs:
        run.logs.mkdir(parents=True, exist_ok=True)
        _log_to_file(run)
    logging.getLogger("dpray.test").info("for b only")
    logger = logging.getLogger("dpray")
    assert sum(getattr(h, "_dpray_file", False) for h in logger.handlers) == 1
    assert "for b only" in (runs[1].logs / "dpray.log").read_text()
    assert "for b only" not in (runs[0].logs / "dpray.log").read_text()
