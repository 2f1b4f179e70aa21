"""Zone lookup and user CSV traces (Electricity Maps exports and the canonical two-column format)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from greenstack.carbon import traces
from greenstack.errors import ConfigError, DataError

EM_HEADER = ("Datetime (UTC),Country,Zone Name,Zone Id,Carbon Intensity gCO₂eq/kWh (direct),"
             "Carbon Intensity gCO₂eq/kWh (LCA),Low Carbon Percentage,Renewable Percentage,Data Source,"
             "Data Estimated,Data Estimation Method")


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def em_export(path: Path, start: str = "2023-01-01 00:00:00", n: int = 4) -> Path:
    hours = pd.date_range(start, periods=n, freq="h")
    rows = [f"{h:%Y-%m-%d %H:%M:%S},France,France,FR,{20 + i}.5,{40 + i}.25,90.1,25.5,rte-france.com,"
            + ("true,ESTIMATED_TIME_SLICER_AVERAGE" if i == 2 else "false,") for i, h in enumerate(hours)]
    return write(path, [EM_HEADER, *rows])


def test_unknown_zone_suggests_the_nearest_and_lists_all():
    with pytest.raises(ConfigError) as info:
        traces.load_zone("DE-LUX")
    msg = str(info.value)
    assert "did you mean 'DE-LU'" in msg
    for zone in traces.available_zones():
        assert zone in msg


def test_zone_ids_are_case_insensitive_and_accept_publisher_aliases():
    assert traces.resolve_zone("us-cal-ciso") == "US-CAL-CISO"
    assert traces.resolve_zone("DE") == "DE-LU"  # Electricity Maps' own id for the exported zone
    assert traces.resolve_zone("BR-CS") == "BR-SP"
    assert traces.find_zone("Atlantis") is None


def test_electricitymaps_export_loads(tmp_path):
    df = traces.load_csv_trace(em_export(tmp_path / "FR_2023_hourly.csv"))
    assert df["timestamp"].iloc[0] == pd.Timestamp("2023-01-01T00:00:00Z")  # naive, but the column says UTC
    assert df["carbon_intensity"].tolist() == [40.25, 41.25, 42.25, 43.25]  # LCA
    assert df["carbon_intensity_direct"].tolist() == [20.5, 21.5, 22.5, 23.5]
    assert df["renewable_percent"].iloc[0] == 25.5 and df["low_carbon_percent"].iloc[0] == 90.1
    assert df["estimated"].tolist() == [0, 0, 1, 0]
    assert df.attrs["zone"] == "FR" and df.attrs["format"] == "electricitymaps"


def test_canonical_two_column_csv_loads(tmp_path):
    path = write(tmp_path / "mine.csv", ["timestamp,carbon_intensity", "2024-03-01T00:00:00Z,120",
                                         "2024-03-01T02:00:00+01:00,130.5", "2024-03-01T02:00:00Z,99"])
    df = traces.load_csv_trace(path)
    assert list(df.columns) == ["timestamp", "carbon_intensity"]
    assert df["timestamp"].tolist() == list(pd.date_range("2024-03-01T00:00Z", periods=3, freq="h"))
    assert df["carbon_intensity"].tolist() == [120.0, 130.5, 99.0]
    assert df.attrs["format"] == "canonical"


def test_tz_naive_canonical_csv_is_rejected_clearly(tmp_path):
    path = write(tmp_path / "naive.csv", ["timestamp,carbon_intensity", "2024-03-01 00:00:00,120",
                                          "2024-03-01 01:00:00,130"])
    with pytest.raises(DataError) as info:
        traces.load_csv_trace(path)
    msg = str(info.value)
    assert "naive.csv" in msg and "no timezone" in msg and "rows 0, 1" in msg
    assert "'Z'" in msg and "Datetime (UTC)" in msg  # both ways to fix it


def test_csv_errors_name_rows_and_file_lines(tmp_path):
    path = write(tmp_path / "bad.csv", ["timestamp,carbon_intensity", "2024-03-01T00:00:00Z,120",
                                        "2024-03-01T01:00:00Z,-3", "2024-03-01T01:00:00Z,80",
                                        "2024-03-01T09:00:00Z,70"])
    with pytest.raises(DataError) as info:
        traces.load_csv_trace(path)
    problems = info.value.problems
    assert len(problems) == 3
    assert any("row 1, line 3" in p.key and p.value == -3.0 for p in problems)
    assert any("row 2, line 4" in p.key and "duplicate" in p.reason for p in problems)
    assert any("row 3, line 5" in p.key and "gap of 8 h" in p.reason for p in problems)


def test_several_yearly_exports_concatenate(tmp_path):
    a = em_export(tmp_path / "a.csv", "2022-12-31 22:00:00", n=2)
    b = em_export(tmp_path / "b.csv", "2023-01-01 00:00:00", n=3)
    df = traces.load_csv_trace([a, b])
    assert len(df) == 5 and (df["timestamp"].diff().dropna() == pd.Timedelta(hours=1)).all()
    with pytest.raises(DataError, match="duplicate"):
        traces.load_csv_trace([b, b])


def test_csv_without_needed_columns(tmp_path):
    with pytest.raises(DataError, match="no timestamp column"):
        traces.load_csv_trace(write(tmp_path / "x.csv", ["time,ci", "2024-01-01T00:00Z,1"]))
    with pytest.raises(DataError, match="no carbon-intensity column"):
        traces.load_csv_trace(write(tmp_path / "y.csv", ["timestamp,co2", "2024-01-01T00:00Z,1"]))
    with pytest.raises(ConfigError, match="not found"):
        traces.load_csv_trace(tmp_path / "missing.csv")
