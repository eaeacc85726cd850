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
