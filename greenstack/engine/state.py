"""The small, explicit state that policies read and change."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from greenstack.engine.preemption import Preemption
from greenstack.engine.requests import Requests


class LoopControl(Protocol):
    """What the loop lets the engine re-plan mid-run (the Trainer implements it; `state.loop`): used by
    the loop's own `BatchResize` (engine/resize.py), never by configured policies."""

    #: the run's length as configured (`trainer.max_duration`)
    duration: Any
    #: the run length the LR schedule was built for
    planned_steps: int

    def rebuild_loader(self, batch_size: int) -> None:
        """Rebuild the train loader with another batch size (updates `state.batch_size`, `steps_per_epoch`)."""
        ...

    def refresh_plan(self) -> None:
        """Re-derive what depends on the run's length (eval cadence, policy windows, progress total)."""
        ...

    def samples_per_step(self, batch_size: int) -> int:
        """Samples one optimizer step takes at `batch_size` (gradient accumulation included)."""
        ...

    def lr_factor_fn(self) -> Callable[[int], float]:
        """The LR schedule's factor by step, for the planned run length."""
        ...


@dataclass
class State:
    """Everything a policy may look at or change during a run.

    Progress counters: `step` counts optimizer steps taken, `epoch` counts completed epochs,
    `batch_in_epoch` counts micro-batches consumed in the current epoch.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None = None
    lr_scheduler: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    max_steps: int = 0
    steps_per_epoch: int = 0
    batch_size: int = 0
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0
    #: target tokens trained on (tasks that count tokens, e.g. causal_lm; 0 otherwise)
    tokens_seen: int = 0
    batch: Any = None
    outputs: Any = None
    loss: torch.Tensor | None = None
    autocast_dtype: torch.dtype | None = None
    grad_scaler: Any = None
    metrics: dict[str, float] = field(default_factory=dict)
    stop: bool = False
    stop_reason: str = ""
    rank: int = 0
    world_size: int = 1
    region: str | None = None
    run_dir: str | None = None
    #: builds (optimizer, lr_scheduler) for new parameters: policies that replace the model
    #: (distillation students, converted QAT graphs) call `replace_model`, which uses it
    optim_factory: Callable[[Iterable[torch.nn.Parameter]], tuple[Any, Any]] | None = None
    #: every policy of the run, in dispatch order (checkpointing saves and restores their state)
    policies: list[Any] = field(default_factory=list)
    #: state of the train loader's shuffling generator at the start of the current epoch
    loader_rng: torch.Tensor | None = None
    #: set by a resuming policy before training: {"loader_rng": Tensor, "batch_in_epoch": int}
    resume: dict[str, Any] | None = None
    #: the loader training draws from (rebuilt when the batch size changes)
    train_loader: Any = None
    #: `set_batch_size(n)`: rebuild the train loader and re-plan the run (only before the first step;
    #: later, set `requests.batch_size = BatchSizeRequest(...)`: applied at the next epoch start)
    set_batch_size: Callable[[int], None] | None = None
    #: `evaluate(model, "val" | "test") -> {"<split>/accuracy", "<split>/loss", ...}` set by the loop
    evaluate: Callable[[torch.nn.Module, str], dict[str, float]] | None = None
    #: `check_finite()` raises NonFiniteLoss if a loss so far was nan/inf (one host sync): set by the loop,
    #: called by checkpointing before it captures a snapshot, so a diverged state is never saved
    check_finite: Callable[[], None] | None = None
    #: the run's task (loss, evaluation, counts): policies that compute a loss themselves use it
    task: Any = None
    #: the loop's re-planning operations (set by the Trainer; see LoopControl)
    loop: LoopControl | None = None
    #: open typed requests between policies and the loop (batch-size change, pause): engine/requests.py
    requests: Requests = field(default_factory=Requests)
    #: every batch-size change the loop applied on a request (dicts: step, epoch, from, to, lr_factor, by...)
    batch_size_changes: list[dict[str, Any]] = field(default_factory=list)
    #: "failed" when a policy stops the run for a failure (sustainability.json `status`), else None
    run_status: str | None = None
    #: trainer.deterministic is true or warn: timing-based decisions keep the current configuration
    #: unless they are replayed from a recorded run (greenstack/engine/replay.py)
    deterministic: bool = False
    #: this run's preemption channel (requests, the saving policy, group hooks); dropped with the run
    preemption: Preemption = field(default_factory=Preemption)

    @property
    def progress(self) -> float:
        """Fraction of the planned optimizer steps done, in [0, 1]."""
        return min(1.0, self.step / self.max_steps) if self.max_steps else 0.0

    def replace_model(self, model: torch.nn.Module, *, rebuild_optimizer: bool = True) -> None:
        """Swap the model being trained (moved to the run's device); rebuild optimizer/schedule for it.

        The new schedule is advanced to the current step so the learning rate continues smoothly.
        """
        self.model = model.to(self.device)
        if rebuild_optimizer and self.optim_factory is not None:
            self.optimizer, self.lr_scheduler = self.optim_factory(self.model.parameters())
            with warnings.catch_warnings():  # fast-forwarding the schedule, not skipping an optimizer step
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(self.step):
                    self.lr_scheduler.step()

    def skip_steps(self, n: int) -> None:
        """Count `n` optimizer steps as done without taking them, advancing the LR schedule with them (a
        federated worker that sat out part of a round meets the others at the next exchange)."""
        if n <= 0:
            return
        self.step += n
        if self.lr_scheduler is not None:
            with warnings.catch_warnings():  # advancing the schedule for steps sat out, not skipping one
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(n):
                    self.lr_scheduler.step()

    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop after the current step; the first reason given wins."""
        if not self.stop:
            self.stop, self.stop_reason = True, reason
