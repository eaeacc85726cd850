"""The stages, in pipeline order.  Importing this package registers every stage."""

from dpray.stages import (  # noqa: F401  (registers)
    align,
    annotate,
    embed,
    evaluate,
    filter,
    ingest,
    report,
    sample,
    train_generator,
)
from dpray.stages.base import STAGES, Stage, StageResult

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

__all__ = ["STAGES", "STAGE_ORDER", "Stage", "StageResult"]
