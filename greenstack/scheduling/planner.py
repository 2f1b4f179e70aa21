"""When to start a job: one copy of the start-time decision rules of `scheduler=forecast_window`.

Why one place: the job itself (the runner's `plan_start` phase, through the policy), the Slurm
submitter (`sbatch --begin`, greenstack/launch/submit.py) and `plan backtest` (thousands of
arrivals at once) must decide the same way, or a backtest measures a policy that never runs.
`StartPlanner.plan(now)` is the single-job form; `StartPlanner.starts(...)` the batch form of the
same rules (window search with ties to the earliest start, then "keep the window only if it saves
at least `min_saving_pct`"); `better_window` is the re-planning rule while a job waits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import numpy as np

from greenstack.scheduling.slurm import slurm_begin
from greenstack.scheduling.windows import TIE_RTOL, choose_starts, window_costs

#: what a start decision tells its caller to do
StartAction = Literal["start_now", "start", "wait", "slurm_begin"]


def keep_window(start_h: Any, saving_pct: Any, min_saving_pct: float) -> Any:
    """Whether a planned start is worth waiting for: it is now, or it saves at least `min_saving_pct`.

    Works on scalars and on numpy arrays (one value per job).
    """
    return np.logical_or(np.asarray(start_h) == 0, np.asarray(saving_pct) >= min_saving_pct)


def better_window(fresh_cost: Any, planned_cost: Any) -> Any:
    """While waiting: move the planned start only when a fresh plan's window is strictly cheaper than the
    planned one (beyond the tie tolerance), on that same fresh plan. Scalars or arrays."""
    return np.asarray(fresh_cost) < np.asarray(planned_cost) * (1 - TIE_RTOL)


@dataclass(frozen=True)
class StartDecision:
    """One job's start: what to do, when, why, and the plan it was decided on (None when none was made)."""

    action: StartAction
    start: datetime
    note: str
    expected_saving_pct: float | None = None
    plan: Any = None  # greenstack.policies.scheduler.forecast_window.Plan
    #: the sbatch --begin value (action slurm_begin)
    begin: str | None = None
    #: who asked to start at once (config, signal, environment, file, a resumed run's checkpoints)
    requested_by: str | None = None

    @property
    def waits(self) -> bool:
        """The job should not start now (sleep until `start`, or be submitted to start then)."""
        return self.action in ("wait", "slurm_begin")


@dataclass(frozen=True)
class StartPlanner:
    """The forecast-window start rules for one job (see the module docstring).

    `make_plan(now)` finds the lowest-carbon window on the job's outlook (it is where the forecast is
    made; tests and backtests pass a fake). `begin_in_slurm`: inside a Slurm allocation, submit with
    `--begin` instead of sleeping on reserved resources (`scheduler.slurm=begin`).
    """

    make_plan: Callable[[datetime], Any]
    deadline: datetime
    duration_h: float
    min_saving_pct: float = 5.0
    begin_in_slurm: bool = True

    def plan(self, now: datetime, *, request: str | None = None, released: str | None = None,
             in_slurm: bool = False) -> StartDecision:
        """The decision at `now`. `request`: why someone asked to start at once; `released`: the start the
        Slurm submitter planned (the job was released at it); `in_slurm`: deciding inside an allocation."""
        if request is not None:
            return StartDecision("start_now", now, f"start requested ({request}): not waiting", requested_by=request)
        if released is not None:
            return StartDecision("start", now, f"Slurm released the job at the window planned when it was "
                                               f"submitted ({released})")
        left_h = (self.deadline - now).total_seconds() / 3600
        if left_h <= self.duration_h:  # the time since the config was checked used up the slack
            return StartDecision("start_now", now, f"the deadline leaves {left_h:.2f} h for a {self.duration_h:g} h "
                                                   "job: no slack to use", expected_saving_pct=0.0)
        plan = self.make_plan(now)
        saving = plan.expected_saving_pct
        if not keep_window(plan.choice.start_h, saving, self.min_saving_pct):
            return StartDecision("start_now", now, f"best window saves {saving:.1f} % < min_saving_pct "
                                                   f"{self.min_saving_pct:g}: starting now", 0.0, plan)
        if plan.choice.start_h == 0:
            return StartDecision("start_now", now, "now is the lowest-carbon window before the deadline", saving, plan)
        if in_slurm and self.begin_in_slurm:
            begin = slurm_begin(plan.start, now)
            return StartDecision("slurm_begin", plan.start, f"submit with --begin={begin} to start in the chosen "
                                                            "window", saving, plan, begin=begin)
        return StartDecision("wait", plan.start, f"waiting for the window at {plan.start:%Y-%m-%dT%H:%MZ}",
                             saving, plan)

    @staticmethod
    def starts(plan_values: np.ndarray, duration_h: float, n_starts: int | np.ndarray,
               min_saving_pct: float = 0.0) -> np.ndarray:
        """The batch form: per row of `plan_values` (jobs x hours), the start offset these rules choose."""
        best = choose_starts(plan_values, duration_h, n_starts)
        if min_saving_pct <= 0:
            return best
        costs = window_costs(plan_values, duration_h)
        now_cost = costs[..., 0]
        chosen = np.take_along_axis(costs, best[..., None], axis=-1)[..., 0]
        saving = np.where(now_cost > 0, 100.0 * (now_cost - chosen) / np.where(now_cost > 0, now_cost, 1.0), 0.0)
        return np.where(keep_window(best, saving, min_saving_pct), best, 0)
