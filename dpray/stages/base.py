"""What a stage is: a plain function ``run(config, run_dir) -> StageResult`` plus its metadata.

Stages never import one another; they meet on disk.  The registry below is what the CLI and the
pipeline iterate over, so adding a stage is adding one module and one :func:`register` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dpray.config import DprayConfig
    from dpray.rundir import RunDir


@dataclass
class StageResult:
    """What a stage produced: output paths and a small counts-only summary (public)."""

    outputs: dict[str, str] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """A pipeline stage.

    ``sections``: the config sections its result depends on (part of the completion marker).
    ``inputs``: files of earlier stages it reads (their content hashes are part of the marker).
    ``needs_ray``: whether the driver must connect to Ray before calling it.
    ``spends_budget``: whether it makes DP releases (spends on the ledger).  A rerun of such a
    stage reuses its saved release unless asked to spend again (``--spend-again``).
    """

    name: str
    run: Callable[[DprayConfig, RunDir], StageResult]
    help: str
    reads: str
    writes: str
    sections: tuple[str, ...]
    inputs: Callable[[DprayConfig, RunDir], list[Path]] = lambda config, run_dir: []
    needs_ray: bool = False
    spends_budget: bool = False


STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    if stage.name in STAGES:
        raise ValueError(f"stage '{stage.name}' registered twice")
    STAGES[stage.name] = stage
    return stage
