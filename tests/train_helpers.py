"""Tiny models and batches for DP-SGD tests (no tokenizer needed)."""

from __future__ import annotations

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from dpray.stages.train_generator.data import collate

VOCAB = 97


def tiny_lora_model(seed: int = 0, dropout: float = 0.0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = get_peft_model(
        LlamaForCausalLM(cfg),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj"]),
    )
    for name, p in model.named_parameters():  # non-zero B so every LoRA tensor gets gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def random_units(num_units: int, per_unit: int = 1, seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        [rng.integers(2, VOCAB, size=rng.integers(4, 12)).astype(np.int32) for _ in range(per_unit)]
        for _ in range(num_units)
    ]


def batch_of(units: list[list[np.ndarray]], unit_ids: list[int], prompt_len: int = 1):
    seqs, owners = [], []
    for u in unit_ids:
        seqs.extend(units[u])
        owners.extend([u] * len(units[u]))
    return collate(seqs, owners, prompt_len, pad_id=0)


def dp_train_tree(run, data, model, epsilon: float = 4.0, **train) -> dict:
    """The config tree of a tiny DP-SGD run (``generator.strategy`` pinned: on CPU ``auto``
    would pick another strategy); ``train`` adds or overrides train keys."""
    return {
        "run_dir": str(run),
        "data": {"path": str(data), "text_field": "instruction", "id_field": "id"},
        "privacy": {"epsilon": epsilon, "delta": 1e-5},
        "generator": {"strategy": "dp_finetune"},
        "train": {
            "model": str(model),
            "expected_batch_size": 32,
            "micro_batch_size": 16,
            "max_tokens": 48,
            **train,
        },
    }
