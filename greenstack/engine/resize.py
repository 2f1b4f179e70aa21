"""Change the batch size between epochs, on request, without losing the run's plan.

Policies ask with `state.requests.batch_size = BatchSizeRequest(batch_size, reason, by, step, lr_scaling)`
(the low-GPU-utilisation alert does); the loop's own `BatchResize` policy applies the request at the
next epoch boundary, where no half-consumed shuffle order is lost:

- the train loader is rebuilt with the same dataset, sampler (and its generator), collate and workers;
- the run is re-planned: an epoch budget keeps its remaining epochs (now of fewer, larger steps), a
  sample budget its remaining samples, a step budget its steps;
- the optimizer keeps its state; the learning rate is scaled by the request's rule and the schedule
  is re-timed so the remaining work covers the rest of the original schedule (no jump, same end);
- the change survives a checkpoint: this policy's state holds the batch size and the schedule's
  re-timing, and re-applies both when a resumed run reaches its first epoch start.

Every applied change is listed in `state.batch_size_changes` (for the requester's report)
and logged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from greenstack.engine.events import Event
from greenstack.engine.policy import Policy, Role
from greenstack.engine.reporter import Reporter
from greenstack.engine.requests import BatchSizeRequest
from greenstack.engine.state import LoopControl, State

log = logging.getLogger("greenstack")


def retimed(factor: Callable[[int], float], segments: list[tuple[int, float, float]]) -> Callable[[int], float]:
    """`factor` (of the originally planned steps) read through piecewise-linear re-timings.

    Each segment `(from_step, virtual_step, virtual_per_step)` maps a real step `s >= from_step` to
    the original schedule's step `virtual_step + (s - from_step) * virtual_per_step`; the last
    segment that has started applies.
    """
    ordered = sorted(segments)

    def lr_factor(step: int) -> float:
        virtual = float(step)
        for start, v0, slope in ordered:
            if step >= start:
                virtual = v0 + (step - start) * slope
        return factor(int(round(virtual)))

    return lr_factor


def virtual_step(step: int, segments: list[tuple[int, float, float]]) -> float:
    """Where real step `step` sits on the originally planned schedule."""
    virtual = float(step)
    for start, v0, slope in sorted(segments):
        if step >= start:
            virtual = v0 + (step - start) * slope
    return virtual


class BatchResize(Policy):
    """The loop's own policy that applies batch-size requests at epoch starts (see module doc)."""

    role = Role.MODIFIER

    events = frozenset({Event.EPOCH_START})

    def __init__(self) -> None:
        super().__init__(name="batch_resize")
        self.batch_size: int | None = None  # None = never changed
        self.max_steps: int | None = None
        self.segments: list[tuple[int, float, float]] = []
        self.changes: list[dict[str, Any]] = []
        self._restored = False

    def __call__(self, event: Event, state: State, reporter: Reporter) -> None:
        loop = state.loop
        if loop is None:
            return  # not run by a Trainer: nothing to re-plan
        if self._restored:  # a resumed run: rebuild the loader and schedule the checkpoint was taken with
            self._restored = False
            loop.rebuild_loader(int(self.batch_size or state.batch_size))
            state.max_steps = int(self.max_steps or state.max_steps)
            loop.refresh_plan()
            self._install_schedule(state, loop)
        request = state.requests.batch_size
        if request is None or state.step == 0:
            return  # before the first step, requesters call state.set_batch_size themselves
        if state.batch_in_epoch:  # resumed mid-epoch: wait for a clean boundary
            return
        state.requests.batch_size = None
        self.apply(state, request, loop, reporter)

    def apply(self, state: State, request: BatchSizeRequest, loop: LoopControl, reporter: Reporter) -> None:
        from greenstack.efficiency.batch_size import lr_scale_factor, scale_learning_rate_

        old, new = int(state.batch_size), int(request.batch_size)
        if new < 1 or new == old:
            return
        old_max, step = state.max_steps, state.step
        v0 = virtual_step(step, self.segments)
        loop.rebuild_loader(new)
        total = loop.duration
        state.max_steps = max(step + 1, remaining_steps(
            total.unit, total.value, step=step, epoch=state.epoch, samples_seen=state.samples_seen,
            steps_per_epoch=state.steps_per_epoch, samples_per_step=loop.samples_per_step(new),
            planned_max=old_max))
        self.max_steps = state.max_steps
        loop.refresh_plan()
        remaining = max(1, state.max_steps - step)
        self.segments.append((step, v0, (loop.planned_steps - v0) / remaining))
        self.batch_size = new
        self._install_schedule(state, loop)
        rule = str(request.lr_scaling)
        lr_factor = lr_scale_factor(old, new, rule)
        scale_learning_rate_(state.optimizer, state.lr_scheduler, lr_factor)
        change = {"step": step, "epoch": state.epoch, "from": old, "to": new, "lr_factor": lr_factor,
                  "lr_scaling": rule, "max_steps_before": old_max, "max_steps_after": state.max_steps,
                  "by": request.by, "reason": request.reason}
        self.changes.append(change)
        state.batch_size_changes.append(change)
        reporter.metric("train/batch_size", new)
        log.info("batch size %d → %d at step %d (epoch %d, requested by %s: %s); LR ×%.3g (%s rule); "
                 "run re-planned %d → %d steps", old, new, step, state.epoch, request.by,
                 request.reason, lr_factor, rule, old_max, state.max_steps)

    def _install_schedule(self, state: State, loop: LoopControl) -> None:
        scheduler = state.lr_scheduler
        if scheduler is None or not hasattr(scheduler, "lr_lambdas") or not self.segments:
            return
        fn = retimed(loop.lr_factor_fn(), self.segments)
        scheduler.lr_lambdas = [fn for _ in scheduler.lr_lambdas]

    def state_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "max_steps": self.max_steps, "segments": [list(s) for s in self.segments],
                "changes": list(self.changes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_size = state.get("batch_size")
        self.max_steps = state.get("max_steps")
        self.segments = [(int(a), float(b), float(c)) for a, b, c in state.get("segments", [])]
        self.changes = list(state.get("changes", []))
        self._restored = self.batch_size is not None


def remaining_steps(unit: str, value: float, *, step: int, epoch: int, samples_seen: int, steps_per_epoch: int,
                    samples_per_step: int, planned_max: int) -> int:
    """The run's new total steps after a batch-size change at `step` (between epochs)."""
    if unit == "ep":
        return step + max(0, math.ceil((value - epoch) * steps_per_epoch))
    if unit == "sp":
        return step + max(0, math.ceil((value - samples_seen) / max(samples_per_step, 1)))
    return planned_max  # a step budget stays a step budget
