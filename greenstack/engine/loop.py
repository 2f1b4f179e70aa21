"""The training loop: train/eval, gradient accumulation, schedules, events to policies.

Deliberately plain PyTorch so that its per-step overhead over a hand-written loop stays within a few
percent (see benchmarks/overhead.py): no per-step host syncs, metrics are materialised only every
`log_interval` steps.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from greenstack.engine.duration import Duration
from greenstack.engine.events import Event
from greenstack.engine.optim import Optim, OptimComponents
from greenstack.engine.policy import Policy, dispatch_order
from greenstack.engine.preemption import Preemption
from greenstack.engine.reporter import DecisionLog, Reporter
from greenstack.engine.resize import BatchResize
from greenstack.engine.state import State
from greenstack.errors import ConfigError, GreenstackError, Problem, RunInterrupted
from greenstack.tasks.base import Task
from greenstack.tasks.classification import Classification

log = logging.getLogger("greenstack")


class NonFiniteLoss(GreenstackError):
    """Training diverged: the loss became nan/inf. The run stops (no checkpoint of the diverged state is
    written) rather than train a NaN model to the end and exit 0."""


class MetricSink(Protocol):
    """Anything that records metric dicts (trackers, the JSONL writer)."""

    def log(self, metrics: dict[str, Any], step: int) -> None: ...


@dataclass
class TrainerConfig:
    """How long and how to train; validated when constructed."""

    max_duration: str = "3ep"
    eval_interval: str = "1ep"
    grad_accum: int = 1
    device: str = "auto"
    max_grad_norm: float | None = None
    log_interval: int = 10
    limit_train_batches: int | None = None
    limit_eval_batches: int | None = None
    progress: bool = True
    #: when output is not a terminal (redirected, piped, a batch log): seconds between plain progress lines
    progress_interval_s: float = 30.0
    #: false | true | warn: reproducible kernels, seeded loaders, frozen timing-based decisions
    #: (greenstack/engine/determinism.py)
    deterministic: bool | Literal["warn"] = False

    def __post_init__(self) -> None:
        from greenstack.engine.determinism import check_mode

        problems: list[Problem] = []
        bad_mode = check_mode(self.deterministic)
        if bad_mode is not None:
            problems.append(bad_mode)
        for key in ("max_duration", "eval_interval"):
            try:
                d = Duration.parse(getattr(self, key), key=f"trainer.{key}")
                if d.unit == "dur":
                    problems.append(Problem(f"trainer.{key}", getattr(self, key),
                                            "a fraction of the run cannot define the run", 'use "3ep" or "500ba"'))
                elif key == "max_duration" and d.value <= 0:
                    problems.append(Problem("trainer.max_duration", self.max_duration,
                                            "the run would take zero optimizer steps", 'e.g. "3ep" or "500ba"'))
            except ConfigError as e:
                problems.extend(e.problems)
        if self.grad_accum < 1:
            problems.append(Problem("trainer.grad_accum", self.grad_accum, "must be >= 1"))
        if self.log_interval < 1:
            problems.append(Problem("trainer.log_interval", self.log_interval, "must be >= 1"))
        if not self.progress_interval_s >= 0:
            problems.append(Problem("trainer.progress_interval_s", self.progress_interval_s, "must be >= 0 seconds"))
        if self.device not in ("auto", "cpu") and not self.device.startswith(("cuda", "mps")):
            problems.append(Problem("trainer.device", self.device, "unknown device", 'use "auto", "cpu" or "cuda[:N]"'))
        for key in ("limit_train_batches", "limit_eval_batches"):
            value = getattr(self, key)
            if value is not None and value < 1:
                problems.append(Problem(f"trainer.{key}", value, "must be >= 1 or null"))
        if problems:
            raise ConfigError(problems)


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; asking for CUDA on a machine without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("CUDA was requested but no CUDA device is available", key="trainer.device",
                          value=name, fix='use trainer.device=auto or cpu')
    return torch.device(name)


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def _limited(loader: Iterable, limit: int | None) -> Iterable:
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            return
        yield batch


class Trainer:
    """Runs one fit: dispatches events to policies and writes metrics to sinks.

    The engine contract (ARCHITECTURE.md "Engine contract"): every hook is called
    `policy(event, state, reporter)`; the Trainer owns the order (`engine.policy.dispatch_order`:
    observers open before modifiers and close after them, checkpointing last, declared order within a
    role); a policy changes the run only through `State` and its typed requests (`state.requests`,
    `state.set_batch_size` before the first step, `state.request_stop`) and reports through its
    `Reporter` (metrics for the next metrics line, decisions with an audit kind into `self.decisions`).
    The `task` (default: classification) supplies the loss, the evaluation metrics and the counts.
    """

    def __init__(self, model: torch.nn.Module, train_loader: Sequence | Iterable, optim: Optim | OptimComponents,
                 config: TrainerConfig, *, val_loader: Iterable | None = None,
                 test_loader: Iterable | None = None, policies: Sequence[Policy] = (),
                 sinks: Sequence[MetricSink] = (), batch_size: int = 0, run_dir: str | None = None,
                 task: Task | None = None, preemption: Preemption | None = None) -> None:
        self.config = config
        self.task = task if task is not None else Classification()
        self.device = resolve_device(config.device)
        self.train_loader, self.val_loader, self.test_loader = train_loader, val_loader, test_loader
        self.policies = list(policies)
        self.sinks = list(sinks)
        self.optim = optim
        self.duration = Duration.parse(config.max_duration)
        max_steps, steps_per_epoch = self._plan(train_loader, batch_size)
        #: the run length the LR schedule was built for (a later batch-size change re-times it)
        self.planned_steps = max_steps
        model.to(self.device)
        optimizer, lr_scheduler = optim.build(model.parameters(), max_steps)
        self.state = State(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, device=self.device,
                           max_steps=max_steps, steps_per_epoch=steps_per_epoch, batch_size=batch_size,
                           run_dir=run_dir, train_loader=train_loader, task=self.task,
                           optim_factory=lambda params: optim.build(params, self.state.max_steps),
                           deterministic=config.deterministic is True or config.deterministic == "warn",
                           preemption=preemption if preemption is not None else Preemption())
        #: the run's decisions, in the order policies took them (audit.jsonl is written from it)
        self.decisions = DecisionLog()
        self._reporters: dict[int, Reporter] = {}
        self._orders_for: list[Policy] | None = None
        self._orders: dict[Event, list[Policy]] = {}
        self.state.set_batch_size = self.set_batch_size
        self.state.evaluate = self.evaluate_split
        self.state.check_finite = self.check_finite
        #: the first optimizer step whose loss was nan/inf (-1: none), kept on the device: no per-step sync
        self._bad_step: torch.Tensor | None = None
        eval_every = Duration.parse(config.eval_interval)
        self.eval_steps = eval_every.to_steps(steps_per_epoch=steps_per_epoch, batch_size=batch_size)
        self.eval_at_epoch_end = eval_every.unit == "ep" and eval_every.value == 1
        # the loop's own policy, last: applies batch-size requests between epochs (see engine/resize.py)
        self.state.loop = self
        self.policies.append(BatchResize())
        self._progress: _Progress | None = None
        self.step_times_s: list[float] = []
        #: the most recent figures of each evaluation split ("val/accuracy", "test/loss", ...)
        self.last_eval: dict[str, float] = {}

    def _epoch_plan(self, train_loader: Any, batch_size: int) -> int:
        """Steps per epoch of this loader; sets `batches_per_epoch`."""
        config = self.config
        n_batches = len(train_loader)
        if config.limit_train_batches:
            n_batches = min(n_batches, config.limit_train_batches)
        if n_batches == 0:
            raise ConfigError("the training set yields no batches", key="data.batch_size",
                              value=batch_size, fix="use a smaller batch size or more data")
        self.batches_per_epoch = n_batches
        return max(1, n_batches // config.grad_accum)

    def _plan(self, train_loader: Any, batch_size: int) -> tuple[int, int]:
        """(max_steps, steps_per_epoch) for this loader; sets `batches_per_epoch`."""
        steps_per_epoch = self._epoch_plan(train_loader, batch_size)
        max_steps = self.duration.to_steps(steps_per_epoch=steps_per_epoch,
                                           batch_size=batch_size * self.config.grad_accum)
        if max_steps < 1:
            raise ConfigError("the run would take zero optimizer steps", key="trainer.max_duration",
                              value=self.config.max_duration)
        return max_steps, steps_per_epoch

    def set_batch_size(self, batch_size: int) -> None:
        """Rebuild the train loader with a new batch size before training starts (batch-size search).

        Same dataset, sampler, collate, workers and shuffling generator; the run length, optimizer and
        schedule are re-planned for the new number of steps. Policies adjust the learning rate
        themselves. Between epochs, ask with `state.requests.batch_size` (engine/resize.py).
        """
        state = self.state
        if state.step:
            raise RuntimeError("set_batch_size works before the first step; later, set "
                               "state.requests.batch_size (applied at the next epoch start)")
        self.rebuild_loader(batch_size)
        state.max_steps, _ = self._plan(self.train_loader, batch_size)
        self.planned_steps = state.max_steps
        state.optimizer, state.lr_scheduler = self.optim.build(state.model.parameters(), state.max_steps)
        self.refresh_plan()

    def rebuild_loader(self, batch_size: int) -> None:
        """The train loader with another batch size: same dataset, sampler (and its generator), collate,
        workers; custom samplers keep their own logic (`sampler.set_batch_size(n)` is called if present).
        Updates `batches_per_epoch`, `state.steps_per_epoch`, `state.batch_size`, `state.train_loader`."""
        from torch.utils.data import DataLoader

        old = self.train_loader
        if not isinstance(old, DataLoader):
            raise TypeError("batch-size changes need a torch DataLoader")
        if hasattr(old.sampler, "set_batch_size"):
            old.sampler.set_batch_size(batch_size)
        self.train_loader = DataLoader(old.dataset, batch_size=batch_size, sampler=old.sampler,
                                       generator=old.generator, num_workers=old.num_workers,
                                       collate_fn=old.collate_fn, drop_last=old.drop_last,
                                       pin_memory=old.pin_memory, persistent_workers=old.persistent_workers,
                                       prefetch_factor=old.prefetch_factor)
        state = self.state
        state.steps_per_epoch = self._epoch_plan(self.train_loader, batch_size)
        state.batch_size, state.train_loader = batch_size, self.train_loader

    def refresh_plan(self) -> None:
        """Re-derive what depends on the run's length after a re-plan: eval cadence, policy windows."""
        state = self.state
        eval_every = Duration.parse(self.config.eval_interval)
        self.eval_steps = eval_every.to_steps(steps_per_epoch=state.steps_per_epoch, batch_size=state.batch_size)
        for policy in self.policies:
            policy.resolve_window(state)
        if self._progress is not None:
            self._progress.total = state.max_steps

    def samples_per_step(self, batch_size: int) -> int:
        """Samples one optimizer step takes at `batch_size` (LoopControl)."""
        return batch_size * self.config.grad_accum

    def lr_factor_fn(self) -> Any:
        """The LR schedule's factor by step for the planned run length (LoopControl)."""
        return self.optim.lr_factor_fn(self.planned_steps)

    # -- events -----------------------------------------------------------------------------------
    def reporter(self, policy: Policy) -> Reporter:
        """The reporter bound to `policy` (its metrics go to the next metrics line, its decisions to
        `self.decisions`)."""
        reporter = self._reporters.get(id(policy))
        if reporter is None or reporter.policy != policy.name:
            reporter = self._reporters[id(policy)] = Reporter(self.state.metrics, policy.name, self.decisions)
        return reporter

    def _order(self, event: Event) -> list[Policy]:
        """`dispatch_order` of the current policies for `event` (cached until the policy list changes)."""
        if self._orders_for != self.policies:
            self._orders_for = list(self.policies)
            self._orders = {e: dispatch_order(self._orders_for, e) for e in Event}
        return self._orders[event]

    def dispatch(self, event: Event) -> None:
        """Call every policy that handles `event`, in the engine's order (`engine.policy.dispatch_order`)."""
        state = self.state
        for policy in self._order(event):
            if policy.handles(event, state):
                policy(event, state, self.reporter(policy))

    def _emit(self, metrics: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(metrics, self.state.step)

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate_split(self, model: torch.nn.Module, split: str) -> dict[str, float]:
        """Loss/accuracy of any model on the run's "val" or "test" split (for policies comparing models)."""
        loader = {"val": self.val_loader, "test": self.test_loader}.get(split)
        if loader is None:
            return {}
        result = self.evaluate(loader, split, model=model, record=False)
        result.pop("epoch", None)
        return result

    @torch.no_grad()
    def evaluate(self, loader: Iterable, prefix: str, *, model: torch.nn.Module | None = None,
                 record: bool = True) -> dict[str, float]:
        """The task's evaluation figures over `loader` (at most `limit_eval_batches` batches)."""
        state = self.state
        model = state.model if model is None else model
        was_training = model.training
        model.eval()
        evaluator = self.task.evaluator(self.device)
        for batch in _limited(loader, self.config.limit_eval_batches):
            batch = move_to(batch, self.device)
            with self._autocast():
                outputs = self.task.outputs(model, batch)
            evaluator.update(outputs, batch)
        model.train(was_training)
        result = evaluator.compute(prefix)
        if not result:
            return {}
        if record:
            self.last_eval.update(result)
        return {**result, "epoch": state.epoch}

    def _autocast(self):
        dtype = self.state.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _run_eval(self) -> None:
        if self.val_loader is None:
            return
        metrics = self.evaluate(self.val_loader, "val")
        self.state.metrics.update(metrics)
        self.dispatch(Event.EVAL_END)
        self._flush()

    def _flush(self) -> None:
        if self.state.metrics:
            self._emit(dict(self.state.metrics))
            self.state.metrics.clear()

    # -- divergence -------------------------------------------------------------------------------
    def _track_finite(self, loss: torch.Tensor) -> None:
        """Remember the first step whose loss is not finite, without a host sync."""
        if self._bad_step is None:
            self._bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach()) & (self._bad_step < 0)
        self._bad_step = torch.where(bad, self._bad_step.new_full((), self.state.step + 1), self._bad_step)

    def check_finite(self) -> None:
        """Raise NonFiniteLoss if any loss so far was nan/inf (one host sync; called at log points, before
        checkpoints and at the end of training)."""
        if self._bad_step is None:
            return
        step = int(self._bad_step.item())
        if step >= 0:
            raise NonFiniteLoss(
                f"training diverged: the loss became nan/inf at step {step}; stopped at step {self.state.step} "
                "without saving the diverged state. Lower optim.lr or clip gradients (trainer.max_grad_norm=1.0), "
                "then resume from the last good checkpoint or start again")

    # -- training ---------------------------------------------------------------------------------
    def fit(self) -> State:
        """Train until `max_duration` or a policy stops the run; evaluate on val and, at the end, test."""
        state, cfg = self.state, self.config
        state.policies = self.policies
        for policy in self.policies:
            policy.resolve_window(state)
        self.dispatch(Event.INIT)
        self.dispatch(Event.FIT_START)
        progress = self._progress = _Progress(enabled=cfg.progress, total=state.max_steps,
                                              plain_interval_s=cfg.progress_interval_s)
        try:
            with progress:
                self._train(progress)
            self.check_finite()
            if self.test_loader is not None:
                if cfg.progress:
                    log.info("training done (%d steps): evaluating on the test split", state.step)
                state.metrics.update(self.evaluate(self.test_loader, "test"))
                self._flush()
        except BaseException:
            self.dispatch(Event.EXCEPTION)
            raise
        self.dispatch(Event.FIT_END)
        self._flush()
        return state

    def _train(self, progress: _Progress) -> None:
        state, cfg = self.state, self.config
        state.model.train()
        running_loss = torch.zeros((), device=self.device)
        running_count = 0
        last_eval_step = -1
        log_t0, log_samples, log_tokens = time.perf_counter(), 0, 0
        task = self.task
        generator = getattr(self.train_loader, "generator", None)
        while state.step < state.max_steps and not state.stop:
            skip = 0
            if state.resume is not None:  # continue mid-epoch exactly where the checkpoint was taken
                if generator is not None and state.resume.get("loader_rng") is not None:
                    generator.set_state(state.resume["loader_rng"])
                skip = int(state.resume.get("batch_in_epoch", 0))
                state.resume = None
            else:
                state.batch_in_epoch = 0
            # the shuffling of this epoch is drawn from the loader's generator when iteration starts
            state.loader_rng = generator.get_state() if generator is not None else None
            self.dispatch(Event.EPOCH_START)
            micro = 0
            for i, batch in enumerate(_limited(self.train_loader, self.batches_per_epoch)):
                if i < skip:
                    continue
                t0 = time.perf_counter()
                tokens = task.tokens(batch)  # on the host batch: no device sync
                state.batch = move_to(batch, self.device)
                self.dispatch(Event.BATCH_START)
                with self._autocast():
                    outputs = task.outputs(state.model, state.batch)
                    loss = task.loss(outputs, state.batch)
                state.outputs, state.loss = outputs, loss
                self.dispatch(Event.AFTER_FORWARD)
                self._track_finite(state.loss)
                scaled = state.loss / cfg.grad_accum
                if state.grad_scaler is not None:
                    scaled = state.grad_scaler.scale(scaled)
                scaled.backward()
                self.dispatch(Event.AFTER_BACKWARD)
                n = task.samples(state.batch)
                state.samples_seen += n
                state.tokens_seen += tokens
                log_samples += n
                log_tokens += tokens
                running_loss += state.loss.detach()
                running_count += 1
                micro += 1
                state.batch_in_epoch += 1
                if micro % cfg.grad_accum:
                    continue
                self._optimizer_step()
                state.step += 1
                self.step_times_s.append(time.perf_counter() - t0)
                self.dispatch(Event.STEP_END)
                if state.preemption.interrupted_signum is not None:  # the handler's raise was swallowed
                    raise RunInterrupted(state.preemption.interrupted_signum)
                if state.step % cfg.log_interval == 0 or state.step == state.max_steps:
                    elapsed = time.perf_counter() - log_t0
                    state.metrics.update({
                        "train/loss": (running_loss / max(running_count, 1)).item(),
                        "lr": state.optimizer.param_groups[0]["lr"], "epoch": state.epoch,
                        "train/samples_per_s": log_samples / elapsed if elapsed > 0 else math.nan,
                    })
                    if log_tokens:
                        state.metrics["train/tokens_per_s"] = log_tokens / elapsed if elapsed > 0 else math.nan
                    running_loss.zero_()
                    running_count, log_t0, log_samples, log_tokens = 0, time.perf_counter(), 0, 0
                    progress.loss = state.metrics["train/loss"]
                    if not math.isfinite(state.metrics["train/loss"]):
                        self._flush()  # the diverged loss is on record (as null in metrics.jsonl)
                        self.check_finite()
                progress.advance(state)  # after the loss of a logging step is known
                if state.metrics:
                    self._flush()
                if not self.eval_at_epoch_end and self.eval_steps and state.step % self.eval_steps == 0:
                    self._run_eval()
                    last_eval_step = state.step
                if state.step >= state.max_steps or state.stop:
                    break
            state.epoch += 1
            if self.eval_at_epoch_end or last_eval_step != state.step:
                self._run_eval()
                last_eval_step = state.step
            self.dispatch(Event.EPOCH_END)
            self.dispatch(Event.CHECKPOINT)
            self._flush()
            if state.stop:
                log.info("stopping early: %s", state.stop_reason)

    def _optimizer_step(self) -> None:
        state, cfg = self.state, self.config
        optimizer = state.optimizer
        assert optimizer is not None
        if cfg.max_grad_norm:
            if state.grad_scaler is not None:
                state.grad_scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.max_grad_norm)
        if state.grad_scaler is not None:
            state.grad_scaler.step(optimizer)
            state.grad_scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if state.lr_scheduler is not None:
            state.lr_scheduler.step()


class _Progress:
    """Progress over optimizer steps: a rich bar on a terminal; otherwise (output redirected to a file or
    a pipe, where a live bar shows nothing until the end) a plain log line every `plain_interval_s`.

    The loss shown is the mean of the last logged interval (`log_interval` steps); before the first one
    it is left out rather than shown as nan.
    """

    def __init__(self, *, enabled: bool, total: int, plain_interval_s: float = 30.0,
                 terminal: bool | None = None) -> None:
        self.enabled, self.total, self.loss = enabled, total, float("nan")
        self.plain_interval_s = plain_interval_s
        self.terminal = terminal
        self._bar: Any = None
        self._t0 = self._last_line = 0.0
        self._step = self._epoch = 0

    def __enter__(self) -> _Progress:
        if not self.enabled:
            return self
        if self.terminal is None:
            from rich.console import Console

            self.terminal = Console().is_terminal
        self._t0 = self._last_line = time.monotonic()
        if self.terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("[bold green]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, info="")
        return self

    def info(self) -> str:
        loss = f" loss {self.loss:.4f}" if math.isfinite(self.loss) else ""
        return f"epoch {self._epoch}{loss}"

    def advance(self, state: State) -> None:
        if not self.enabled:
            return
        self._step, self._epoch = state.step, state.epoch
        if self._bar is not None:
            self._bar.update(self._task, completed=state.step, total=self.total, info=self.info())
            return
        now = time.monotonic()
        if now - self._last_line >= self.plain_interval_s and state.step < self.total:
            self._last_line = now
            self._plain_line(now)

    def _plain_line(self, now: float) -> None:
        elapsed = now - self._t0
        total = max(self.total, 1)
        left = elapsed / self._step * (total - self._step) if self._step else float("nan")
        eta = f", ~{_hms(left)} left" if math.isfinite(left) and self._step < total else ""
        log.info("train: step %d/%d (%d %%), %s, %s elapsed%s", self._step, total, 100 * self._step // total,
                 self.info(), _hms(elapsed), eta)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
        elif self.enabled and exc[0] is None and self._step:
            self._plain_line(time.monotonic())  # the final state, always shown once


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
