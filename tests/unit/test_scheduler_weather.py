"""Scheduler policies and a `carbon=csv` trace that carries its own weather-forecast columns."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest
import torch

from greenstack.carbon.sources import make_source
from greenstack.engine.events import Event
from greenstack.engine.state import State
from greenstack.policies.scheduler.forecast_window import ForecastWindow
from greenstack.policies.scheduler.pause_resume import PauseResume
from greenstack.policies.scheduler.threshold import Threshold
from greenstack.scheduling.outlook import intensity_outlook
from tests.helpers.clock import SimClock
from tests.helpers.hooks import fire

NOW = "2023-01-09T10:30:00+00:00"
COLUMNS = ["weather_wind_d1", "weather_wind_d2"]


@pytest.fixture(autouse=True)
def _no_outside_requests(monkeypatch):
    for var in ("GREENSTACK_START_NOW", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def windy(tmp_path):
    """A wind-driven grid (no daily pattern) whose trace CSV carries the wind forecast as weather columns."""
    rng = np.random.default_rng(11)
    times = pd.date_range("2022-11-01", "2023-01-20", freq="h", tz="UTC", inclusive="left")
    wind = np.convolve(rng.standard_normal(len(times) + 24), np.ones(24) / 5, mode="valid")[: len(times)]
    ci = np.clip(300 - 80 * wind, 30, None)
    stamp = times.strftime("%Y-%m-%dT%H:%M:%SZ")
    plain, with_weather = tmp_path / "plain.csv", tmp_path / "with_weather.csv"
    pd.DataFrame({"timestamp": stamp, "carbon_intensity": ci}).to_csv(plain, index=False)
    pd.DataFrame({"timestamp": stamp, "carbon_intensity": ci, "weather_wind_d1": wind,
                  "weather_wind_d2": wind}).to_csv(with_weather, index=False)
    return str(plain), str(with_weather), pd.Series(ci, index=times)


def test_csv_source_keeps_its_weather_columns_and_the_outlook_uses_them(windy):
    plain, with_weather, _ = windy
    assert make_source("csv", path=plain).weather is None
    src = make_source("csv", path=with_weather)
    assert list(src.weather.columns) == COLUMNS
    outlook = intensity_outlook(src, datetime.fromisoformat(NOW), 24)
    assert outlook.kind == "forecast" and outlook.weather_columns == COLUMNS
    assert outlook.describe()["weather_columns"] == COLUMNS
    assert intensity_outlook(make_source("csv", path=plain), datetime.fromisoformat(NOW), 24).weather_columns == []


def test_forecast_window_plans_on_the_traces_weather_and_says_so(windy):
    plain, with_weather, ci = windy
    start = pd.Timestamp(NOW).floor("h")
    actual = ci[start: start + pd.Timedelta(hours=23)].rolling(3).mean().shift(-2).dropna()  # 3 h windows

    def plan(trace: str):
        clock = SimClock(NOW)
        return ForecastWindow(trace=trace, duration="3h", deadline="24h", replan=False, clock=clock.time,
                              sleep=clock.sleep).make_plan()

    blind, informed = plan(plain), plan(with_weather)
    assert informed.inputs("mean", 3.0)["weather_columns"] == COLUMNS
    assert blind.inputs("mean", 3.0)["weather_columns"] == []
    got = {p: float(actual[pd.Timestamp(p.start).floor("h")]) for p in (blind, informed)}
    assert got[informed] < got[blind]
    assert got[informed] <= actual.min() * 1.05


def test_threshold_records_that_it_does_not_use_weather(windy, tmp_path):
    _, with_weather, _ = windy
    clock = SimClock(NOW)
    policy = Threshold(trace=with_weather, duration="2h", deadline="6h", poll="30m", clock=clock.time,
                       sleep=clock.sleep)
    fire(policy, Event.INIT, State(model=torch.nn.Linear(1, 1), run_dir=str(tmp_path)))
    first = policy.decisions[0]
    assert first["inputs"]["weather_columns"] == []
    assert any("weather columns (weather_wind_d1, weather_wind_d2) are not used" in n for n in first["notes"])


def test_pause_resume_plans_with_the_traces_weather(windy, tmp_path):
    _, with_weather, _ = windy
    clock = SimClock(NOW)
    policy = PauseResume(mode="plan", trace=with_weather, deadline="24h", clock=clock.time, sleep=clock.sleep)
    policy.deadline = datetime.fromisoformat(NOW) + timedelta(hours=24)
    policy.remaining_s = lambda state: 4 * 3600.0
    _, plan = policy._plan(State(model=torch.nn.Linear(1, 1), run_dir=str(tmp_path)))
    assert plan["weather_columns"] == COLUMNS
    assert plan["outlook"]["weather_columns"] == COLUMNS
