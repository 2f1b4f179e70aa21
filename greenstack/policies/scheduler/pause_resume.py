"""`scheduler=pause_resume`: pause training while the grid is dirty, resume when it is clean again.

Checked every `check_every` of wall-clock time at a step end:

* mode `threshold`: pause while intensity exceeds a level (absolute `threshold_g_per_kwh`, or the
  `percentile` of the `lookback` before the run); resume once it is at or below it;
* mode `plan`: plan the remaining work as an interruptible job over the outlook up to the deadline
  (`windows.best_slots`, with `min_chunk` and `resume_overhead`) and pause until the next planned slot.

Other policies may ask for a pause through `state.requests.pause` (a `PauseRequest` with `by`, `reason`,
optionally `threshold` in g/kWh, e.g. from `efficiency.alerts`): the policy pauses until the intensity is
at or below that threshold (else its own level) and clears the request once it has acted.

The deadline always wins: the remaining time is estimated from measured step times (x `safety`), and
a pause never lasts past `deadline - remaining`; a start-now request ends a pause at once. Before a
pause the run is checkpointed through any policy that offers `checkpoint_now(state, reason)` (so a
kill while paused loses nothing); otherwise it pauses in memory and says so. Why in-process: the
pause is testable with a fake clock, and a paused process keeps its GPU state warm; the meters keep
running, so idle power while paused is still accounted.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Literal

import numpy as np

from greenstack.engine.events import Event
from greenstack.engine.reporter import Reporter
from greenstack.engine.requests import PauseRequest
from greenstack.engine.state import State
from greenstack.errors import ConfigError, Problem, at_least, checked, collecting
from greenstack.policies.scheduler._base import SchedulerPolicy
from greenstack.policies.scheduler.threshold import INTENSITY, PERCENTILE
from greenstack.scheduling.outlook import (
    hour_floor,
    intensity_now,
    intensity_outlook,
    observed_levels,
    weather_note,
)
from greenstack.scheduling.timeparse import parse_deadline, parse_hours
from greenstack.scheduling.windows import best_slots, planning_values


class PauseResume(SchedulerPolicy):
    """Pause/resume training around high grid intensity within a deadline (see module docstring)."""

    events = frozenset({Event.FIT_START, Event.STEP_END, Event.FIT_END})

    @checked("scheduler")
    def __init__(self, mode: Literal["threshold", "plan"] = "threshold",
                 threshold_g_per_kwh: Annotated[float | None, INTENSITY] = None,
                 percentile: Annotated[float, PERCENTILE] = 50.0,
                 lookback: str = "7d", deadline: str | float = "48h", check_every: str | float = "5m",
                 poll: str | float = "5m", min_chunk: str | float = "1h", resume_overhead: str | float = "5m",
                 safety: Annotated[float, at_least(1, fix="a margin on the remaining time")] = 1.2, objective: str | float = "mean", checkpoint_on_pause: bool = True,
                 start_now: bool = False, zone: str | None = None, trace: str | None = None, carbon: Any = None,
                 clock: Callable[[], float] | None = None, sleep: Callable[[float], None] | None = None) -> None:
        problems: list[Problem] = []
        key = "scheduler"

        def parse(fn: Callable[[], Any], default: Any) -> Any:
            return collecting(problems, fn, default)

        self.lookback_h = parse(lambda: parse_hours(lookback, f"{key}.lookback"), 168.0)
        self.check_every_s = parse(lambda: parse_hours(check_every, f"{key}.check_every"), 1 / 12) * 3600
        self.poll_s = parse(lambda: parse_hours(poll, f"{key}.poll"), 1 / 12) * 3600
        self.min_chunk_h = parse(lambda: parse_hours(min_chunk, f"{key}.min_chunk"), 1.0)
        self.resume_overhead_h = parse(lambda: parse_hours(resume_overhead, f"{key}.resume_overhead",
                                                           allow_zero=True), 0.0)
        now = datetime.fromtimestamp((clock or time.time)(), tz=timezone.utc)
        parse(lambda: parse_deadline(deadline, now, f"{key}.deadline"), None)  # checked now, set at FIT_START
        try:
            planning_values([1.0], {0.5: [1.0]}, objective=objective, mean=[1.0])
        except ConfigError as err:
            problems += [Problem(f"{key}.objective", p.value, p.reason, p.fix) for p in err.problems]
        try:
            super().__init__(name="pause_resume", zone=zone, trace=trace, carbon=carbon, start_now=start_now,
                             clock=clock, sleep=sleep)
        except ConfigError as err:
            problems += err.problems
        if problems:
            raise ConfigError(problems)
        self.mode, self.threshold_g_per_kwh, self.percentile = mode, threshold_g_per_kwh, float(percentile)
        self.deadline_spec, self.safety, self.objective = deadline, float(safety), objective
        self.checkpoint_on_pause = checkpoint_on_pause
        self.deadline: datetime | None = None
        self.level: float | None = None
        self.paused_s = 0.0
        self.pauses = 0
        self._step_s: list[float] = []
        self._last_step_end: float | None = None
        self._last_check = -math.inf
        self._last_resume = -math.inf

    # -- estimates ----------------------------------------------------------------------------------
    def remaining_s(self, state: State) -> float:
        """Time the rest of the run needs: steps left x median measured step time x safety."""
        if not self._step_s:
            return 0.0
        recent = self._step_s[-50:]
        return max(0, state.max_steps - state.step) * statistics.median(recent) * self.safety

    def latest_resume_s(self, state: State) -> float:
        assert self.deadline is not None
        return self.deadline.timestamp() - self.remaining_s(state) - self.resume_overhead_h * 3600

    # -- events -------------------------------------------------------------------------------------
    def __call__(self, event: Event, state: State, reporter: Reporter) -> None:
        if event is Event.FIT_START:
            self._fit_start(state, reporter)
        elif event is Event.STEP_END:
            now = self.clock()
            if self._last_step_end is not None:
                self._step_s.append(max(0.0, now - self._last_step_end))
            if now - self._last_check >= self.check_every_s and state.step < state.max_steps:
                self._last_check = now
                self._check(state, reporter)
            self._last_step_end = self.clock()  # time paused is not step time

    def _fit_start(self, state: State, reporter: Reporter) -> None:
        now = self.now()
        if self.deadline is None:  # a resumed run keeps its original deadline (state_dict)
            self.deadline = parse_deadline(self.deadline_spec, now, "scheduler.deadline")
        self._last_step_end = self.clock()
        if self.mode == "threshold":
            if self.threshold_g_per_kwh is not None:
                self.level, how = float(self.threshold_g_per_kwh), "configured threshold_g_per_kwh"
            else:
                hours = max(1, int(math.ceil(self.lookback_h)))
                self.level = float(np.percentile(observed_levels(self.source(), now, hours), self.percentile))
                how = f"p{self.percentile:g} of the {hours} h before the run"
            self.record(state, reporter, "arm", {"mode": self.mode, "level_from": how, "deadline": self.deadline,
                                       "weather_columns": []},
                        {"pause_above_g_per_kwh": self.level}, numbers={"pause_level_g_per_kwh": self.level},
                        notes=weather_note(self.source(), "pause_resume in threshold mode"))
        else:
            self.record(state, reporter, "arm", {"mode": self.mode, "deadline": self.deadline,
                                       "min_chunk_h": self.min_chunk_h, "resume_overhead_h": self.resume_overhead_h},
                        {"plan": "re-planned at each check from the outlook"})

    def _check(self, state: State, reporter: Reporter) -> None:
        request = state.requests.pause
        if self.start_request(state) is not None:
            return  # the owner asked to run: no pausing
        now_s = self.clock()
        latest = self.latest_resume_s(state)
        if request is not None:
            state.requests.pause = None
            self._requested(state, reporter, request, latest)
            return
        if now_s - self._last_resume < self.min_chunk_h * 3600:
            return  # run at least one chunk between pauses
        if latest - now_s < self.poll_s:
            return  # no room before the deadline
        intensity, prov, src = intensity_now(self.source(), self.now())
        if self.mode == "threshold":
            assert self.level is not None
            if intensity <= self.level:
                return
            self._pause(state, reporter, intensity, prov, src, target_s=latest, resume_below=self.level,
                        plan={"pause_above_g_per_kwh": self.level}, expected=None)
            return
        resume_at, plan = self._plan(state)
        if resume_at is None or resume_at <= now_s:
            return
        self._pause(state, reporter, intensity, prov, src, target_s=min(resume_at, latest), resume_below=None, plan=plan,
                    expected=plan.get("expected_saving_pct"))

    def _requested(self, state: State, reporter: Reporter, request: PauseRequest, latest: float) -> None:
        """Act on another policy's pause request (and say so), unless the deadline leaves no room."""
        by = str(request.by or "another policy")
        if latest - self.clock() < self.poll_s:
            self.record(state, reporter, "decline_pause", {"request": request.to_dict()}, {"reason": "no room before the deadline"},
                        notes=[f"{by} asked for a pause, but the deadline leaves no room"])
            return
        intensity, prov, src = intensity_now(self.source(), self.now())
        below = request.threshold if request.threshold is not None else self.level
        below = float(below) if isinstance(below, (int, float)) else None
        self._pause(state, reporter, intensity, prov, src, target_s=latest, resume_below=below,
                    plan={"requested_by": by, "request_reason": request.reason}, expected=None)

    def _plan(self, state: State) -> tuple[float | None, dict[str, Any]]:
        """Next planned slot start (epoch s) of the remaining work, and the plan's summary."""
        assert self.deadline is not None
        now = self.now()
        t0 = hour_floor(now)
        work_h = max(1, int(math.ceil(self.remaining_s(state) / 3600)))
        hours = int(math.floor((self.deadline - t0).total_seconds() / 3600))
        if hours < work_h:
            return None, {}
        outlook = intensity_outlook(self.source(), now, hours)
        slots = best_slots(outlook.values(self.objective), work_h, deadline_h=min(hours, outlook.hours),
                           min_chunk_h=max(1, int(round(self.min_chunk_h))), resume_overhead_h=self.resume_overhead_h)
        plan = {"work_h": work_h, "slots": slots.to_dict(), "outlook": outlook.describe(),
                "weather_columns": list(outlook.weather_columns),
                "expected_saving_pct": slots.expected_saving_pct}
        if not slots.slots or slots.slots[0] == 0:
            return None, plan
        return (t0 + timedelta(hours=slots.slots[0])).timestamp(), plan

    def _pause(self, state: State, reporter: Reporter, intensity: float, prov: str, src: str, *, target_s: float,
               resume_below: float | None, plan: dict[str, Any], expected: float | None) -> None:
        saved = self._checkpoint(state)
        self.pauses += 1
        latest = self.latest_resume_s(state)
        self.record(state, reporter, "pause", {"intensity_g_per_kwh": intensity, "step": state.step, "source": src,
                                     "remaining_s": self.remaining_s(state), "deadline": self.deadline,
                                     "latest_resume": datetime.fromtimestamp(latest, tz=timezone.utc)},
                    {"resume_by": datetime.fromtimestamp(target_s, tz=timezone.utc), **plan},
                    expected_saving_pct=expected, provenance=prov, notes=[saved],
                    numbers={"paused": 1.0, "pauses": float(self.pauses), "intensity_at_pause_g_per_kwh": intensity})
        seen = {"intensity": intensity, "clean": False}

        def check() -> float | None:
            if resume_below is None:
                return None
            value, _, _ = intensity_now(self.source(), self.now())
            seen["intensity"] = value
            if value <= resume_below:
                seen["clean"] = True
                return self.clock()
            return None

        before = self.waited_s
        reason = self.wait_until(target_s, state, tick_s=self.poll_s, countdown_every_s=max(self.poll_s, 600.0),
                                 on_tick=check, describe=lambda left: f"paused at step {state.step}; resuming in "
                                                                      f"at most {left / 3600:.2f} h")
        paused = self.waited_s - before
        self.paused_s += paused
        now_s = self.clock()
        if seen["clean"]:
            reason = f"intensity {seen['intensity']:.0f} g/kWh at or below {resume_below:.0f}"
        elif not reason.startswith("started early"):
            reason = "deadline: must resume to finish in time" if target_s >= latest - 1 else "planned slot reached"
        resumed, _, _ = intensity_now(self.source(), self.now())
        saving = 100.0 * (intensity - resumed) / intensity if intensity > 0 else 0.0
        self._last_resume = now_s
        self.record(state, reporter, "resume", {"reason": reason, "intensity_at_pause_g_per_kwh": intensity},
                    {"resumed_at": self.now(), "paused_s": round(paused, 3), "intensity_g_per_kwh": resumed},
                    expected_saving_pct=saving, provenance=prov,
                    numbers={"paused": 0.0, "paused_s_total": self.paused_s, "intensity_at_resume_g_per_kwh": resumed},
                    notes=[f"{reason}; saving = intensity at resume vs at pause for the shifted work"])

    def _checkpoint(self, state: State) -> str:
        if not self.checkpoint_on_pause:
            return "checkpoint_on_pause=false: pausing in memory only"
        for policy in state.policies:
            where = policy.checkpoint_now(state, "pause_resume") if policy is not self else None
            if where is not None:
                return f"checkpointed before pausing: {where}"
        return "no checkpointing policy offers checkpoint_now(): pausing in memory only"

    def summary(self) -> dict[str, Any]:
        from greenstack.provenance import Figure

        figs = super().summary()
        figs["scheduler/paused_s"] = Figure(round(self.paused_s, 3), "s", "measured", "pause_resume clock")
        figs["scheduler/pauses"] = Figure(self.pauses, "count", "measured", "pause_resume")
        return figs

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "deadline": self.deadline.isoformat() if self.deadline else None,
                "paused_s": self.paused_s, "pauses": self.pauses}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("deadline"):
            self.deadline = datetime.fromisoformat(state["deadline"])
        self.paused_s += float(state.get("paused_s", 0.0))
        self.pauses += int(state.get("pauses", 0))
