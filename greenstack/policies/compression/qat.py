"""int8 quantization-aware training from `start` on, with the backend picked per model."""

from __future__ import annotations

import logging
from typing import Any

import torch

from greenstack.compression.qat import (
    BACKENDS,
    backend_of,
    choose_backend,
    excluded_modules,
    freeze_qat,
    prepare_qat,
)
from greenstack.compression.selection import check_patterns
from greenstack.engine.duration import Duration
from greenstack.engine.events import Event
from greenstack.engine.policy import Policy, Role
from greenstack.engine.reporter import Reporter
from greenstack.engine.state import State
from greenstack.errors import ConfigError, Problem
from greenstack.policies.compression._common import duration_steps, init_window, replace_model
from greenstack.provenance import Figure

log = logging.getLogger("greenstack")
NAME = "compression.qat"


class Int8QAT(Policy):
    """Swaps the model for a fake-quantized (int8) copy at `start` (the QAT delay: let the float model,
    and any pruning, settle first) and trains it from there; the export stage converts it to int8.

    `backend: auto` picks torchao (`quantize_` + `QATConfig`) for Linear/Embedding-heavy models and
    torch.ao FX graph-mode QAT for CNNs (torchao does not convert Conv2d), and logs why.
    `freeze_at` stops updating activation ranges and BatchNorm statistics for the last steps.
    `exclude`: regexes on module names kept in float (e.g. the first conv or the classifier).
    Whether the model has anything to quantize is checked at INIT, before the first step.
    """

    role = Role.MODIFIER

    audit_kind = "compression"

    events = frozenset({Event.INIT, Event.BATCH_START, Event.STEP_END})

    def __init__(self, backend: str = "auto", start: str | int | None = None, freeze_at: str | int | None = None,
                 exclude: list[str] | str | None = None) -> None:
        problems: list[Problem] = []
        init_window(self, NAME, start, None, problems)
        if backend not in BACKENDS:
            problems.append(Problem(f"{NAME}.backend", backend, "unknown QAT backend", f"use one of {BACKENDS}"))
        self.freeze_at: Duration | None = None
        if freeze_at is not None:
            try:
                self.freeze_at = Duration.parse(freeze_at, key=f"{NAME}.freeze_at")
            except ConfigError as e:
                problems.extend(e.problems)
        problems += check_patterns(exclude, f"{NAME}.exclude")
        if problems:
            raise ConfigError(problems)
        self.backend = backend
        self.exclude = [exclude] if isinstance(exclude, str) else list(exclude or [])
        self.chosen: str | None = None
        self.reason = ""
        self.prepared_at: int | None = None
        self.frozen = False
        self._freeze_step: int | None = None

    def handles(self, event: Event, state: State) -> bool:
        return event in self.events

    def resolve_window(self, state: State) -> None:
        super().resolve_window(state)
        self._freeze_step = duration_steps(self.freeze_at, state) if self.freeze_at is not None else None
        if self._freeze_step is not None and self._freeze_step < self._start_step:
            raise ConfigError(Problem(f"{NAME}.freeze_at", str(self.freeze_at), "comes before start",
                                      "freeze observers after QAT has started"))

    def __call__(self, event: Event, state: State, reporter: Reporter) -> None:
        if event is Event.INIT:
            if self.prepared_at is not None and backend_of(state.model) is not None:
                return  # resumed with the fake-quant model already in place
            choice = choose_backend(state.model, self.backend, self.exclude)
            self.chosen, self.reason = choice.name, choice.reason
            log.info("qat: backend %s (%s); fake-quant from step %d", choice.name, choice.reason, self._start_step)
            return
        if event is Event.BATCH_START:
            if self.prepared_at is None and state.step >= self._start_step:
                self._prepare(state)
        elif event is Event.STEP_END and self.prepared_at is not None and not self.frozen \
                and self._freeze_step is not None and state.step >= self._freeze_step:
            assert self.chosen is not None
            freeze_qat(state.model, self.chosen)
            self.frozen = True
            log.info("qat: observers and BatchNorm statistics frozen at step %d", state.step)

    def restore_model(self, state: State) -> None:
        """Checkpoint hook: a snapshot taken after QAT began holds a fake-quant model; rebuild that
        structure (same backend, exclusions) before its weights and optimizer state are loaded."""
        if self.prepared_at is None or backend_of(state.model) is not None:
            return
        from greenstack.policies.efficiency._common import sample_batch, train_loader_of

        if self.chosen is None:
            choice = choose_backend(state.model, self.backend, self.exclude)
            self.chosen, self.reason = choice.name, choice.reason
        loader = train_loader_of(state)
        batch = sample_batch(loader, 1, state.device) if loader is not None and hasattr(loader, "dataset") \
            else None
        self._prepare(state, batch, at=self.prepared_at)
        if self.frozen:  # BatchNorm-freezing is a module flag, not a saved buffer
            freeze_qat(state.model, self.chosen)
        log.info("qat: resumed run: model re-prepared for fake-quant (as at step %d) before loading weights",
                 self.prepared_at)

    def _prepare(self, state: State, batch: Any = None, *, at: int | None = None) -> None:
        assert self.chosen is not None
        batch = state.batch if batch is None else batch
        inputs = batch["inputs"] if isinstance(batch, dict) else None
        example = (inputs[:1],) if isinstance(inputs, torch.Tensor) else ()
        prepared = prepare_qat(state.model, self.chosen, example, excluded_modules(state.model, self.exclude))
        replace_model(state, prepared)
        state.model.train()
        if at is not None:
            return
        self.prepared_at = state.step
        log.info("qat: model prepared for int8 fake-quant training at step %d (%s)", state.step, self.chosen)

    def state_dict(self) -> dict[str, Any]:
        return {"backend": self.chosen, "prepared_at": self.prepared_at, "frozen": self.frozen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.chosen, self.prepared_at, self.frozen = state["backend"], state["prepared_at"], state["frozen"]

    def summary(self) -> dict[str, Any]:
        figures: dict[str, Any] = {}
        if self.chosen is not None:
            figures["compression/qat_backend"] = Figure(self.chosen, "", "measured", f"{NAME}: {self.reason}")
        if self.prepared_at is not None:
            figures["compression/qat_start_step"] = Figure(self.prepared_at, "step", "measured", f"{NAME}: loop step")
        return figures
