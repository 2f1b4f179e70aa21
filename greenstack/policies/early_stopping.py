"""Stop when a validation metric stops improving for `patience` evaluations."""

from __future__ import annotations

import logging
import math
from typing import Annotated, Any, Literal

from greenstack.engine.events import Event
from greenstack.engine.policy import Policy, Role
from greenstack.engine.reporter import Reporter
from greenstack.engine.state import State
from greenstack.errors import at_least, checked
from greenstack.tasks.base import has_improved

log = logging.getLogger("greenstack")


class EarlyStopping(Policy):
    """Requests a stop after `patience` evaluations without improvement of `monitor`."""

    role = Role.OBSERVER

    events = frozenset({Event.EVAL_END})

    @checked("policies.early_stopping")
    def __init__(self, monitor: str = "val/loss", mode: Literal["min", "max"] = "min",
                 patience: Annotated[int, at_least(1, integer=True)] = 3, min_delta: Annotated[float, at_least(0)] = 0.0,
                 start: str | None = None, end: str | None = None) -> None:
        super().__init__(start=start, end=end, name="early_stopping")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.best = math.nan
        self.bad_evals = 0

    def __call__(self, event: Event, state: State, reporter: Reporter) -> None:
        if self.monitor not in state.metrics:
            log.warning("early_stopping: metric %r not produced by evaluation; known: %s",
                        self.monitor, sorted(state.metrics))
            return
        current = float(state.metrics[self.monitor])
        if has_improved(current, self.best, mode=self.mode, min_delta=self.min_delta):
            self.best, self.bad_evals = current, 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            state.request_stop(f"{self.monitor} did not improve for {self.patience} evaluations "
                               f"(best {self.best:.4g})")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_evals = float(state["best"]), int(state["bad_evals"])
