"""``dp_finetune``: the seed paper's generator -- LoRA fine-tuned with DP-SGD on Ray Train.

The private instructions are trained in the generator's prompt format (for a chat model, as the
user turn of its chat template; see :mod:`~dpray.stages.train_generator.formats`), with Poisson
sampling, per-unit clipping and central or secure noise; the body lives in
:func:`dpray.stages.train_generator.stage.train_generator`, which the membership audit reuses.
Best where GPUs are: on a CPU, the few dozen DP steps that fit move a small model only a little.
"""

from __future__ import annotations

from dpray.config import DprayConfig
from dpray.rundir import RunDir
from dpray.stages.base import StageResult


def run(config: DprayConfig, run_dir: RunDir) -> StageResult:
    from dpray.stages.train_generator.stage import train_generator

    return train_generator(config, run_dir, ledger_required=True)
