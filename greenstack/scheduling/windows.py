"""Lowest-carbon window search: pure, vectorised numpy functions over hourly intensity values.

Why pure functions: the same search serves the scheduler policies (one forecast), the backtest
(thousands of jobs at once: every function takes a trailing hour axis and any leading batch axes)
and tests against brute force. Hour 0 is the job's arrival; values are gCO2eq/kWh per hour, so a
window's cost is proportional to its emissions for a job of constant power.

* contiguous jobs: `window_costs` (cumulative sums, fractional durations allowed) and `best_window`;
* interruptible jobs: `best_slots`, an exact dynamic programme over (hours done, current run
  length) with a minimum chunk length and a resume overhead charged at each restart;
* risk-aware planning: `planning_values` turns a forecast's quantiles into the values to optimise
  (an upper quantile penalises uncertain, far-ahead windows).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from greenstack.errors import ConfigError, Problem

TIE_RTOL = 1e-9  # costs this close count as equal, so float noise never beats "earliest start wins"


def _first_min(costs: np.ndarray) -> np.ndarray:
    """Index of the earliest (near-)minimum along the last axis."""
    low = np.min(costs, axis=-1, keepdims=True)
    return np.argmax(costs <= low + TIE_RTOL * np.abs(low) + 1e-12, axis=-1)


# --- contiguous windows -----------------------------------------------------------------------------

def window_costs(values: Any, duration_h: float) -> np.ndarray:
    """Cost (sum of hourly values) of a contiguous job of `duration_h` hours started at each hour.

    The last axis is time; the result has `T - ceil(duration_h) + 1` starts on that axis. A fractional
    duration pays the fraction of its last hour (a 2.5 h job started at hour k: v[k] + v[k+1] + 0.5 v[k+2]).
    """
    v = np.asarray(values, dtype="float64")
    if not duration_h > 0:
        raise ConfigError(Problem("duration", duration_h, "a job must last more than 0 hours"))
    whole = int(math.floor(duration_h + 1e-9))
    frac = float(duration_h) - whole
    if frac < 1e-9:
        frac = 0.0
    span = whole + (1 if frac else 0)
    n_starts = v.shape[-1] - span + 1
    if n_starts < 1:
        raise ConfigError(Problem("duration", duration_h, f"longer than the {v.shape[-1]} h of values given",
                                  "give values covering at least the job's duration"))
    cs = np.concatenate([np.zeros(v.shape[:-1] + (1,)), np.cumsum(v, axis=-1)], axis=-1)
    sums = cs[..., whole:whole + n_starts] - cs[..., :n_starts]
    if frac:
        sums = sums + frac * v[..., whole:whole + n_starts]
    return sums


@dataclass(frozen=True)
class WindowChoice:
    """The chosen start (hours after arrival) of a contiguous job and what it is expected to save."""

    start_h: int
    duration_h: float
    cost: float  # sum of planning values over the window (g/kWh x h)
    cost_now: float  # the same for starting at hour 0
    latest_start_h: int  # last start considered (after clipping to the values given)
    horizon_limited: bool  # the requested latest start did not fit the values (planned with what is known)

    @property
    def expected_saving_pct(self) -> float:
        """Saving vs starting at once, in % of the run-now cost, on the planning values."""
        return 100.0 * (self.cost_now - self.cost) / self.cost_now if self.cost_now > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"start_h": self.start_h, "duration_h": self.duration_h, "cost": self.cost,
                "cost_now": self.cost_now, "latest_start_h": self.latest_start_h,
                "horizon_limited": self.horizon_limited, "expected_saving_pct": self.expected_saving_pct}


def best_window(values: Any, duration_h: float, *, earliest_h: int = 0, latest_start_h: int | None = None
                ) -> WindowChoice:
    """Lowest-cost contiguous window starting in [earliest_h, latest_start_h] (ties: the earliest).

    If the latest start would need values beyond those given (slack past the forecast horizon), the
    search is limited to what is known and `horizon_limited` says so.
    """
    v = np.asarray(values, dtype="float64")
    if v.ndim != 1:
        raise ConfigError(Problem("values", v.shape, "expected one series of hourly values"))
    costs = window_costs(v, duration_h)
    last_possible = len(costs) - 1
    want = last_possible if latest_start_h is None else int(latest_start_h)
    if earliest_h < 0 or want < earliest_h:
        raise ConfigError(Problem("latest_start_h", latest_start_h,
                                  f"before the earliest start {earliest_h}", "the deadline must leave room for the job"))
    latest = min(want, last_possible)
    if latest < earliest_h:
        raise ConfigError(Problem("values", len(v), f"no window of {duration_h} h starts at or after hour "
                                  f"{earliest_h} within the values given"))
    k = earliest_h + int(_first_min(costs[earliest_h:latest + 1]))
    return WindowChoice(k, float(duration_h), float(costs[k]), float(costs[0]), latest, latest < want)


def choose_starts(plan: np.ndarray, duration_h: float, n_starts: int | np.ndarray) -> np.ndarray:
    """Batch version: for each row of `plan` (jobs x hours), the start in [0, n_starts) of least cost.

    `n_starts` may differ per row (an array); ties go to the earliest start.
    """
    costs = window_costs(plan, duration_h)
    n = np.broadcast_to(np.asarray(n_starts), costs.shape[:-1])
    if np.any(n < 1) or np.any(n > costs.shape[-1]):
        raise ConfigError(Problem("n_starts", int(np.max(n)), f"must be within 1..{costs.shape[-1]}"))
    allowed = np.arange(costs.shape[-1]) < n[..., None]
    return _first_min(np.where(allowed, costs, np.inf))


# --- interruptible jobs -----------------------------------------------------------------------------

@dataclass(frozen=True)
class SlotPlan:
    """Hours (offsets from arrival) in which an interruptible job runs, grouped in chunks."""

    slots: tuple[int, ...]
    cost: float  # planning-value cost including resume overheads
    cost_now: float  # cost of running contiguously from hour 0
    min_chunk_h: int
    resume_overhead_h: float
    horizon_limited: bool = False

    @property
    def chunks(self) -> list[tuple[int, int]]:
        """(first hour, length) of each run of consecutive slots."""
        out: list[tuple[int, int]] = []
        for s in self.slots:
            if out and out[-1][0] + out[-1][1] == s:
                out[-1] = (out[-1][0], out[-1][1] + 1)
            else:
                out.append((s, 1))
        return out

    @property
    def expected_saving_pct(self) -> float:
        return 100.0 * (self.cost_now - self.cost) / self.cost_now if self.cost_now > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"slots": list(self.slots), "chunks": self.chunks, "cost": self.cost, "cost_now": self.cost_now,
                "min_chunk_h": self.min_chunk_h, "resume_overhead_h": self.resume_overhead_h,
                "horizon_limited": self.horizon_limited, "expected_saving_pct": self.expected_saving_pct}


@dataclass
class _Dp:
    """Result of the batched slot DP: planning cost, cost on the evaluation values, optional path."""

    plan_cost: np.ndarray
    eval_cost: np.ndarray
    final_r: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    choices: list[np.ndarray] = field(default_factory=list)


def _check_slots_args(duration_h: float, min_chunk_h: int, resume_overhead_h: float, hours: int) -> None:
    problems = []
    if int(duration_h) != duration_h or duration_h < 1:
        problems.append(Problem("duration", duration_h, "an interruptible job is planned in whole hours (>= 1)",
                                "round the duration up to whole hours"))
    if int(min_chunk_h) != min_chunk_h or min_chunk_h < 1:
        problems.append(Problem("min_chunk", min_chunk_h, "must be a whole number of hours >= 1"))
    if resume_overhead_h < 0:
        problems.append(Problem("resume_overhead", resume_overhead_h, "must be >= 0 hours"))
    if not problems and hours < duration_h:
        problems.append(Problem("deadline", hours, f"leaves {hours} h for a {duration_h} h job",
                                "give a deadline at least as long as the job"))
    if problems:
        raise ConfigError(problems)


def slot_dp(plan: np.ndarray, duration_h: int, *, min_chunk_h: int = 1, resume_overhead_h: float = 0.0,
            evaluate: np.ndarray | None = None, keep_path: bool = False) -> _Dp:
    """Exact batched DP for interruptible jobs over a (jobs x hours) planning matrix.

    State after each hour: (hours of work done w, run length r capped at M = min(min_chunk, duration),
    r = 0 meaning idle). A chunk may only end once it is M hours long (the last chunk too), and every
    chunk after the first costs `resume_overhead_h` x the value of the hour it restarts in. The job must
    be done within the hours given. `evaluate` (same shape) is summed along the chosen path, so a
    backtest scores a forecast-planned path on actual intensity without backtracking.
    """
    p = np.atleast_2d(np.asarray(plan, dtype="float64"))
    ev = p if evaluate is None else np.atleast_2d(np.asarray(evaluate, dtype="float64"))
    n_jobs, hours = p.shape
    _check_slots_args(duration_h, min_chunk_h, resume_overhead_h, hours)
    d = int(duration_h)
    m = min(int(min_chunk_h), d)
    inf = np.inf
    v = np.full((n_jobs, d + 1, m + 1), inf)
    a = np.zeros((n_jobs, d + 1, m + 1))
    v[:, 0, 0] = 0.0
    restart = (np.arange(d) > 0)[None, :]  # a chunk started with w > 0 hours done pays the overhead
    out = _Dp(np.empty(0), np.empty(0))
    for t in range(hours):
        c, ce = p[:, t:t + 1], ev[:, t:t + 1]
        nv = np.full_like(v, inf)
        na = np.zeros_like(a)
        code = np.zeros(v.shape, dtype=np.int8) if keep_path else None
        # idle: stay idle (code 0) or end a chunk that is long enough (code 1)
        stay, stop = v[:, :, 0], v[:, :, m]
        take_stop = stop < stay
        nv[:, :, 0] = np.where(take_stop, stop, stay)
        na[:, :, 0] = np.where(take_stop, a[:, :, m], a[:, :, 0])
        if code is not None:
            code[:, :, 0] = take_stop
        # start a chunk (code 2): idle with w < d -> (w + 1, 1)
        over = resume_overhead_h * restart
        start_v = v[:, :-1, 0] + c * (1.0 + over)
        start_a = a[:, :-1, 0] + ce * (1.0 + over)
        # continue a chunk (code 3): (w, r) -> (w + 1, min(r + 1, m)) for r >= 1
        for r_new in range(1, m + 1):
            cands_v, cands_a, cands_c = [], [], []
            if r_new == 1:
                cands_v.append(start_v)
                cands_a.append(start_a)
                cands_c.append(2)
            prev = [r_new - 1] if 1 <= r_new - 1 < m else []
            if r_new == m:
                prev.append(m)
            for r in prev:
                if r >= 1:
                    cands_v.append(v[:, :-1, r] + c)
                    cands_a.append(a[:, :-1, r] + ce)
                    cands_c.append(10 + r)
            best_v, best_a = cands_v[0], cands_a[0]
            best_c = np.full(best_v.shape, cands_c[0], dtype=np.int8)
            for cv, ca, cc in zip(cands_v[1:], cands_a[1:], cands_c[1:], strict=True):
                better = cv < best_v
                best_v = np.where(better, cv, best_v)
                best_a = np.where(better, ca, best_a)
                best_c = np.where(better, np.int8(cc), best_c)
            nv[:, 1:, r_new] = best_v
            na[:, 1:, r_new] = best_a
            if code is not None:
                code[:, 1:, r_new] = best_c
        v, a = nv, na
        if code is not None:
            out.choices.append(code)
    end_idle, end_run = v[:, d, 0], v[:, d, m]
    pick_run = end_run < end_idle
    out.plan_cost = np.where(pick_run, end_run, end_idle)
    out.eval_cost = np.where(pick_run, a[:, d, m], a[:, d, 0])
    out.final_r = np.where(pick_run, m, 0)
    return out


def best_slots(values: Any, duration_h: int, *, deadline_h: int | None = None, min_chunk_h: int = 1,
               resume_overhead_h: float = 0.0) -> SlotPlan:
    """Cheapest set of whole-hour slots for an interruptible job that must finish by `deadline_h`.

    With no overhead and chunks of 1 h this is simply the `duration_h` cheapest hours; a minimum
    chunk length and a resume overhead make fewer, longer chunks pay off. A deadline past the values
    given is clipped to them (`horizon_limited`).
    """
    v = np.asarray(values, dtype="float64")
    if v.ndim != 1:
        raise ConfigError(Problem("values", v.shape, "expected one series of hourly values"))
    want = len(v) if deadline_h is None else int(deadline_h)
    hours = min(want, len(v))
    _check_slots_args(duration_h, min_chunk_h, resume_overhead_h, hours)
    # ties go to the earliest hours: a vanishing preference for earlier slots, costs reported on `v`
    nudged = v[:hours] * (1.0 + TIE_RTOL * np.arange(hours)) + TIE_RTOL * np.arange(hours)
    dp = slot_dp(nudged[None, :], int(duration_h), min_chunk_h=min_chunk_h, resume_overhead_h=resume_overhead_h,
                 evaluate=v[None, :hours], keep_path=True)
    if not np.isfinite(dp.plan_cost[0]):
        raise ConfigError(Problem("min_chunk", min_chunk_h, f"no feasible plan within {hours} h",
                                  "lower min_chunk or give a later deadline"))
    slots = _backtrack(dp, int(duration_h), min(int(min_chunk_h), int(duration_h)))
    d = int(duration_h)
    return SlotPlan(tuple(slots), float(dp.eval_cost[0]), float(v[:d].sum()), int(min_chunk_h),
                    float(resume_overhead_h), hours < want)


def _backtrack(dp: _Dp, d: int, m: int) -> list[int]:
    w, r = d, int(dp.final_r[0])
    slots: list[int] = []
    for t in range(len(dp.choices) - 1, -1, -1):
        code = int(dp.choices[t][0, w, r])
        if r == 0:
            r = m if code == 1 else 0
            continue
        slots.append(t)
        w -= 1
        r = 0 if code == 2 else code - 10
    return sorted(slots)


def slots_cost(values: Any, slots: Any, resume_overhead_h: float = 0.0) -> float:
    """Cost of running in `slots` (hour offsets): values summed plus overhead at every restart."""
    v = np.asarray(values, dtype="float64")
    s = sorted(int(x) for x in slots)
    total = float(v[s].sum()) if s else 0.0
    for prev, cur in zip(s, s[1:], strict=False):
        if cur != prev + 1:
            total += resume_overhead_h * float(v[cur])
    return total


# --- risk-aware planning ----------------------------------------------------------------------------

def planning_values(point: Any, quantiles: Mapping[float, Any] | None = None, *,
                    objective: str | float = "point", mean: Any = None) -> np.ndarray:
    """The hourly values a plan optimises: the point forecast, the mean, or an (interpolated) quantile.

    objective: "point" (default), "mean" (the unbiased expectation: minimises expected emissions),
    "median", or a quantile level in (0, 1) such as 0.9: optimising an
    upper quantile prefers windows that are low even if the forecast is off, which penalises far-ahead
    windows whose uncertainty is larger. Levels between the given quantiles are interpolated linearly.
    """
    pt = np.asarray(point, dtype="float64")
    if objective == "point":
        return pt
    if objective == "mean":
        if mean is None:
            raise ConfigError(Problem("objective", objective, "the forecast has no mean", 'use objective "point"'))
        return np.asarray(mean, dtype="float64")
    level = 0.5 if objective == "median" else objective
    try:
        q = float(level)
    except (TypeError, ValueError):
        raise ConfigError(Problem("objective", objective, "unknown planning objective",
                                  'use "point", "mean", "median" or a quantile level such as 0.9')) from None
    if not 0.0 < q < 1.0:
        raise ConfigError(Problem("objective", objective, "a quantile level must be in (0, 1)", "e.g. 0.9"))
    if not quantiles:
        raise ConfigError(Problem("objective", objective, "the forecast has no quantiles",
                                  'use objective "point"'))
    levels = sorted(quantiles)
    arrs = np.stack([np.asarray(quantiles[k], dtype="float64") for k in levels])
    if q <= levels[0]:
        return arrs[0]
    if q >= levels[-1]:
        return arrs[-1]
    hi = int(np.searchsorted(levels, q))
    lo = hi - 1
    w = (q - levels[lo]) / (levels[hi] - levels[lo])
    return (1 - w) * arrs[lo] + w * arrs[hi]


__all__ = ["SlotPlan", "WindowChoice", "best_slots", "best_window", "choose_starts", "planning_values",
           "slot_dp", "slots_cost", "window_costs"]
