"""Alignment on the DP synthetic instructions: ``sft``, ``reward`` and ``ppo`` stages.

Modules: ``models`` (loading/saving models and tokenizers), ``generate`` (responses from local
models or endpoints), ``judges`` (reward-model and LLM pairwise judges), ``common`` (Ray Train and
DeepSpeed glue), and one module per stage.  Everything here reads public (DP) data only.
"""

from dpray.stages.align import ppo, reward, sft  # noqa: F401  (registers the stages)
