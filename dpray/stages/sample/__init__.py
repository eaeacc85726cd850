"""The sampling stage (``dpray sample``): N unique synthetic instructions from the DP generator.

Modules: ``backends`` (the Sampler interface, generator spec, Ray Data actor), ``hf`` (batched
transformers), ``vllm_backend`` (vLLM, imported lazily), ``clean`` (cleaning and dedup),
``shards`` (the resumable shard plan and its files), ``stage`` (the Ray Data pipeline).
"""

from dpray.stages.sample.stage import STAGE, SampleShortfallError, run, sample

__all__ = ["STAGE", "SampleShortfallError", "run", "sample"]
