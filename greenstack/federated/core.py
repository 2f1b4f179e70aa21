"""The math of geo-distributed training as plain functions, testable without processes.

Top-k with error feedback (what a worker sends), the work-weighted average of sparse updates (what
every worker computes identically from the gathered updates), the outer optimizer step, and the
carbon-aware participation decision (how many local steps each region does in a round).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

#: bytes per sent index of a top-k update (int32 positions into the flat update vector)
INDEX_BYTES = 4


def topk_with_error_feedback(update: torch.Tensor, error: torch.Tensor, ratio: float
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, values) of the largest-magnitude `ratio` of `update + error`; `error` keeps the rest.

    Error feedback is why top-k converges: what is not sent this round is added to the next update
    instead of being lost, so every coordinate is eventually applied. `error` is updated in place.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    error.add_(update)
    k = max(1, math.ceil(ratio * error.numel()))
    if k >= error.numel():
        indices = torch.arange(error.numel(), device=error.device)
    else:
        indices = torch.topk(error.abs(), k, sorted=False).indices
    values = error[indices].clone()
    error[indices] = 0.0
    return indices.to(torch.int32), values


def weighted_sparse_average(numel: int, indices: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                            weights: Sequence[float]) -> torch.Tensor:
    """Dense average of sparse updates, each weighted by the work its worker did (0 = sat out).

    Every worker evaluates this on the same gathered tensors in the same order, so all replicas get
    bit-identical results without a second collective. All weights zero gives a zero update.
    """
    total = float(sum(weights))
    out = torch.zeros(numel, dtype=values[0].dtype if values else torch.float32,
                      device=values[0].device if values else None)
    if total <= 0:
        return out
    for idx, val, w in zip(indices, values, weights, strict=True):
        if w > 0 and idx.numel():
            out.index_add_(0, idx.long(), val.to(out.dtype) * (float(w) / total))
    return out


def weighted_dense_average(updates: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Work-weighted mean of dense updates (no compression)."""
    total = float(sum(weights))
    out = torch.zeros_like(updates[0])
    if total <= 0:
        return out
    for update, w in zip(updates, weights, strict=True):
        if w > 0:
            out.add_(update, alpha=float(w) / total)
    return out


@dataclass
class OuterOptimizer:
    """SGD with (Nesterov) momentum on the pseudo-gradient `anchor - local`, as in DiLoCo.

    lr=1, momentum=0 is plain parameter averaging; DiLoCo uses lr=0.7, momentum=0.9, nesterov.
    """

    lr: float = 1.0
    momentum: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def step(self, anchor: torch.Tensor, pseudo_grad: torch.Tensor, plain_from: int | None = None) -> None:
        """Move `anchor` (flat global parameters) in place along `-pseudo_grad`.

        Elements from `plain_from` on (BatchNorm statistics) are plainly averaged: momentum would push a
        running variance below zero.
        """
        split = anchor.numel() if plain_from is None else plain_from
        head = pseudo_grad[:split]
        grad = head
        if self.momentum:
            if self._buf is None:
                self._buf = head.clone()
            else:
                self._buf.mul_(self.momentum).add_(head)
            grad = head.add(self._buf, alpha=self.momentum) if self.nesterov else self._buf
        anchor[:split].add_(grad, alpha=-self.lr)
        if split < anchor.numel():
            anchor[split:].sub_(pseudo_grad[split:])

    def state_dict(self) -> dict:
        return {"buf": self._buf}

    def load_state_dict(self, state: dict) -> None:
        self._buf = state.get("buf")


@dataclass(frozen=True)
class ParticipationRule:
    """When a region sits out or slows down in a round, from grid intensity.

    A region is *dirty* when its intensity is above `threshold_g_per_kwh` (if set) or above the
    cheapest region's intensity × (1 + `margin`) (if set). Dirty regions do `dirty_steps_fraction`
    of the round's local steps (0 = sit out). `mode="uniform"` makes every region do every step.
    """

    mode: str = "carbon_aware"
    threshold_g_per_kwh: float | None = None
    margin: float | None = 0.5
    dirty_steps_fraction: float = 0.0

    def steps(self, intensities_g_per_kwh: Mapping[str, float], local_steps: int) -> dict[str, int]:
        """Local steps each region does this round."""
        return decide_participation(intensities_g_per_kwh, local_steps, mode=self.mode,
                                    threshold_g_per_kwh=self.threshold_g_per_kwh, margin=self.margin,
                                    dirty_steps_fraction=self.dirty_steps_fraction)


def decide_participation(intensities_g_per_kwh: Mapping[str, float], local_steps: int, *,
                         mode: str = "carbon_aware", threshold_g_per_kwh: float | None = None,
                         margin: float | None = 0.5, dirty_steps_fraction: float = 0.0) -> dict[str, int]:
    """Local steps per region for one outer round (see `ParticipationRule`).

    The cleanest region always participates fully, so a round never has zero work even when every
    region is above the threshold.
    """
    if mode == "uniform" or not intensities_g_per_kwh:
        return dict.fromkeys(intensities_g_per_kwh, local_steps)
    cheapest = min(intensities_g_per_kwh.values())
    reduced = int(math.floor(local_steps * dirty_steps_fraction))
    out: dict[str, int] = {}
    for region, intensity in intensities_g_per_kwh.items():
        dirty = (threshold_g_per_kwh is not None and intensity > threshold_g_per_kwh) or \
                (margin is not None and intensity > cheapest * (1.0 + margin))
        out[region] = reduced if dirty and intensity > cheapest else local_steps
    return out


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    """All parameters and floating buffers (BatchNorm statistics) as one flat fp32 vector (a copy)."""
    tensors = [t.detach().reshape(-1).float() for t in _synced_tensors(module)]
    return torch.cat(tensors) if tensors else torch.zeros(0)


def load_flat_params_(module: torch.nn.Module, flat: torch.Tensor) -> None:
    """Write a vector made by `flat_params` back into the module's parameters and float buffers."""
    offset = 0
    with torch.no_grad():
        for t in _synced_tensors(module):
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t).to(t.dtype))
            offset += n
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} values, module needs {offset}")


def param_count(module: torch.nn.Module) -> int:
    """How many leading elements of `flat_params(module)` are parameters (the rest are buffers)."""
    return sum(p.numel() for p in module.parameters())


def _synced_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    params = [p for p in module.parameters()]
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    return params + buffers
