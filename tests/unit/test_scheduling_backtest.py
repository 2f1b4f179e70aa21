"""`greenstack plan backtest`: hand-computed answers, the JSON contract, no look-ahead, clear errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from greenstack.carbon import traces
from greenstack.cli.plan import run_plan
from greenstack.errors import ConfigError, DataError
from greenstack.scheduling.backtest import BacktestConfig, run_backtest

LOW_HOURS = (2, 3, 4, 5)  # UTC hours at 100 g/kWh; every other hour 300


def periodic(days: float, start: str = "2023-01-01") -> pd.DataFrame:
    times = pd.date_range(start, periods=int(round(24 * days)), freq="h", tz="UTC")
    return pd.DataFrame({"timestamp": times.strftime("%Y-%m-%dT%H:%M:%SZ"),
                         "carbon_intensity": np.where(times.hour.isin(LOW_HOURS), 100.0, 300.0)})


def write(df: pd.DataFrame, path) -> str:
    df.to_csv(path, index=False)
    return str(path)


# Hand computation for a 4 h job, 24 h slack, on the pattern above. A job arriving at hour h costs
# 100 x (low hours in h..h+3) + 300 x (the rest) if started at once; the best window is 02-05 (400).
#   h = 2: 400 -> 0 %;  h in {1, 3}: 600 -> 33.3 %;  h in {0, 4}: 800 -> 50 %;  h in {23, 5}: 1000 -> 60 %;
#   the other 17 hours: 1200 -> 66.7 %.  Mean: (2*33.33 + 2*50 + 2*60 + 17*66.67) / 24 = 1420 / 24.
ORACLE_PCT = 1420 / 24
# Threshold (p25 of last week = 300, start once the latest observed hour is < 300): arrivals 3..6 see a
# low hour and start at once (0 %); the others start at 03:00 (03-06 = 600): h=2 -> -50 %, h=0 -> 25 %,
# h=1 -> 0 %, h=23 -> 40 %, the 16 hours 7..22 -> 50 %.  Mean: (-50 + 25 + 40 + 16*50) / 24 = 815 / 24.
THRESHOLD_PCT = 815 / 24


def test_hand_computed_answer_on_a_periodic_trace(tmp_path, capsys):
    history = write(periodic(60, "2022-11-01"), tmp_path / "history.csv")
    trace = write(periodic(9 + 27 / 24, "2022-12-31"), tmp_path / "trace.csv")  # 9 whole days of arrivals
    assert run_plan(["backtest", "--trace", trace, "--history", history, "--duration", "4h", "--slack", "24h",
                     "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"traces", "aggregate"}
    (entry,) = doc["traces"]
    assert set(entry) == {"trace", "jobs", "saving_pct", "capture"}
    assert entry["trace"] == trace
    assert entry["jobs"] == 9 * 24  # the last 27 arrivals' windows would run past the trace end: skipped
    s = entry["saving_pct"]
    assert set(s) == {"policy", "oracle", "naive", "threshold"}
    assert s["oracle"] == pytest.approx(ORACLE_PCT, abs=1e-3)
    assert s["naive"] == pytest.approx(ORACLE_PCT, abs=1e-3)  # a periodic grid is seasonal-naive's best case
    assert s["threshold"] == pytest.approx(THRESHOLD_PCT, abs=1e-3)
    assert s["policy"] == pytest.approx(ORACLE_PCT, abs=1e-3)  # the forecaster learns the pattern exactly
    assert entry["capture"] == pytest.approx(1.0, abs=1e-4)
    assert doc["aggregate"] == {"saving_pct": s, "capture": entry["capture"]}


def test_interruptible_oracle_matches_on_the_periodic_trace(tmp_path):
    y = periodic(69 + 27 / 24, "2022-11-01")
    values = y["carbon_intensity"].to_numpy()
    start_s = int(pd.Timestamp(y["timestamp"].iloc[0]).timestamp())
    first = 24 * 60
    cfg = BacktestConfig(duration_h=4, slack_h=24, interruptible=True, resume_overhead_h=0.1)
    res = run_backtest(values, start_s, first, cfg)
    assert res.jobs == 24 * 9
    assert res.saving_pct["oracle"] == pytest.approx(ORACLE_PCT, abs=1e-6)  # the 4 low hours are contiguous
    assert res.saving_pct["policy"] == pytest.approx(ORACLE_PCT, abs=1e-3)


def brute_baselines(y: np.ndarray, arrivals: np.ndarray, d: int, slack: int) -> dict[str, float]:
    """Plain-loop oracle, seasonal-naive and threshold savings (independent of the vectorised code)."""
    out = {"oracle": [], "naive": [], "threshold": []}
    for a in arrivals:
        cost = [sum(y[a + k:a + k + d]) for k in range(slack + 1)]
        naive = [sum(y[a + k + i - 24 * ((k + i) // 24 + 1)] for i in range(d)) for k in range(slack + 1)]
        level = np.percentile(y[a - 168:a], 25)
        k_thr = next((k for k in range(slack + 1) if y[a + k - 1] < level), slack)
        for key, k in (("oracle", int(np.argmin(cost))), ("naive", int(np.argmin(naive))), ("threshold", k_thr)):
            out[key].append(100 * (cost[0] - cost[k]) / cost[0])
    return {k: float(np.mean(v)) for k, v in out.items()}


def test_baselines_on_a_shipped_trace_match_a_plain_loop():
    df = traces.load_zone("GB")
    df = df[(df["timestamp"] >= "2023-03-01") & (df["timestamp"] < "2023-03-15")]
    y = df["carbon_intensity"].to_numpy()
    cfg = BacktestConfig(duration_h=3, slack_h=12, forecaster="seasonal-naive")
    res = run_backtest(y, int(df["timestamp"].iloc[0].timestamp()), 168, cfg)
    arrivals = np.arange(168, len(y) - 15 + 1)
    assert res.jobs == len(arrivals) and res.skipped_end == 14
    expected = brute_baselines(y, arrivals, 3, 12)
    for key, value in expected.items():
        assert res.saving_pct[key] == pytest.approx(value, abs=1e-9)
    assert res.saving_pct["policy"] == pytest.approx(expected["naive"], abs=1e-9)  # same forecaster


def test_no_look_ahead_future_values_do_not_change_past_plans():
    """Editing the trace after hour T must not change any plan decided before T - window."""
    y = periodic(70, "2022-11-01")["carbon_intensity"].to_numpy() * np.linspace(1, 1.3, 24 * 70)
    rng = np.random.default_rng(3)
    y = y * rng.uniform(0.8, 1.2, len(y))
    start_s = int(pd.Timestamp("2022-11-01", tz="UTC").timestamp())
    cfg = BacktestConfig(duration_h=2, slack_h=6)
    first, cut = 24 * 60, 24 * 65
    edited = y.copy()
    edited[cut:] *= rng.uniform(0.2, 3.0, len(y) - cut)
    a = run_backtest(y, start_s, first, cfg)
    b = run_backtest(edited, start_s, first, cfg)
    n_before = cut - first - cfg.window_h  # jobs whose whole window (and planning data) precede the edit
    assert np.array_equal(a.per_job["policy"][:n_before], b.per_job["policy"][:n_before])
    assert not np.array_equal(a.per_job["policy"], b.per_job["policy"])


def test_slack_beyond_the_horizon_plans_with_what_is_known(tmp_path, capsys):
    history = write(periodic(60, "2022-11-01"), tmp_path / "h.csv")
    trace = write(periodic(8, "2022-12-31"), tmp_path / "t.csv")
    assert run_plan(["backtest", "--trace", trace, "--history", history, "--duration", "2h", "--slack", "80h",
                     "--forecaster", "seasonal-naive", "--json"]) == 0
    out = capsys.readouterr()
    assert "72 h forecast horizon" in out.err and "what is known" in out.err
    entry = json.loads(out.out)["traces"][0]
    assert entry["jobs"] == 8 * 24 - 81 and entry["saving_pct"]["oracle"] > 0


def test_table_output(tmp_path, capsys):
    history = write(periodic(60, "2022-11-01"), tmp_path / "h.csv")
    a = write(periodic(5, "2022-12-31"), tmp_path / "a.csv")
    assert run_plan(["backtest", "--trace", a, "--trace", a, "--history", history, "--duration", "4h",
                     "--slack", "24h", "--forecaster", "seasonal-naive"]) == 0
    out = capsys.readouterr().out
    for text in ("greenstack %", "oracle %", "seasonal-naive %", "threshold %", "capture", "aggregate",
                 "skipped 27 at the end"):
        assert text in out


@pytest.mark.parametrize(("argv", "key"), [
    (["--duration", "0h", "--slack", "24h"], "--duration"),
    (["--duration", "4h", "--slack", "1.5h"], "--slack"),
    (["--duration", "4x", "--slack", "24h"], "--duration"),
    (["--duration", "4h", "--slack", "24h", "--objective", "best"], "--objective"),
    (["--duration", "2.5h", "--slack", "24h", "--interruptible"], "--duration"),
    (["--duration", "4h", "--slack", "24h", "--interruptible", "--replan"], "--replan"),
])
def test_bad_flags_are_clear_errors(tmp_path, argv, key):
    trace = write(periodic(3), tmp_path / "t.csv")
    with pytest.raises(ConfigError) as err:
        run_plan(["backtest", "--trace", trace, *argv])
    assert key in {p.key for p in err.value.problems}


def test_missing_file_and_too_short_trace(tmp_path):
    with pytest.raises(ConfigError) as err:
        run_plan(["backtest", "--trace", str(tmp_path / "nope.csv"), "--duration", "4h", "--slack", "24h"])
    assert "not found" in str(err.value)
    short = write(periodic(1), tmp_path / "short.csv")
    with pytest.raises(ConfigError) as err:
        run_plan(["backtest", "--trace", short, "--duration", "4h", "--slack", "24h"])
    assert "cannot hold one job window" in str(err.value)


def test_replanning_keeps_the_best_window_on_a_periodic_trace():
    y = periodic(69 + 27 / 24, "2022-11-01")["carbon_intensity"].to_numpy()
    start_s = int(pd.Timestamp("2022-11-01", tz="UTC").timestamp())
    res = run_backtest(y, start_s, 24 * 60, BacktestConfig(duration_h=4, slack_h=24, replan=True))
    assert res.saving_pct["policy"] == pytest.approx(ORACLE_PCT, abs=1e-3)
    assert math.isclose(res.capture, 1.0, abs_tol=1e-4)


def test_hourly_rolling_forecasts_reproduce_the_daily_evaluation_at_midnight():
    """The backtest's hourly forecasts are the forecast-eval model: same fits, same values at 00:00."""
    from greenstack.carbon import forecast as fc
    from greenstack.scheduling.rolling import rolling_forecasts

    s = fc.hourly_series(traces.load_zone("GB"))[:"2022-03-31"]
    ctx = fc.zone_context("GB")
    ev = fc.rolling_evaluate(s, pd.Timestamp("2022-02-01", tz="UTC"), context=ctx)
    first = int((ev.origins[0] - s.index[0]) / pd.Timedelta(hours=1))
    fm = rolling_forecasts(s.to_numpy(), int(s.index[0].timestamp()), first, horizon_h=72, context=ctx)
    rows = 24 * np.arange(len(ev.origins))
    assert fm.valid[rows].all()
    np.testing.assert_allclose(fm.point[rows], ev.model, rtol=1e-9)


def test_weather_columns_in_the_trace_reach_the_backtest_forecaster(tmp_path, capsys):
    rng = np.random.default_rng(5)
    times = pd.date_range("2023-01-01", periods=24 * 150, freq="h", tz="UTC")
    wind = np.convolve(rng.standard_normal(len(times) + 48), np.ones(48) / 7, mode="valid")[: len(times)]
    ci = np.clip(300 + 30 * np.sin(2 * np.pi * times.hour.to_numpy() / 24) - 80 * wind, 40, None)
    df = pd.DataFrame({"timestamp": times.strftime("%Y-%m-%dT%H:%M:%SZ"), "carbon_intensity": ci})
    hist, trace = df.iloc[: 24 * 90], df.iloc[24 * 90:]
    plain = write(trace, tmp_path / "plain.csv")
    weather = write(trace.assign(weather_wind=wind[24 * 90:]), tmp_path / "weather.csv")
    hist_plain = write(hist, tmp_path / "hist.csv")
    hist_weather = write(hist.assign(weather_wind=wind[: 24 * 90]), tmp_path / "hist_weather.csv")

    def capture(trace_path, hist_path):
        assert run_plan(["backtest", "--trace", trace_path, "--history", hist_path, "--duration", "4h",
                         "--slack", "24h", "--json"]) == 0
        return json.loads(capsys.readouterr().out)["traces"][0]

    without, with_weather = capture(plain, hist_plain), capture(weather, hist_weather)
    assert without["jobs"] == with_weather["jobs"]
    assert with_weather["saving_pct"]["oracle"] == pytest.approx(without["saving_pct"]["oracle"])
    assert with_weather["capture"] > without["capture"] + 0.05
    assert run_plan(["backtest", "--trace", weather, "--history", hist_weather, "--duration", "4h",
                     "--slack", "24h"]) == 0
    assert "weather: weather_wind" in capsys.readouterr().out  # the table says what the forecaster used
    # the same columns from a separate --weather file (as `greenstack carbon weather` writes) give the same plans
    sep = write(pd.DataFrame({"timestamp": df["timestamp"], "weather_wind": wind}), tmp_path / "w.csv")
    assert run_plan(["backtest", "--trace", plain, "--history", hist_plain, "--weather", sep, "--duration", "4h",
                     "--slack", "24h", "--json"]) == 0
    from_file = json.loads(capsys.readouterr().out)["traces"][0]
    assert from_file["saving_pct"] == pytest.approx(with_weather["saving_pct"])


def test_weather_files_without_weather_columns_or_for_several_zones_are_refused(tmp_path):
    trace = write(periodic(60), tmp_path / "t.csv")
    with pytest.raises(DataError, match="no weather_"):
        run_plan(["backtest", "--trace", trace, "--weather", trace, "--duration", "4h", "--slack", "24h"])
    with pytest.raises(DataError, match="file not found"):
        run_plan(["backtest", "--trace", trace, "--weather", str(tmp_path / "nope.csv"), "--duration", "4h",
                  "--slack", "24h"])
    gb = traces.load_zone("GB").iloc[: 24 * 60]
    de = traces.load_zone("DE-LU").iloc[: 24 * 60]
    paths = []
    for name, df in (("gb", gb), ("de", de)):
        out = pd.DataFrame({"Datetime (UTC)": df["timestamp"].dt.strftime("%Y-%m-%d %H:%M:%S"),
                            "Zone Id": name.upper() if name == "gb" else "DE-LU",
                            "Carbon Intensity gCO₂eq/kWh (LCA)": df["carbon_intensity"]})
        paths.append(write(out, tmp_path / f"{name}.csv"))
    w = write(pd.DataFrame({"timestamp": periodic(60)["timestamp"], "weather_wind": 1.0}), tmp_path / "w.csv")
    with pytest.raises(DataError, match="several zones"):
        run_plan(["backtest", "--trace", paths[0], "--trace", paths[1], "--weather", w, "--duration", "4h",
                  "--slack", "24h"])
