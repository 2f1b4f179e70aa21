"""A forecast_window run started before its planned window reports what happened, not the plan (issue 15.1)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from greenstack.engine.events import Event
from greenstack.policies.scheduler.forecast_window import ForecastWindow
from tests.helpers.hooks import fire
from tests.unit.test_scheduler_policies import FakeClock, state, trace  # noqa: F401 - trace is a fixture


@pytest.fixture(autouse=True)
def _no_outside_requests(monkeypatch):
    for var in ("GREENSTACK_START_NOW", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)


def policy_started_after(trace, tmp_path, sleeps: int, start: str = "2023-01-09T10:30:00+00:00"):  # noqa: F811
    clock = FakeClock(start)
    clock.on_sleep = lambda c: (tmp_path / "START_NOW").touch() if len(c.sleeps) == sleeps else None
    policy = ForecastWindow(trace=trace, clock=clock.time, sleep=clock.sleep, duration="3h", deadline="24h",
                            replan=False, tick_s=600.0, countdown_every_s=3600.0)
    st = state(tmp_path)
    fire(policy, Event.INIT, st)
    return policy, st, clock


def test_started_early_reports_the_saving_of_the_actual_start(trace, tmp_path):  # noqa: F811
    policy, st, clock = policy_started_after(trace, tmp_path, sleeps=3)  # 30 min into a 15.5 h wait
    wait, start = policy.decisions
    assert wait["action"] == "wait" and wait["expected_saving_pct"] == pytest.approx(66.7, abs=1.0)
    assert start["action"] == "start" and start["inputs"]["window_used"] is False
    assert start["inputs"]["planned_saving_pct"] == pytest.approx(wait["expected_saving_pct"], abs=0.01)
    # started at 11:00 in a 300 g/kWh stretch: no saving vs starting at arrival (10:30, also 300)
    assert start["expected_saving_pct"] == pytest.approx(0.0, abs=0.5)
    figure = policy.summary()["scheduler/expected_saving_pct"]
    assert figure.value == pytest.approx(0.0, abs=0.5)
    assert "started early" in figure.source and "not used" in figure.source
    assert st.metrics["scheduler/expected_saving_pct"] == pytest.approx(0.0, abs=0.5)
    assert "was not used" in " ".join(start["notes"])
    json.dumps(policy.decisions)


def test_a_start_inside_a_cheap_hour_reports_that_saving(trace, tmp_path):  # noqa: F811
    # wait from 22:30 for the 02:00 window; START_NOW at 02:00+ would be the planned window itself, so stop
    # at ~00:30 instead: 00:30-03:30 covers one low hour (02-03) of three -> (900 - 700) / 900 = 22 %
    policy, _, clock = policy_started_after(trace, tmp_path, sleeps=12, start="2023-01-09T22:30:00+00:00")
    assert clock.now == datetime(2023, 1, 10, 0, 30, tzinfo=timezone.utc)
    start = policy.decisions[-1]
    assert start["expected_saving_pct"] == pytest.approx(100 * 200 / 900, abs=1.5)
    assert policy.summary()["scheduler/expected_saving_pct"].value == pytest.approx(start["expected_saving_pct"])
