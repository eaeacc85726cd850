"""The Python API: what a notebook calls instead of the ``dpray`` command.

    from dpray import load_config, run, run_stage

    config = load_config("jobs/smoke.yaml", {"run_dir": "runs/nb", "sample.num_samples": 60})
    run_stage("ingest", config)            # one stage (skipped when already done)
    results = run(config)                  # every stage, skipping the completed ones

The same calls as the CLI (same run directory layout, markers, ledger and leak scan), minus the
argument parsing and the exit codes: failures are raised as exceptions (``ConfigError`` naming the
key, :class:`dpray.errors.DprayError` subclasses for what the commands check before Ray starts,
``LeakError``, ``BudgetExceededError`` ...), never printed.  dpray's log records go to the
cell's stderr (the stream current when each record is emitted, which is what a notebook swaps in
per cell) and to ``RUN_DIR/private/logs/dpray.log``.  Heavy modules (Ray, torch, TRL) are
imported by the stages that need them, not by ``import dpray`` or by this module.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpray.config import ConfigError, DprayConfig, config_from_tree, packaged_config_path
from dpray.config import load_config as _load_config_file

if TYPE_CHECKING:
    from dpray.stages.base import StageResult

Overrides = Mapping[str, Any] | list[str] | None


def load_config(
    source: str | Path | Mapping[str, Any] | None = None, overrides: Overrides = None
) -> DprayConfig:
    """A validated config from a YAML file, a config tree (a dict, as the YAML would parse), or,
    with no ``source``, the packaged demo config.

    ``overrides`` are ``{"section.key": value}`` (values are Python objects) or the CLI's
    ``["section.key=value", ...]`` (values parsed as YAML).  Raises :class:`ConfigError` naming
    the file, line or key at fault.
    """
    strings = _override_strings(overrides)
    if isinstance(source, Mapping):
        return config_from_tree(dict(source), strings)
    return _load_config_file(
        source if source is not None else packaged_config_path("demo"), strings
    )


def run(
    config: DprayConfig | str | Path,
    stages: list[str] | None = None,
    *,
    force: bool = False,
    spend_again: bool = False,
    log_level: int | str = logging.INFO,
) -> dict[str, StageResult | None]:
    """Run the pipeline, as ``dpray run``: every stage in order (or just ``stages``), skipping
    those already done with this config and these inputs; the whole pipeline ends with the leak
    scan and the report.  Returns each stage's :class:`~dpray.stages.base.StageResult` (its
    output paths and summary), or None for a skipped stage.

    ``force`` reruns done stages (DP stages reuse their saved releases: no new spend);
    ``spend_again`` draws every DP release anew, which spends privacy budget again.
    """
    from dpray.pipeline import run_pipeline

    config, run_dir = _prepare(config, log_level, stages)
    return run_pipeline(config, run_dir, stages=stages, force=force, spend_again=spend_again)


def run_stage(
    name: str,
    config: DprayConfig | str | Path,
    *,
    force: bool = False,
    spend_again: bool = False,
    log_level: int | str = logging.INFO,
) -> StageResult | None:
    """Run one stage by name (``"ingest"``, ``"sample"``, ...), as ``dpray <stage>``; returns its
    :class:`~dpray.stages.base.StageResult`, or None when it was already done (``force`` reruns
    it)."""
    from dpray.pipeline import run_stage as run_one
    from dpray.stages import STAGES

    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; known: {sorted(STAGES)}")
    config, run_dir = _prepare(config, log_level, [name])
    return run_one(STAGES[name], config, run_dir, force=force, spend_again=spend_again)


def _prepare(config: DprayConfig | str | Path, log_level: int | str, stages: list[str] | None):
    """The config and its run directory, with dpray's logging set up for this run, after the
    checks the commands make before Ray starts (:mod:`dpray.preflight`: the run directory,
    models, earlier stages' outputs, GPUs, the Ray address), raised as one-line errors."""
    from dpray.cli import _configure_logging, _log_to_file
    from dpray.preflight import check_run_dir, preflight, stages_to_run
    from dpray.rundir import RunDir

    if not isinstance(config, DprayConfig):
        config = load_config(config)
    level = logging.getLevelName(log_level.upper()) if isinstance(log_level, str) else log_level
    if not isinstance(level, int):
        raise ConfigError(f"log_level: unknown level {log_level!r}")
    for problem in check_run_dir(config.run_dir):  # before RunDir creates folders in it
        raise problem
    run_dir = RunDir(config.run_dir)
    _configure_logging(level)  # one stderr handler on the "dpray" logger, however many calls
    _log_to_file(run_dir)  # and this run's private log file (the previous run's is closed)
    preflight(config, stages_to_run(config, stages), run_dir.root)
    return config, run_dir


def _override_strings(overrides: Overrides) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        import json

        # JSON is YAML: the value arrives as the same Python object (a path stays a string).
        return [f"{key}={json.dumps(value, default=str)}" for key, value in overrides.items()]
    return list(overrides)


__all__ = ["load_config", "run", "run_stage"]
