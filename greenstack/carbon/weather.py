"""Weather-forecast columns for the carbon-intensity forecaster, from Open-Meteo's Previous Runs API.

Why previous runs: wind, sunshine and temperature drive renewables and load, so forecasts of them help
a 72 h carbon-intensity forecast, but only forecasts that existed at the forecast origin may be used.
Training or evaluating on what the weather *turned out to be* (or on the latest run, issued after the
origin) is look-ahead and makes backtests look better than live use can be. Open-Meteo archives each
hourly variable `v` as `v_previous_dayK`: the value predicted about K x 24 h before the valid time.

Column convention: `weather_<v>_d<K>` holds `v_previous_dayK`; the forecaster reads column `_dK` for
the lead hours whose `_dK` run was published before the origin (`forecast.weather_lead_day`: 1-19 ->
d1, 20-43 -> d2, 44-67 -> d3, 68-72 -> d4, allowing 6 h for a run to be published). The current run (`v`, day 0) is never output. Index: hourly UTC timestamps.
Data: Open-Meteo (https://open-meteo.com), CC BY 4.0; most models are archived from January 2024.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd

from greenstack.carbon.providers.cache import DiskCache
from greenstack.carbon.providers.http import DEFAULT_RETRIES, HttpClient, ProviderError
from greenstack.errors import ConfigError, DataError, Problem

log = logging.getLogger("greenstack.carbon.weather")

BASE_URL = "https://previous-runs-api.open-meteo.com/v1"
PATH = "/forecast"
PROVIDER = "open-meteo"
SOURCE = "Open-Meteo Previous Runs API (CC BY 4.0)"
DOCS_URL = "https://open-meteo.com/en/docs/previous-runs-api"
DEFAULT_VARIABLES: tuple[str, ...] = ("temperature_2m", "cloud_cover", "wind_speed_10m", "shortwave_radiation")
DEFAULT_LEAD_DAYS: tuple[int, ...] = (1, 2, 3, 4)  # a 72 h horizon (see forecast.weather_lead_day)
MAX_LEAD_DAY = 7  # the API archives previous_day1 .. previous_day7
MAX_CHUNK_DAYS = 92  # one calendar quarter per request at most
ARCHIVE_START = date(2024, 1, 1)  # most models' previous runs are archived from here
HISTORICAL_AFTER_DAYS = 7  # a chunk ending longer ago than this no longer changes ...
HISTORICAL_TTL_S = 30 * 86400.0  # ... so its cached response is kept this long
DEFAULT_TIMEOUT_S = 30.0  # a quarter of hourly data for a dozen columns is a large response

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_PREVIOUS = re.compile(r"^(?P<var>[a-z][a-z0-9_]*)_previous_day(?P<k>[0-9]+)$")

Progress = Callable[[int, int], None]  # (chunks done, chunks in all)


def column_name(variable: str, lead_day: int) -> str:
    """`weather_<variable>_d<lead_day>`, e.g. weather_wind_speed_10m_d1."""
    return f"weather_{variable}_d{int(lead_day)}"


def lead_day_for(lead_hour: int) -> int:
    """The lead day whose columns serve a forecast `lead_hour` hours after the origin (1-19 -> 1, 20-43 -> 2, ...).

    One definition with the forecaster's (`forecast.weather_lead_day`): a run is published hours after it
    starts, so a `_d1` value for the last hours of day 1 would not yet exist at the origin.
    """
    from greenstack.carbon.forecast import weather_lead_day

    return weather_lead_day(lead_hour)


def make_client(*, timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES, backoff_s: float = 0.5,
                transport: httpx.BaseTransport | None = None) -> HttpClient:
    """An HttpClient for the Previous Runs API (no key); `transport` lets tests replay responses."""
    return HttpClient(BASE_URL, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s, transport=transport,
                      provider=PROVIDER)


# --- input checks ---------------------------------------------------------------------------------

def as_date(value: Any, key: str = "date") -> date:
    """A UTC calendar date from a date, datetime, Timestamp or ISO text; ConfigError if unreadable."""
    if type(value) is date:
        return value
    try:
        ts = pd.Timestamp(value)
    except (ValueError, TypeError):
        ts = pd.NaT
    if ts is pd.NaT or pd.isna(ts):
        raise ConfigError(Problem(key, value, "not a date", "use YYYY-MM-DD, e.g. 2024-03-01"))
    if ts.tzinfo is not None:
        ts = ts.tz_convert("UTC")
    return ts.date()


def _check(lat: float, lon: float, start: Any, end: Any, variables: Iterable[str], lead_days: Iterable[int],
           model: str | None) -> tuple[date, date, tuple[str, ...], tuple[int, ...]]:
    """Validated (start, end, variables, lead_days); every problem at once as a ConfigError."""
    problems: list[Problem] = []
    for key, value, bound in (("latitude", lat, 90.0), ("longitude", lon, 180.0)):
        try:
            ok = -bound <= float(value) <= bound
        except (TypeError, ValueError):
            ok = False
        if not ok:
            problems.append(Problem(key, value, f"must be a number in [-{bound:g}, {bound:g}] degrees"))
    dates: list[date | None] = []
    for key, value in (("start", start), ("end", end)):
        try:
            dates.append(as_date(value, key))
        except ConfigError as err:
            problems.extend(err.problems)
            dates.append(None)
    d0, d1 = dates
    if d0 is not None and d1 is not None and d1 < d0:
        problems.append(Problem("end", d1.isoformat(), f"before start {d0.isoformat()}",
                                "give an end date on or after the start date (both inclusive)"))
    names: list[str] = []
    for v in [variables] if isinstance(variables, str) else variables:
        v = str(v).strip()
        if (m := _PREVIOUS.match(v)) is not None:
            problems.append(Problem("variables", v, "give the base variable, not a previous-run column",
                                    f"use {m['var']!r} and choose lead days with lead_days / --lead-days"))
        elif not _NAME.match(v):
            problems.append(Problem("variables", v, "not an Open-Meteo hourly variable name "
                                    "(lower-case letters, digits and _)", f"e.g. {', '.join(DEFAULT_VARIABLES)}"))
        elif v not in names:
            names.append(v)
    if not names and not any(p.key == "variables" for p in problems):
        problems.append(Problem("variables", list(variables), "no variables", f"e.g. {', '.join(DEFAULT_VARIABLES)}"))
    days: set[int] = set()
    for k in [lead_days] if isinstance(lead_days, int) else lead_days:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= MAX_LEAD_DAY:
            problems.append(Problem("lead_days", k, f"must be a whole number of days in 1..{MAX_LEAD_DAY}",
                                    "the API archives runs up to 7 days before the valid time; 1 2 3 4 cover 72 h"))
        else:
            days.add(int(k))
    if not days and not any(p.key == "lead_days" for p in problems):
        problems.append(Problem("lead_days", list(lead_days), "no lead days", "e.g. 1 2 3 4 (a 72 h horizon)"))
    if model is not None and not _NAME.match(str(model)):
        problems.append(Problem("model", model, "not an Open-Meteo model name", f"e.g. best_match; see {DOCS_URL}"))
    if problems:
        raise ConfigError(problems)
    assert d0 is not None and d1 is not None
    return d0, d1, tuple(names), tuple(sorted(days))


def date_chunks(start: Any, end: Any, max_days: int = MAX_CHUNK_DAYS) -> list[tuple[date, date]]:
    """Inclusive (first, last) date ranges covering start..end, one calendar quarter (or max_days) at most.

    Why quarters: a chunk of a longer or shifted range is then the same request, so it hits the cache.
    """
    d0, d1 = as_date(start, "start"), as_date(end, "end")
    out: list[tuple[date, date]] = []
    t = d0
    while t <= d1:
        quarter_end = pd.Timestamp(t).to_period("Q").end_time.date()
        u = min(quarter_end, d1, t + timedelta(days=max(1, int(max_days)) - 1))
        out.append((t, u))
        t = u + timedelta(days=1)
    return out


# --- responses ------------------------------------------------------------------------------------

def shape_error(what: str, payload: Any) -> DataError:
    return DataError(Problem(f"{PROVIDER} response", repr(payload)[:120], f"unexpected shape: {what}",
                             "the API may have changed or a proxy answered; retry later"))


def parse_response(payload: Any, variables: Sequence[str] | None = None,
                   lead_days: Sequence[int] | None = None) -> pd.DataFrame:
    """An API response as `weather_<v>_d<K>` float columns on an hourly UTC index named `timestamp`.

    Without `variables`/`lead_days`, every `<v>_previous_day<K>` in the response is taken. Requested
    columns missing from the response, or a body that is not the documented shape, raise DataError.
    The current run (`<v>`, day 0) is ignored: it was issued after the origins it would inform.
    """
    if not isinstance(payload, dict):
        raise shape_error("expected a JSON object", payload)
    if payload.get("error"):
        raise DataError(Problem(f"{PROVIDER} response", None, f"error: {payload.get('reason', 'no reason given')}"))
    hourly = payload.get("hourly")
    if not isinstance(hourly, dict) or not isinstance(hourly.get("time"), list):
        raise shape_error("expected {'hourly': {'time': [...], ...}}", payload)
    times = hourly["time"]
    if not times:
        raise DataError(Problem(f"{PROVIDER} response", "[]", "no hours in the response"))
    if variables is None or lead_days is None:
        found = [(m["var"], int(m["k"])) for key in hourly if (m := _PREVIOUS.match(str(key)))]
        wanted = [(v, k) for v, k in found if (variables is None or v in variables)
                  and (lead_days is None or k in lead_days)]
    else:
        wanted = [(v, int(k)) for v in variables for k in lead_days]
    missing = [f"{v}_previous_day{k}" for v, k in wanted if f"{v}_previous_day{k}" not in hourly]
    if missing or not wanted:
        raise DataError(Problem(f"{PROVIDER} response", ", ".join(missing) or "(none)",
                                "requested variables missing from the response",
                                f"the model may not archive them; check the names on {DOCS_URL}"))
    try:
        offset = pd.Timedelta(seconds=float(payload.get("utc_offset_seconds") or 0))
        if all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in times):
            index = pd.to_datetime(pd.Series(times, dtype="float64"), unit="s", utc=True)
        else:
            index = pd.to_datetime(pd.Series(times, dtype="object"), format="ISO8601") - offset
            index = index.dt.tz_localize("UTC") if index.dt.tz is None else index.dt.tz_convert("UTC")
    except (ValueError, TypeError, OverflowError) as err:
        raise shape_error(f"unreadable 'time' values ({err})", times[:3]) from None
    order = list(dict.fromkeys([*(variables or ()), *(v for v, _ in wanted)]))  # as requested, else as listed
    columns: dict[str, np.ndarray] = {}
    for v, k in sorted(wanted, key=lambda vk: (order.index(vk[0]), vk[1])):
        values = hourly[f"{v}_previous_day{k}"]
        if not isinstance(values, list) or len(values) != len(times):
            raise shape_error(f"'{v}_previous_day{k}' is not a list as long as 'time'", values)
        if any(x is not None and (isinstance(x, bool) or not isinstance(x, (int, float))) for x in values):
            bad = next(x for x in values if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float))))
            raise DataError(Problem(f"{PROVIDER} response.{v}_previous_day{k}", bad, "non-numeric value"))
        columns[column_name(v, k)] = np.array([np.nan if x is None else float(x) for x in values], dtype="float64")
    frame = pd.DataFrame(columns, index=pd.DatetimeIndex(index, name="timestamp").as_unit("s"))
    frame = frame[~frame.index.duplicated(keep="first")].sort_index()
    frame.attrs.update(_meta(payload))
    return frame


def _meta(payload: dict[str, Any]) -> dict[str, Any]:
    units = payload.get("hourly_units") if isinstance(payload.get("hourly_units"), dict) else {}
    base_units = {k: str(u) for k, u in units.items() if k != "time" and "_previous_day" not in k}
    base_units |= {m["var"]: str(u) for k, u in units.items() if (m := _PREVIOUS.match(k))}
    return {"grid_latitude": payload.get("latitude"), "grid_longitude": payload.get("longitude"),
            "units": base_units}


def _rejection_reason(message: str) -> str | None:
    """The `reason` of an Open-Meteo HTTP 400 body quoted in a ProviderError message."""
    if "HTTP 400" not in message:
        return None
    body = message[message.find("{"):] if "{" in message else ""
    try:
        return str(json.loads(body)["reason"])
    except (ValueError, KeyError, TypeError):
        m = re.search(r'"reason"\s*:\s*"((?:[^"\\]|\\.)*)', body)
        return m.group(1) if m else body.strip() or None


# --- fetching -------------------------------------------------------------------------------------

def request_params(lat: float, lon: float, first: date, last: date, variables: Sequence[str],
                   lead_days: Sequence[int], model: str | None = None) -> dict[str, str]:
    """Query parameters of one Previous Runs request (dates inclusive, times in GMT)."""
    hourly = ",".join(f"{v}_previous_day{k}" for v in variables for k in lead_days)
    params = {"latitude": f"{float(lat):.4f}", "longitude": f"{float(lon):.4f}", "hourly": hourly,
              "start_date": first.isoformat(), "end_date": last.isoformat(), "timezone": "GMT"}
    if model:
        params["models"] = str(model)
    return params


def _hours(first: date, last: date) -> pd.DatetimeIndex:
    return pd.date_range(pd.Timestamp(first, tz="UTC"), pd.Timestamp(last, tz="UTC") + pd.Timedelta(hours=23),
                         freq="h", name="timestamp").as_unit("s")


def fetch_previous_runs(lat: float, lon: float, start: Any, end: Any, *,
                        variables: Sequence[str] = DEFAULT_VARIABLES,
                        lead_days: Sequence[int] = DEFAULT_LEAD_DAYS, model: str | None = None,
                        client: HttpClient | None = None, cache: DiskCache | None = None,
                        progress: Progress | None = None, now: float | None = None) -> pd.DataFrame:
    """Hourly `weather_<v>_d<K>` columns for dates start..end (inclusive, UTC) at lat/lon.

    Long ranges are fetched one quarter per request; `progress(done, total)` is called after each.
    With a `cache`, responses are reused: within its TTL for recent chunks, for HISTORICAL_TTL_S for
    chunks ending over a week before `now` (epoch seconds, default: the clock). Missing hours are NaN.
    Raises ConfigError for bad input or a request the API rejects (its reason included), DataError
    for an unusable response or no data at all, ProviderError when the API cannot be reached.
    `frame.attrs` holds source, coordinates, units, requests made and cache hits.
    """
    first, last, names, days = _check(lat, lon, start, end, variables, lead_days, model)
    now_s = time.time() if now is None else float(now)
    historical_before = pd.Timestamp(now_s, unit="s", tz="UTC") - pd.Timedelta(days=HISTORICAL_AFTER_DAYS)
    chunks = date_chunks(first, last)
    own = client is None
    http = make_client() if client is None else client
    zone_label = f"{float(lat):.4f},{float(lon):.4f}"
    frames: list[pd.DataFrame] = []
    meta: dict[str, Any] = {}
    requests = hits = 0
    try:
        for i, (c0, c1) in enumerate(chunks, 1):
            params = request_params(lat, lon, c0, c1, names, days, model)
            historical = pd.Timestamp(c1 + timedelta(days=1), tz="UTC") <= historical_before
            frame = None
            entry = cache.get(PROVIDER, zone_label, params, now=now_s, allow_stale=True) if cache is not None else None
            if cache is not None and entry is not None and entry.age_s(now_s) <= (max(HISTORICAL_TTL_S, cache.ttl_s) if historical
                                                             else cache.ttl_s):
                try:
                    frame = parse_response(entry.payload, names, days)
                    hits += 1
                except DataError:
                    frame = None  # a corrupt cache file: ask again
            if frame is None:
                payload = _get(http, params, c0, c1)
                requests += 1
                frame = parse_response(payload, names, days)
                if cache is not None:
                    cache.put(PROVIDER, zone_label, params, payload, now=now_s)
            meta = meta or dict(frame.attrs)
            hours = _hours(c0, c1)
            frames.append(frame.loc[(frame.index >= hours[0]) & (frame.index <= hours[-1])])  # only its own dates
            if progress is not None:
                progress(i, len(chunks))
    finally:
        if own:
            http.close()
    out = pd.concat(frames)
    out = out[~out.index.duplicated(keep="first")].reindex(_hours(first, last))
    out = out[[column_name(v, k) for v in names for k in days]].astype("float64")
    if out.isna().all().all():
        raise _no_data_error(first, last, names, model)
    early = out.index < pd.Timestamp(ARCHIVE_START, tz="UTC")
    if early.any() and out[early].isna().all().all():
        log.warning("%s: no previous runs before %s (most models are archived from January 2024); "
                    "those rows are empty", PROVIDER, out.index[~early][0].strftime("%Y-%m-%d"))
    out.attrs.update(meta)
    out.attrs.update({"source": SOURCE, "latitude": float(lat), "longitude": float(lon), "model": model,
                      "variables": list(names), "lead_days": list(days), "requests": requests, "cache_hits": hits})
    return out


def _get(http: HttpClient, params: dict[str, str], first: date, last: date) -> Any:
    try:
        return http.get_json(PATH, params=params)
    except ProviderError as err:
        reason = _rejection_reason(str(err))
        if reason is None:
            raise
        summary = f"{params['hourly']} {first}..{last}" + (f" model {params['models']}" if "models" in params else "")
        raise ConfigError(Problem(f"{PROVIDER} request", summary, f"rejected by Open-Meteo: {reason}",
                                  f"check variable and model names on {DOCS_URL} and the date range")) from None


def _no_data_error(first: date, last: date, names: Sequence[str], model: str | None) -> DataError:
    where = f"{first.isoformat()}..{last.isoformat()}"
    if first < ARCHIVE_START:
        return DataError(Problem(f"{PROVIDER} data", where, "every value is missing: previous-run forecasts are "
                                 "archived from January 2024 for most models",
                                 "request dates from 2024-01-01 on; a trace that starts earlier gets no "
                                 "weather columns before then"))
    return DataError(Problem(f"{PROVIDER} data", where, f"every value is missing for {', '.join(names)}"
                             + (f" (model {model})" if model else ""),
                             "the model may not archive these variables, or the dates are beyond its forecast; "
                             f"see {DOCS_URL}"))


def weather_for_zone(zone: str, start: Any, end: Any, **kw: Any) -> pd.DataFrame:
    """fetch_previous_runs at a shipped zone's representative coordinates (see `zone_context`)."""
    from greenstack.carbon import traces
    from greenstack.carbon.forecast import zone_context

    ctx = zone_context(zone)
    if ctx.lat is None or ctx.lon is None:
        known = sorted(z for z, info in traces.zone_metadata().items() if info.get("lat") is not None)
        problems = [Problem("zone", zone, "no coordinates known for this zone",
                            f"pass --lat and --lon, or call fetch_previous_runs(lat, lon, ...); "
                            f"zones with coordinates: {', '.join(known)}")]
        try:  # report the other mistakes too
            _check(0.0, 0.0, start, end, kw.get("variables", DEFAULT_VARIABLES),
                   kw.get("lead_days", DEFAULT_LEAD_DAYS), kw.get("model"))
        except ConfigError as err:
            problems += err.problems
        raise ConfigError(problems)
    out = fetch_previous_runs(ctx.lat, ctx.lon, start, end, **kw)
    out.attrs["zone"] = ctx.zone
    return out


# --- output ---------------------------------------------------------------------------------------

def write_csv(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write `timestamp` (YYYY-MM-DDTHH:MM:SSZ) + weather columns atomically: a failure leaves no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = frame.copy()
    out.index = pd.DatetimeIndex(out.index).tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%SZ")
    out.index.name = "timestamp"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            out.to_csv(f, index=True, lineterminator="\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a data file is as readable as any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


__all__ = ["BASE_URL", "DEFAULT_LEAD_DAYS", "DEFAULT_VARIABLES", "HISTORICAL_TTL_S", "MAX_CHUNK_DAYS", "SOURCE",
           "as_date", "column_name", "date_chunks", "fetch_previous_runs", "lead_day_for", "make_client",
           "parse_response", "request_params", "weather_for_zone", "write_csv"]
