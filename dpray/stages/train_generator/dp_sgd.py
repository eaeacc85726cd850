"""One DP-SGD step: per-example (or per-user) clipped gradient sums, then a noisy update.

Per-sample gradients come from Opacus' ``GradSampleModule`` (hooks, or functorch); LoRA layers
are plain ``nn.Linear`` to it, and the frozen base model gets no hooks.  Clipping is done here
rather than by Opacus' optimizer because user-level DP must sum a user's per-example gradients
*before* clipping, and because the noise is added by an aggregator (central or secure) across
workers, not by a local optimizer.

The update divides the noisy sum by the *expected* batch size q·n: the realised batch size is
private under Poisson sampling and must not leak through the normalisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus import GradSampleModule

from dpray.stages.train_generator.data import IGNORE, Batch


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean next-token cross-entropy of each row (rows of any length weigh the same)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    ce = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).view(shift_labels.shape)
    counts = (shift_labels != IGNORE).sum(1).clamp(min=1)
    return ce.sum(1) / counts


def wrap_for_per_sample_grads(model: torch.nn.Module, mode: str = "hooks") -> GradSampleModule:
    """Opacus wrapper computing ``p.grad_sample`` for every trainable parameter."""
    if mode not in ("hooks", "functorch"):
        raise ValueError(f"grad_sample_mode '{mode}' is not supported (hooks, functorch)")
    return GradSampleModule(
        model, batch_first=True, loss_reduction="sum", force_functorch=(mode == "functorch")
    )


@dataclass
class LocalSum:
    """A worker's clipped gradient sum for one step plus counts (the counts stay private)."""

    vector: torch.Tensor  # flat, float32, length = number of trainable parameters
    loss_sum: float
    examples: int
    units: int
    tokens: int
    clipped_units: int


def clipped_sum(
    gsm: GradSampleModule,
    params: Sequence[torch.nn.Parameter],
    batches: Sequence[Batch],
    clip_norm: float,
) -> LocalSum:
    """Σ over units of clip_C(Σ over the unit's examples of ∇ loss_example), flattened."""
    sums = [torch.zeros(p.numel(), dtype=torch.float32, device=p.device) for p in params]
    loss_sum, examples, units, tokens, clipped = 0.0, 0, 0, 0, 0
    for batch in batches:
        device = params[0].device
        out = gsm(
            input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
        )
        losses = per_example_loss(out.logits, batch.labels.to(device))
        losses.sum().backward()
        unit_idx = batch.units.to(device)
        per_unit = []
        norms_sq = torch.zeros(batch.num_units, device=device)
        for p in params:
            gs = p.grad_sample.reshape(p.grad_sample.shape[0], -1).float()
            if batch.num_units != gs.shape[0]:
                gs = torch.zeros(batch.num_units, gs.shape[1], device=device).index_add_(
                    0, unit_idx, gs
                )
            per_unit.append(gs)
            norms_sq += gs.pow(2).sum(1)
            p.grad_sample = None
            p.grad = None
        norms = norms_sq.sqrt()
        factors = (clip_norm / (norms + 1e-6)).clamp(max=1.0)
        for total, gs in zip(sums, per_unit, strict=True):
            total += factors @ gs
        loss_sum += float(losses.detach().sum())
        examples += len(losses)
        units += batch.num_units
        tokens += batch.num_tokens
        clipped += int((norms > clip_norm).sum())
    return LocalSum(torch.cat(sums), loss_sum, examples, units, tokens, clipped)


def apply_update(
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.nn.Parameter],
    noisy_sum: torch.Tensor,
    expected_batch_size: float,
) -> None:
    """Set ``p.grad = noisy_sum / (q·n)`` and take an optimizer step."""
    grad = noisy_sum.to(dtype=torch.float32) / expected_batch_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = grad[offset : offset + n].view_as(p).to(p.device, p.dtype).clone()
        offset += n
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def dp_step(
    gsm: GradSampleModule,
    params: Sequence[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    batches: Sequence[Batch],
    clip_norm: float,
    expected_batch_size: float,
    aggregate: Callable[[torch.Tensor], torch.Tensor],
) -> LocalSum:
    """Clipped local sum → aggregate (adds noise, sums across workers) → update."""
    local = clipped_sum(gsm, params, batches, clip_norm)
    noisy = aggregate(local.vector)
    apply_update(optimizer, params, noisy, expected_batch_size)
    return local


def plain_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[Batch],
    expected_batch_size: float,
) -> float:
    """The non-private baseline: the same loss normalisation, no clipping, no noise."""
    loss_sum = 0.0
    device = next(model.parameters()).device
    for batch in batches:
        out = model(
            input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
        )
        losses = per_example_loss(out.logits, batch.labels.to(device))
        (losses.sum() / expected_batch_size).backward()
        loss_sum += float(losses.detach().sum())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum
