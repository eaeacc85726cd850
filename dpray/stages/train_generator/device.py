"""Where a DP-SGD worker computes, and in which precision: decided inside the worker.

The device is the one Ray Train assigned to this worker (``ray.train.torch.get_device()``:
``cuda:<local index>`` when the worker was scheduled with a GPU, else CPU), never one chosen on
the driver.  On a GPU the frozen base model is held in bf16 (half the memory of fp32: a 7B base
is ~14 GB instead of ~28 GB) while the LoRA weights, their per-sample gradients, the clipped sum,
the noise and the optimizer state stay fp32: DP-SGD's clipping and noise are calibrated on the
fp32 gradient, and bf16's 8-bit mantissa would round the small noisy update away.  No autocast
wraps the step (Opacus' hooks would see mixed-precision activations).  On a CPU everything is
fp32 (bf16 matmuls are slow or emulated on CPUs without AVX512-BF16/AMX).
"""

from __future__ import annotations

import torch


def worker_device() -> torch.device:
    """The device Ray Train gave this worker (CPU outside a GPU worker or outside Ray Train)."""
    try:
        import ray.train.torch

        return torch.device(ray.train.torch.get_device())
    except Exception:  # not inside a Ray Train worker (a test, a Ray task): CPU
        return torch.device("cpu")


def base_dtype(device: torch.device) -> torch.dtype:
    """Precision of the frozen base model on ``device``: bf16 on a GPU that supports it."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def trainable_to_fp32(model: torch.nn.Module) -> None:
    """Cast the trainable (LoRA) parameters to fp32 in place; the frozen base keeps its dtype."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
