"""Shared pieces of the benchmarks (the workload, per-iteration timing); the scripts print the BENCH line."""

from __future__ import annotations

import statistics
import time

import torch

from greenstack.data import digits
from greenstack.engine.events import Event
from greenstack.engine.policy import Policy, Role
from greenstack.models import build_timm

MODEL, IMAGE_SIZE, BATCH, SEED = "resnet10t", 32, 64, 0


def workload(seed: int = SEED):
    """(model, data module) built exactly the same way for every contender."""
    data = digits(batch_size=BATCH, image_size=IMAGE_SIZE, seed=seed)
    torch.manual_seed(seed)
    model = build_timm(MODEL, num_classes=data.num_classes, in_chans=data.in_chans)
    return model, data


class IterationTimer(Policy):
    """Timestamps at every STEP_END: consecutive deltas are full iterations (data, step, dispatch, logging)."""

    events = frozenset({Event.FIT_START, Event.STEP_END})
    role = Role.OBSERVER

    def __init__(self) -> None:
        super().__init__(name="timer")
        self.stamps: list[float] = []

    def __call__(self, event, state, reporter) -> None:
        self.stamps.append(time.perf_counter())

    def deltas(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
