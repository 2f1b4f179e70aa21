"""What a scheduler can know about the next hours of grid intensity, from any IntensitySource.

* a trace (shipped zone or user CSV) that has observations right up to the start: the greenstack
  72 h forecaster, fitted on those observations only (quantiles included);
* a trace that ends before the start (the shipped 2021-2023 traces seen from today): the source's
  own replay (same hour-of-week of its latest year) - the very values run accounting will use;
* a live provider: its lookup for the coming hours (Electricity Maps serves its forecast there),
  with the source's fallback chain;
* a constant source: nothing to gain by waiting, said so.

Every outlook is capped at the forecast horizon; asking for more plans with what is known and adds
a note saying so. Provenance and source text are kept so each decision can say what it rested on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd

from greenstack.carbon import forecast as fc
from greenstack.scheduling.windows import planning_values

Z90 = 1.2815515655446004  # standard-normal 90 % quantile


@dataclass
class Outlook:
    """Hourly intensity expected from `times[0]` (the start's hour) on, with how it was obtained."""

    zone: str
    start: datetime
    times: pd.DatetimeIndex
    point: np.ndarray
    quantiles: dict[float, np.ndarray]
    mean: np.ndarray
    kind: str  # forecast | replay | provider | constant
    provenance: str
    source: str
    requested_h: int
    notes: list[str] = field(default_factory=list)
    weather_columns: list[str] = field(default_factory=list)  # what the forecaster used (none: not a forecast)

    @property
    def hours(self) -> int:
        return len(self.times)

    @property
    def horizon_limited(self) -> bool:
        return self.hours < self.requested_h

    def values(self, objective: str | float = "mean") -> np.ndarray:
        """The hourly values to plan on (see `windows.planning_values`)."""
        return planning_values(self.point, self.quantiles, objective=objective, mean=self.mean)

    def describe(self) -> dict[str, Any]:
        return {"zone": self.zone, "from": self.times[0].isoformat() if self.hours else None, "hours": self.hours,
                "requested_h": self.requested_h, "kind": self.kind, "provenance": self.provenance,
                "source": self.source, "weather_columns": list(self.weather_columns), "notes": list(self.notes)}


def hour_floor(when: datetime) -> datetime:
    return when.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)


def _series_of(source: Any) -> pd.Series | None:
    """The observed hourly series behind a trace-backed source (None for live/constant sources)."""
    t, ci = getattr(source, "_t", None), getattr(source, "_ci", None)
    if t is None or ci is None:
        return None
    return pd.Series(np.asarray(ci, dtype="float64"), index=pd.to_datetime(np.asarray(t), unit="s", utc=True))


def _mean_from_quantiles(median: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Mean of a log-normal matched to a 10-90 % interval (why: expected emissions need the mean)."""
    sigma = np.clip((np.log(np.clip(hi, 1e-9, None)) - np.log(np.clip(lo, 1e-9, None))) / (2 * Z90), 0, None)
    return median * np.exp(sigma**2 / 2)


def intensity_outlook(source: Any, start: datetime, hours: int, *, horizon_h: int = fc.HORIZON_H,
                      quantiles: tuple[float, ...] = fc.DEFAULT_QUANTILES,
                      weather: pd.DataFrame | None = None) -> Outlook:
    """Hourly intensity for `hours` hours from the hour of `start` (capped at `horizon_h`).

    `weather`: UTC-indexed weather-forecast columns (`weather_*`, lead-day suffixes honoured) that the
    forecaster uses when it runs; ignored (and said so) when the outlook is a replay or a provider's.
    A source's own weather columns (`carbon=csv` with `weather_*` columns) join them, as in
    `plan forecast-eval` (the trace's columns win over a same-named `weather` column).
    """
    weather = merge_weather(getattr(source, "weather", None), weather)
    t0 = hour_floor(start)
    want = max(1, int(math.ceil(hours)))
    use = min(want, int(horizon_h))
    notes: list[str] = []
    if use < want:
        notes.append(f"asked to plan {want} h ahead but the forecast horizon is {horizon_h} h: planning within the "
                     f"first {horizon_h} h (what is known); later windows are not considered")
    times = pd.date_range(pd.Timestamp(t0), periods=use, freq="h")
    zone = str(getattr(source, "zone", "") or "")
    if getattr(source, "resolution_s", 3600) is None:
        look = source.series_at(times)
        v = np.asarray(look.intensity_g_per_kwh, dtype="float64")
        notes.append(f"constant intensity ({look.source}): waiting cannot lower emissions")
        return Outlook(zone, start, times, v, {0.5: v}, v, "constant", look.provenance, look.source, want, notes)
    series = _series_of(source)
    if series is not None:
        hist = series[series.index < pd.Timestamp(t0)]
        need = fc.CONTEXT_H + use + fc.MIN_TRAIN_ORIGINS * 24
        gap_h = (pd.Timestamp(t0) - hist.index[-1]) / pd.Timedelta(hours=1) if len(hist) else math.inf
        if gap_h <= 3 and len(hist) >= need:
            lead = int(round(gap_h)) - 1  # hours between the last observation and the start's hour
            model = fc.CarbonForecaster(horizon_h=min(use + lead, 144), context=fc.zone_context(zone),
                                        quantiles=tuple(sorted(set(quantiles) | {0.1, 0.5, 0.9})))
            usable = None
            if weather is not None and not weather.empty:
                usable = weather.loc[:, weather.notna().any()]
                if usable.empty:
                    notes.append("the weather columns hold no values: forecasting without them")
                    usable = None
                else:
                    notes.append(f"forecast uses weather columns {', '.join(map(str, usable.columns))}")
            f = model.fit(hist, exog=usable).predict()
            sl = slice(lead, lead + use)
            qs = {q: v[sl] for q, v in f.quantiles.items()}
            mean = _mean_from_quantiles(qs[0.5], qs[0.1], qs[0.9])
            used = [] if usable is None else [str(c) for c in usable.columns]
            return Outlook(zone, start, times, f.point[sl], qs, mean, "forecast", "estimated", f.source, want, notes,
                           used)
        if len(hist) and gap_h <= 3:
            notes.append(f"only {len(hist)} h observed before the start (the forecaster needs {need} h): "
                         "using the source's own values instead")
    look = source.series_at(times)
    v = np.asarray(look.intensity_g_per_kwh, dtype="float64")
    kind = "replay" if series is not None else "provider"
    if weather is not None:
        notes.append(f"weather columns not used: the outlook is the source's {kind}, not greenstack's forecast")
    if kind == "replay":
        notes.append(f"no observations up to {pd.Timestamp(t0).isoformat()}: planning on {look.source} "
                     "(no forecast uncertainty available)")
    return Outlook(zone, start, times, v, {0.5: v}, v, kind, look.provenance, look.source, want, notes)


def merge_weather(own: pd.DataFrame | None, extra: pd.DataFrame | None) -> pd.DataFrame | None:
    """A source's weather columns joined with extra ones (a `weather=` file); the source's win on a clash."""
    if own is None or own.empty:
        return extra
    if extra is None or extra.empty:
        return own
    extra = extra.drop(columns=[c for c in extra.columns if c in own.columns])
    return own if extra.empty else own.join(extra, how="outer")


def weather_note(source: object, rule: str) -> list[str]:
    """For rules that act on observed intensity only: say that the source's weather columns go unused."""
    own = getattr(source, "weather", None)
    if own is None or own.empty:
        return []
    return [f"{rule} acts on observed intensity: the trace's weather columns "
            f"({', '.join(map(str, own.columns))}) are not used"]


def observed_levels(source: Any, before: datetime, lookback_h: int) -> np.ndarray:
    """Hourly intensities of the `lookback_h` hours before `before` (as the source reports them)."""
    t0 = hour_floor(before)
    times = pd.date_range(pd.Timestamp(t0) - pd.Timedelta(hours=lookback_h), periods=lookback_h, freq="h")
    return np.asarray(source.series_at(times).intensity_g_per_kwh, dtype="float64")


def intensity_now(source: Any, when: datetime) -> tuple[float, str, str]:
    """(intensity, provenance, source text) for the hour containing `when`."""
    look = source.series_at([pd.Timestamp(hour_floor(when))])
    return float(look.intensity_g_per_kwh[0]), str(look.provenance), str(look.source)


__all__ = ["Outlook", "hour_floor", "intensity_now", "intensity_outlook", "merge_weather", "observed_levels",
           "weather_note"]
