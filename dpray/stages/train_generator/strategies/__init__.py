"""Generation strategies: one module each, one entry function ``run(config, run_dir)``.

All of them write ``generator/generator.json`` (strategy, prompt format, the prompts and stop
tokens sampling starts from), spend -- if at all -- through the one ledger, and hand over to the
same sampling stage and DP filter, so they can be compared on the same data:

* ``dp_finetune`` -- the seed paper: LoRA fine-tuned with DP-SGD on the private instructions;
* ``prompted`` -- no training: the base model with public prompts (optionally one per public
  topic); the whole epsilon goes to the filter;
* ``private_evolution`` -- Aug-PE / Private Evolution: rounds of DP nearest-neighbour votes of
  the private embeddings over synthetic candidates, and variations of the voted ones.

Modules are imported on use (a registry of names), so choosing one never imports the others'
heavy dependencies.
"""

from __future__ import annotations

import importlib
import logging

from dpray.config import ConfigError, DprayConfig
from dpray.rundir import RunDir
from dpray.stages.base import StageResult

log = logging.getLogger(__name__)

STRATEGIES = {
    "dp_finetune": "dp_finetune",
    "prompted": "prompted",
    "private_evolution": "private_evolution",
}
"""Strategy name -> module in this package (each with ``run(config, run_dir)``)."""


def resolve(config: DprayConfig) -> str:
    """The strategy this config runs (``auto`` resolved)."""
    name = config.generator.resolved_strategy(config.train.use_gpu)
    if name not in STRATEGIES:
        raise ConfigError(f"generator.strategy: unknown {name!r}; known: {sorted(STRATEGIES)}")
    return name


def run_strategy(config: DprayConfig, run_dir: RunDir) -> StageResult:
    name = resolve(config)
    module = importlib.import_module(f"{__name__}.{STRATEGIES[name]}")
    log.info("train-generator: strategy %s", name)
    return module.run(config, run_dir)


__all__ = ["STRATEGIES", "resolve", "run_strategy"]
