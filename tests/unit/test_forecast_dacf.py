"""The DACF archive (hourly intensity + GFS weather columns) through the forecaster and the CLI.

Reads the gzipped copies shipped in benchmarks/data/dacf (Apache-2.0, see the README there).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from greenstack.carbon import forecast as fc
from greenstack.carbon.inputs import trace_zone, zone_from_filename
from greenstack.cli.plan import run_plan

DACF = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "dacf"
WEATHER = ["weather_wind_speed_ms", "weather_temperature_k", "weather_dewpoint_k", "weather_dswrf_w_m2",
           "weather_precipitation_kg_m2"]


def _split(tmp_path: Path, region: str, history: tuple[str, str], trace: tuple[str, str],
           trace_name: str | None = None) -> tuple[Path, Path]:
    """Slices of a shipped DACF file, written as the archive's own CSV (columns untouched)."""
    df = pd.read_csv(DACF / f"DACF-{region}_2020-01_2021-06_hourly.csv.gz")
    hist = tmp_path / f"DACF-{region}_{history[0]}_{history[1]}_hourly.csv"
    df[(df.timestamp >= history[0]) & (df.timestamp < history[1])].to_csv(hist, index=False)
    out = tmp_path / (trace_name or f"DACF-{region}_{trace[0]}_{trace[1]}_hourly.csv")
    df[(df.timestamp >= trace[0]) & (df.timestamp < trace[1])].to_csv(out, index=False)
    return hist, out


def test_shipped_dacf_files_have_the_documented_columns():
    for region in ("CISO", "ERCO", "ISNE", "PJM", "SE"):
        df = pd.read_csv(DACF / f"DACF-{region}_2020-01_2021-06_hourly.csv.gz", nrows=3)
        assert list(df.columns) == ["timestamp", "carbon_intensity", *WEATHER]
    assert (DACF / "LICENSE.md").read_text().startswith(" " * 33 + "Apache License")


def test_region_codes_resolve_to_zone_context():
    assert fc.zone_context("CISO").zone == "US-CAL-CISO"
    assert fc.zone_context("erco").timezone == "America/Chicago"
    isne = fc.zone_context("ISNE")
    assert (isne.zone, isne.timezone, isne.country) == ("US-NE-ISNE", "America/New_York", "US")
    assert fc.zone_context("nowhere").lat is None
    assert zone_from_filename("/x/DACF-PJM_2020-01_2021-06_hourly.csv") == "PJM"
    assert zone_from_filename("GB_2023_hourly.csv") is None
    hist = pd.DataFrame({"a": [1]})
    hist.attrs["zone"] = "ERCO"
    assert trace_zone(pd.DataFrame({"a": [1]}), [hist]) == "ERCO"


@pytest.mark.slow
def test_forecast_eval_and_backtest_accept_dacf_files_and_name_the_weather(tmp_path, capsys):
    # history named as the archive names it; the evaluated file under any other name takes its zone
    hist, trace = _split(tmp_path, "ERCO", ("2020-09-01", "2021-01-01"), ("2021-01-01", "2021-01-15"),
                         trace_name="heldout.csv")
    assert run_plan(["forecast-eval", "--trace", str(trace), "--history", str(hist), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)["traces"][0]
    assert doc["weather_columns"] == WEATHER
    assert doc["zone"] == "US-TEX-ERCO"
    assert doc["mape"]["model"]["day1"] < doc["mape"]["naive"]["day1"]
    assert run_plan(["backtest", "--trace", str(trace), "--history", str(hist), "--duration", "4h",
                     "--slack", "24h"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "weather: " + ", ".join(WEATHER) in out
    assert "re-planned hourly" in out  # the default, as scheduler=forecast_window plans
    assert run_plan(["backtest", "--trace", str(trace), "--history", str(hist), "--duration", "4h",
                     "--slack", "24h", "--no-replan", "--json"]) == 0
    once = json.loads(capsys.readouterr().out)
    assert set(once) == {"traces", "aggregate"} and set(once["traces"][0]) == {"trace", "jobs", "saving_pct", "capture"}
    assert run_plan(["backtest", "--trace", str(trace), "--history", str(hist), "--duration", "4h",
                     "--slack", "24h", "--interruptible", "--forecaster", "seasonal-naive"]) == 0  # no re-plan there
    assert "re-planned" not in capsys.readouterr().out


def test_calibrated_quantiles_are_numpy_quantiles_at_the_nominal_level():
    r = np.random.default_rng(0).normal(size=(3, 4, 50))
    got = fc.calibrated_quantiles(r, (0.1, 0.5, 0.9), np.full((3, 4), fc.BAND_MISS))
    assert np.allclose(got, np.moveaxis(np.quantile(r, [0.1, 0.5, 0.9], axis=2), 0, 1))
    wide = fc.calibrated_quantiles(r, (0.1, 0.5, 0.9), np.full((3, 4), 0.05))
    assert np.all(wide[..., 0, :] <= got[..., 0, :]) and np.all(wide[..., 2, :] >= got[..., 2, :])
    assert np.allclose(wide[..., 1, :], got[..., 1, :])  # the median stays


def test_interval_widens_after_outcomes_fall_outside_it():
    bank = fc.RidgeBank(horizon_h=2, n_features=1, alpha=0.0, forgetting=1.0, residual_window=365)
    bank.weights = np.zeros((2, 1))
    rng = np.random.default_rng(1)
    x = np.ones((2, 1, 1))
    for _ in range(40):  # calm errors: the band settles near the nominal level
        bank.add(x, rng.normal(scale=0.05, size=(2, 1)))
    before = bank.quantile_offsets((0.1, 0.9))
    start_miss = bank.band_miss.copy()
    for _ in range(10):  # the errors grow: every outcome misses the band
        bank.add(x, rng.choice([-1.0, 1.0], size=(2, 1)) * 0.5)
    assert np.all(bank.band_miss < start_miss)
    after = bank.quantile_offsets((0.1, 0.9))
    assert np.all(after[0] < before[0]) and np.all(after[1] > before[1])


def test_weather_day_means_are_trailing_and_keep_the_lead_day():
    ex = np.arange(60.0).reshape(30, 2)
    out, names = fc.with_weather_means(ex, ["weather_wind_d1", "weather_temp"])
    assert names == ["weather_wind_d1", "weather_temp", f"weather_wind_mean{fc.WEATHER_MEAN_H}h_d1",
                     f"weather_temp_mean{fc.WEATHER_MEAN_H}h"]
    later = ex.copy()
    later[20:] += 1000.0  # a change after row 19 must not reach the means up to row 19
    out_later, _ = fc.with_weather_means(later, ["weather_wind_d1", "weather_temp"])
    assert np.array_equal(out[:20], out_later[:20])
    assert out[29, 2] == pytest.approx(ex[max(0, 30 - fc.WEATHER_MEAN_H):, 0].mean())
    picks = fc.exog_lead_columns(names, 24)
    assert picks.shape == (24, 4)  # the mean columns are variables of their own, lead days honoured
