"""L2 on selected weights, inside the active window: as a loss term or as decoupled decay."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from greenstack.compression.l2 import decay_, l2_penalty
from greenstack.compression.selection import check_patterns, select_weights
from greenstack.engine.events import Event
from greenstack.engine.policy import Policy, Role
from greenstack.engine.reporter import Reporter
from greenstack.engine.state import State
from greenstack.errors import ConfigError, Problem, at_least, checked
from greenstack.policies.compression._common import init_window
from greenstack.provenance import Figure

log = logging.getLogger("greenstack")
NAME = "compression.l2"


class L2Regularization(Policy):
    """Adds `coefficient/2 * sum ||w||^2` of the selected weights to the loss (`mode: loss`), or shrinks
    them by `lr * coefficient` after each step (`mode: decoupled`), while active.

    Unlike the optimizer's weight decay it leaves norms, biases and embeddings alone, and can be
    limited to a window (e.g. before pruning starts) and to layers matched by `include`/`exclude`.
    """

    role = Role.MODIFIER

    audit_kind = "compression"

    events = frozenset({Event.INIT, Event.AFTER_FORWARD, Event.STEP_END})

    @checked(NAME)
    def __init__(self, coefficient: Annotated[float, at_least(0)] = 1e-4, mode: Literal["loss", "decoupled"] = "loss",
                 include: list[str] | str | None = None, exclude: list[str] | str | None = None,
                 start: str | int | None = None, end: str | int | None = None) -> None:
        problems: list[Problem] = []
        init_window(self, NAME, start, end, problems)
        problems += check_patterns(include, f"{NAME}.include") + check_patterns(exclude, f"{NAME}.exclude")
        if problems:
            raise ConfigError(problems)
        self.coefficient, self.mode, self.include, self.exclude = float(coefficient), mode, include, exclude
        self._weights: list[Any] = []
        self._model_id: int | None = None
        self.last_penalty: float | None = None

    def _select(self, state: State) -> list[Any]:
        if self._model_id != id(state.model):
            self._weights = list(select_weights(state.model, self.include, self.exclude).values())
            self._model_id = id(state.model)
        return self._weights

    def __call__(self, event: Event, state: State, reporter: Reporter) -> None:
        if event is Event.INIT:
            if not self._select(state):
                raise ConfigError(Problem(f"{NAME}.include", self.include, "matches no Conv/Linear weight",
                                          "loosen include/exclude"))
            return
        if event is Event.AFTER_FORWARD and self.mode == "loss" and state.loss is not None:
            penalty = l2_penalty(self._select(state), self.coefficient)
            state.loss = state.loss + penalty.to(state.loss.device)
            self.last_penalty = penalty.detach()
        elif event is Event.STEP_END and self.mode == "decoupled" and state.optimizer is not None:
            decay_(self._select(state), self.coefficient, state.optimizer.param_groups[0]["lr"])

    def summary(self) -> dict[str, Any]:
        figures = {"compression/l2_coefficient": Figure(self.coefficient, "", "measured", f"{NAME} config ({self.mode})")}
        if self.last_penalty is not None:
            figures["compression/l2_last_penalty"] = Figure(float(self.last_penalty), "nats", "measured",
                                                            f"{NAME}: last added loss term")
        return figures
