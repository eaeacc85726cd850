"""The stages, in pipeline order.

Stage modules register themselves when imported.  They are imported on first use of
:data:`STAGES` (or of a stage's name), not when this package is: a Ray worker that only needs
one stage's worker class (an embedding actor, say) would otherwise pay for importing every
stage -- torch, TRL, DeepSpeed, dp-accounting -- about 5 s per process on 2 cores.
"""

from __future__ import annotations

import importlib
from typing import Any

from dpray.stages.base import Stage, StageResult

STAGE_ORDER = [
    "ingest",
    "train-generator",
    "sample",
    "embed",
    "filter",
    "annotate",
    "sft",
    "reward",
    "ppo",
    "evaluate",
    "report",
]

STAGE_MODULES = (
    "ingest",
    "train_generator",
    "sample",
    "embed",
    "filter",
    "annotate",
    "align",
    "evaluate",
    "report",
)
"""Modules whose import registers the stages of :data:`STAGE_ORDER` (``align``: sft, reward,
ppo)."""


def load_stages() -> dict[str, Stage]:
    """Import every stage module (idempotent) and return the registry."""
    from dpray.stages.base import STAGES

    for module in STAGE_MODULES:
        importlib.import_module(f"{__name__}.{module}")
    missing = [name for name in STAGE_ORDER if name not in STAGES]
    if missing:
        raise RuntimeError(f"stages not registered: {missing}")
    return STAGES


def __getattr__(name: str) -> Any:
    if name == "STAGES":
        return load_stages()
    if name in STAGE_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["STAGES", "STAGE_ORDER", "Stage", "StageResult", "load_stages"]
