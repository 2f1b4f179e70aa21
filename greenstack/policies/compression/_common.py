"""Helpers shared by the compression policies: windows parsed with every problem collected."""

from __future__ import annotations

import warnings

from torch import nn

from greenstack.engine.duration import Duration
from greenstack.engine.policy import Policy
from greenstack.engine.state import State
from greenstack.errors import ConfigError, Problem


def init_window(policy: Policy, name: str, start: str | int | None, end: str | int | None,
                problems: list[Problem]) -> None:
    """`Policy.__init__` with `start`/`end`, collecting their problems instead of raising the first,
    and rejecting an `end` before `start` when both are in the same unit (mixed units are checked when
    the loop resolves the window, still before the first step)."""
    parsed: dict[str, Duration | None] = {}
    for key, value in (("start", start), ("end", end)):
        try:
            parsed[key] = Duration.parse(value, key=f"{name}.{key}") if value is not None else None
        except ConfigError as e:
            problems.extend(e.problems)
            parsed[key] = None
    Policy.__init__(policy, start=parsed["start"], end=parsed["end"], name=name)
    s, e = parsed["start"], parsed["end"]
    if s is not None and e is not None and s.unit == e.unit and e.value < s.value:
        problems.append(Problem(f"{name}.end", str(end), f"ends before it starts ({start})",
                                "make `end` later than `start`"))


def duration_steps(value: Duration | None, policy_state: State, default: int = 0) -> int:
    """A parsed duration as an optimizer step index for the current run."""
    if value is None:
        return default
    return value.to_steps(steps_per_epoch=policy_state.steps_per_epoch, total_steps=policy_state.max_steps,
                          batch_size=policy_state.batch_size)


def replace_model(state: State, model: nn.Module) -> None:
    """`state.replace_model` without torch's "lr_scheduler.step() before optimizer.step()" warning: the
    new schedule is fast-forwarded to the current step on purpose, no optimizer step is skipped."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        state.replace_model(model)
