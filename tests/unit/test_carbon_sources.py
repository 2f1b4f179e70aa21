"""Intensity sources: provenance labels, hour-of-week replay, country fallback, factory and Hydra."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from greenstack.carbon import sources, traces
from greenstack.carbon.sources import (
    CountryAverageSource,
    CsvTraceSource,
    EmbeddedTraceSource,
    IntensitySource,
    SeriesSource,
    StaticSource,
    make_source,
    to_epoch_seconds,
)
from greenstack.errors import ConfigError

UTC = timezone.utc


def trace_value(zone: str, when: str) -> pd.Series:
    df = traces.load_zone(zone).set_index("timestamp")
    return df.loc[pd.Timestamp(when)]


def test_replay_maps_2026_wednesday_afternoon_onto_a_2023_wednesday():
    src = EmbeddedTraceSource("DE-LU")
    when = datetime(2026, 6, 3, 14, 30, tzinfo=UTC)
    assert when.weekday() == 2  # Wednesday
    look = src.series_at(when)
    # 2026-06-03 -> 2023-06-03 (a Saturday) -> nearest Wednesday is 2023-05-31, same hour 14:00.
    expected = trace_value("DE-LU", "2023-05-31T14:00:00Z")
    assert pd.Timestamp("2023-05-31").weekday() == 2
    assert look.intensity_g_per_kwh[0] == expected["carbon_intensity"]
    assert look.renewable_percent[0] == expected["renewable_percent"]
    assert look.provenance == "estimated" and look.provenances.tolist() == ["estimated"]
    assert look.source == "electricitymaps:DE-LU replayed 2023 (hour-of-week)"


def test_replay_keeps_weekday_and_hour_for_every_hour_of_several_years():
    want = pd.date_range("2024-01-01", "2027-01-01", freq="h", tz="UTC", inclusive="left")
    src = EmbeddedTraceSource("GB")
    df = traces.load_zone("GB").set_index("timestamp")
    got = src.series_at(want).intensity_g_per_kwh
    mapped = pd.DatetimeIndex(pd.to_datetime(
        sources._replay_year(want.as_unit("s").asi8.astype(float), 2023), unit="s", utc=True))
    assert (mapped.year == 2023).all()
    assert (mapped.day_of_week == want.day_of_week).all() and (mapped.hour == want.hour).all()
    assert np.abs(mapped.day_of_year - want.day_of_year).max() <= 7  # nearest week of year
    np.testing.assert_array_equal(got, df.loc[mapped, "carbon_intensity"].to_numpy())


def test_in_span_hours_are_measured_unless_the_publisher_estimated_them():
    src = EmbeddedTraceSource("DE-LU")
    measured_hour = datetime(2023, 1, 1, 0, 59, tzinfo=UTC)
    estimated_hour = datetime(2023, 4, 15, 1, 0, tzinfo=UTC)  # flagged estimated in the export
    assert trace_value("DE-LU", "2023-04-15T01:00:00Z")["estimated"] == 1
    look = src.series_at([measured_hour, estimated_hour])
    assert look.provenances.tolist() == ["measured", "estimated"]
    assert look.provenance == "estimated"
    assert look.intensity_g_per_kwh[0] == pytest.approx(185.8)
    assert src.at(measured_hour).provenance == "measured"
    assert EmbeddedTraceSource("IN-WE").at(measured_hour).provenance == "estimated"  # 100 % modelled zone


def test_time_inputs_agree_and_naive_times_are_rejected():
    src = EmbeddedTraceSource("GB")
    aware = datetime(2022, 7, 1, 12, 15, tzinfo=UTC)
    variants = [aware, aware.astimezone(timezone(timedelta(hours=2))), np.datetime64("2022-07-01T12:15"),
                aware.timestamp(), "2022-07-01T12:15:00Z", pd.Timestamp(aware),
                pd.DatetimeIndex([aware]), np.array([aware.timestamp()])]
    values = {float(src.series_at(v).intensity_g_per_kwh[0]) for v in variants}
    assert len(values) == 1
    np.testing.assert_allclose(to_epoch_seconds(variants[:6]), aware.timestamp())  # a mixed list too
    with pytest.raises(ConfigError, match="timezone"):
        src.series_at(datetime(2022, 7, 1, 12))
    with pytest.raises(ConfigError, match="timezone"):
        src.series_at(pd.DatetimeIndex(["2022-07-01 12:00"]))


def test_country_average_source():
    fr = CountryAverageSource("fr")
    assert fr.country_iso3 == "FRA" and CountryAverageSource("FRA").intensity_g_per_kwh == fr.intensity_g_per_kwh
    row = sources.country_table()["DEU"]
    de = CountryAverageSource("DEU")
    look = de.series_at([0.0, 1.7e9])
    assert look.intensity_g_per_kwh.tolist() == [row["carbon_intensity"]] * 2
    assert look.renewable_percent[0] == row["renewable_percent"]
    assert look.provenance == "estimated"
    assert look.source == f"owid/codecarbon annual average DEU {row['year']}"
    with pytest.raises(ConfigError, match="Germany|DEU"):
        CountryAverageSource("Germny")


def test_static_source_is_fallback_unless_declared_measured():
    look = StaticSource(300).series_at([0, 3600])
    assert look.intensity_g_per_kwh.tolist() == [300.0, 300.0]
    assert np.isnan(look.renewable_percent).all()
    assert look.provenance == "fallback" and look.source == "static:300 g/kWh (configured)"
    assert StaticSource(250.5, 40, measured=True).at(0).provenance == "measured"
    with pytest.raises(ConfigError) as info:
        StaticSource(-1, renewable_percent=120)
    assert len(info.value.problems) == 2


def test_make_source_kinds():
    assert isinstance(make_source("embedded", "GB"), EmbeddedTraceSource)
    de = make_source("embedded", "de")  # Electricity Maps' id of the DE-LU export: the hourly trace wins
    assert isinstance(de, EmbeddedTraceSource) and de.zone == "DE-LU" and de.country_iso3 == "DEU"
    fr = make_source("embedded", "FR")  # no trace, but a country: annual average
    assert isinstance(fr, CountryAverageSource) and fr.country_iso3 == "FRA"
    assert isinstance(make_source("embedded", "FRA"), CountryAverageSource)
    assert isinstance(make_source("country", "US"), CountryAverageSource)
    assert make_source("static", intensity_g_per_kwh=123).at(0).value == 123.0
    for src in (make_source("embedded", "GB"), fr, make_source("static", intensity_g_per_kwh=1)):
        assert isinstance(src, IntensitySource)


def test_make_source_errors_are_helpful():
    with pytest.raises(ConfigError) as info:
        make_source("embedded", "DE-LUX")
    assert "did you mean 'DE-LU'" in str(info.value) and "country code" in str(info.value)
    with pytest.raises(ConfigError, match="needs a zone"):
        make_source("embedded")
    with pytest.raises(ConfigError, match="needs a value"):
        make_source("static")
    with pytest.raises(ConfigError, match="needs a file path"):
        make_source("csv")
    with pytest.raises(ConfigError, match="embedded, country, static, csv"):
        make_source("watttime", "CAISO_NORTH")


def test_make_source_from_hydra_config(tmp_path):
    from hydra.utils import instantiate

    src = instantiate({"_target_": "greenstack.carbon.sources.make_source", "kind": "embedded", "zone": "SG"})
    assert isinstance(src, EmbeddedTraceSource) and src.country_iso3 == "SGP"
    path = tmp_path / "ci.csv"
    path.write_text("timestamp,carbon_intensity\n2024-01-01T00:00:00Z,100\n2024-01-01T01:00:00Z,200\n")
    csv = instantiate({"_target_": "greenstack.carbon.sources.make_source", "kind": "csv", "path": str(path),
                       "zone": "my-dc"})
    assert isinstance(csv, CsvTraceSource) and csv.zone == "my-dc"
    assert csv.at("2024-01-01T01:30:00Z").value == 200.0


def test_series_source_gap_and_short_series():
    df = pd.DataFrame({"timestamp": pd.to_datetime(["2024-01-01T00:00Z", "2024-01-01T01:00Z",
                                                    "2024-01-01T03:00Z"]),
                       "carbon_intensity": [100.0, 200.0, 400.0]})
    src = SeriesSource(df, name="tiny")
    look = src.series_at(["2024-01-01T01:10:00Z", "2024-01-01T02:30:00Z", "2024-01-01T03:59:00Z",
                          "2025-01-01T00:00:00Z"])
    # 02:30 is in the gap: previous value carried forward, estimated; past the end: series mean, fallback.
    assert look.intensity_g_per_kwh.tolist() == [200.0, 200.0, 400.0, pytest.approx(700 / 3)]
    assert look.provenances.tolist() == ["measured", "estimated", "measured", "fallback"]
    assert look.provenance == "fallback" and "too short to replay" in look.source


def test_week_long_series_replays_hour_of_week():
    stamps = pd.date_range("2024-01-01T00:00Z", periods=24 * 7, freq="h")  # Monday..Sunday
    df = pd.DataFrame({"timestamp": stamps, "carbon_intensity": np.arange(24 * 7, dtype=float)})
    src = SeriesSource(df, name="week")
    later = pd.Timestamp("2024-03-06T05:20:00Z")  # a Wednesday
    look = src.series_at(later)
    assert look.intensity_g_per_kwh[0] == 2 * 24 + 5  # Wednesday 05:00 of the trace week
    assert look.provenance == "estimated" and "hour-of-week" in look.source


@pytest.mark.parametrize("year", [3023, 1900, 1989, 2100])
def test_a_trace_dated_in_an_implausible_year_is_refused_naming_the_rows(tmp_path, year):
    from greenstack.errors import DataError

    path = tmp_path / "typo.csv"
    hours = [f"2023-12-31T{h:02d}:00:00Z,{100 + h}" for h in range(22, 24)] + \
        [f"{year}-01-01T{h:02d}:00:00Z,{200 + h}" for h in range(3)]
    path.write_text("timestamp,carbon_intensity\n" + "\n".join(hours) + "\n")
    with pytest.raises(DataError) as err:
        CsvTraceSource(path)
    text = str(err.value)
    assert f"{year}-01-01T00:00:00Z" in text and "line 4" in text and "3023 for 2023" in text


def test_replaying_a_trace_decades_away_warns_once(tmp_path, caplog):
    path = tmp_path / "old.csv"
    start = pd.Timestamp("1995-03-01T00:00Z")
    path.write_text("timestamp,carbon_intensity\n" + "\n".join(
        f"{(start + pd.Timedelta(hours=h)).isoformat()},{100 + h % 24}" for h in range(24 * 14)) + "\n")
    src = CsvTraceSource(path)
    with caplog.at_level("WARNING", logger="greenstack.carbon"):
        src.series_at(pd.Timestamp("1995-03-20T00:00Z"))  # a few days away: no warning
        assert caplog.records == []
        src.series_at([pd.Timestamp("2026-06-01T00:00Z"), pd.Timestamp("2026-06-02T00:00Z")])
        src.series_at(pd.Timestamp("2026-07-01T00:00Z"))
    assert len(caplog.records) == 1 and "31 years away" in caplog.text and "1995-03-01" in caplog.text
