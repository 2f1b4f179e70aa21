"""`greenstack plan forecast-eval`: the JSON/table contract and clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from greenstack.carbon import traces
from greenstack.cli.plan import SUBCOMMANDS, parse_hours, run_plan
from greenstack.errors import ConfigError, DataError


def _em_export(path: Path, zone: str, start: str, end: str) -> Path:
    """Write a slice of a shipped trace in the Electricity Maps data-portal export format."""
    df = traces.load_zone(zone)
    df = df[(df["timestamp"] >= start) & (df["timestamp"] < end)]
    out = pd.DataFrame({
        "Datetime (UTC)": df["timestamp"].dt.strftime("%Y-%m-%d %H:%M:%S"), "Country": "Germany",
        "Zone Name": "Germany", "Zone Id": zone,
        "Carbon Intensity gCO₂eq/kWh (direct)": df["carbon_intensity_direct"],
        "Carbon Intensity gCO₂eq/kWh (LCA)": df["carbon_intensity"],
        "Low Carbon Percentage": df["low_carbon_percent"], "Renewable Percentage": df["renewable_percent"],
        "Data Source": "test", "Data Estimated": df["estimated"].map({0: "false", 1: "true"}),
        "Data Estimation Method": ""})
    out.to_csv(path, index=False)
    return path


def _canonical(path: Path, zone: str, start: str, end: str, scale: float = 1.0, fmt: str = "%Y-%m-%dT%H:%M:%SZ"):
    df = traces.load_zone(zone)
    df = df[(df["timestamp"] >= start) & (df["timestamp"] < end)]
    pd.DataFrame({"timestamp": df["timestamp"].dt.strftime(fmt),
                  "carbon_intensity": (df["carbon_intensity"] * scale).round(2)}).to_csv(path, index=False)
    return path


def test_json_contract_with_history(tmp_path, capsys):
    hist = _em_export(tmp_path / "DE_2022.csv", "DE-LU", "2022-09-01", "2023-01-01")
    trace = _em_export(tmp_path / "DE_2023q1.csv", "DE-LU", "2023-01-01", "2023-02-15")
    assert run_plan(["forecast-eval", "--trace", str(trace), "--history", str(hist), "--horizon", "72h",
                     "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (entry,) = doc["traces"]
    assert entry["trace"] == str(trace) and entry["zone"] == "DE-LU"
    for who in ("model", "naive"):
        assert set(entry["mape"][who]) == {"day1", "day2", "day3"}
        assert set(entry["mae"][who]) == {"day1", "day2", "day3"}
    assert entry["origins"] == 43 and entry["warmup_origins_skipped"] == 0  # 45 days - 2 lacking a full horizon
    assert entry["mape"]["model"]["day1"] < entry["mape"]["naive"]["day1"]


def test_table_output_and_multiple_traces(tmp_path, capsys):
    a = _canonical(tmp_path / "gb.csv", "GB", "2022-01-01", "2022-04-01")
    b = _canonical(tmp_path / "ciso.csv", "US-CAL-CISO", "2022-01-01", "2022-04-01")
    assert run_plan(["forecast-eval", "--trace", str(a), "--trace", str(b), "--horizon", "48h",
                     "--zone", "GB"]) == 0
    out = capsys.readouterr().out
    assert "MAPE greenstack" in out and "MAPE naive" in out and "MAE" in out
    assert "gb.csv" in out and "ciso.csv" in out and "day2" in out and "day3" not in out
    assert "warm-up skipped" in out


@pytest.mark.parametrize(("fmt", "scale", "match"), [
    ("%Y-%m-%dT%H:%M:%S", 1.0, "no timezone"),
    ("%Y-%m-%dT%H:%M:%SZ", 2.2046, "lbs/MWh"),  # IN-WE (~750 g/kWh) expressed in lbs/MWh
])
def test_bad_inputs_raise_clear_errors(tmp_path, fmt, scale, match):
    path = _canonical(tmp_path / "bad.csv", "IN-WE", "2022-01-01", "2022-03-01", scale=scale, fmt=fmt)
    with pytest.raises(DataError, match=match):
        run_plan(["forecast-eval", "--trace", str(path), "--json"])


def test_lbs_per_mwh_beyond_the_g_per_kwh_range_gets_the_unit_hint_first(tmp_path):
    path = _canonical(tmp_path / "moer.csv", "IN-WE", "2022-01-01", "2022-03-01", scale=2.9)
    with pytest.raises(DataError) as err:
        run_plan(["forecast-eval", "--trace", str(path)])
    assert "lbs/MWh" in err.value.problems[0].reason


def test_duplicated_hours_short_traces_and_overlapping_history(tmp_path):
    dup = _canonical(tmp_path / "dup.csv", "GB", "2022-01-01", "2022-03-01")
    lines = dup.read_text().splitlines()
    dup.write_text("\n".join([*lines[:10], lines[9], *lines[10:]]) + "\n")
    with pytest.raises(DataError, match="duplicate"):
        run_plan(["forecast-eval", "--trace", str(dup)])
    short = _canonical(tmp_path / "short.csv", "GB", "2022-01-01", "2022-01-20")
    with pytest.raises(DataError, match="too short"):
        run_plan(["forecast-eval", "--trace", str(short)])
    trace = _canonical(tmp_path / "t.csv", "GB", "2022-03-01", "2022-04-01")
    hist = _canonical(tmp_path / "h.csv", "GB", "2022-01-01", "2022-03-05")
    with pytest.raises(DataError, match="overlaps"):
        run_plan(["forecast-eval", "--trace", str(trace), "--history", str(hist)])


def test_horizon_parsing_and_usage_errors():
    assert parse_hours("72h") == 72 and parse_hours("3d") == 72 and parse_hours("24") == 24
    for bad in ("0h", "73h", "soon", "1.5h"):
        with pytest.raises(ConfigError):
            parse_hours(bad)
    with pytest.raises(ConfigError, match="required"):
        run_plan(["forecast-eval"])
    assert "forecast-eval" in SUBCOMMANDS  # registry later subcommands extend


def test_cli_prints_errors_without_traceback(cli, tmp_path):
    path = _canonical(tmp_path / "naive.csv", "GB", "2022-01-01", "2022-03-01", fmt="%Y-%m-%d %H:%M")
    res = cli("plan", "forecast-eval", "--trace", str(path), "--horizon", "72h")
    assert res.returncode == 2
    assert "no timezone" in res.stderr + res.stdout and "Traceback" not in res.stderr


def test_weather_file_lowers_the_error_it_can_explain(tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(7)
    times = pd.date_range("2022-01-01", periods=24 * 200, freq="h", tz="UTC")
    wind = np.convolve(rng.standard_normal(len(times) + 48), np.ones(48) / 7, mode="valid")[: len(times)]
    ci = np.clip(300 + 40 * np.sin(2 * np.pi * times.hour.to_numpy() / 24) - 60 * wind, 50, None)
    stamp = times.strftime("%Y-%m-%dT%H:%M:%SZ")
    trace = tmp_path / "t.csv"
    pd.DataFrame({"timestamp": stamp, "carbon_intensity": ci.round(2)}).to_csv(trace, index=False)
    weather = tmp_path / "w.csv"  # forecasts made 1-4 days ahead (here: exact, for the test)
    pd.DataFrame({"timestamp": stamp, **{f"weather_wind_d{k}": wind for k in (1, 2, 3, 4)}}).to_csv(weather, index=False)

    def day_mape(*extra):
        assert run_plan(["forecast-eval", "--trace", str(trace), "--json", *extra]) == 0
        doc = json.loads(capsys.readouterr().out)["traces"][0]
        assert doc["weather_columns"] == ([f"weather_wind_d{k}" for k in (1, 2, 3, 4)] if extra else [])
        return doc["mape"]["model"]

    plain, informed = day_mape(), day_mape("--weather", str(weather))
    for day in ("day1", "day2", "day3"):
        assert informed[day] < 0.6 * plain[day]
