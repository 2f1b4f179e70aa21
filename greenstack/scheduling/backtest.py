"""Backtest carbon-aware scheduling against the oracle on an hourly intensity trace.

A job of `duration_h` arrives at every hour of the trace and may start anywhere in
[arrival, arrival + slack] (interruptible jobs: run in any hours before arrival + slack + duration).
Each method plans with what was known at arrival only, and every plan is scored on the actual
intensity: the saving is (cost of starting at arrival - cost of the plan) / cost of starting at
arrival, in %, averaged over jobs. Methods:

* policy    - greenstack: window search on the rolling 72 h forecast (`rolling.rolling_forecasts`),
              optimising the mean forecast by default (chosen on 2022 with 2021 history; optimising an
              upper quantile was worse there); with `replan`, re-decided every hour while waiting
* oracle    - window search on the actual intensity (the upper bound)
* naive     - window search on the seasonal-naive forecast (same hour, most recent observed day)
* threshold - start at the first hour whose latest observed intensity is below the `threshold_pct`
              percentile of the week before arrival (interruptible: run while below it), with the
              deadline forcing the rest

Why "latest observed": an hourly average is only known once its hour is over, so at hour t the
threshold rule sees hour t-1, the same information rule as the forecaster (strictly before t).
Jobs whose window could run past the end of the trace, and warm-up arrivals without enough history
for the forecaster, are skipped (and counted).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from greenstack.carbon import forecast as fc
from greenstack.errors import ConfigError, Problem
from greenstack.scheduling import windows
from greenstack.scheduling.planner import StartPlanner, better_window
from greenstack.scheduling.rolling import ForecastMatrix, rolling_forecasts

FORECASTERS = ("greenstack", "seasonal-naive")
METHODS = ("policy", "oracle", "naive", "threshold")


@dataclass(frozen=True)
class BacktestConfig:
    """What job is backtested and how greenstack plans it; validated when constructed."""

    duration_h: float = 4.0
    slack_h: int = 24
    interruptible: bool = False
    forecaster: str = "greenstack"
    objective: str | float = "mean"
    replan: bool = False
    min_chunk_h: int = 1
    resume_overhead_h: float = 0.0
    threshold_pct: float = 25.0
    #: the policy's `min_saving_pct`: start at arrival unless the planned window saves at least this (0: any)
    min_saving_pct: float = 0.0
    threshold_lookback_h: int = 168
    refit_every_h: int = 24
    horizon_h: int = fc.HORIZON_H

    def __post_init__(self) -> None:
        problems = []
        if not self.duration_h > 0:
            problems.append(Problem("--duration", self.duration_h, "a job must last more than 0 hours", "e.g. 4h"))
        if self.interruptible and self.duration_h != int(self.duration_h):
            problems.append(Problem("--duration", self.duration_h, "interruptible jobs are planned in whole hours",
                                    f"use {math.ceil(self.duration_h)}h"))
        if self.slack_h < 0 or self.slack_h != int(self.slack_h):
            problems.append(Problem("--slack", self.slack_h, "must be a whole number of hours >= 0", "e.g. 24h"))
        if self.forecaster not in FORECASTERS:
            problems.append(Problem("--forecaster", self.forecaster, "unknown forecaster",
                                    f"one of {', '.join(FORECASTERS)}"))
        if self.min_chunk_h < 1 or self.min_chunk_h != int(self.min_chunk_h):
            problems.append(Problem("--min-chunk", self.min_chunk_h, "must be a whole number of hours >= 1"))
        if self.resume_overhead_h < 0:
            problems.append(Problem("--resume-overhead", self.resume_overhead_h, "must be >= 0"))
        if not self.min_saving_pct >= 0:
            problems.append(Problem("min_saving_pct", self.min_saving_pct, "must be >= 0"))
        if not 0 < self.threshold_pct < 100:
            problems.append(Problem("--threshold-pct", self.threshold_pct, "a percentile in (0, 100)"))
        if self.replan and self.interruptible:
            problems.append(Problem("--replan", True, "re-planning is backtested for contiguous jobs only",
                                    "drop --replan or --interruptible"))
        if self.refit_every_h < 1:
            problems.append(Problem("refit_every_h", self.refit_every_h, "must be >= 1"))
        if not 1 <= self.horizon_h <= 144:
            problems.append(Problem("horizon_h", self.horizon_h, "must be 1..144"))
        try:
            windows.planning_values(np.ones(1), {0.5: np.ones(1)}, objective=self.objective, mean=np.ones(1))
        except ConfigError as err:
            problems += [Problem("--objective", p.value, p.reason, p.fix) for p in err.problems]
        if problems:
            raise ConfigError(problems)

    @property
    def span_h(self) -> int:
        """Hours a contiguous run of the job touches."""
        return int(math.ceil(self.duration_h - 1e-9))

    @property
    def window_h(self) -> int:
        """Hours from arrival to the deadline (latest start + job)."""
        return int(self.slack_h) + self.span_h

    @property
    def planned_h(self) -> int:
        """Hours the forecaster can plan over: the window, clipped to the forecast horizon."""
        return min(self.window_h, self.horizon_h)

    @property
    def horizon_limited(self) -> bool:
        return self.window_h > self.horizon_h

    def horizon_note(self) -> str | None:
        """What "plan with what is known" means for this job, when the slack passes the horizon."""
        if not self.horizon_limited:
            return None
        return (f"slack {self.slack_h:g}h + duration {self.duration_h:g}h exceeds the {self.horizon_h} h forecast "
                f"horizon: greenstack plans only within the first {self.horizon_h} h (what is known)")


@dataclass
class BacktestResult:
    """Mean % saving per method over the jobs of one trace, and how many jobs were skipped."""

    name: str
    jobs: int
    saving_pct: dict[str, float]
    skipped_end: int
    skipped_warmup: int
    seconds: float
    per_job: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def capture(self) -> float | None:
        """Policy saving / oracle saving (None when the oracle cannot save anything)."""
        oracle = self.saving_pct["oracle"]
        return self.saving_pct["policy"] / oracle if oracle > 0 else None

    def to_dict(self) -> dict[str, Any]:
        cap = self.capture
        return {"trace": self.name, "jobs": self.jobs,
                "saving_pct": {k: round(v, 4) for k, v in self.saving_pct.items()},
                "capture": None if cap is None else round(cap, 4)}


def _threshold_levels(y: np.ndarray, arrivals: np.ndarray, lookback_h: int, pct: float) -> np.ndarray:
    """Per arrival, the `pct` percentile of the `lookback_h` hours before it (observed only)."""
    lb = np.minimum(lookback_h, arrivals)
    if np.all(lb == lookback_h):
        idx = arrivals[:, None] - lookback_h + np.arange(lookback_h)[None, :]
        return np.percentile(y[idx], pct, axis=1)
    return np.array([np.percentile(y[max(a - lookback_h, 0):a], pct) if a > 0 else y[0] for a in arrivals])


def threshold_contiguous(observed: np.ndarray, levels: np.ndarray, slack_h: int) -> np.ndarray:
    """Start offset per job: first k in [0, slack] whose latest observation is below the level, else slack.

    `observed[:, k]` is what is known when deciding at hour k (the hour before it).
    """
    below = observed[:, : slack_h + 1] < levels[:, None]
    return np.where(below.any(axis=1), np.argmax(below, axis=1), slack_h)


def threshold_interruptible(observed: np.ndarray, actual: np.ndarray, levels: np.ndarray, duration_h: int,
                            min_chunk_h: int, resume_overhead_h: float) -> np.ndarray:
    """Cost on `actual` of running whenever the latest observation is below the level (deadline forces)."""
    n_jobs, hours = actual.shape
    done = np.zeros(n_jobs, dtype=int)
    run_len = np.zeros(n_jobs, dtype=int)
    cost = np.zeros(n_jobs)
    for t in range(hours):
        left = duration_h - done
        forced = (hours - t) <= left
        must_continue = (run_len > 0) & (run_len < min(min_chunk_h, duration_h))
        run = (left > 0) & (forced | must_continue | (observed[:, t] < levels))
        restart = run & (run_len == 0) & (done > 0)
        cost += np.where(run, actual[:, t] * (1.0 + resume_overhead_h * restart), 0.0)
        done += run
        run_len = np.where(run, run_len + 1, 0)
    return cost


def forecasts_for(values: np.ndarray, start_s: int, first_arrival: int, cfg: BacktestConfig, *,
                  context: fc.ZoneContext | None = None, replan: bool | None = None,
                  exog: pd.DataFrame | None = None,
                  progress: Callable[[int, int], None] | None = None) -> ForecastMatrix:
    """The rolling forecasts a backtest of `cfg` needs (reusable across objectives and job modes)."""
    n = len(values)
    last_arrival = n - cfg.window_h + 1
    extra = cfg.slack_h if (cfg.replan if replan is None else replan) else 0
    return rolling_forecasts(np.asarray(values, dtype="float64"), start_s, first_arrival, horizon_h=cfg.planned_h,
                             context=context, refit_every_h=cfg.refit_every_h,
                             last_arrival=min(n, last_arrival + extra),
                             quantiles=_quantile_levels(cfg.objective), exog=exog, progress=progress)


def run_backtest(values: np.ndarray, start_s: int, first_arrival: int, cfg: BacktestConfig, *,
                 name: str = "trace", context: fc.ZoneContext | None = None,
                 forecasts: ForecastMatrix | None = None, exog: pd.DataFrame | None = None,
                 progress: Callable[[int, int], None] | None = None) -> BacktestResult:
    """Backtest one hourly series; arrivals are every index from `first_arrival` (earlier = history).

    `forecasts` (from `forecasts_for`) lets several configurations share one forecasting pass;
    `exog` (weather-forecast columns, UTC-indexed) feeds the greenstack forecaster as in forecast-eval.
    """
    t0 = time.perf_counter()
    y = np.asarray(values, dtype="float64")
    n = len(y)
    last_arrival = n - cfg.window_h + 1  # exclusive: the whole window must lie inside the trace
    skipped_end = max(0, n - max(first_arrival, last_arrival))
    if last_arrival <= first_arrival:
        raise ConfigError(Problem("--trace", name, f"{n - first_arrival} h of trace cannot hold one job window "
                                  f"of {cfg.window_h} h (slack + duration)", "give a longer trace or less slack"))
    horizon = cfg.planned_h
    extra = cfg.slack_h if cfg.replan else 0  # re-planning needs forecasts from later origins too
    if cfg.forecaster == "greenstack":
        fm = forecasts or forecasts_for(y, start_s, first_arrival, cfg, context=context, exog=exog,
                                        progress=progress)
        if (fm.arrivals[0] != first_arrival or len(fm.arrivals) < min(n, last_arrival + extra) - first_arrival
                or fm.point.shape[1] != horizon):
            raise ValueError("forecasts do not cover this backtest's arrivals and horizon")
        all_plan = windows.planning_values(fm.point, fm.quantiles, objective=cfg.objective, mean=fm.mean)
        valid = fm.valid[: last_arrival - first_arrival]
        arrivals = fm.arrivals[: last_arrival - first_arrival]
    else:
        arrivals = np.arange(first_arrival, last_arrival, dtype="int64")
        valid = arrivals >= 24
        all_plan = None
    skipped_warmup = int((~valid).sum())
    arrivals = arrivals[valid]
    if len(arrivals) == 0:
        raise ConfigError(Problem("--trace", name, "every arrival is in the forecaster's warm-up",
                                  "give earlier data of the same zone with --history"))
    hrs = np.arange(cfg.window_h)
    actual = y[arrivals[:, None] + hrs[None, :]]
    naive_idx = arrivals[:, None] + hrs[None, :] - 24 * (hrs[None, :] // 24 + 1)
    naive = y[naive_idx]
    if all_plan is None:
        all_plan = _naive_matrix(y, np.arange(first_arrival, min(n, last_arrival + extra)), horizon)
    rows_all = arrivals - first_arrival
    plan = all_plan[rows_all]
    observed = y[arrivals[:, None] + hrs[None, :] - 1]  # at hour k, the hour before is the latest known
    levels = _threshold_levels(y, arrivals, cfg.threshold_lookback_h, cfg.threshold_pct)
    now_cost = windows.window_costs(actual, cfg.duration_h)[:, 0]
    costs: dict[str, np.ndarray] = {}
    if cfg.interruptible:
        d = int(cfg.duration_h)
        kw = {"min_chunk_h": cfg.min_chunk_h, "resume_overhead_h": cfg.resume_overhead_h}
        costs["oracle"] = windows.slot_dp(actual, d, **kw).plan_cost
        costs["policy"] = windows.slot_dp(plan, d, evaluate=actual[:, :horizon], **kw).eval_cost
        costs["naive"] = windows.slot_dp(naive, d, evaluate=actual, **kw).eval_cost
        costs["threshold"] = threshold_interruptible(observed, actual, levels, d, cfg.min_chunk_h,
                                                     cfg.resume_overhead_h)
    else:
        all_costs = windows.window_costs(actual, cfg.duration_h)  # (jobs, slack + 1)
        rows = np.arange(len(arrivals))
        costs["oracle"] = all_costs.min(axis=1)
        n_plan = min(cfg.slack_h, horizon - cfg.span_h) + 1
        starts = StartPlanner.starts(plan, cfg.duration_h, n_plan, cfg.min_saving_pct)
        if cfg.replan:
            starts = _replan(all_plan, rows_all, starts, cfg)
        costs["policy"] = all_costs[rows, starts]
        costs["naive"] = all_costs[rows, windows.choose_starts(naive, cfg.duration_h, cfg.slack_h + 1)]
        costs["threshold"] = all_costs[rows, threshold_contiguous(observed, levels, cfg.slack_h)]
    per_job = {k: 100.0 * (now_cost - c) / now_cost for k, c in costs.items()}
    saving = {k: float(np.mean(per_job[k])) for k in METHODS}
    return BacktestResult(name, len(arrivals), saving, skipped_end, skipped_warmup, time.perf_counter() - t0,
                          per_job)


def _naive_matrix(y: np.ndarray, origins: np.ndarray, horizon_h: int) -> np.ndarray:
    """Seasonal-naive forecasts (rows = origins): the same hour of the most recent observed day."""
    h = np.arange(horizon_h)
    return y[np.clip(origins[:, None] + h[None, :] - 24 * (h[None, :] // 24 + 1), 0, None)]


def _replan(all_plan: np.ndarray, rows: np.ndarray, first: np.ndarray, cfg: BacktestConfig) -> np.ndarray:
    """Start offsets when every waiting job re-plans each hour with the forecast issued at that hour.

    A job keeps its planned start unless a fresh forecast finds a window strictly cheaper than the
    planned one (on that same fresh forecast); it starts when its planned hour comes. This is what
    `scheduler=forecast_window` does while waiting (`replan: true`), and it uses only forecasts
    issued by then.
    """
    planned = first.copy()
    started = np.where(planned == 0, 0, -1)
    for step in range(1, cfg.slack_h + 1):
        waiting = np.flatnonzero(started < 0)
        if not len(waiting):
            break
        plan = all_plan[rows[waiting] + step]
        n_plan = min(cfg.slack_h - step, plan.shape[1] - cfg.span_h) + 1
        costs = windows.window_costs(plan, cfg.duration_h)[:, :n_plan]
        idx = np.arange(len(waiting))
        best = np.argmin(costs, axis=1)
        current = np.clip(planned[waiting] - step, 0, n_plan - 1)
        better = better_window(costs[idx, best], costs[idx, current])
        planned[waiting[better]] = best[better] + step
        started[waiting[planned[waiting] <= step]] = step
    return np.where(started < 0, cfg.slack_h, started)


def _quantile_levels(objective: str | float) -> tuple[float, ...]:
    levels = set(fc.DEFAULT_QUANTILES)
    if objective not in ("point", "mean", "median"):
        levels.add(float(objective))
    return tuple(sorted(levels))


def aggregate(results: list[BacktestResult]) -> dict[str, Any]:
    """Mean saving per method over traces (each trace weighs the same) and capture = sum policy / sum oracle."""
    saving = {k: float(np.mean([r.saving_pct[k] for r in results])) for k in METHODS}
    oracle = sum(r.saving_pct["oracle"] for r in results)
    cap = sum(r.saving_pct["policy"] for r in results) / oracle if oracle > 0 else None
    return {"saving_pct": {k: round(v, 4) for k, v in saving.items()},
            "capture": None if cap is None else round(cap, 4)}
