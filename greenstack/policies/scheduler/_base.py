"""What every scheduler policy shares: its intensity source, a clock, start-now requests, decisions.

Why an injectable clock and sleep: the policies wait on wall-clock time; tests and backtests drive
them with a fake clock and a synthetic trace instead of real hours. Why several start-now routes:
a waiting run must be startable at once from wherever its owner is - the config
(`scheduler.start_now=true`), the environment (`GREENSTACK_START_NOW=1`), a signal to the process
(SIGUSR2) or a file in the run dir (`touch RUN_DIR/START_NOW`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

from greenstack.engine.events import Event
from greenstack.engine.policy import Policy, Role
from greenstack.engine.reporter import Reporter
from greenstack.engine.state import State
from greenstack.errors import ConfigError, Problem
from greenstack.provenance import Figure
from greenstack.scheduling.decisions import Decision, DecisionRecorder
from greenstack.scheduling.timeparse import format_hours

log = logging.getLogger("greenstack")
START_NOW_ENV = "GREENSTACK_START_NOW"
START_NOW_FILE = "START_NOW"
START_SIGNAL = signal.SIGUSR2


def build_source(zone: str | None, trace: str | None, carbon: Any, key: str) -> Any:
    """The IntensitySource a policy plans on: a CSV trace, a shipped zone, or the run's carbon config."""
    if trace:
        from greenstack.carbon.sources import CsvTraceSource

        return CsvTraceSource(trace, zone=zone, key=f"{key}.trace")
    if zone:
        from greenstack.carbon.sources import make_source

        try:
            return make_source("embedded", zone=zone)
        except ConfigError as err:
            raise ConfigError([Problem(f"{key}.zone", p.value, p.reason, p.fix) for p in err.problems]) from None
    if carbon is not None and hasattr(carbon, "source"):
        return carbon.source()
    return None


@dataclass
class StartContext:
    """What a start-time decision reads and sets, before the run has a model or a State: the run dir
    (START_NOW file, checkpoints of a resumed run), the decision's figures for the run's first metrics
    row, and the region it chose."""

    run_dir: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    region: str | None = None


class SchedulerPolicy(Policy):
    """Base of the scheduler policies (see the module docstring).

    A start-time scheduler (`start_time = True`: when or where the run starts) implements `decide`;
    the runner calls `decide_start` once before it builds anything. Its INIT hook only decides for a
    loop used without the runner, and once decided the loop does not dispatch INIT to it again.
    """

    #: decides when or where the run starts, once, before the run builds anything (`decide`)
    start_time: ClassVar[bool] = False

    role = Role.MODIFIER

    placement = "start"  # decides when the run starts: built and consulted before the model or data
    changes_training = False
    audit_kind = "schedule"

    def __init__(self, *, name: str, zone: str | None = None, trace: str | None = None, carbon: Any = None,
                 start_now: bool = False, clock: Callable[[], float] | None = None,
                 sleep: Callable[[float], None] | None = None, key: str = "scheduler") -> None:
        super().__init__(name=name)
        self.key = key  # config path in error messages
        self.zone, self.trace, self.carbon = zone, trace, carbon
        self.start_now = bool(start_now)
        self.clock = clock or time.time
        self.sleep = sleep or time.sleep
        self.recorder = DecisionRecorder(name)
        self._source: Any = build_source(zone, trace, carbon, self.key)
        self._signalled = False
        self._previous_handler: Any = None
        self.waited_s = 0.0
        self._started: StartContext | None = None

    # -- shared helpers -----------------------------------------------------------------------------
    @property
    def decisions(self) -> list[dict[str, Any]]:
        """JSON-able record of every decision so far (see `greenstack.scheduling.decisions`)."""
        return self.recorder.decisions

    def recorded_decisions(self) -> list[dict[str, Any]]:
        return self.recorder.decisions

    def decision_recorder(self) -> DecisionRecorder:
        return self.recorder

    def source(self) -> Any:
        if self._source is None:
            raise ConfigError(Problem(f"{self.key}.zone", None, "no carbon-intensity source to plan on",
                                      f"set {self.key}.zone=GB, {self.key}.trace=FILE, or "
                                      f"{self.key}.carbon=${{carbon}} (the run's carbon config)"))
        return self._source

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), tz=timezone.utc)

    def record(self, state: State | StartContext | None, reporter: Reporter, action: str, inputs: dict[str, Any], choice: dict[str, Any],
               *, expected_saving_pct: float | None = None, provenance: str = "estimated",
               notes: list[str] | None = None, numbers: dict[str, float] | None = None) -> dict[str, Any]:
        """Record a decision (the audit log listens to the recorder) and report its figures as metrics."""
        del state
        decision = Decision(self.name, action, self.now(), inputs, choice, expected_saving_pct, provenance,
                            list(notes or []))
        figures: dict[str, Any] = {}
        record = self.recorder.record(decision, figures, numbers)
        reporter.metrics(figures)
        return record

    # -- start-time decisions -----------------------------------------------------------------------
    def decide(self, state: StartContext, reporter: Reporter) -> None:
        """Take the start-time decision (wait for a window, pick a region): record it (its figures go to
        `reporter`), set `state.region` when it chooses one."""
        del state, reporter

    def decide_start(self, run_dir: str | Path | None, *, region: str | None = None) -> StartContext:
        """The start-time decision, taken once (the runner calls this before it builds the run).
        `region`: where the run is now, when known."""
        if self._started is None:
            started = StartContext(run_dir=str(run_dir) if run_dir is not None else None, region=region)
            self.decide(started, Reporter.for_state(started, self.name))
            self._started = started
        return self._started

    def handles(self, event: Event, state: State) -> bool:
        if self.start_time and self._started is not None:
            return False  # decided before the run was built: nothing to do at its INIT
        return super().handles(event, state)

    def __call__(self, event: Event, state: State, reporter: Reporter) -> None:
        """A start-time scheduler in a loop run without the runner: decide at INIT."""
        if not self.start_time or event is not Event.INIT:
            return
        started = self.decide_start(state.run_dir, region=state.region)
        reporter.metrics(started.metrics)
        if started.region is not None:
            state.region = started.region

    # -- start-now requests -------------------------------------------------------------------------
    def install_start_signal(self) -> None:
        """SIGUSR2 -> start at once (main thread only; the previous handler is restored afterwards)."""
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(START_SIGNAL, self._on_signal)

    def restore_start_signal(self) -> None:
        if self._previous_handler is not None:
            signal.signal(START_SIGNAL, self._previous_handler)
            self._previous_handler = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        del signum, frame
        self._signalled = True

    @staticmethod
    def resumed_run(state: State | StartContext | None) -> str | None:
        """Why this looks like a resumed run (checkpoints in its run dir): it must not wait again.

        Why a file check: checkpoints are restored at INIT after the scheduler has run (checkpointing
        goes last), so the scheduler cannot see restored state when it decides whether to wait.
        """
        run_dir = getattr(state, "run_dir", None)
        ckpt = Path(run_dir) / "checkpoints" if run_dir else None
        if ckpt is not None and ckpt.is_dir() and (any(ckpt.glob("step-*")) or any(ckpt.glob("rank-*/step-*"))):
            return f"{ckpt} holds checkpoints: a resumed run starts at once (its first segment chose the window)"
        return None

    def start_request(self, state: State | StartContext | None) -> str | None:
        """Why the run should start at once, if someone asked: config, signal, environment or file."""
        if self.start_now:
            return "config start_now=true"
        if self._signalled:
            return "SIGUSR2"
        if os.environ.get(START_NOW_ENV, "").strip().lower() in ("1", "true", "yes"):
            return f"{START_NOW_ENV}=1"
        run_dir = getattr(state, "run_dir", None)
        if run_dir and (Path(run_dir) / START_NOW_FILE).exists():
            return f"{Path(run_dir) / START_NOW_FILE} exists"
        return None

    def wait_until(self, target_s: float, state: State | StartContext | None, *, tick_s: float, countdown_every_s: float,
                   describe: Callable[[float], str], on_tick: Callable[[], float | None] | None = None) -> str:
        """Sleep (in ticks) until `target_s` or a start request; returns why waiting ended.

        `on_tick` may return a new target (re-planning); the countdown is logged every
        `countdown_every_s` seconds with `describe(seconds_left)`.
        """
        t_start = self.clock()
        last_report = -float("inf")
        reason = "planned start reached"
        self.install_start_signal()
        try:
            while True:
                now = self.clock()
                request = self.start_request(state)
                if request is not None:
                    reason = f"started early: {request}"
                    break
                if on_tick is not None:
                    new_target = on_tick()
                    if new_target is not None:
                        target_s = new_target
                left = target_s - now
                if left <= 0:
                    break
                if now - last_report >= countdown_every_s:
                    log.info("%s: %s", self.name, describe(left))
                    last_report = now
                self.sleep(min(tick_s, left))
        finally:
            self.restore_start_signal()
            self.waited_s += max(0.0, self.clock() - t_start)
        return reason

    @staticmethod
    def countdown_text(left_s: float, start: datetime, saving_pct: float | None,
                       run_dir: str | Path | None = None) -> str:
        """The countdown line; its start-now hint names the run's real directory (copy-pasteable)."""
        import shlex

        saving = f", expected saving {saving_pct:.1f} % vs now" if saving_pct is not None else ""
        touch = shlex.quote(str(Path(run_dir) / START_NOW_FILE)) if run_dir else f"RUN_DIR/{START_NOW_FILE}"
        return (f"starting in {format_hours(left_s / 3600)} at {start.strftime('%Y-%m-%dT%H:%MZ')}{saving} "
                f"(start at once: touch {touch}, kill -USR2 {os.getpid()} or {START_NOW_ENV}=1)")

    # -- reporting ----------------------------------------------------------------------------------
    def summary(self) -> dict[str, Figure]:
        figs: dict[str, Figure] = {}
        src = f"greenstack.policies.scheduler.{self.name}"
        savings = [d["expected_saving_pct"] for d in self.decisions if isinstance(d["expected_saving_pct"], (int, float))]
        final = self.decisions[-1] if self.decisions else {}
        if str((final.get("inputs") or {}).get("reason", "")).startswith("started early") \
                and not isinstance(final.get("expected_saving_pct"), (int, float)):
            savings = []  # the planned window was not used and the actual start has no expected saving
        if savings:
            last = next(d for d in reversed(self.decisions) if isinstance(d["expected_saving_pct"], (int, float)))
            inputs = last["inputs"] if isinstance(last.get("inputs"), dict) else {}
            on = inputs.get("source")
            label = f"{src}: {last['action']}" + (f" on {on}" if on else "")
            if str(inputs.get("reason", "")).startswith("started early"):
                label = (f"{src}: {inputs['reason']}; saving expected for the actual start, the planned window "
                         f"({inputs.get('planned_saving_pct')} % expected) was not used")
            figs["scheduler/expected_saving_pct"] = Figure(round(savings[-1], 3), "%", "estimated", label)
        figs["scheduler/wait_s"] = Figure(round(self.waited_s, 3), "s", "measured", f"{src} clock")
        figs["scheduler/decisions"] = Figure(json.dumps(self.decisions), "json", "estimated",
                                             f"{src}: every decision (inputs, choice, expected saving)")
        return figs

    def state_dict(self) -> dict[str, Any]:
        return {"decisions": list(self.decisions), "waited_s": self.waited_s}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        earlier = list(state.get("decisions", []))
        self.recorder.decisions[:0] = [d for d in earlier if d not in self.recorder.decisions]
        self.waited_s += float(state.get("waited_s", 0.0))


class _CarriedMetrics(Policy):
    """Hands the start-time decisions (metrics, chosen region) to the run's State at INIT."""

    role = Role.OBSERVER

    audit_kind = "schedule"

    events = frozenset({Event.INIT})

    def __init__(self, metrics: dict[str, Any], region: str | None) -> None:
        super().__init__(name="scheduler_metrics")
        self.metrics, self.region = metrics, region

    def __call__(self, event: Event, state: State, reporter: Reporter) -> None:
        reporter.metrics(self.metrics)
        if self.region is not None and state.region is None:
            state.region = self.region


def start_when_scheduled(policies: list[Policy], run_dir: str | Path) -> Policy:
    """Take the start-time scheduling decisions (wait for a window, pick a region) before the run builds
    anything, so a waiting run holds no model, data or device memory and opens no tracker run.

    Each start-time scheduler decides once (`decide_start`); the run's loop does not call it at INIT
    again. Returns a policy that puts the decisions' metrics into the run's first metrics row and the
    chosen region into State (always one policy, so checkpointed policy positions do not depend on what
    the schedulers did).
    """
    metrics: dict[str, Any] = {}
    region: str | None = None
    for policy in policies:
        if isinstance(policy, SchedulerPolicy) and policy.start_time:
            started = policy.decide_start(run_dir)
            metrics.update(started.metrics)
            region = started.region if started.region is not None else region
    return _CarriedMetrics(metrics, region)
