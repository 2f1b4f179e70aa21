"""Batch-size search: the largest power-of-two batch that fits a memory budget, then the best measured one.

Bigger batches amortise per-step overheads (kernel launches, optimizer step, Python) until the device
is saturated; past that point they only cost memory. The search doubles the batch from the configured
size while a trial step succeeds and its peak memory stays within `memory_fraction` of the device
(GPU allocator peak; RSS on CPU), halving instead when the configured batch does not fit. An
out-of-memory error during a trial is caught and means "does not fit". Among the batches that fit it
keeps the one with the most samples per joule (or per second without an energy counter), and moves
away from the configured batch only for a clear gain. The learning rate then follows a scaling rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

LrRule = Literal["linear", "sqrt", "none"]


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM, or an allocator failure on CPU (`DefaultCPUAllocator: can't allocate memory`)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@dataclass
class BatchTrial:
    """One measured batch size."""

    batch_size: int
    fits: bool
    peak_bytes: int | None = None
    samples_per_s: float | None = None
    samples_per_j: float | None = None
    reason: str = ""

    def score(self, basis: str) -> float:
        value = self.samples_per_j if basis == "samples/J" else self.samples_per_s
        return value if value is not None else -math.inf

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "fits": self.fits, "peak_bytes": self.peak_bytes,
                "samples_per_s": self.samples_per_s, "samples_per_j": self.samples_per_j, "reason": self.reason}


@dataclass
class BatchSizeResult:
    """All trials, the largest batch that fit, the chosen batch and its gain over the configured one."""

    start: int
    chosen: int
    max_fit: int | None
    basis: str
    gain: float
    trials: list[BatchTrial] = field(default_factory=list)


def search_batch_size(peak_bytes: Callable[[int], int | None],
                      measure: Callable[[list[int]], dict[int, tuple[float | None, float | None]]], *,
                      start: int, max_batch_size: int, limit_bytes: int, memory_fraction: float = 0.8,
                      min_gain: float = 1.05, basis: str = "samples/s", min_batch_size: int = 1) -> BatchSizeResult:
    """Power-of-two search from `start` (see module docstring), in two phases.

    Memory: `peak_bytes(n)` runs one step at batch `n` and returns its peak memory (it may raise an
    out-of-memory error); `n` fits when that is at most `memory_fraction * limit_bytes`.
    Speed: `measure(sizes)` times all fitting sizes together (interleaved, so machine noise hits
    them alike) and returns `{n: (samples/s, samples/J or None)}`.
    """
    budget = memory_fraction * limit_bytes
    trials: dict[int, BatchTrial] = {}

    def fits(n: int) -> bool:
        try:
            peak = peak_bytes(n)
        except Exception as e:  # noqa: BLE001 - only OOM is expected; anything else is re-raised
            if not is_out_of_memory(e):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            trials[n] = BatchTrial(n, False, reason=f"out of memory: {str(e).splitlines()[0][:120]}")
            return False
        if peak is not None and peak > budget:
            trials[n] = BatchTrial(n, False, peak, reason=f"peak {peak / 2**20:.0f} MiB > {memory_fraction:.0%} "
                                                          f"of {limit_bytes / 2**20:.0f} MiB")
            return False
        trials[n] = BatchTrial(n, True, peak)
        return True

    n = start
    if fits(n):
        while n * 2 <= max_batch_size and fits(n * 2):
            n *= 2
    else:
        while n > min_batch_size:
            n = max(min_batch_size, n // 2)
            if fits(n):
                break
    fitting = sorted(t.batch_size for t in trials.values() if t.fits)
    if not fitting:
        return BatchSizeResult(start, start, None, basis, 1.0, list(trials.values()))
    for size, (per_s, per_j) in measure(fitting).items():
        trials[size].samples_per_s, trials[size].samples_per_j = per_s, per_j
    best = max((trials[size] for size in fitting), key=lambda t: (t.score(basis), -t.batch_size))
    base = trials[start]
    if base.fits:
        base_score = base.score(basis)
        gain = best.score(basis) / base_score if base_score > 0 else 1.0
        if gain < min_gain:
            best, gain = base, 1.0
    else:
        gain = math.inf
    return BatchSizeResult(start, best.batch_size, fitting[-1], basis, gain, list(trials.values()))


def lr_scale_factor(old_batch_size: int, new_batch_size: int, rule: LrRule) -> float:
    """Goyal et al.'s linear rule (SGD), the square-root rule (Adam-family; Malladi et al. 2022), or none."""
    if rule == "none" or old_batch_size == new_batch_size:
        return 1.0
    ratio = new_batch_size / old_batch_size
    return ratio if rule == "linear" else math.sqrt(ratio)


def scale_learning_rate_(optimizer: torch.optim.Optimizer, lr_scheduler: Any, factor: float) -> None:
    """Multiply every group's LR by `factor` and keep the schedule consistent (its base LRs too)."""
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    if lr_scheduler is not None and hasattr(lr_scheduler, "base_lrs"):
        lr_scheduler.base_lrs = [lr * factor for lr in lr_scheduler.base_lrs]
        if hasattr(lr_scheduler, "_last_lr"):
            lr_scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
