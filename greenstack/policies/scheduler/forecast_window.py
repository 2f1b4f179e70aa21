"""`scheduler=forecast_window`: wait for the lowest-carbon window before the deadline, then train.

At INIT (before the clock and meters start) the policy asks the intensity outlook for the hours up
to the deadline, picks the start whose window of `duration` has the lowest expected intensity
(`greenstack.scheduling.windows.best_window`, optimising the mean forecast by default), records the
decision, and waits with a countdown. While waiting it re-plans every hour with fresh data
(`replan`). SIGUSR2, `GREENSTACK_START_NOW=1`, `touch RUN_DIR/START_NOW` or `start_now=true` start at
once. Inside a Slurm allocation it does not sleep (the resources would idle while reserved): it
records the `--begin` value the launcher should use (`slurm_begin`) and starts. Under
`launcher=slurm` the launcher plans at submit time and submits with `--begin`; the job then finds
the plan in its environment (`GREENSTACK_PLANNED_START`) and starts at once, recording that plan.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pandas as pd

from greenstack.carbon.forecast import HORIZON_H
from greenstack.engine.events import Event
from greenstack.engine.reporter import Reporter
from greenstack.errors import ConfigError, GreenstackError, Problem
from greenstack.policies.scheduler._base import SchedulerPolicy, StartContext
from greenstack.scheduling.outlook import Outlook, hour_floor, intensity_outlook
from greenstack.scheduling.planner import StartDecision, StartPlanner, better_window
from greenstack.scheduling.slurm import PLANNED_SAVING_ENV, PLANNED_START_ENV, slurm_begin
from greenstack.scheduling.timeparse import parse_deadline, parse_hours
from greenstack.scheduling.windows import WindowChoice, best_window, planning_values, window_costs

__all__ = ["ForecastWindow", "Plan", "plan_window", "slurm_begin"]

OPENMETEO = "openmeteo"
WEATHER_HISTORY_DAYS = 92  # Open-Meteo weather fetched for the forecaster's fit: the most recent season


class Plan:
    """A chosen start: when, what it is expected to save, and on which outlook."""

    def __init__(self, start: datetime, choice: WindowChoice, outlook: Outlook, deadline: datetime) -> None:
        self.start, self.choice, self.outlook, self.deadline = start, choice, outlook, deadline

    @property
    def expected_saving_pct(self) -> float:
        return self.choice.expected_saving_pct

    def inputs(self, objective: Any, duration_h: float) -> dict[str, Any]:
        o = self.outlook
        return {"duration_h": duration_h, "deadline": self.deadline, "objective": objective,
                "outlook": o.describe(), "source": o.source, "weather_columns": list(o.weather_columns),
                "expected_g_per_kwh_by_hour": [round(float(v), 2) for v in o.values(objective)]}

    def choice_dict(self) -> dict[str, Any]:
        c = self.choice
        return {"start": self.start, "start_offset_h": c.start_h, "latest_start_h": c.latest_start_h,
                "expected_mean_g_per_kwh": c.cost / c.duration_h, "run_now_mean_g_per_kwh": c.cost_now / c.duration_h,
                "horizon_limited": c.horizon_limited}


def plan_window(source: Any, now: datetime, deadline: datetime, duration_h: float, *, objective: Any = "mean",
                horizon_h: int = HORIZON_H, weather: pd.DataFrame | None = None) -> Plan:
    """The lowest-carbon start in [now, deadline - duration] on the source's outlook (no sleeping).

    Raises ConfigError when the deadline leaves less than the job's duration.
    """
    left_h = (deadline - now).total_seconds() / 3600
    if left_h < duration_h:
        raise ConfigError(Problem("deadline", deadline.isoformat(),
                                  f"leaves {left_h:.2f} h from {now.isoformat()} for a {duration_h:g} h job",
                                  "give a later deadline or a shorter duration"))
    t0 = hour_floor(now)
    latest_start_h = int(math.floor((deadline - timedelta(hours=duration_h) - t0).total_seconds() / 3600 + 1e-9))
    span = latest_start_h + int(math.ceil(duration_h - 1e-9))
    outlook = intensity_outlook(source, now, span, horizon_h=horizon_h, weather=weather)
    values = outlook.values(objective)
    if len(values) < math.ceil(duration_h - 1e-9):  # shorter than the job: run now, said so
        outlook.notes.append("the outlook is shorter than the job: starting now")
        values = list(values) + [values[-1]] * (math.ceil(duration_h) - len(values))
    choice = best_window(values, duration_h, latest_start_h=latest_start_h)
    if choice.horizon_limited and not outlook.horizon_limited:
        outlook.notes.append(f"latest start clipped to hour {choice.latest_start_h} of the outlook")
    start = now if choice.start_h == 0 else t0 + timedelta(hours=choice.start_h)
    return Plan(start, choice, outlook, deadline)


class ForecastWindow(SchedulerPolicy):
    """Wait for the lowest-carbon window of `duration` before `deadline` (see module docstring)."""

    plans_at_submit = True  # launch/submit.py plans its window when a Slurm job is submitted

    events = frozenset({Event.INIT})
    start_time = True

    def __init__(self, duration: str | float = "1h", deadline: str | float = "24h", objective: str | float = "mean",
                 min_saving_pct: float = 5.0, replan: bool = True, start_now: bool = False,
                 horizon_h: int = HORIZON_H, tick_s: float = 1.0, countdown_every_s: float = 60.0,
                 slurm: str = "begin", zone: str | None = None, trace: str | None = None, carbon: Any = None,
                 weather: str | None = None, clock: Callable[[], float] | None = None, sleep: Callable[[float], None] | None = None) -> None:
        problems: list[Problem] = []
        key = "scheduler"
        self.duration_h = self._parse(lambda: parse_hours(duration, f"{key}.duration"), problems, 1.0)
        self.deadline_text = deadline
        now = datetime.fromtimestamp((clock or time.time)(), tz=timezone.utc)
        self.deadline = self._parse(lambda: parse_deadline(deadline, now, f"{key}.deadline"), problems, None)
        if self.deadline is not None and not problems:
            left_h = (self.deadline - now).total_seconds() / 3600
            if left_h < self.duration_h:
                problems.append(Problem(f"{key}.deadline", deadline,
                                        f"leaves {left_h:.2f} h, shorter than the job ({duration})",
                                        f"give a deadline of at least {duration} (or a shorter duration)"))
        try:
            planning_values([1.0], {0.5: [1.0]}, objective=objective, mean=[1.0])
        except ConfigError as err:
            problems += [Problem(f"{key}.objective", p.value, p.reason, p.fix) for p in err.problems]
        if not min_saving_pct >= 0:
            problems.append(Problem(f"{key}.min_saving_pct", min_saving_pct, "must be >= 0"))
        if not 1 <= horizon_h <= 144:
            problems.append(Problem(f"{key}.horizon_h", horizon_h, "must be 1..144 hours"))
        for k, v in (("tick_s", tick_s), ("countdown_every_s", countdown_every_s)):
            if not v > 0:
                problems.append(Problem(f"{key}.{k}", v, "must be > 0"))
        if slurm not in ("begin", "sleep"):
            problems.append(Problem(f"{key}.slurm", slurm, "must be begin or sleep",
                                    "begin: inside a Slurm job record the --begin value and start; sleep: wait anyway"))
        self.weather = str(weather) if weather else None
        self._weather_file = None
        if self.weather and self.weather != OPENMETEO:
            from greenstack.carbon.inputs import load_weather

            try:
                self._weather_file = load_weather([self.weather], [])
            except ConfigError as err:
                problems += [Problem(f"{key}.weather", p.value, p.reason,
                                     p.fix or "give a CSV of weather_* columns or `openmeteo`") for p in err.problems]
        try:
            super().__init__(name="forecast_window", zone=zone, trace=trace, carbon=carbon, start_now=start_now,
                             clock=clock, sleep=sleep)
        except ConfigError as err:
            problems += err.problems
        if problems:
            raise ConfigError(problems)
        self.objective, self.min_saving_pct, self.replan = objective, float(min_saving_pct), bool(replan)
        self.horizon_h, self.tick_s, self.countdown_every_s, self.slurm = horizon_h, tick_s, countdown_every_s, slurm
        self.plan: Plan | None = None

    @staticmethod
    def _parse(fn: Callable[[], Any], problems: list[Problem], default: Any) -> Any:
        try:
            return fn()
        except ConfigError as err:
            problems.extend(err.problems)
            return default

    def make_plan(self, now: datetime | None = None) -> Plan:
        """The plan at `now` (default: the policy's clock), without waiting: for launchers and tests."""
        now = now or self.now()
        weather, note = self.weather_frame(now)
        plan = plan_window(self.source(), now, self.deadline, self.duration_h,
                           objective=self.objective, horizon_h=self.horizon_h, weather=weather)
        if note:
            plan.outlook.notes.append(note)
        return plan

    def weather_frame(self, now: datetime) -> tuple[pd.DataFrame | None, str | None]:
        """The weather-forecast columns to plan with, and a note when they could not be had.

        Why a note, not an error: weather only sharpens the forecast; a plan without it is still a plan,
        and the decision record says which one was made.
        """
        if self.weather is None:
            return None, None
        if self.weather != OPENMETEO:
            return self._weather_file, None
        from greenstack.carbon import weather as om
        from greenstack.carbon.providers.cache import DiskCache

        zone = str(getattr(self.source(), "zone", "") or "")
        start = pd.Timestamp(now).tz_convert("UTC").floor("h")
        try:
            frame = om.weather_for_zone(zone, (start - pd.Timedelta(days=WEATHER_HISTORY_DAYS)).date(),
                                        (start + pd.Timedelta(hours=self.horizon_h)).date(), cache=DiskCache())
        except GreenstackError as err:
            return None, f"weather (Open-Meteo) unavailable, planning without it: {err}"
        return frame, None

    def planner(self) -> StartPlanner:
        """This policy's start rules (shared with the Slurm submitter and `plan backtest`)."""
        return StartPlanner(self.make_plan, self.deadline, self.duration_h, self.min_saving_pct,
                            begin_in_slurm=self.slurm == "begin")

    def decide(self, state: StartContext, reporter: Reporter) -> None:
        if self.decisions:  # replayed from a recorded run
            return
        slurm_job = os.environ.get("SLURM_JOB_ID")
        decision = self.planner().plan(self.now(), request=self.start_request(state) or self.resumed_run(state),
                                       released=os.environ.get(PLANNED_START_ENV) if slurm_job else None,
                                       in_slurm=bool(slurm_job))
        plan = decision.plan
        if plan is None:  # decided without a plan: asked to start, released by Slurm, or no slack left
            self._record_unplanned(state, reporter, decision)
            return
        self.plan = plan
        numbers = {"expected_mean_g_per_kwh": plan.choice.cost / plan.choice.duration_h,
                   "run_now_mean_g_per_kwh": plan.choice.cost_now / plan.choice.duration_h,
                   "planned_start_s": plan.start.timestamp(), "planned_wait_h": plan.choice.start_h}
        inputs, choice = plan.inputs(self.objective, self.duration_h), plan.choice_dict()
        notes = list(plan.outlook.notes)
        if decision.action == "slurm_begin":
            choice = {**choice, "slurm_begin": decision.begin}
            notes.append(f"inside Slurm job {slurm_job}: not sleeping on reserved resources; {decision.note}")
        elif decision.action != "wait":
            notes.append(decision.note)
        self.record(state, reporter, decision.action, inputs, choice, expected_saving_pct=decision.expected_saving_pct,
                    numbers=numbers, notes=notes)
        if decision.action == "wait":
            self._wait(state, reporter, plan)

    def _record_unplanned(self, state: StartContext, reporter: Reporter, decision: StartDecision) -> None:
        if decision.action == "start":  # released by Slurm at the window planned when it was submitted
            try:
                saving: float | None = float(os.environ.get(PLANNED_SAVING_ENV, ""))
            except ValueError:
                saving = None
            self.record(state, reporter, "start", {"planned_start": os.environ.get(PLANNED_START_ENV),
                                         "planned_by": "launcher (sbatch --begin)"},
                        {"start": self.now(), "slurm_job_id": os.environ["SLURM_JOB_ID"]},
                        expected_saving_pct=saving, notes=[decision.note])
        elif decision.requested_by is not None:  # asked to start at once
            self.record(state, reporter, "start_now", {"requested_by": decision.requested_by}, {"start": self.now()},
                        notes=[decision.note])
        else:  # the deadline leaves no slack
            self.record(state, reporter, "start_now", {"deadline": self.deadline, "duration_h": self.duration_h},
                        {"start": self.now()}, expected_saving_pct=0.0, notes=[decision.note])

    def _wait(self, state: StartContext, reporter: Reporter, plan: Plan) -> None:
        current = {"plan": plan, "hour": hour_floor(self.now())}

        def replan() -> float | None:
            """Each new hour: keep the planned start unless a fresh plan finds a strictly cheaper window."""
            now = self.now()
            if not self.replan or hour_floor(now) == current["hour"] or now >= current["plan"].start:
                return None
            current["hour"] = hour_floor(now)
            fresh = self.make_plan(now)
            values = fresh.outlook.values(self.objective)
            k_cur = int(round((current["plan"].start - hour_floor(now)).total_seconds() / 3600))
            costs = window_costs(values, self.duration_h) if len(values) >= math.ceil(self.duration_h) else []
            if 0 <= k_cur < len(costs) and not better_window(fresh.choice.cost, costs[k_cur]):
                return None  # the planned window is still (one of) the best
            self.record(state, reporter, "replan", fresh.inputs(self.objective, self.duration_h), fresh.choice_dict(),
                        expected_saving_pct=fresh.expected_saving_pct, notes=fresh.outlook.notes,
                        numbers={"planned_start_s": fresh.start.timestamp()})
            current["plan"] = fresh
            self.plan = fresh
            return fresh.start.timestamp()

        reason = self.wait_until(plan.start.timestamp(), state, tick_s=self.tick_s,
                                 countdown_every_s=self.countdown_every_s, on_tick=replan,
                                 describe=lambda left: self.countdown_text(left, current["plan"].start,
                                                                           current["plan"].expected_saving_pct,
                                                                           getattr(state, "run_dir", None)))
        final = current["plan"]
        if not reason.startswith("started early"):
            self.record(state, reporter, "start", {"reason": reason, "planned_start": final.start},
                        {"start": self.now(), "waited_s": round(self.waited_s, 3)},
                        expected_saving_pct=final.expected_saving_pct, numbers={"wait_s": self.waited_s},
                        notes=[f"{reason} after waiting {self.waited_s / 3600:.2f} h"])
            return
        # Started before the planned window: the planned saving was not realised. Report the saving
        # expected for the start that actually happened (on the first plan's outlook, vs starting at arrival).
        actual = self.saving_at(plan, self.now())
        self.record(state, reporter, "start", {"reason": reason, "planned_start": final.start,
                                     "planned_saving_pct": round(final.expected_saving_pct, 3), "window_used": False},
                    {"start": self.now(), "waited_s": round(self.waited_s, 3)},
                    expected_saving_pct=actual, numbers={"wait_s": self.waited_s},
                    notes=[f"{reason} after waiting {self.waited_s / 3600:.2f} h: the planned window "
                           f"({final.start.strftime('%Y-%m-%dT%H:%MZ')}, {final.expected_saving_pct:.1f} % expected) "
                           "was not used; " + ("the saving expected for the actual start is "
                                               f"{actual:.1f} % vs starting at arrival" if actual is not None
                                               else "no saving can be expected for the actual start")])

    def saving_at(self, plan: Plan, when: datetime) -> float | None:
        """Expected % saving of a start at `when` vs starting at the plan's arrival, on the plan's outlook."""
        values = plan.outlook.values(self.objective)
        if len(values) < math.ceil(self.duration_h - 1e-9) or plan.choice.cost_now <= 0:
            return None
        costs = window_costs(values, self.duration_h)
        k = int((hour_floor(when) - hour_floor(plan.outlook.start)).total_seconds() // 3600)
        if not 0 <= k < len(costs):
            return None
        return round(float((plan.choice.cost_now - costs[k]) / plan.choice.cost_now * 100), 3)
