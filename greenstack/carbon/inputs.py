"""Carbon traces and weather files as the planning tools and the forecast-window policy read them.

Trace inputs are CSV files or shipped zone-years (`GB:2023`); weather files hold `weather_*` forecast
columns. The command line (`greenstack plan ...`) and `scheduler=forecast_window` share these loaders,
so they live here, below both.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from greenstack.errors import ConfigError, DataError, Problem

_ZONE_YEARS = re.compile(r"^(?P<zone>[A-Za-z][A-Za-z0-9-]*):(?P<first>\d{4})(?:-(?P<last>\d{4}))?$")


def shipped_zone_years(spec: str, role: str = "--trace") -> pd.DataFrame | None:
    """`ZONE:YEAR` or `ZONE:FIRST-LAST` (e.g. GB:2023, GB:2021-2022): that part of a shipped trace, else None.

    Why: the shipped traces are one file per zone (2021-2023), while evaluations need a year to test
    on and earlier years to fit on; naming them saves exporting CSVs first.
    """
    match = _ZONE_YEARS.match(str(spec).strip())
    if match is None or Path(spec).exists():
        return None
    from greenstack.carbon import traces

    zone = traces.find_zone(match["zone"])
    if zone is None:
        raise traces.unknown_zone_error(match["zone"], extra_fix=f"{role} ZONE:YEAR, e.g. GB:2023")
    first, last = int(match["first"]), int(match["last"] or match["first"])
    df = traces.load_zone(zone)
    years = df["timestamp"].dt.year
    have = sorted(set(years))
    if first > last or first not in have or last not in have:
        raise ConfigError(Problem(role, spec, f"the shipped {zone} trace covers {have[0]}-{have[-1]}",
                                  f"e.g. {zone}:{have[-1]} or {zone}:{have[0]}-{have[-2]}"))
    out = df[(years >= first) & (years <= last)].reset_index(drop=True)
    out.attrs.update(df.attrs)
    out.attrs["path"] = f"{zone}:{first}" + (f"-{last}" if last != first else "")
    return out


def load_trace(path: str, units: str, role: str) -> pd.DataFrame:
    """A carbon trace named on the command line (`--trace`/`--history`): a CSV file or a shipped zone-year,
    in g/kWh, with its zone, role and weather columns in `attrs`."""
    from greenstack.carbon import traces
    from greenstack.carbon.forecast import LBS_PER_MWH_TO_G_PER_KWH, check_units

    shipped = shipped_zone_years(path, f"--{role}")
    if shipped is not None:
        shipped.attrs["role"] = role
        shipped.attrs["exog"] = None
        return shipped
    try:
        df = traces.load_csv_trace(path, key=f"--{role}")
    except DataError as err:
        hint = lbs_hint(path, err) if units == "g_per_kwh" else None
        raise DataError(([hint] if hint else []) + err.problems) from None
    if units == "lbs_per_mwh":
        df["carbon_intensity"] = df["carbon_intensity"] * LBS_PER_MWH_TO_G_PER_KWH
    else:
        check_units(df["carbon_intensity"].to_numpy(), Path(path).name)
    df.attrs["role"] = role
    df.attrs["exog"] = read_exog(path)
    if not df.attrs.get("zone"):
        zone = zone_from_filename(path)
        if zone:
            df.attrs["zone"] = zone
    return df


_DACF_NAME = re.compile(r"^DACF-(?P<region>[A-Za-z]+)_")


def zone_from_filename(path: str) -> str | None:
    """The region a file without a zone column names itself after (the DACF archive: `DACF-CISO_...csv`)."""
    m = _DACF_NAME.match(Path(path).name)
    return m["region"].upper() if m else None


def canonical_zone(zone: str) -> str:
    """A zone id as the forecaster knows it (aliases resolved), else as given."""
    from greenstack.carbon.forecast import zone_context

    return zone_context(zone).zone or str(zone)


def trace_zone(trace: pd.DataFrame, history: Sequence[pd.DataFrame]) -> str | None:
    """The trace's zone, else the one zone its history files agree on (for calendar and sun features)."""
    if trace.attrs.get("zone"):
        return str(trace.attrs["zone"])
    zones = {str(h.attrs["zone"]) for h in history if h.attrs.get("zone")}
    return zones.pop() if len(zones) == 1 else None


def lbs_hint(path: str, err: DataError) -> Problem | None:
    """If the file failed the g/kWh range check and its magnitude looks like lbs/MWh, say so first."""
    if not any("outside [0," in p.reason for p in err.problems):
        return None
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except Exception:  # noqa: BLE001 - only a hint; the original error is raised regardless
        return None
    col = next((c for c in raw.columns if "carbon" in c.lower() and "intensity" in c.lower()), None)
    if col is None:
        return None
    values = pd.to_numeric(raw[col], errors="coerce").to_numpy()
    from greenstack.carbon.forecast import check_units

    try:
        check_units(values, Path(path).name)
    except DataError as hint:
        return hint.problems[0]
    return None


def read_exog(path: str) -> pd.DataFrame | None:
    """Optional weather-forecast columns (`forecast_*` / `weather_*`) of a canonical CSV."""
    from greenstack.carbon.traces import read_weather_columns

    return read_weather_columns(path)


def weather_columns(exog: pd.DataFrame | None) -> list[str]:
    """The weather columns a forecaster run could use (any value present), for the report."""
    return [] if exog is None else [str(c) for c in exog.columns if exog[c].notna().any()]


def load_weather(paths: Sequence[str], traces_in: Sequence[pd.DataFrame]) -> pd.DataFrame | None:
    """The `--weather` files as one UTC-indexed frame; clear errors for files without weather columns.

    Why one set for all traces: a weather file describes one place, so traces of different zones in
    one call would silently share it; that is refused instead.
    """
    if not paths:
        return None
    zones = {d.attrs.get("zone") for d in traces_in if d.attrs.get("zone")}
    problems: list[Problem] = []
    if len(zones) > 1:
        problems.append(Problem("--weather", ", ".join(paths), f"traces of several zones ({', '.join(sorted(zones))}) "
                                "would share one weather file", "run one zone per call when giving --weather"))
    frames = []
    for path in paths:
        if not Path(path).is_file():
            problems.append(Problem("--weather", path, "file not found", "check the path"))
            continue
        try:
            ex = read_exog(path)
        except DataError as err:
            problems += err.problems
            continue
        if ex is None:
            problems.append(Problem("--weather", path, "no weather_* or forecast_* columns",
                                    "write one with `greenstack carbon weather`"))
            continue
        frames.append(ex)
    if problems:
        raise DataError(problems)
    out = pd.concat(frames).sort_index()
    return out[~out.index.duplicated(keep="last")]


def combine_history(trace: pd.DataFrame, history: list[pd.DataFrame], name: str,
             weather: pd.DataFrame | None = None) -> tuple[pd.Series, pd.DataFrame | None]:
    """History + trace as one hourly series, and their weather columns (plus `weather`, the --weather files).

    History must end before the trace starts. A column both in a trace and a --weather file is taken
    from the trace.
    """
    from greenstack.carbon.forecast import hourly_series

    start = trace["timestamp"].iloc[0]
    parts = []
    for h in sorted(history, key=lambda d: d["timestamp"].iloc[0]):
        if h["timestamp"].iloc[-1] >= start:
            raise DataError(Problem(f"--history {Path(h.attrs['path']).name}", h["timestamp"].iloc[-1].isoformat(),
                                    f"history overlaps the evaluated trace {name} (it starts {start.isoformat()})",
                                    "history must end before the trace starts (no look-ahead)"))
        parts.append(h[["timestamp", "carbon_intensity"]])
    parts.append(trace[["timestamp", "carbon_intensity"]])
    df = pd.concat(parts, ignore_index=True)
    if len(parts) > 1:
        from greenstack.carbon.schema import validate_trace

        df = validate_trace(df, f"history + {name}")
    exogs = [d.attrs.get("exog") for d in [*history, trace] if d.attrs.get("exog") is not None]
    exog = pd.concat(exogs).sort_index() if exogs else None
    if weather is not None:
        extra = weather.drop(columns=[c for c in weather.columns if exog is not None and c in exog.columns])
        exog = extra if exog is None else exog.join(extra, how="outer")
    return hourly_series(df, name), exog


def history_for(trace: pd.DataFrame, history: list[pd.DataFrame], n_traces: int) -> list[pd.DataFrame]:
    """History files that belong to this trace: same zone id, or any when zones are unknown."""
    zone = trace.attrs.get("zone")
    out = []
    for h in history:
        hz = h.attrs.get("zone")
        if zone and hz:
            if hz == zone or canonical_zone(hz) == canonical_zone(zone):
                out.append(h)
        elif n_traces == 1 or h["timestamp"].iloc[-1] < trace["timestamp"].iloc[0]:
            out.append(h)
    return out
