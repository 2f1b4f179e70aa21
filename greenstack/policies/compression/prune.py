"""Gradual magnitude pruning with Zhu & Gupta's cubic schedule; masks kept through fine-tuning."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

import torch

from greenstack.compression.pruning import (
    apply_masks_,
    compute_masks,
    cubic_sparsity,
    is_pruning_step,
    mask_gradients_,
    masks_from_zeros,
    sparsity_of,
)
from greenstack.compression.selection import check_patterns, is_conv1d, select_weights
from greenstack.engine.duration import Duration
from greenstack.engine.events import Event
from greenstack.engine.policy import Policy, Role
from greenstack.engine.reporter import Reporter
from greenstack.engine.state import State
from greenstack.errors import ConfigError, Problem, between, checked
from greenstack.policies.compression._common import duration_steps, init_window
from greenstack.provenance import Figure

log = logging.getLogger("greenstack")
NAME = "compression.prune"
FRACTION = between(0, 1, high_open=True, fix="a fraction of weights to remove, e.g. 0.8")


class MagnitudePruning(Policy):
    """Prunes the smallest-magnitude weights from `initial_sparsity` at `start` to `final_sparsity` at
    `end`, recomputing masks every `frequency` steps on the cubic schedule, then keeps the masks for
    the rest of the run (pruned weights and their gradients stay zero through every optimizer step).

    `scope`: "global" ranks all selected weights together, "layer" prunes each tensor equally.
    `structure`: "unstructured" (single weights) or "channels" (whole output channels).
    `include`/`exclude`: regexes on weight names (e.g. exclude: ["^fc\\\\.", "conv1\\\\.0"]).
    """

    role = Role.MODIFIER

    audit_kind = "compression"

    events = frozenset({Event.INIT, Event.BATCH_START, Event.AFTER_BACKWARD, Event.STEP_END, Event.FIT_END})

    @checked(NAME)
    def __init__(self, final_sparsity: Annotated[float, FRACTION] = 0.8, initial_sparsity: Annotated[float, FRACTION] = 0.0,
                 start: str | int = "0ba",
                 end: str | int = "0.5dur", frequency: str | int = "0.05dur",
                 scope: Literal["global", "layer"] = "global",
                 structure: Literal["unstructured", "channels"] = "unstructured",
                 include: list[str] | str | None = None, exclude: list[str] | str | None = None) -> None:
        problems: list[Problem] = []
        init_window(self, NAME, start, end, problems)
        if initial_sparsity > final_sparsity:
            problems.append(Problem(f"{NAME}.initial_sparsity", initial_sparsity,
                                    f"larger than final_sparsity ({final_sparsity})", "sparsity only grows"))
        self.frequency: Duration | None = None
        try:
            self.frequency = Duration.parse(frequency, key=f"{NAME}.frequency")
            if self.frequency.value <= 0:
                problems.append(Problem(f"{NAME}.frequency", frequency, "must be positive"))
        except ConfigError as e:
            problems.extend(e.problems)
        problems += check_patterns(include, f"{NAME}.include") + check_patterns(exclude, f"{NAME}.exclude")
        if problems:
            raise ConfigError(problems)
        self.final_sparsity, self.initial_sparsity = float(final_sparsity), float(initial_sparsity)
        self.scope, self.structure, self.include, self.exclude = scope, structure, include, exclude
        self._frequency_steps = 1
        self.masks: dict[str, torch.Tensor] = {}
        self._weights: dict[str, torch.Tensor] = {}
        self._model_id: int | None = None
        self.target = 0.0
        self.last_pruned_step: int | None = None
        self.final_measured: float | None = None

    # the schedule, not the window, decides what happens: masks are kept after `end`
    def handles(self, event: Event, state: State) -> bool:
        return event in self.events

    def resolve_window(self, state: State) -> None:
        super().resolve_window(state)
        self._frequency_steps = max(1, duration_steps(self.frequency, state, 1))

    def schedule(self, step: int) -> float:
        """Target sparsity at `step` for this run (window resolved)."""
        end = self._end_step if self._end_step is not None else self._start_step
        return cubic_sparsity(step, initial=self.initial_sparsity, final=self.final_sparsity,
                              start_step=self._start_step, end_step=end, frequency=self._frequency_steps)

    def _select(self, state: State) -> dict[str, torch.Tensor]:
        if self._model_id != id(state.model):
            self._weights = select_weights(state.model, self.include, self.exclude)
            self._model_id = id(state.model)
            if self.masks and (set(self.masks) != set(self._weights) or any(
                    self.masks[k].shape != w.shape for k, w in self._weights.items())):
                # a policy replaced the model with one whose layers are named or shaped differently
                # (QAT turns GPT-2's Conv1D into Linear: transposed): the zeros in the weights are the masks
                log.info("prune: model replaced; recovering masks from its zero weights")
                self.masks = masks_from_zeros(self._weights)
        return self._weights

    def __call__(self, event: Event, state: State, reporter: Reporter) -> None:
        if event is Event.INIT:
            if not self._select(state):
                raise ConfigError(Problem(f"{NAME}.include", self.include, "matches no Conv/Linear weight",
                                          "loosen include/exclude"))
            if self.structure == "channels" and any(is_conv1d(m) for m in state.model.modules()):
                raise ConfigError(Problem(f"{NAME}.structure", self.structure, "channel pruning ranks output "
                                          "channels along dim 0, but GPT-2's transformers Conv1D stores its weight "
                                          "(in, out), so it would remove input channels",
                                          "use structure: unstructured, or a Llama-style decoder "
                                          "(model=llama_tiny, nn.Linear throughout)"))
            if self.last_pruned_step is not None and not self.masks:  # resumed: masks are the zeros
                self.masks = masks_from_zeros(self._weights)
            log.info("prune: %d tensors (%s parameters), %s %s, sparsity %.2f -> %.2f over steps %d..%s",
                     len(self._weights), f"{sum(w.numel() for w in self._weights.values()):,}", self.scope,
                     self.structure, self.initial_sparsity, self.final_sparsity, self._start_step,
                     self._end_step)
            return
        weights = self._select(state)
        if event is Event.BATCH_START:
            end = self._end_step if self._end_step is not None else self._start_step
            step = state.step
            if step != self.last_pruned_step and is_pruning_step(step, start_step=self._start_step, end_step=end,
                                                                 frequency=self._frequency_steps):
                self.target = self.schedule(step)
                if self.target > 0:
                    self.masks = compute_masks(weights, self.target, scope=self.scope, structure=self.structure)
                    apply_masks_(weights, self.masks)
                self.last_pruned_step = step
        elif not self.masks:
            return
        elif event is Event.AFTER_BACKWARD:
            mask_gradients_(weights, self.masks)
        elif event is Event.STEP_END:
            apply_masks_(weights, self.masks)
        elif event is Event.FIT_END:
            self.final_measured = sparsity_of(weights)

    def state_dict(self) -> dict[str, Any]:
        return {"target": self.target, "last_pruned_step": self.last_pruned_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.target = float(state["target"])
        self.last_pruned_step = state["last_pruned_step"]
        self.masks = {}  # recovered from the weights' zeros at INIT

    def summary(self) -> dict[str, Any]:
        source = f"{NAME}: zeros in {len(self._weights)} selected weight tensors after training"
        figures: dict[str, Any] = {
            "compression/prune_target_sparsity": Figure(self.final_sparsity, "fraction", "measured",
                                                        f"{NAME} config (cubic schedule)"),
            "compression/pruned_tensor_parameters": Figure(sum(w.numel() for w in self._weights.values()),
                                                           "count", "measured", source),
        }
        if self.final_measured is not None:
            figures["compression/prune_sparsity"] = Figure(round(self.final_measured, 6), "fraction", "measured", source)
        return figures
