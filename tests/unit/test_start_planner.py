"""One copy of the start rules: StartPlanner.plan(now) for one job, StartPlanner.starts for a backtest."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np

from greenstack.scheduling.planner import StartPlanner, better_window
from greenstack.scheduling.windows import best_window

NOW = datetime(2026, 3, 2, 9, 30, tzinfo=timezone.utc)


@dataclass
class _Plan:
    """What the planner reads of a forecast_window Plan: the chosen window and its start."""

    choice: object
    start: datetime

    @property
    def expected_saving_pct(self) -> float:
        return self.choice.expected_saving_pct


def _planner(values, *, min_saving_pct=5.0, deadline_h=24.0, duration_h=2.0, begin=True):
    def make_plan(now):
        choice = best_window(values, duration_h)
        return _Plan(choice, now + timedelta(hours=choice.start_h))

    return StartPlanner(make_plan, NOW + timedelta(hours=deadline_h), duration_h, min_saving_pct,
                        begin_in_slurm=begin)


CHEAP_LATER = [400, 400, 400, 100, 100, 400, 400, 400]  # window at hour 3 saves 75 %
FLAT = [400, 400, 399, 399, 400, 400]  # best window saves 0.25 %


def test_each_rule_gives_its_decision():
    assert _planner(CHEAP_LATER).plan(NOW, request="SIGUSR2").action == "start_now"
    assert _planner(CHEAP_LATER).plan(NOW, request="SIGUSR2").requested_by == "SIGUSR2"
    assert _planner(CHEAP_LATER).plan(NOW, released="2026-03-02T14:00:00Z").action == "start"
    no_slack = _planner(CHEAP_LATER, deadline_h=2.0).plan(NOW)
    assert no_slack.action == "start_now" and no_slack.plan is None and "no slack" in no_slack.note
    small = _planner(FLAT).plan(NOW)
    assert small.action == "start_now" and small.expected_saving_pct == 0.0 and "min_saving_pct" in small.note
    assert _planner(FLAT, min_saving_pct=0.0).plan(NOW).action == "wait"  # any saving is worth it
    wait = _planner(CHEAP_LATER).plan(NOW)
    assert wait.action == "wait" and wait.start == NOW + timedelta(hours=3) and wait.expected_saving_pct == 75.0
    begin = _planner(CHEAP_LATER).plan(NOW, in_slurm=True)
    assert begin.action == "slurm_begin" and begin.begin and begin.waits
    assert _planner(CHEAP_LATER, begin=False).plan(NOW, in_slurm=True).action == "wait"  # slurm: sleep
    assert _planner([100, 100, 400, 400]).plan(NOW).action == "start_now"  # now is the best window


def test_the_batch_form_applies_the_same_rules_as_one_job():
    rows = np.array([CHEAP_LATER[:6], FLAT, [100, 100, 400, 400, 400, 400]], dtype=float)
    for min_saving in (0.0, 5.0, 80.0):
        batch = StartPlanner.starts(rows, 2.0, 5, min_saving)
        one = []
        for row in rows:
            decision = _planner(list(row), min_saving_pct=min_saving).plan(NOW)
            one.append(0 if decision.action == "start_now" else decision.plan.choice.start_h)
        assert list(batch) == one, (min_saving, list(batch), one)


def test_replanning_moves_only_to_a_strictly_cheaper_window():
    assert better_window(90.0, 100.0) and not better_window(100.0, 100.0)
    assert list(better_window(np.array([90.0, 100.0]), np.array([100.0, 100.0]))) == [True, False]
