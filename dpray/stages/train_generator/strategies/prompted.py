"""``prompted``: no training -- the base model, asked through public prompts.

The generator is the untouched base model and its public prompt format (for a chat model the
chat template up to a user turn, one prompt per public topic when topics are on).  It reads no
private data and spends nothing: the whole epsilon is left to the DP filter, which is then the
only step that sees the private set.  The cheapest strategy, and a strong one for chat models
whose user turns already read like real requests.
"""

from __future__ import annotations

import logging
import shutil

from dpray.config import DprayConfig
from dpray.rundir import RunDir, write_json
from dpray.stages.base import StageResult

log = logging.getLogger(__name__)


def run(config: DprayConfig, run_dir: RunDir) -> StageResult:
    from transformers import AutoTokenizer

    from dpray.models import resolve_causal_lm
    from dpray.stages.train_generator.stage import format_metadata, prompt_format

    model_path = resolve_causal_lm(config.train.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    fmt = prompt_format(config, tokenizer, "prompted")
    public = run_dir.public("generator")
    shutil.rmtree(public / "adapter", ignore_errors=True)  # a former strategy's adapter
    (public / "metrics.jsonl").unlink(missing_ok=True)
    meta = {
        "base_model": config.train.model,
        **format_metadata(fmt, "prompted"),
        "adapter": False,
        "adapter_sha256": "",
        "epsilon_spent": 0.0,
        "note": "no training: the base model with public prompts; reads no private data",
    }
    path = write_json(public / "generator.json", meta)
    log.info(
        "train-generator: prompted, %d public prompt(s), format %s", len(fmt.prompts), fmt.name
    )
    return StageResult(
        outputs={"generator": str(path)},
        summary={"strategy": "prompted", "format": fmt.name, "prompts": len(fmt.prompts)},
    )
