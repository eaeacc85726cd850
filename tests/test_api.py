"""The Python API (``from dpray import load_config, run, run_stage``): cheap to import, the same
run directory as the CLI, logging a notebook sees, errors raised with the key named."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from dpray.config import ConfigError
from tests.conftest import REPO, base_tree

HEAVY = ("pydantic", "pyarrow", "ray", "torch", "transformers", "trl")


@pytest.fixture
def dpray_logger():
    """Put the ``dpray`` logger back as it was (the API adds its handlers, as the CLI does)."""
    logger = logging.getLogger("dpray")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield logger
    for handler in logger.handlers:
        if handler not in saved[0]:
            logger.removeHandler(handler)
            handler.close()
    logger.propagate, logger.level = saved[1], saved[2]


def _data(path, n=10):
    path.write_text("".join(json.dumps({"id": str(i), "text": f"q {i}"}) + "\n" for i in range(n)))
    return path


def test_import_dpray_is_cheap_and_the_api_loads_no_heavy_module():
    loaded = f"sorted(m for m in {HEAVY!r} if m in sys.modules)"
    code = (
        f"import sys; import dpray; before = {loaded}; "
        f"from dpray import load_config, run, run_stage; print(before, {loaded})"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[] ['pydantic']"  # the config model; Ray and torch wait for a stage


def test_run_stage_on_a_tiny_config(tmp_path, capsys, dpray_logger):
    from dpray import load_config, run, run_stage

    data = _data(tmp_path / "d.jsonl")
    tree = base_tree(tmp_path / "elsewhere", data)
    config = load_config(tree, {"run_dir": str(tmp_path / "run"), "data.max_chars": 500})
    assert config.run_dir == str(tmp_path / "run") and config.data.max_chars == 500

    result = run_stage("ingest", config)
    assert result is not None and result.summary["rows_out"] == 10
    assert (tmp_path / "run" / "private" / "ingest" / "instructions.parquet").is_file()
    assert "ingest: started" in capsys.readouterr().err  # the cell's stderr, at emit time
    log_file = tmp_path / "run" / "private" / "logs" / "dpray.log"
    assert "ingest: finished" in log_file.read_text()

    assert run_stage("ingest", config) is None  # done: skipped, as `dpray ingest`
    assert "already done" in capsys.readouterr().err
    again = run(config, stages=["ingest"], force=True, log_level="WARNING")
    assert set(again) == {"ingest"} and again["ingest"].summary["rows_out"] == 10
    assert "ingest: started" not in capsys.readouterr().err  # WARNING and above only


def test_load_config_sources_and_errors(tmp_path, dpray_logger):
    from dpray import load_config, run_stage

    assert load_config().run_dir  # the packaged demo config
    smoke = load_config(REPO / "jobs" / "smoke.yaml", ["sample.num_samples=7"])
    assert smoke.sample.num_samples == 7
    with pytest.raises(ConfigError, match="nope"):
        load_config(REPO / "jobs" / "smoke.yaml", {"sample.nope": 1})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    config = load_config(base_tree(tmp_path / "run", _data(tmp_path / "d.jsonl")))
    with pytest.raises(ConfigError, match="unknown stage 'ingset'"):
        run_stage("ingset", config)
    from dpray.errors import MissingInputError

    with pytest.raises(MissingInputError, match="dpray filter"):  # checked before Ray starts
        run_stage("annotate", config)
