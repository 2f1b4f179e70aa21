"""Optimizer and learning-rate schedule, built from the `optim` config group.

The config composes components (`OptimComponents`): `optimizer` is a partial of any torch optimizer
(`_target_: torch.optim.AdamW`, `_partial_: true`, its own arguments such as betas), called with the
parameters, `lr` and `weight_decay`; `lr_schedule` a partial of `warmup_decay` (or your own function of
the run's length returning the per-step LR factor). `Optim` is the short Python form (`Optim(lr=0.1)`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch

from greenstack.errors import ConfigError, Problem, above, at_least, between, checked

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "linear", "step")


@dataclass
class Optim:
    """What to optimise with; `build` needs the run's length, which only the loop knows."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    nesterov: bool = False
    schedule: Literal["constant", "cosine", "linear", "step"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    step_size_steps: int = 1000
    gamma: float = 0.1

    def __post_init__(self) -> None:
        problems = []
        if self.name not in OPTIMIZERS:
            problems.append(Problem("optim.name", self.name, "unknown optimizer", f"choose one of {OPTIMIZERS}"))
        if self.schedule not in SCHEDULES:
            problems.append(Problem("optim.schedule", self.schedule, "unknown schedule",
                                    f"choose one of {SCHEDULES}"))
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            problems.append(Problem("optim.lr", self.lr, "learning rate must be a positive finite number"))
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            problems.append(Problem("optim.weight_decay", self.weight_decay, "must be a finite number >= 0",
                                    "e.g. optim.weight_decay=0.01 (0 = none)"))
        if not (isinstance(self.momentum, (int, float)) and math.isfinite(self.momentum) and self.momentum >= 0):
            problems.append(Problem("optim.momentum", self.momentum, "must be a finite number >= 0"))
        try:  # a list, a tuple, or the ListConfig `instantiate` passes
            betas = None if isinstance(self.betas, (str, bytes)) else list(self.betas)
        except TypeError:
            betas = None
        if betas is None or len(betas) != 2 or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas):
            problems.append(Problem("optim.betas", self.betas, "must be two numbers within [0, 1)",
                                    "e.g. optim.betas=[0.9,0.999]"))
        if not (isinstance(self.gamma, (int, float)) and math.isfinite(self.gamma) and self.gamma > 0):
            problems.append(Problem("optim.gamma", self.gamma, "must be a finite number > 0"))
        if self.step_size_steps < 1:
            problems.append(Problem("optim.step_size_steps", self.step_size_steps, "must be >= 1"))
        if self.warmup_steps < 0:
            problems.append(Problem("optim.warmup_steps", self.warmup_steps, "must be >= 0"))
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(Problem("optim.min_lr_ratio", self.min_lr_ratio, "must be within [0, 1]"))
        if problems:
            raise ConfigError(problems)

    def build(self, params: Iterable[torch.nn.Parameter], total_steps: int
              ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """Create the optimizer and a per-step LR scheduler for a run of `total_steps` steps."""
        params = list(params)
        if self.name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum,
                                                         weight_decay=self.weight_decay, nesterov=self.nesterov)
        elif self.name == "adam":
            opt = torch.optim.Adam(params, lr=self.lr, betas=tuple(self.betas), weight_decay=self.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=self.lr, betas=tuple(self.betas), weight_decay=self.weight_decay)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor_fn(total_steps))

    def lr_factor_fn(self, total_steps: int) -> Callable[[int], float]:
        """Multiplier of the base LR at each step: linear warm-up, then the chosen decay."""
        return _factor(total_steps, self.schedule, self.warmup_steps, self.min_lr_ratio, self.step_size_steps,
                       self.gamma)


def _factor(total_steps: int, kind: str, warmup: int, floor: float, step_size_steps: int,
            gamma: float) -> Callable[[int], float]:
    decay_steps = max(1, total_steps - warmup)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / decay_steps)
        if kind == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        if kind == "linear":
            return floor + (1 - floor) * (1 - t)
        if kind == "step":
            return gamma ** ((step - warmup) // max(1, step_size_steps))
        return 1.0

    return factor


@checked("optim.lr_schedule")
def warmup_decay(total_steps: int, kind: Literal["constant", "cosine", "linear", "step"] = "constant",
                 warmup_steps: Annotated[int, at_least(0, integer=True)] = 0,
                 min_lr_ratio: Annotated[float, between(0, 1)] = 0.0,
                 step_size_steps: Annotated[int, at_least(1, integer=True)] = 1000,
                 gamma: Annotated[float, above(0)] = 0.1) -> Callable[[int], float]:
    """The LR schedule component (`optim.lr_schedule`, `_partial_: true`): per-step multiplier of the base
    LR for a run of `total_steps` steps: linear warm-up, then constant, cosine or linear decay to
    `min_lr_ratio`, or steps of `gamma` every `step_size_steps`."""
    return _factor(total_steps, kind, warmup_steps, min_lr_ratio, step_size_steps, gamma)


class OptimComponents:
    """What the loop builds the optimizer and LR schedule from (`build`), given as config components."""

    @checked("optim")
    def __init__(self, optimizer: Callable[..., torch.optim.Optimizer],
                 lr: Annotated[float, above(0, fix="a positive learning rate, e.g. optim.lr=0.001")] = 1e-3,
                 weight_decay: Annotated[float, at_least(0, fix="e.g. optim.weight_decay=0.01 (0 = none)")] = 0.0,
                 lr_schedule: Callable[[int], Callable[[int], float]] | None = None) -> None:
        self.optimizer, self.lr, self.weight_decay, self.lr_schedule = optimizer, float(lr), float(weight_decay), lr_schedule

    def build(self, params: Iterable[torch.nn.Parameter], total_steps: int
              ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """Create the optimizer and a per-step LR scheduler for a run of `total_steps` steps."""
        opt = self.optimizer(list(params), lr=self.lr, weight_decay=self.weight_decay)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor_fn(total_steps))

    def lr_factor_fn(self, total_steps: int) -> Callable[[int], float]:
        return self.lr_schedule(total_steps) if self.lr_schedule is not None else (lambda step: 1.0)
