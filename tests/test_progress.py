"""One switch for progress (``progress`` in the config): Ray Data's own bars on a terminal,
no periodic "Active & requested resources" blocks in logs unless asked for (#15)."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from dpray.config import DprayConfig, apply_overrides
from dpray.runtime import configure_progress, progress_enabled
from dpray.stages import STAGES

PROGRESS_LOGGER = "ray.data._internal.progress"


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def _config(tmp_path, **extra) -> DprayConfig:
    tree = {
        "run_dir": str(tmp_path / "run"),
        "data": {"path": str(tmp_path / "x.jsonl")},
        "privacy": {"epsilon": 1.0, "delta": 1e-5},
        **extra,
    }
    return DprayConfig.model_validate(tree)


@pytest.fixture
def restore_progress():
    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = (ctx.enable_progress_bars, logging.getLogger(PROGRESS_LOGGER).level)
    yield ctx
    ctx.enable_progress_bars = before[0]
    logging.getLogger(PROGRESS_LOGGER).setLevel(before[1])


@pytest.mark.parametrize(
    ("stdout_tty", "stderr_tty", "expected"),
    [(True, True, True), (False, True, False), (True, False, False), (False, False, False)],
)
def test_default_is_bars_only_on_a_terminal(
    tmp_path, monkeypatch, stdout_tty, stderr_tty, expected
):
    monkeypatch.setattr(sys, "stdout", _Stream(stdout_tty))
    monkeypatch.setattr(sys, "stderr", _Stream(stderr_tty))
    assert progress_enabled(_config(tmp_path)) is expected


@pytest.mark.parametrize("value", [True, False])
def test_config_wins_over_the_terminal(tmp_path, monkeypatch, value):
    monkeypatch.setattr(sys, "stdout", _Stream(not value))
    monkeypatch.setattr(sys, "stderr", _Stream(not value))
    assert progress_enabled(_config(tmp_path, progress=value)) is value


def test_set_override_turns_bars_off(tmp_path):
    tree = apply_overrides({"progress": True}, ["progress=false"])
    assert _config(tmp_path, **tree).progress is False


def test_configure_progress_sets_ray_data(tmp_path, restore_progress):
    ctx = restore_progress
    assert configure_progress(_config(tmp_path, progress=False)) is False
    assert ctx.enable_progress_bars is False
    # Ray Data's one-time "progress bars disabled" notice and its 10-s blocks stay quiet.
    assert logging.getLogger(PROGRESS_LOGGER).getEffectiveLevel() == logging.ERROR
    assert configure_progress(_config(tmp_path, progress=True)) is True
    assert ctx.enable_progress_bars is True
    assert logging.getLogger(PROGRESS_LOGGER).level == logging.NOTSET


def test_progress_is_in_no_stage_fingerprint(tmp_path):
    on, off = _config(tmp_path, progress=True), _config(tmp_path, progress=False)
    for stage in STAGES.values():
        assert on.section_hash(*stage.sections) == off.section_hash(*stage.sections), stage.name
