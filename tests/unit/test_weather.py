"""Open-Meteo previous-run weather columns: parsing, chunking, cache, clear errors, and the CLI (no network)."""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
from datetime import date, timedelta
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from greenstack.carbon import weather
from greenstack.carbon.providers import DiskCache, ProviderError
from greenstack.cli import main
from greenstack.errors import ConfigError, DataError

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "openmeteo"
VARS = ("wind_speed_10m", "shortwave_radiation")
DAYS = (1, 2)
COLS = ["weather_wind_speed_10m_d1", "weather_wind_speed_10m_d2", "weather_shortwave_radiation_d1",
        "weather_shortwave_radiation_d2"]
MARCH = "previous_runs_GB_2024-03-01_3d.json"
PRE_2024 = "previous_runs_GB_2023-06-01_all_null.json"
MAKE_CLIENT = weather.make_client
REASON = "Cannot initialize WeatherVariable from invalid String value wind_speed_100_previous_day1 for key hourly"


def fixture(name: str) -> dict:
    return json.loads((FIX / name).read_text())


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any real HTTP request fails the test: everything goes through MockTransport."""

    def refuse(self, request):
        raise AssertionError(f"network touched: {request.url}")

    monkeypatch.setattr(httpx.HTTPTransport, "handle_request", refuse)


class Server:
    """A MockTransport handler that records requests; `answer` is a fixture name, a Response or a callable."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if callable(self.answer):
            return self.answer(request)
        if isinstance(self.answer, httpx.Response):
            return self.answer
        return httpx.Response(200, json=fixture(self.answer))

    def client(self) -> weather.HttpClient:
        return MAKE_CLIENT(transport=httpx.MockTransport(self), backoff_s=0.001, retries=2)

    def ranges(self) -> list[tuple[str, str]]:
        return [(r.url.params["start_date"], r.url.params["end_date"]) for r in self.requests]


def synthetic(request: httpx.Request, extra_days: int = 0) -> httpx.Response:
    """A response for whatever was asked: value = chunk-start ordinal * 1000 + hour of the chunk.

    `extra_days` pads the answer past end_date, as an overlapping neighbour chunk would.
    """
    p = request.url.params
    first, last = date.fromisoformat(p["start_date"]), date.fromisoformat(p["end_date"])
    hours = pd.date_range(str(first), str(last + timedelta(days=1 + extra_days)), freq="h", inclusive="left")
    base = first.toordinal() * 1000.0
    hourly: dict[str, list] = {"time": [t.strftime("%Y-%m-%dT%H:%M") for t in hours]}
    for name in p["hourly"].split(","):
        hourly[name] = [base + i for i in range(len(hours))]
    return httpx.Response(200, json={"latitude": 52.52, "longitude": -1.48, "utc_offset_seconds": 0,
                                     "timezone": "GMT", "hourly_units": {"time": "iso8601"}, "hourly": hourly})


def fetch(server: Server, start="2024-03-01", end="2024-03-03", **kw) -> pd.DataFrame:
    kw.setdefault("variables", VARS)
    kw.setdefault("lead_days", DAYS)
    return weather.fetch_previous_runs(52.5, -1.5, start, end, client=server.client(), **kw)


# --- parsing -----------------------------------------------------------------------------------------

def test_parse_names_columns_by_lead_day_on_an_hourly_utc_index():
    doc = fixture(MARCH)
    df = weather.parse_response(doc, VARS, DAYS)
    assert list(df.columns) == COLS
    assert isinstance(df.index, pd.DatetimeIndex) and str(df.index.tz) == "UTC" and df.index.name == "timestamp"
    assert df.index[0] == pd.Timestamp("2024-03-01T00:00Z") and df.index[-1] == pd.Timestamp("2024-03-03T23:00Z")
    assert len(df) == 72 and (df.index.to_series().diff().dropna() == pd.Timedelta(hours=1)).all()
    for v in VARS:
        for k in DAYS:
            raw = doc["hourly"][f"{v}_previous_day{k}"]
            expected = np.array([np.nan if x is None else x for x in raw], dtype=float)
            np.testing.assert_array_equal(df[f"weather_{v}_d{k}"].to_numpy(), expected)
    assert df.isna().sum().to_dict() == {COLS[0]: 2, COLS[1]: 0, COLS[2]: 0, COLS[3]: 3}
    assert df.attrs["units"] == {"wind_speed_10m": "km/h", "shortwave_radiation": "W/m²"}
    # without a request list: every previous-run column, in the response's order
    assert list(weather.parse_response(doc).columns) == COLS
    assert list(weather.parse_response(doc, ["shortwave_radiation"], [2]).columns) == [COLS[3]]


def test_parse_ignores_the_current_run_and_converts_a_utc_offset():
    doc = fixture(MARCH)
    doc["hourly"]["wind_speed_10m"] = [99.0] * 72  # day 0: issued after the origins it would inform
    assert not any(c.endswith("_d0") or c == "weather_wind_speed_10m" for c in weather.parse_response(doc).columns)
    shifted = copy.deepcopy(fixture(MARCH))
    shifted["utc_offset_seconds"] = 3600
    shifted["hourly"]["time"] = [(pd.Timestamp(t) + pd.Timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
                                 for t in shifted["hourly"]["time"]]
    a, b = weather.parse_response(fixture(MARCH), VARS, DAYS), weather.parse_response(shifted, VARS, DAYS)
    pd.testing.assert_frame_equal(a, b)


def test_lead_day_convention():
    assert [weather.lead_day_for(h) for h in (1, 19, 20, 43, 44, 67, 68, 72)] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert weather.column_name("cloud_cover", 3) == "weather_cloud_cover_d3"


# --- fetching ----------------------------------------------------------------------------------------

def test_request_asks_only_for_previous_runs_with_documented_params():
    server = Server(MARCH)
    df = fetch(server, model="ecmwf_ifs025")
    (req,) = server.requests
    assert req.url.host == "previous-runs-api.open-meteo.com" and req.url.path == "/v1/forecast"
    p = req.url.params
    assert p["hourly"] == ("wind_speed_10m_previous_day1,wind_speed_10m_previous_day2,"
                           "shortwave_radiation_previous_day1,shortwave_radiation_previous_day2")
    assert (p["latitude"], p["longitude"], p["start_date"], p["end_date"], p["timezone"], p["models"]) == (
        "52.5000", "-1.5000", "2024-03-01", "2024-03-03", "GMT", "ecmwf_ifs025")
    assert list(df.columns) == COLS and len(df) == 72
    assert df.attrs["source"] == weather.SOURCE and df.attrs["requests"] == 1 and df.attrs["cache_hits"] == 0
    fetch(server)
    assert "models" not in server.requests[-1].url.params


def test_default_variables_and_lead_days_cover_72h():
    server = Server(synthetic)
    df = weather.fetch_previous_runs(52.5, -1.5, "2024-03-01", "2024-03-01", client=server.client())
    assert list(df.columns) == [f"weather_{v}_d{k}" for v in weather.DEFAULT_VARIABLES for k in (1, 2, 3, 4)]


def test_long_range_is_fetched_by_quarter_and_joined_without_duplicates():
    server = Server(lambda r: synthetic(r, extra_days=1))  # every answer overlaps the next chunk by a day
    seen: list[tuple[int, int]] = []
    df = fetch(server, "2024-01-15", "2024-07-02", progress=lambda done, total: seen.append((done, total)))
    assert server.ranges() == [("2024-01-15", "2024-03-31"), ("2024-04-01", "2024-06-30"),
                               ("2024-07-01", "2024-07-02")]
    assert seen == [(1, 3), (2, 3), (3, 3)]
    expected = pd.date_range("2024-01-15", "2024-07-03", freq="h", inclusive="left", tz="UTC")
    assert df.index.equals(expected) and df.index.is_unique
    assert not df.isna().any().any()
    # each hour comes from the chunk that asked for it, not the neighbour's overlap
    assert df.loc["2024-03-31T23:00Z", COLS[0]] == date(2024, 1, 15).toordinal() * 1000 + 77 * 24 - 1  # its last hour
    assert df.loc["2024-04-01T00:00Z", COLS[0]] == date(2024, 4, 1).toordinal() * 1000
    assert all(b - a <= timedelta(days=weather.MAX_CHUNK_DAYS - 1)
               for a, b in weather.date_chunks("2023-12-01", "2025-03-01", weather.MAX_CHUNK_DAYS))


def test_hours_the_api_leaves_out_are_missing_not_dropped():
    def short(request):
        doc = fixture(MARCH)
        doc["hourly"] = {k: v[:48] for k, v in doc["hourly"].items()}  # the third day is not in the answer
        return httpx.Response(200, json=doc)

    df = fetch(Server(short))
    assert len(df) == 72 and df.loc["2024-03-03"].isna().all().all() and df.loc["2024-03-02"].notna().any().any()


def test_cache_hit_avoids_a_second_request_and_history_is_kept_longer(tmp_path):
    cache = DiskCache(tmp_path / "cache", ttl_s=3600)
    server = Server(MARCH)
    recent_now = pd.Timestamp("2024-03-04T12:00Z").timestamp()  # the chunk ended hours ago
    first = fetch(server, cache=cache, now=recent_now)
    again = fetch(server, cache=cache, now=recent_now + 600)
    assert len(server.requests) == 1 and again.attrs["cache_hits"] == 1 and again.attrs["requests"] == 0
    pd.testing.assert_frame_equal(first, again)
    fetch(server, cache=cache, now=recent_now + 2 * 3600)  # recent data past the normal TTL: asked again
    assert len(server.requests) == 2

    hist_cache = DiskCache(tmp_path / "hist", ttl_s=3600)
    server = Server(MARCH)
    old_now = pd.Timestamp("2024-04-01T00:00Z").timestamp()  # the chunk ended weeks ago: it will not change
    fetch(server, cache=hist_cache, now=old_now)
    fetch(server, cache=hist_cache, now=old_now + 10 * 86400)
    assert len(server.requests) == 1
    fetch(server, cache=hist_cache, now=old_now + weather.HISTORICAL_TTL_S + 60)
    assert len(server.requests) == 2


def test_http_400_reason_surfaces_and_is_not_retried(tmp_path):
    server = Server(httpx.Response(400, json=fixture("error_400_bad_variable.json")))
    with pytest.raises(ConfigError) as err:
        fetch(server, variables=["wind_speed_100"], lead_days=[1], cache=DiskCache(tmp_path))
    assert REASON in str(err.value) and "rejected by Open-Meteo" in str(err.value)
    assert len(server.requests) == 1 and not list(tmp_path.glob("*.json"))


def test_all_null_before_2024_says_the_archive_starts_in_2024():
    server = Server(PRE_2024)
    with pytest.raises(DataError, match="January 2024") as err:
        fetch(server, "2023-06-01", "2023-06-02")
    assert "2024-01-01" in err.value.problems[0].fix
    # all-null from 2024 on is a different cause and says so
    with pytest.raises(DataError, match="every value is missing for wind_speed_10m") as err:
        fetch(Server(PRE_2024), "2024-06-01", "2024-06-02")
    assert "January 2024" not in str(err.value)


def test_a_range_reaching_back_before_2024_keeps_the_data_it_has(caplog):
    def archive_from_2024(request):
        response = synthetic(request)
        doc = response.json()
        for name, values in doc["hourly"].items():
            if name != "time":
                doc["hourly"][name] = [None if t < "2024" else v for t, v in zip(doc["hourly"]["time"], values, strict=True)]
        return httpx.Response(200, json=doc)

    with caplog.at_level(logging.WARNING, logger="greenstack.carbon.weather"):
        df = fetch(Server(archive_from_2024), "2023-12-30", "2024-01-02")
    assert df.loc[:"2023-12-31"].isna().all().all() and df.loc["2024-01-01":].notna().all().all()
    assert "no previous runs before 2024-01-01" in caplog.text


@pytest.mark.parametrize(("kw", "key", "match"), [
    ({"start": "2024-03-05", "end": "2024-03-01"}, "end", "before start 2024-03-05"),
    ({"start": "March 5th-ish"}, "start", "not a date"),
    ({"variables": ["wind speed"]}, "variables", "not an Open-Meteo hourly variable name"),
    ({"variables": ["temperature_2m;drop"]}, "variables", "not an Open-Meteo hourly variable name"),
    ({"variables": ["wind_speed_10m_previous_day1"]}, "variables", "base variable"),
    ({"variables": []}, "variables", "no variables"),
    ({"lead_days": [0, 1]}, "lead_days", "1..7"),
    ({"lead_days": [8]}, "lead_days", "1..7"),
    ({"lead_days": [1.5]}, "lead_days", "1..7"),
    ({"lat": 95.0}, "latitude", "[-90, 90]"),
    ({"model": "Best Match"}, "model", "model name"),
])
def test_bad_input_is_a_clear_error_before_any_request(kw, key, match):
    server = Server(MARCH)
    args = {"lat": 52.5, "lon": -1.5, "start": "2024-03-01", "end": "2024-03-03", "variables": VARS,
            "lead_days": DAYS} | kw
    with pytest.raises(ConfigError, match=match) as err:
        weather.fetch_previous_runs(args.pop("lat"), args.pop("lon"), args.pop("start"), args.pop("end"),
                                    client=server.client(), **args)
    assert [p.key for p in err.value.problems] == [key] and server.requests == []


def test_every_input_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        weather.fetch_previous_runs(200, -1.5, "2024-03-05", "2024-03-01", variables=["Wind"], lead_days=[9],
                                    client=Server(MARCH).client())
    assert [p.key for p in err.value.problems] == ["latitude", "end", "variables", "lead_days"]


@pytest.mark.parametrize(("answer", "error", "match"), [
    (httpx.Response(200, text="<html>maintenance</html>"), ProviderError, "not JSON"),
    (httpx.Response(200, json={"latitude": 52.5, "daily": {}}), DataError, "unexpected shape"),
    (httpx.Response(200, json=[1, 2, 3]), DataError, "expected a JSON object"),
    (httpx.Response(200, json={"error": True, "reason": "Latitude must be in range of -90 to 90°"}), DataError,
     "Latitude must be in range"),
])
def test_garbage_responses_are_clear_errors_and_never_cached(tmp_path, answer, error, match):
    with pytest.raises(error, match=match):
        fetch(Server(answer), cache=DiskCache(tmp_path))
    assert not list(tmp_path.glob("*.json"))


def test_responses_missing_or_mangling_requested_variables():
    def without(name):
        doc = fixture(MARCH)
        del doc["hourly"][name]
        return httpx.Response(200, json=doc)

    with pytest.raises(DataError, match="missing from the response") as err:
        fetch(Server(lambda r: without("shortwave_radiation_previous_day2")))
    assert err.value.problems[0].value == "shortwave_radiation_previous_day2"
    doc = fixture(MARCH)
    doc["hourly"]["wind_speed_10m_previous_day1"] = doc["hourly"]["wind_speed_10m_previous_day1"][:10]
    with pytest.raises(DataError, match="not a list as long as 'time'"):
        fetch(Server(httpx.Response(200, json=doc)))
    doc = fixture(MARCH)
    doc["hourly"]["wind_speed_10m_previous_day2"][5] = "n/a"
    with pytest.raises(DataError, match="non-numeric value"):
        fetch(Server(httpx.Response(200, json=doc)))


def test_transient_failures_are_retried_then_reported(tmp_path):
    calls = {"n": 0}

    def flaky(request):
        calls["n"] += 1
        return httpx.Response(503) if calls["n"] == 1 else httpx.Response(200, json=fixture(MARCH))

    assert len(fetch(Server(flaky))) == 72 and calls["n"] == 2
    with pytest.raises(ProviderError, match="HTTP 502"):
        fetch(Server(httpx.Response(502)))


def test_zone_coordinates_and_unknown_zones():
    server = Server(MARCH)
    df = weather.weather_for_zone("GB", "2024-03-01", "2024-03-03", variables=VARS, lead_days=DAYS,
                                  client=server.client())
    p = server.requests[0].url.params
    assert (p["latitude"], p["longitude"]) == ("52.5000", "-1.5000") and df.attrs["zone"] == "GB"
    with pytest.raises(ConfigError, match="no coordinates known") as err:
        weather.weather_for_zone("XX-NOWHERE", "2024-03-01", "2024-03-03", client=server.client())
    assert "--lat and --lon" in err.value.problems[0].fix and "DE-LU" in err.value.problems[0].fix
    with pytest.raises(ConfigError) as err:  # the other mistakes are reported with it
        weather.weather_for_zone("XX-NOWHERE", "2024-03-05", "2024-03-01", lead_days=[0], client=server.client())
    assert [p.key for p in err.value.problems] == ["zone", "end", "lead_days"]
    assert len(server.requests) == 1


def test_write_csv_is_atomic(tmp_path, monkeypatch):
    df = weather.parse_response(fixture(MARCH), VARS, DAYS)
    out = tmp_path / "w.csv"
    out.write_text("old contents\n")

    def broken(self, buf, **kw):
        buf.write("timestamp,half")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken)
    with pytest.raises(OSError, match="disk full"):
        weather.write_csv(df, out)
    assert out.read_text() == "old contents\n" and sorted(p.name for p in tmp_path.iterdir()) == ["w.csv"]


# --- CLI ---------------------------------------------------------------------------------------------

@pytest.fixture
def cli_server(monkeypatch, tmp_path):
    """Serve the CLI's requests from `server.answer`; cache under tmp_path."""
    server = Server(MARCH)
    monkeypatch.setattr(weather, "make_client", lambda **kw: server.client())
    monkeypatch.setenv("GREENSTACK_CACHE_DIR", str(tmp_path / "cache"))
    return server


def weather_cmd(out: Path, *extra: str, where=("--zone", "GB"), dates=("2024-03-01", "2024-03-03")) -> list[str]:
    return ["carbon", "weather", *where, "--from", dates[0], "--to", dates[1], "--out", str(out),
            "--variables", *VARS, "--lead-days", "1", "2", *extra]


def test_cli_writes_timestamp_and_weather_columns(tmp_path, cli_server, capsys):
    out = tmp_path / "data" / "gb_weather.csv"
    assert main(weather_cmd(out)) == 0
    text = capsys.readouterr().out
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["timestamp", *COLS] and len(rows) == 73
    assert rows[1][0] == "2024-03-01T00:00:00Z" and rows[-1][0] == "2024-03-03T23:00:00Z"
    assert rows[1][1] == "14.0" and rows[1][4] == ""  # shortwave d2 is null in the first hours
    back = pd.read_csv(out)
    assert pd.to_datetime(back["timestamp"], utc=True, format="ISO8601").is_monotonic_increasing
    assert int(back[COLS].isna().sum().sum()) == 5
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as any new file, not mkstemp's private 0600
    assert "72 hourly rows" in text and "4 weather columns" in text and "1.7% missing" in text
    assert "zone GB at 52.5, -1.5" in text and "Open-Meteo Previous Runs API (CC BY 4.0)" in text
    p = cli_server.requests[0].url.params
    assert (p["latitude"], p["start_date"], p["end_date"]) == ("52.5000", "2024-03-01", "2024-03-03")
    # the second run is answered by the cache
    assert main(weather_cmd(out, "--json")) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(cli_server.requests) == 1 and doc["cache_hits"] == 1 and doc["requests"] == 0
    assert doc["rows"] == 72 and doc["columns"] == COLS and doc["missing_share"] == round(5 / 288, 4)
    assert doc["source"] == weather.SOURCE and doc["empty_columns"] == [] and doc["zone"] == "GB"
    assert doc["first_with_data"] == "2024-03-01T00:00:00Z" and doc["units"]["wind_speed_10m"] == "km/h"


def test_cli_lat_lon_and_comma_separated_variables(tmp_path, cli_server, capsys):
    out = tmp_path / "w.csv"
    argv = ["carbon", "weather", "--lat", "48.1", "--lon", "11.6", "--from", "2024-03-01", "--to", "2024-03-03",
            "--out", str(out), "--variables", "wind_speed_10m,shortwave_radiation", "--lead-days", "2", "--no-cache",
            "--json"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["columns"] == [COLS[1], COLS[3]] and doc["zone"] is None and doc["latitude"] == 48.1
    assert cli_server.requests[0].url.params["hourly"] == ("wind_speed_10m_previous_day2,"
                                                           "shortwave_radiation_previous_day2")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(("answer", "dates", "message"), [
    (httpx.Response(400, json=fixture("error_400_bad_variable.json")), ("2024-03-01", "2024-03-03"), REASON),
    (PRE_2024, ("2023-06-01", "2023-06-02"), "archived from January 2024"),
    (httpx.Response(200, text="<html>Bad gateway</html>"), ("2024-03-01", "2024-03-03"), "not JSON"),
])
def test_cli_failure_leaves_the_output_alone(tmp_path, cli_server, capsys, answer, dates, message):
    cli_server.answer = answer
    out = tmp_path / "w.csv"
    out.write_text("previous good file\n")
    code = main(weather_cmd(out, dates=dates))
    err = capsys.readouterr().err
    assert code != 0 and message in err and "Traceback" not in err
    assert out.read_text() == "previous good file\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["w.csv"]
    fresh = tmp_path / "new.csv"
    assert main(weather_cmd(fresh, dates=dates)) != 0 and not fresh.exists()


@pytest.mark.parametrize(("argv_where", "dates", "lead", "flag", "reason"), [
    (("--zone", "GB"), ("2024-03-05", "2024-03-01"), "1", "--to", "before start"),
    (("--zone", "GB"), ("2024-03-01", "2024-03-02"), "9", "--lead-days", "1..7"),
    (("--zone", "ATLANTIS"), ("2024-03-01", "2024-03-02"), "1", "--zone", "no coordinates known"),
    (("--lat", "52.5"), ("2024-03-01", "2024-03-02"), "1", "--zone/--lat/--lon", "no location"),
    (("--lat", "95", "--lon", "0"), ("2024-03-01", "2024-03-02"), "1", "--lat", "[-90, 90]"),
    (("--zone", "GB", "--lat", "1"), ("2024-03-01", "2024-03-02"), "1", "greenstack carbon weather",
     "not allowed with argument"),
])
def test_cli_bad_input_names_the_flag(tmp_path, cli_server, capsys, argv_where, dates, lead, flag, reason):
    out = tmp_path / "w.csv"
    argv = ["carbon", "weather", *argv_where, "--from", dates[0], "--to", dates[1], "--out", str(out),
            "--lead-days", lead]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert flag in err and reason in err and "Traceback" not in err
    assert cli_server.requests == [] and not out.exists()
