"""The shipped carbon data: complete, hourly, gap-free, attributed, and reproducible by the build tool."""

from __future__ import annotations

import gzip
import importlib.util
import json
import time
from pathlib import Path

import pandas as pd
import pytest

from greenstack.carbon import traces
from greenstack.carbon.schema import validate_trace
from greenstack.carbon.sources import country_table

ZONES = ["AU-NSW", "BR-SP", "CA-ON", "DE-LU", "GB", "IN-WE", "JP-TK", "SG", "US-CAL-CISO", "US-MIDA-PJM",
         "US-NY-NYIS", "US-TEX-ERCO"]
REPO = Path(__file__).resolve().parents[2]


def test_all_twelve_zones_are_shipped():
    assert traces.available_zones() == ZONES
    assert set(traces.zone_metadata()) == set(ZONES)


@pytest.mark.parametrize("zone", ZONES)
def test_zone_has_three_gap_free_hourly_years(zone):
    df = traces.load_zone(zone)
    assert list(df.columns) == list(traces.TRACE_COLUMNS)
    assert len(df) == 3 * 8760
    assert set(df["timestamp"].dt.year) == {2021, 2022, 2023}
    assert str(df["timestamp"].dt.tz) == "UTC"
    assert df["timestamp"].iloc[0] == pd.Timestamp("2021-01-01T00:00:00Z")
    assert df["timestamp"].iloc[-1] == pd.Timestamp("2023-12-31T23:00:00Z")
    assert (df["timestamp"].diff().dropna() == pd.Timedelta(hours=1)).all()
    assert set(df["estimated"].unique()) <= {0, 1}
    validate_trace(df, zone, max_gap_hours=1)  # the full schema, strictest gap


def test_publisher_estimates_are_kept():
    meta = traces.zone_metadata()
    assert traces.load_zone("IN-WE")["estimated"].all()
    assert traces.load_zone("JP-TK")["estimated"].all()
    assert meta["US-TEX-ERCO"]["estimated_fraction"] == 0
    assert 0 < meta["SG"]["estimated_fraction"] < 0.2
    assert (traces.load_zone("CA-ON")["carbon_intensity_direct"] == 0).any()  # real zeros survive


def test_lca_is_the_headline_intensity():
    df = traces.load_zone("DE-LU").set_index("timestamp")
    row = df.loc[pd.Timestamp("2023-01-01T00:00:00Z")]
    # Export row: "2023-01-01 00:00:00,Germany,Germany,DE,140.51,185.8,83.79,78.42,entsoe.eu,false,"
    assert row["carbon_intensity"] == pytest.approx(185.8)
    assert row["carbon_intensity_direct"] == pytest.approx(140.51)
    assert row["low_carbon_percent"] == pytest.approx(83.79)
    assert row["renewable_percent"] == pytest.approx(78.42)
    assert row["estimated"] == 0


def test_loading_is_fast_and_cached():
    traces._load_zone_cached.cache_clear()
    t0 = time.perf_counter()
    df = traces.load_zone("GB")
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    traces.load_zone("gb")
    warm = time.perf_counter() - t0
    assert cold < 0.5, cold
    assert warm < 0.05, warm
    df.loc[0, "carbon_intensity"] = -1.0  # callers get a copy: the cache must not change
    assert traces.load_zone("GB").loc[0, "carbon_intensity"] >= 0


def test_shipped_data_is_compact():
    total = sum(p.stat().st_size for p in traces.DATA_DIR.rglob("*") if p.is_file())
    assert total < 6_000_000, total
    with gzip.open(traces.TRACES_DIR / "GB.csv.gz", "rt", encoding="utf-8") as fh:
        header, first = fh.readline().strip(), fh.readline().strip()
    assert header == ",".join(traces.TRACE_COLUMNS)
    assert first.startswith("2021-01-01T00:00:00Z,")


def test_zone_metadata_is_plausible():
    countries = country_table()
    for zone, info in traces.zone_metadata().items():
        assert info["country_iso3"] in countries, zone
        assert -90 <= info["lat"] <= 90 and -180 <= info["lon"] <= 180
        assert info["location_approximate"] is True
    gb = traces.zone_metadata()["GB"]
    assert abs(gb["lat"] - 52.5) < 1 and abs(gb["lon"] + 1.5) < 1
    assert traces.zone_metadata()["BR-SP"]["publisher_zone_id"] == "BR-CS"


def test_country_table():
    table = country_table()
    assert len(table) == 213
    assert len({row["iso2"] for row in table.values()}) == 213
    for iso3, row in table.items():
        assert set(row) == {"name", "iso2", "carbon_intensity", "renewable_percent", "year"}, iso3
        assert 0 <= row["carbon_intensity"] <= 2000
        assert row["renewable_percent"] is None or 0 <= row["renewable_percent"] <= 100
    assert table["FRA"]["iso2"] == "FR" and table["FRA"]["carbon_intensity"] < 100  # nuclear-heavy grid
    assert table["DEU"]["name"] == "Germany"


def test_license_attributes_sources():
    text = (traces.DATA_DIR / "LICENSE.md").read_text(encoding="utf-8")
    for needle in ("Open Database License", "ODbL", "Electricity Maps", "HewlettPackard/sustain-cluster",
                   "293fbd152dae52a4b77fee50362b0b61641f16d1", "codecarbon", "MIT", "Our World in Data",
                   "CC BY 4.0"):
        assert needle.lower() in text.lower().replace("creative commons by 4.0", "cc by 4.0"), needle


def _build_module():
    spec = importlib.util.spec_from_file_location("build_carbon_data", REPO / "tools" / "build_carbon_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_export(path: Path, hours: pd.DatetimeIndex, zone: str = "GB") -> None:
    rows = ["Datetime (UTC),Country,Zone Name,Zone Id,Carbon Intensity gCO₂eq/kWh (direct),"
            "Carbon Intensity gCO₂eq/kWh (LCA),Low Carbon Percentage,Renewable Percentage,Data Source,"
            "Data Estimated,Data Estimation Method"]
    for i, h in enumerate(hours):
        est = "true,ESTIMATED_TIME_SLICER_AVERAGE" if i == 1 else "false,"
        rows.append(f"{h:%Y-%m-%d %H:%M:%S},Great Britain,Great Britain,{zone},{100 + i}.123,{150 + i}.456,"
                    f"60.0,40.5,elexon,{est}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def test_build_tool_on_synthetic_source(tmp_path):
    build = _build_module()
    src, dst = tmp_path / "src", tmp_path / "dst"
    _write_export(src / "carbon/electricitymaps/GB/GB_2023_hourly.csv", pd.date_range("2023-01-01", periods=48, freq="h"))
    mix = {"FRA": {"country_name": "France", "carbon_intensity": 56.0, "renewables_TWh": 25.0, "total_TWh": 100.0,
                   "year": 2022},
           "GBR": {"country_name": "United Kingdom", "carbon_intensity": 237.5, "renewables_TWh": 0.0,
                   "total_TWh": 0.0, "year": 2022}}
    (src / "carbon/global_energy_mix.json").write_text(json.dumps(mix), encoding="utf-8")
    assert build.main(["--src", str(src), "--dst", str(dst)]) == 0

    out = pd.read_csv(dst / "traces/GB.csv.gz")
    assert list(out.columns) == list(traces.TRACE_COLUMNS)
    assert out["timestamp"].iloc[0] == "2023-01-01T00:00:00Z"
    assert out["carbon_intensity"].iloc[0] == pytest.approx(150.46)  # LCA, rounded to 2 decimals
    assert out["carbon_intensity_direct"].iloc[0] == pytest.approx(100.12)
    assert out["estimated"].tolist()[:3] == [0, 1, 0]
    countries = json.loads((dst / "country_intensity.json").read_text(encoding="utf-8"))
    assert countries["FRA"] == {"name": "France", "iso2": "FR", "carbon_intensity": 56.0,
                                "renewable_percent": 25.0, "year": 2022}
    assert countries["GBR"]["renewable_percent"] is None  # no total -> unknown, not a division error
    zones = json.loads((dst / "zones.json").read_text(encoding="utf-8"))["zones"]
    assert zones["GB"]["rows"] == 48 and zones["GB"]["country_iso3"] == "GBR"

    first = (dst / "traces/GB.csv.gz").read_bytes()
    build.main(["--src", str(src), "--dst", str(dst)])
    assert (dst / "traces/GB.csv.gz").read_bytes() == first  # reproducible bytes


def test_build_tool_rejects_a_gap(tmp_path):
    build = _build_module()
    hours = pd.date_range("2023-01-01", periods=48, freq="h").delete(10)
    _write_export(tmp_path / "src/carbon/electricitymaps/GB/GB_2023_hourly.csv", hours)
    with pytest.raises(SystemExit, match="not strictly hourly"):
        build.main(["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst")])
