"""DP-SGD on the device Ray assigned (#16 item 1), pinned on a CPU-only machine.

A GPU worker's bug is a tensor made on the process's default device (the CPU) next to a model on
``cuda:0``.  Here the roles are played by two devices a CPU machine has: the model and batches
live on ``cpu`` (the assigned device) while the *default* device is ``meta``.  A factory call in
the DP step that does not name its device then makes a meta tensor, and mixing it with the
model's tensors fails or leaves a meta result; so a step that runs and matches the plain result
creates and reduces every tensor on the assigned device.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dpray.stages.train_generator import device as device_mod
from dpray.stages.train_generator.adapter import build_lora_model, verify_adapter
from dpray.stages.train_generator.dp_sgd import (
    apply_update,
    clipped_sum,
    trainable_parameters,
    wrap_for_per_sample_grads,
)
from dpray.stages.train_generator.noise import CentralAggregator, SecureAggregator
from dpray.stages.train_generator.plan import LoraLayout
from tests.train_helpers import batch_of, random_units, tiny_lora_model


def _step(model, batches, aggregator, default_device: str | None):
    params = trainable_parameters(model)
    gsm = wrap_for_per_sample_grads(model)
    opt = torch.optim.AdamW(params, lr=1e-2)
    context = torch.device(default_device) if default_device else _null()
    with context:
        local = clipped_sum(gsm, params, batches, 0.5)
        noisy = aggregator(local.vector, 0)
        apply_update(opt, params, noisy, 8.0)
    gsm._close()
    return local.vector, noisy, torch.cat([p.detach().flatten() for p in params])


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("scheme", ["central", "secure"])
def test_every_tensor_of_the_dp_step_is_made_on_the_assigned_device(scheme):
    units = random_units(8)
    batches = [batch_of(units, [0, 1, 2, 3]), batch_of(units, [4, 5, 6, 7])]

    def aggregator():
        if scheme == "central":
            return CentralAggregator(noise_multiplier=0.0, clip_norm=0.5)
        return SecureAggregator(
            dim=dim,
            noise_multiplier=0.0,
            clip_norm=0.5,
            max_units_per_worker=8,
            session=b"device-test",
        )

    dim = sum(p.numel() for p in trainable_parameters(tiny_lora_model()))
    expected = _step(tiny_lora_model(), batches, aggregator(), None)
    got = _step(tiny_lora_model(), batches, aggregator(), "meta")
    for want, have in zip(expected, got, strict=True):
        assert have.device == torch.device("cpu")  # the assigned device, not the default
        tolerance = 1e-6 if scheme == "central" else 1e-3  # secure quantises the sum
        assert torch.allclose(have, want, atol=tolerance)


def test_frozen_base_in_bf16_lora_in_fp32_takes_a_dp_step():
    """The GPU precision recipe, run on the CPU: bf16 base, fp32 LoRA, no autocast."""
    model = tiny_lora_model()
    for param in model.parameters():
        if not param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    device_mod.trainable_to_fp32(model)
    trainable = trainable_parameters(model)
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    units = random_units(4)
    vector, noisy, after = _step(model, [batch_of(units, [0, 1, 2, 3])], _central(), None)
    assert vector.dtype == torch.float32 and torch.isfinite(vector).all()
    assert float(vector.norm()) > 0  # per-sample gradients reached the fp32 LoRA weights
    assert after.dtype == torch.float32


def _central():
    return CentralAggregator(noise_multiplier=0.0, clip_norm=0.5)


def test_base_precision_per_device(monkeypatch):
    assert device_mod.base_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert device_mod.base_dtype(torch.device("cuda:0")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert device_mod.base_dtype(torch.device("cuda:0")) == torch.float32


def test_worker_device_is_cpu_outside_ray_train():
    assert device_mod.worker_device() == torch.device("cpu")


def test_build_lora_model_puts_the_model_on_the_given_device(tmp_path: Path):
    model_dir = tmp_path / "base"
    _plain_tiny(model_dir)
    layout = LoraLayout(0, 4, 8, 0.0, ("q_proj", "v_proj"))
    model, _ = build_lora_model(str(model_dir), layout, "cpu")
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    again, _ = build_lora_model(str(model_dir), layout, torch.device("cpu"))
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)  # same seed: every rank builds the same replica


def test_adapter_check_reads_the_saved_tensors_back(tmp_path: Path):
    model_dir = tmp_path / "base"
    _plain_tiny(model_dir)
    layout = LoraLayout(0, 4, 8, 0.0, ("q_proj", "v_proj"))
    model, _ = build_lora_model(str(model_dir), layout)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.01)
    adapter = tmp_path / "adapter"
    model.save_pretrained(str(adapter))
    assert verify_adapter(str(model_dir), adapter, model) == 4  # 2 layers x (q, v)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    with torch.no_grad():  # a tensor that did not round-trip is caught
        next(p for n, p in model.named_parameters() if "lora_A" in n).add_(1.0)
    with pytest.raises(RuntimeError, match="did not round-trip"):
        verify_adapter(str(model_dir), adapter, model)


def _plain_tiny(folder: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(folder))
    return model
