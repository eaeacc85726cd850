"""The CLI: every command documents what it reads and writes; errors are one clear line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dpray.cli import build_parser, main
from dpray.stages import STAGES
from tests.conftest import make_canary


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


# ------------------------------------------------------------ `dpray audit leaks` (#14, defect 6)
def _leak_run(root, texts):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dpray.rundir import RunDir

    run_dir = RunDir(root)
    pq.write_table(
        pa.table(
            {
                "id": pa.array([str(i) for i in range(len(texts))], pa.string()),
                "text": pa.array(texts, pa.string()),
            }
        ),
        run_dir.private("ingest") / "instructions.parquet",
    )
    return run_dir


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_audit_leaks_on_a_mistyped_run_dir_fails_and_creates_nothing(tmp_path, capsys):
    typo = tmp_path / "runs" / "smoek"
    code = main(["audit", "leaks", str(typo)])
    assert code not in (0, 5)
    line = _one_line_error(capsys)
    assert "smoek" in line and "run directory" in line
    assert not typo.exists() and not (tmp_path / "runs").exists()


def test_audit_leaks_without_a_private_index_fails(tmp_path, capsys):
    # a folder that exists but holds no run: nothing to compare against
    bare = tmp_path / "bare"
    (bare / "sample").mkdir(parents=True)
    assert main(["audit", "leaks", str(bare)]) not in (0, 5)
    assert "private" in _one_line_error(capsys)
    assert sorted(p.name for p in bare.iterdir()) == ["sample"]  # no private/, no audit/
    # an ingest that kept no instructions: an empty index would pass every file
    empty = _leak_run(tmp_path / "empty", [])
    assert main(["audit", "leaks", str(empty.root)]) not in (0, 5)
    assert "empty" in _one_line_error(capsys)
    assert not (empty.root / "audit").exists()


def test_audit_leaks_exit_code_is_the_pipelines(tmp_path, capsys):
    """A leak exits 5 from `dpray audit leaks`, as from `dpray run` (EXIT_LEAK)."""
    from dpray.cli import EXIT_LEAK

    canary = (
        f"my card number is {make_canary()} and it was charged twice, "
        "please cancel it today before the weekend"
    )
    run_dir = _leak_run(tmp_path / "run", [canary])
    (run_dir.public("report") / "index.html").write_text("nothing private here")
    assert main(["audit", "leaks", str(run_dir.root)]) == 0
    (run_dir.public("report") / "index.html").write_text(f"<p>{canary}</p>")
    capsys.readouterr()
    assert main(["audit", "leaks", str(run_dir.root)]) == EXIT_LEAK == 5
    assert "1 leaks" in capsys.readouterr().out


def test_report_on_a_path_that_is_not_a_run_fails_and_creates_nothing(tmp_path, capsys):
    """A mistyped run directory is an error (exit 2), not a new empty report."""
    missing = tmp_path / "runs" / "typo"
    assert main(["report", str(missing)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert not missing.exists()
