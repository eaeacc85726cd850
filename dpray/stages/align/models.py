"""Loading and saving the models the alignment stages hand to each other.

A stage's model directory holds either a full Hugging Face model or a LoRA adapter (peft).  An
adapter directory also holds ``dpray_model.json`` naming its base by *spec* (``packaged:smollm2``,
``tiny:...``, a path) rather than only by the machine-specific cache path peft records, so a run
directory copied to another machine still loads.  Every loader goes through
:func:`prepare_tokenizer` so training, generation and scoring agree on the pad token.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from dpray.rundir import read_json, write_json

log = logging.getLogger(__name__)

META_FILE = "dpray_model.json"
ADAPTER_FILE = "adapter_config.json"


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give ``tokenizer`` a pad token distinct from EOS when its vocabulary has a spare one.

    SmolLM2 pads with its EOS ``<|im_end|>``, which also closes every chat turn.  TRL's PPO builds
    attention masks as ``ids != pad``, so that pad would hide the turn ends inside each prompt;
    ``<|endoftext|>`` never occurs in a chat, so it becomes the pad (no new embedding needed).
    """
    eos = tokenizer.eos_token
    if tokenizer.pad_token is None or tokenizer.pad_token == eos:
        vocab = tokenizer.get_vocab()
        for candidate in ("<|endoftext|>", tokenizer.unk_token):
            if candidate and candidate != eos and candidate in vocab:
                tokenizer.pad_token = candidate
                break
        else:
            if tokenizer.pad_token is None:
                tokenizer.pad_token = eos
    return tokenizer


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(str(path), local_files_only=True))


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_FILE).is_file()


def write_meta(directory: str | Path, kind: str, base_model: str, **extra: Any) -> None:
    """Record how to load ``directory`` (``kind``: lora, full or reward) and its base spec."""
    write_json(Path(directory) / META_FILE, {"kind": kind, "base_model": base_model, **extra})


def model_source(spec: str | Path) -> tuple[Path, Path | None]:
    """``(base model dir, adapter dir or None)`` for a spec, a model dir or an adapter dir."""
    from dpray.models import resolve_causal_lm

    path = Path(str(spec)).expanduser()
    if is_adapter(path):
        meta = read_json(path / META_FILE) if (path / META_FILE).is_file() else {}
        base = meta.get("base_model") or read_json(path / ADAPTER_FILE)["base_model_name_or_path"]
        return resolve_causal_lm(base), path
    return resolve_causal_lm(str(spec)), None


def _tokenizer_dir(base: Path, adapter: Path | None) -> Path:
    if adapter is not None and (adapter / "tokenizer_config.json").is_file():
        return adapter
    return base


def load_causal_lm(
    spec: str | Path, dtype: torch.dtype | str = "float32", device: str | None = "cpu"
):
    """``(model, tokenizer)``: the base model with the adapter (if any) merged in, in eval mode.

    Merged because every consumer (generation, PPO's starting policy) wants plain weights: a
    merged forward pass costs what the base costs.  ``device=None`` leaves the weights where
    ``from_pretrained`` put them (a trainer moves them; under ZeRO-3 they are partitions).
    """
    from transformers import AutoModelForCausalLM

    base, adapter = model_source(spec)
    tokenizer = load_tokenizer(_tokenizer_dir(base, adapter))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, local_files_only=True)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return _placed(model, device).eval(), tokenizer


def _placed(model: Any, device: str | None) -> Any:
    return model if device is None else model.to(device)


def load_reward_model(
    path: str | Path, dtype: torch.dtype | str = "float32", device: str | None = "cpu"
):
    """``(model, tokenizer)`` of a one-logit sequence-classification reward model."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=1, dtype=dtype, local_files_only=True
    )
    model.config.pad_token_id = tokenizer.pad_token_id  # where the score is read
    return _placed(model, device).eval(), tokenizer


def fp32_score_head(model: Any) -> Any:
    """Keep a trained one-logit ``score`` head in fp32 on a bf16 backbone (same parameter names).

    The head is tiny, and a bf16 weight that a torch optimiser updates loses small steps.  Its
    input is cast to the head's dtype, so the head also runs outside autocast (PPO scores values
    with the bare model during rollouts); a DeepSpeed engine that casts the whole model to bf16
    (keeping its own fp32 master copy) makes the cast a no-op.
    """
    head = model.score
    head.float()
    head.register_forward_pre_hook(
        lambda module, inputs: tuple(x.to(module.weight.dtype) for x in inputs)
    )
    return model


def new_reward_model(spec: str, dtype: torch.dtype | str = "float32"):
    """A fresh reward model (random one-logit head) on the causal LM ``spec``'s backbone."""
    from transformers import AutoModelForSequenceClassification

    from dpray.models import resolve_causal_lm

    path = resolve_causal_lm(spec)
    tokenizer = load_tokenizer(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=dtype, local_files_only=True
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def merge_reward_adapter(adapter_dir: Path, out_dir: Path, base_spec: str) -> None:
    """Turn a LoRA reward model (adapter + trained score head) into a full model directory."""
    from peft import PeftModel

    model, tokenizer = new_reward_model(base_spec)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def chat_messages(instruction: str, system_prompt: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*messages, {"role": "user", "content": instruction}]


def chat_prompt_ids(tokenizer: Any, instruction: str, system_prompt: str | None = None) -> list:
    """Token ids of ``instruction`` as a user turn, ending where the assistant starts."""
    ids = tokenizer.apply_chat_template(
        chat_messages(instruction, system_prompt),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    return [int(t) for t in ids]


__all__ = [
    "META_FILE",
    "chat_messages",
    "chat_prompt_ids",
    "fp32_score_head",
    "is_adapter",
    "load_causal_lm",
    "load_reward_model",
    "load_tokenizer",
    "merge_reward_adapter",
    "model_source",
    "new_reward_model",
    "prepare_tokenizer",
    "write_meta",
]
