"""Where grid carbon intensity comes from: shipped traces, user CSVs, country averages, a constant.

Every source answers `series_at(times)` with one intensity per time plus a provenance label and a
human-readable source string, so reports never show a bare number. Provenance rules:

* trace hours actually covered by the data and not flagged `estimated` by the publisher: "measured"
  (it is the provider's historical value for that very hour, the same a live API would return);
* publisher-estimated hours, hours inside a gap (previous value carried forward), times outside the
  trace (replayed from the same hour-of-week of the latest full year) and country annual averages:
  "estimated";
* a configured constant: "fallback" (or "measured" if the user declares it so).

Live providers (Electricity Maps, WattTime, UK carbon-intensity API) plug in by fetching a series,
validating it with `greenstack.carbon.schema.validate_trace`, and wrapping it in `SeriesSource`.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from greenstack.carbon import traces
from greenstack.carbon.schema import DEFAULT_MAX_GAP_HOURS, MAX_INTENSITY_G_PER_KWH, validate_trace
from greenstack.errors import ConfigError, Problem
from greenstack.provenance import PROVENANCES, Figure, Provenance, weakest

log = logging.getLogger("greenstack.carbon")
#: replaying a series further than this from its own span gets a warning: the grid has changed since
FAR_REPLAY_YEARS = 10.0

HOUR_S = 3600
DAY_S = 86400
WEEK_S = 7 * DAY_S
SOURCE_KINDS = ("embedded", "country", "static", "csv")


@dataclass(frozen=True)
class IntensityLookup:
    """Grid intensity at requested times; `provenance` is the weakest of the per-time labels."""

    times_s: np.ndarray  # requested times, UTC epoch seconds (float64)
    intensity_g_per_kwh: np.ndarray  # gCO2eq/kWh per time
    renewable_percent: np.ndarray  # % per time, nan where unknown
    provenances: np.ndarray  # per-time label: "measured" / "estimated" / "fallback"
    provenance: Provenance
    source: str

    def __len__(self) -> int:
        return len(self.times_s)

    def figure(self, i: int = 0) -> Figure:
        """The i-th intensity as a Figure (value, unit, provenance, source)."""
        return Figure(float(self.intensity_g_per_kwh[i]), "gCO2eq/kWh", str(self.provenances[i]),  # type: ignore[arg-type]
                      self.source)


def to_epoch_seconds(times: Any) -> np.ndarray:
    """Convert times to UTC epoch seconds (float64 array).

    Accepts a scalar or array-like of tz-aware datetimes / pandas Timestamps / ISO strings with an
    offset, numpy datetime64 (taken as UTC, numpy has no time zones) or numbers (epoch seconds).
    Naive datetimes are rejected: guessing their zone would shift every hour.
    """
    if isinstance(times, (str, datetime, date, np.datetime64, int, float, np.number, pd.Timestamp)):
        times = [times]
    if isinstance(times, (pd.Series, pd.Index)) and pd.api.types.is_datetime64_any_dtype(times.dtype):
        idx = pd.DatetimeIndex(times)
        if idx.tz is None:
            raise _naive_error(idx[0] if len(idx) else None)
        return idx.tz_convert("UTC").as_unit("ns").asi8.astype("float64") / 1e9
    arr = np.asarray(times)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.dtype.kind == "M":
        return arr.astype("datetime64[ns]").astype("int64").astype("float64") / 1e9
    if arr.dtype.kind in "iuf":
        return arr.astype("float64")
    if arr.dtype.kind == "b":
        raise ConfigError(Problem("times", arr[:3].tolist(), "booleans are not times"))
    if len(arr) == 0:
        return np.zeros(0)
    values = list(arr)
    if all(isinstance(v, datetime) for v in values):
        naive = [v for v in values if v.tzinfo is None or v.tzinfo.utcoffset(v) is None]
        if naive:
            raise _naive_error(naive[0])
        return pd.DatetimeIndex(pd.to_datetime(values, utc=True)).as_unit("ns").asi8.astype("float64") / 1e9
    if all(isinstance(v, str) for v in values):
        from greenstack.carbon.schema import parse_timestamps

        parsed, problems = parse_timestamps(pd.Series(values), name="times")
        if problems:
            raise ConfigError(problems)
        return pd.DatetimeIndex(parsed).as_unit("ns").asi8.astype("float64") / 1e9
    if all(isinstance(v, (str, datetime, np.datetime64, int, float, np.number)) for v in values):
        return np.array([to_epoch_seconds(v)[0] for v in values], dtype="float64")  # mixed kinds
    raise ConfigError(Problem("times", values[:3], "expected datetimes (tz-aware), datetime64 or epoch seconds"))


def _naive_error(example: Any) -> ConfigError:
    return ConfigError(Problem("times", str(example), "time without a timezone",
                               "use timezone-aware UTC times, e.g. datetime(..., tzinfo=timezone.utc)"))


class IntensitySource(ABC):
    """Interface of every carbon-intensity provider (offline traces today, live APIs later)."""

    name: str = "intensity source"
    zone: str = ""
    country_iso3: str | None = None
    # Intensity can change only at multiples of resolution_s (offset by alignment_s) seconds since the
    # epoch; accounting splits energy at these boundaries. None means constant in time.
    resolution_s: float | None = HOUR_S
    alignment_s: float = 0.0

    @abstractmethod
    def series_at(self, times_utc: Any) -> IntensityLookup:
        """Intensity (gCO2eq/kWh) and renewable share at each time (see `to_epoch_seconds`)."""

    def at(self, time_utc: Any) -> Figure:
        """Intensity at one time as a Figure."""
        return self.series_at(time_utc).figure(0)

    def describe(self) -> dict[str, Any]:
        """What this source is, for logs and reports."""
        return {"name": self.name, "zone": self.zone, "country_iso3": self.country_iso3,
                "resolution_s": self.resolution_s, "class": type(self).__name__}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class SeriesSource(IntensitySource):
    """A validated time series of intensity, looked up as a step function (each row holds until the next).

    Times outside the series are replayed: same weekday and hour-of-day in the latest full calendar
    year of the series, nearest week of year (or, for shorter series, the same hour-of-week of the
    last full week / hour-of-day of the last full day); failing that, the series mean ("fallback").
    """

    def __init__(self, df: pd.DataFrame, *, name: str, zone: str = "", country_iso3: str | None = None,
                 covered_provenance: Provenance = "measured", label: str | None = None,
                 max_gap_hours: float = DEFAULT_MAX_GAP_HOURS, validated: bool = False) -> None:
        if covered_provenance not in PROVENANCES:
            raise ConfigError(Problem("provenance", covered_provenance, f"must be one of {PROVENANCES}"))
        if not validated:
            df = validate_trace(df, name, max_gap_hours=max_gap_hours)
        arrays = traces.trace_arrays(df)
        self.name = name
        self.zone = zone or name
        self.country_iso3 = country_iso3
        self.label = label or name
        self.covered_provenance: Provenance = covered_provenance
        self._t = arrays["time_s"]
        self._ci = arrays["intensity_g_per_kwh"]
        self._re = arrays["renewable_percent"]
        self._est = arrays["estimated"]
        steps = np.diff(self._t)
        self.resolution_s = float(np.median(steps)) if len(steps) else float(HOUR_S)
        self.alignment_s = float(self._t[0] % self.resolution_s)
        self.start_s = int(self._t[0])
        self.end_s = int(self._t[-1] + self.resolution_s)  # exclusive
        self.replay_year = self._latest_full_year()
        self._warned_far = False
        # weather-forecast columns (UTC-indexed `weather_*`) that came with the series, for the forecaster
        self.weather: pd.DataFrame | None = None

    def _latest_full_year(self) -> int | None:
        last = pd.Timestamp(self.end_s, unit="s", tz="UTC").year
        for year in range(last, 1969, -1):
            y0 = pd.Timestamp(year=year, month=1, day=1, tz="UTC").timestamp()
            y1 = pd.Timestamp(year=year + 1, month=1, day=1, tz="UTC").timestamp()
            if y0 < self.start_s:
                return None
            if y1 <= self.end_s:
                return year
        return None

    @property
    def span(self) -> tuple[pd.Timestamp, pd.Timestamp]:
        """First covered instant and the exclusive end of the series, UTC."""
        return pd.Timestamp(self.start_s, unit="s", tz="UTC"), pd.Timestamp(self.end_s, unit="s", tz="UTC")

    def series_at(self, times_utc: Any) -> IntensityLookup:
        t = to_epoch_seconds(times_utc)
        if np.isnan(t).any():
            raise ConfigError(Problem("times", "NaT/NaN", "missing times cannot be looked up"))
        inside = (t >= self.start_s) & (t < self.end_s)
        mapped = t.copy()
        prov = np.full(len(t), "estimated", dtype="<U9")
        replay_note, replayable = "", True
        if (~inside).any():
            mapped[~inside], replay_note, replayable = self._replay(t[~inside])
            self._warn_far(t[~inside])
        idx = np.clip(np.searchsorted(self._t, mapped, side="right") - 1, 0, len(self._t) - 1)
        ci = self._ci[idx].copy()
        re = self._re[idx].copy()
        if not replayable:  # series shorter than a day: its mean, labelled fallback
            prov[~inside] = "fallback"
            ci[~inside] = float(self._ci.mean())
            re[~inside] = float(np.nanmean(self._re)) if np.isfinite(self._re).any() else np.nan
        covered = inside & (t < self._t[idx] + self.resolution_s) & ~self._est[idx]
        prov[covered] = self.covered_provenance
        label = self.label
        if (~inside).any():
            label = f"{label} {replay_note}" if not inside.any() else f"{label} (in span) + {replay_note}"
        labels = [str(p) for p in np.unique(prov)] or ["estimated"]
        return IntensityLookup(t, ci, re, prov, weakest(*labels), label)

    def _warn_far(self, t: np.ndarray) -> None:
        """Warn (once per source) when a lookup is replayed from a span many years away."""
        away_s = float(np.max(np.maximum(self.start_s - t, t - self.end_s)))
        years = away_s / (365.25 * DAY_S)
        if years > FAR_REPLAY_YEARS and not self._warned_far:
            self._warned_far = True
            first, end = self.span
            log.warning("%s covers %s to %s, but times %.0f years away were looked up: they are replayed from "
                        "it (hour-of-week) and the grid may differ a lot; check the trace's dates",
                        self.label, first.date(), end.date(), years)

    def _replay(self, t: np.ndarray) -> tuple[np.ndarray, str, bool]:
        """Map times outside the series onto it; returns (times inside, description, ok)."""
        if self.replay_year is not None:
            return _replay_year(t, self.replay_year), f"replayed {self.replay_year} (hour-of-week)", True
        for period, what in ((WEEK_S, "hour-of-week"), (DAY_S, "hour-of-day")):
            ref_start = self.end_s - period
            if ref_start >= self.start_s:
                k = np.floor((t - ref_start) / period)
                return t - k * period, f"replayed last {what.split('-')[-1]} ({what})", True
        return np.full(len(t), float(self.start_s)), "mean of series (too short to replay)", False


def _replay_year(t: np.ndarray, year: int) -> np.ndarray:
    """Same month/day/time moved to `year`, then shifted <= 3 days to the same weekday, kept in year."""
    secs = np.floor(t).astype("int64")
    frac = t - secs
    dt = secs.astype("datetime64[s]")
    months = dt.astype("datetime64[M]")
    month_of_year = months.astype("int64") % 12
    within_month = (dt - months.astype("datetime64[s]")).astype("int64")
    ref_month = (np.datetime64(f"{year}-01", "M") + month_of_year).astype("datetime64[s]").astype("int64")
    cand = ref_month + within_month  # Feb 29 -> Mar 1 in a non-leap year
    weekday = lambda s: (np.floor_divide(s, DAY_S) + 3) % 7  # noqa: E731  (1970-01-01 was a Thursday)
    shift = (weekday(secs) - weekday(cand)) % 7
    shift = np.where(shift > 3, shift - 7, shift)
    cand = cand + shift * DAY_S
    y0 = np.datetime64(f"{year}-01-01", "s").astype("int64")
    y1 = np.datetime64(f"{year + 1}-01-01", "s").astype("int64")
    cand = np.where(cand < y0, cand + WEEK_S, cand)
    cand = np.where(cand >= y1, cand - WEEK_S, cand)
    return cand + frac


class EmbeddedTraceSource(SeriesSource):
    """A shipped Electricity Maps zone (hourly 2021-2023, LCA intensity); see data/LICENSE.md."""

    def __init__(self, zone: str) -> None:
        zone_id = traces.resolve_zone(zone)
        info = traces.zone_metadata().get(zone_id, {})
        super().__init__(traces.load_zone(zone_id), name=f"electricitymaps:{zone_id}", zone=zone_id,
                         country_iso3=info.get("country_iso3"), label=f"electricitymaps:{zone_id}",
                         validated=True)
        self.metadata = info


class CsvTraceSource(SeriesSource):
    """A user CSV (Electricity Maps export or canonical `timestamp,carbon_intensity`)."""

    def __init__(self, path: str | Path | Sequence[str | Path], *, zone: str | None = None,
                 provenance: Provenance = "measured", max_gap_hours: float = DEFAULT_MAX_GAP_HOURS,
                 key: str = "path") -> None:
        df = traces.load_csv_trace(path, max_gap_hours=max_gap_hours, key=key)
        zone = zone or df.attrs.get("zone") or ""
        paths = df.attrs["path"]
        name = f"csv:{Path(paths if isinstance(paths, str) else paths[0]).name}"
        iso3 = find_country(zone.split("-")[0]) if zone else None
        super().__init__(df, name=name, zone=zone or name, country_iso3=iso3, covered_provenance=provenance,
                         label=f"{name}" + (f" ({zone})" if zone else ""), validated=True)
        self.path = paths
        frames = [w for p in ([paths] if isinstance(paths, str) else paths)
                  if (w := traces.read_weather_columns(p)) is not None]
        if frames:
            weather = pd.concat(frames).sort_index()
            self.weather = weather[~weather.index.duplicated(keep="last")]


@lru_cache(maxsize=1)
def country_table() -> dict[str, dict[str, Any]]:
    """Annual country intensities shipped in data/country_intensity.json, keyed by ISO-3."""
    return json.loads((traces.DATA_DIR / "country_intensity.json").read_text(encoding="utf-8"))


def find_country(code: str) -> str | None:
    """The country table's key for `code` (ISO-2/ISO-3, any case), or None."""
    key = str(code).strip().upper()
    table = country_table()
    if key in table:
        return key
    for iso3, row in table.items():
        if row.get("iso2", "").upper() == key:
            return iso3
    return None


class CountryAverageSource(IntensitySource):
    """A country's annual average intensity (OWID via codecarbon); constant in time, "estimated"."""

    resolution_s = None

    def __init__(self, country: str) -> None:
        iso3 = find_country(country)
        if iso3 is None:
            table = country_table()
            names = {row["name"].upper(): k for k, row in table.items()}
            close = difflib.get_close_matches(str(country).upper(), list(table) + list(names), n=3, cutoff=0.6)
            sugg = [names.get(c, c) for c in close]
            raise ConfigError(Problem("country", country, "unknown country code",
                                      (f"did you mean {', '.join(sugg)}? " if sugg else "")
                                      + "use ISO 3166 alpha-2 or alpha-3, e.g. 'FR' or 'FRA'"))
        row = country_table()[iso3]
        self.country_iso3 = iso3
        self.zone = iso3
        self.year = int(row["year"])
        self.intensity_g_per_kwh = float(row["carbon_intensity"])
        self.renewable_percent = float("nan") if row["renewable_percent"] is None else float(row["renewable_percent"])
        self.name = f"owid/codecarbon annual average {iso3} {self.year}"
        self.country_name = row["name"]

    def series_at(self, times_utc: Any) -> IntensityLookup:
        t = to_epoch_seconds(times_utc)
        n = len(t)
        return IntensityLookup(t, np.full(n, self.intensity_g_per_kwh), np.full(n, self.renewable_percent),
                               np.full(n, "estimated", dtype="<U9"), "estimated", self.name)


class StaticSource(IntensitySource):
    """A configured constant intensity: "fallback" unless the user declares it measured."""

    resolution_s = None

    def __init__(self, intensity_g_per_kwh: float, renewable_percent: float | None = None, *,
                 measured: bool = False, zone: str = "static") -> None:
        problems = []
        value = _as_float(intensity_g_per_kwh)
        if value is None or not 0.0 <= value <= MAX_INTENSITY_G_PER_KWH:
            problems.append(Problem("intensity_g_per_kwh", intensity_g_per_kwh,
                                    f"must be a number in [0, {MAX_INTENSITY_G_PER_KWH:g}] gCO2eq/kWh"))
        re = _as_float(renewable_percent) if renewable_percent is not None else float("nan")
        if renewable_percent is not None and (re is None or not 0.0 <= re <= 100.0):
            problems.append(Problem("renewable_percent", renewable_percent, "must be in [0, 100]"))
        if problems:
            raise ConfigError(problems)
        self.intensity_g_per_kwh = float(value)  # type: ignore[arg-type]
        self.renewable_percent = float(re)  # type: ignore[arg-type]
        self.provenance: Provenance = "measured" if measured else "fallback"
        self.zone = zone
        self.name = f"static:{self.intensity_g_per_kwh:g} g/kWh (configured)"

    def series_at(self, times_utc: Any) -> IntensityLookup:
        t = to_epoch_seconds(times_utc)
        n = len(t)
        return IntensityLookup(t, np.full(n, self.intensity_g_per_kwh), np.full(n, self.renewable_percent),
                               np.full(n, self.provenance, dtype="<U9"), self.provenance, self.name)


def _as_float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def make_source(kind: str, zone: str | None = None, intensity_g_per_kwh: float | None = None,
                path: str | None = None, *, renewable_percent: float | None = None, measured: bool = False,
                max_gap_hours: float = DEFAULT_MAX_GAP_HOURS) -> IntensitySource:
    """Build a source from config (Hydra: `_target_: greenstack.carbon.sources.make_source`).

    kind: "embedded" (zone: a shipped trace id, or a country code -> its annual average),
    "country" (zone: ISO-2/ISO-3), "static" (intensity_g_per_kwh; `measured` marks it measured),
    "csv" (path to a user CSV, see `load_csv_trace`; zone is an optional label; rows the file does
    not flag as estimated count as "measured", like the shipped traces).
    """
    kind_norm = str(kind).strip().lower()
    if kind_norm == "embedded":
        if not zone:
            raise ConfigError(Problem("carbon.zone", zone, "the embedded source needs a zone",
                                      f"one of {', '.join(traces.available_zones())} or a country code"))
        zone_id = traces.find_zone(zone)
        if zone_id is not None:
            return EmbeddedTraceSource(zone_id)
        if find_country(zone) is not None:
            return CountryAverageSource(zone)
        raise traces.unknown_zone_error(zone, extra_fix="or a country code such as 'FR'/'FRA' for its "
                                                        "annual average")
    if kind_norm == "country":
        return CountryAverageSource(zone or "")
    if kind_norm == "static":
        if intensity_g_per_kwh is None:
            raise ConfigError(Problem("carbon.intensity_g_per_kwh", None, "the static source needs a value",
                                      "e.g. carbon.intensity_g_per_kwh=400"))
        return StaticSource(intensity_g_per_kwh, renewable_percent, measured=measured, zone=zone or "static")
    if kind_norm == "csv":
        if not path:
            raise ConfigError(Problem("carbon.path", path, "the csv source needs a file path"))
        return CsvTraceSource(path, zone=zone, max_gap_hours=max_gap_hours, key="carbon.path")
    raise ConfigError(Problem("carbon.kind", kind, "unknown carbon-intensity source",
                              f"one of {', '.join(SOURCE_KINDS)}"))
