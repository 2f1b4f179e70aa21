"""Gradual magnitude pruning (Zhu & Gupta, 2017, "To prune, or not to prune") as plain functions.

The sparsity follows the cubic schedule

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3,   t in {t0, t0 + dt, ..., t0 + n * dt}

so pruning is fast while the network still has redundant weights and slows down as it approaches the
final sparsity. Masks are recomputed only at pruning steps; between them (and after the schedule
ends, during fine-tuning) they are re-applied after every optimizer step so that momentum or weight
decay cannot revive a pruned weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from greenstack.compression.selection import select_weights

Scope = Literal["global", "layer"]
Structure = Literal["unstructured", "channels"]


def cubic_sparsity(step: int, *, initial: float, final: float, start_step: int, end_step: int,
                   frequency: int = 1) -> float:
    """Target sparsity at optimizer step `step` under the cubic schedule.

    Before `start_step` nothing is pruned (0.0). Between start and end the target changes only at
    pruning steps `start_step + k * frequency` (held constant in between); from `end_step` on it is `final`.
    """
    if step < start_step:
        return 0.0
    span = end_step - start_step
    if span <= 0 or step >= end_step:
        return final
    frequency = max(1, frequency)
    last_prune_step = start_step + ((step - start_step) // frequency) * frequency
    progress = (last_prune_step - start_step) / span
    return final + (initial - final) * (1.0 - progress) ** 3


def is_pruning_step(step: int, *, start_step: int, end_step: int, frequency: int = 1) -> bool:
    """Whether masks are recomputed at `step`: every `frequency` steps from start, plus the end step."""
    if step < start_step or step > end_step:
        return False
    return step == end_step or (step - start_step) % max(1, frequency) == 0


def _channel_scores(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output channel (dim 0), divided by sqrt(fan-in) so layers compare fairly."""
    flat = weight.detach().reshape(weight.shape[0], -1).float()
    return flat.norm(dim=1) / math.sqrt(flat.shape[1])


def _kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (1-based) of a flat tensor; kthvalue is O(n), a full sort is not needed."""
    return values.kthvalue(k).values


def compute_masks(weights: Mapping[str, torch.Tensor], sparsity: float, *, scope: Scope = "global",
                  structure: Structure = "unstructured") -> dict[str, torch.Tensor]:
    """Boolean keep-masks (True = keep) that zero the `sparsity` fraction of smallest-magnitude weights.

    `scope="global"` ranks all selected weights together (layers with more redundancy lose more),
    `"layer"` prunes each tensor to the same sparsity. `structure="channels"` removes whole output
    channels ranked by their normalised L2 norm; every layer keeps at least one channel.
    Ties at the threshold are broken by position, so exactly round(sparsity * n) elements are pruned.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be within [0, 1), got {sparsity}")
    masks: dict[str, torch.Tensor] = {}
    if structure == "channels":
        scores = {name: _channel_scores(w) for name, w in weights.items()}
        if scope == "layer":
            for name, w in weights.items():
                keep = _keep_top(scores[name], sparsity)
                keep[scores[name].argmax()] = True
                masks[name] = _expand(keep, w)
            return masks
        flat = torch.cat([s.cpu() for s in scores.values()]) if scores else torch.zeros(0)
        # channels differ in size across layers: prune the lowest-scoring ones until `sparsity` of the
        # weights (not of the channels) is gone
        sizes = torch.cat([torch.full((scores[n].numel(),), w[0].numel(), dtype=torch.float64)
                           for n, w in weights.items()]) if scores else torch.zeros(0, dtype=torch.float64)
        order = torch.argsort(flat, stable=True)
        cumulative = torch.cumsum(sizes[order], 0)
        n_prune = int((cumulative <= sparsity * sizes.sum() + 0.5).sum())
        keep_all = torch.ones(flat.numel(), dtype=torch.bool)
        keep_all[order[:n_prune]] = False
        offset = 0
        for name, w in weights.items():
            n = scores[name].numel()
            keep = keep_all[offset:offset + n].to(w.device)
            keep[scores[name].argmax()] = True
            masks[name] = _expand(keep, w)
            offset += n
        return masks
    if scope == "layer":
        return {name: _keep_top(w.detach().abs().flatten(), sparsity).reshape(w.shape) for name, w in weights.items()}
    flat = torch.cat([w.detach().abs().flatten().float().cpu() for w in weights.values()]) if weights else torch.zeros(0)
    keep_all = _keep_top(flat, sparsity)
    offset = 0
    for name, w in weights.items():
        masks[name] = keep_all[offset:offset + w.numel()].reshape(w.shape).to(w.device)
        offset += w.numel()
    return masks


def _keep_top(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask over a flat score tensor pruning exactly round(sparsity * n) lowest scores."""
    n = scores.numel()
    n_prune = int(round(sparsity * n))
    keep = torch.ones(n, dtype=torch.bool, device=scores.device)
    if n_prune <= 0:
        return keep
    threshold = _kth_smallest(scores, n_prune)
    below = scores < threshold
    keep[below] = False
    remaining = n_prune - int(below.sum())
    if remaining > 0:  # ties at the threshold: prune the first `remaining` of them
        ties = torch.nonzero(scores == threshold).flatten()[:remaining]
        keep[ties] = False
    return keep


def _expand(channel_keep: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    shape = (weight.shape[0],) + (1,) * (weight.ndim - 1)
    return channel_keep.reshape(shape).expand_as(weight).clone()


@torch.no_grad()
def apply_masks_(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned elements in place (weights without a mask are left alone)."""
    for name, w in weights.items():
        mask = masks.get(name)
        if mask is not None:
            w.mul_(mask.to(dtype=w.dtype, device=w.device))


@torch.no_grad()
def mask_gradients_(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the gradients of pruned elements so optimizer state (momentum, Adam moments) stays at zero."""
    for name, w in weights.items():
        mask = masks.get(name)
        if mask is not None and w.grad is not None:
            w.grad.mul_(mask.to(dtype=w.grad.dtype, device=w.grad.device))


def masks_from_zeros(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep-masks recovered from the weights themselves (after a resume, or for an exported model)."""
    return {name: w.detach() != 0 for name, w in weights.items()}


def sparsity_of(weights: Mapping[str, torch.Tensor]) -> float:
    """Fraction of zero elements over the given tensors."""
    total = sum(w.numel() for w in weights.values())
    if not total:
        return 0.0
    return sum(int((w.detach() == 0).sum()) for w in weights.values()) / total


def magnitude_prune_(model: nn.Module, sparsity: float, *, include: str | list[str] | None = None,
                     exclude: str | list[str] | None = None, scope: Scope = "global",
                     structure: Structure = "unstructured") -> dict[str, torch.Tensor]:
    """One-shot magnitude pruning of `model`'s Conv/Linear weights in place; returns the keep-masks."""
    weights = select_weights(model, include, exclude)
    masks = compute_masks(weights, sparsity, scope=scope, structure=structure)
    apply_masks_(weights, masks)
    return masks
