"""Hourly grid carbon-intensity traces: the shipped Electricity Maps zones and user CSV files.

Why shipped traces: carbon accounting and carbon-aware scheduling must work offline and
reproducibly, so greenstack carries 2021-2023 hourly data for 12 zones (ODbL, see data/LICENSE.md).
`carbon_intensity` is the life-cycle (LCA) value, the figure Electricity Maps headlines; the direct
(combustion-only) value is kept as `carbon_intensity_direct`.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from greenstack.carbon.schema import DEFAULT_MAX_GAP_HOURS, parse_timestamps, validate_trace
from greenstack.errors import ConfigError, DataError, Problem

DATA_DIR = Path(__file__).resolve().parent / "data"
TRACES_DIR = DATA_DIR / "traces"
TRACE_COLUMNS = ("timestamp", "carbon_intensity", "carbon_intensity_direct", "renewable_percent",
                 "low_carbon_percent", "estimated")


@lru_cache(maxsize=1)
def zone_metadata() -> dict[str, dict[str, Any]]:
    """Metadata of every shipped zone (name, country ISO-3, approximate lat/lon, coverage, aliases)."""
    meta = json.loads((DATA_DIR / "zones.json").read_text(encoding="utf-8"))
    return meta["zones"]


def available_zones() -> list[str]:
    """Ids of the zones with a shipped hourly trace, e.g. ['AU-NSW', ..., 'US-TEX-ERCO']."""
    return sorted(p.name.removesuffix(".csv.gz") for p in TRACES_DIR.glob("*.csv.gz"))


def find_zone(zone: str) -> str | None:
    """The shipped zone id for `zone` (case-insensitive; publisher aliases such as 'DE'), else None."""
    key = str(zone).strip().upper()
    zones = available_zones()
    for z in zones:
        if z.upper() == key:
            return z
    for z, info in zone_metadata().items():
        if z in zones and key in (a.upper() for a in info.get("aliases", [])):
            return z
    return None


def resolve_zone(zone: str) -> str:
    """Like find_zone, but an unknown zone is a ConfigError naming the closest and all available ids."""
    found = find_zone(zone)
    if found is None:
        raise unknown_zone_error(zone)
    return found


def unknown_zone_error(zone: str, *, extra_fix: str = "") -> ConfigError:
    """A ConfigError for an unknown zone id that suggests the nearest shipped ids (difflib)."""
    zones = available_zones()
    by_upper = {z.upper(): z for z in zones}
    close = [by_upper[c] for c in difflib.get_close_matches(str(zone).upper(), list(by_upper), n=3, cutoff=0.5)]
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    fix = f"{hint}available zones: {', '.join(zones)}" + (f"; {extra_fix}" if extra_fix else "")
    return ConfigError(Problem("zone", zone, "no shipped carbon-intensity trace for this zone", fix))


def load_zone(zone: str) -> pd.DataFrame:
    """The shipped hourly trace of a zone (UTC, 2021-2023); cached, so repeated loads are free.

    Columns: timestamp (datetime64 UTC), carbon_intensity, carbon_intensity_direct (g/kWh),
    renewable_percent, low_carbon_percent (%), estimated (int8 0/1, 1 = modelled by the publisher).
    The shipped files are checked by the build script and the test suite, not on every load.
    """
    return _load_zone_cached(resolve_zone(zone)).copy()


@cache
def _load_zone_cached(zone: str) -> pd.DataFrame:
    path = TRACES_DIR / f"{zone}.csv.gz"
    df = pd.read_csv(path, compression="gzip", engine="c",
                     dtype={c: "float64" for c in TRACE_COLUMNS[1:5]} | {"estimated": "int8"})
    df["timestamp"] = pd.to_datetime(df["timestamp"], format="%Y-%m-%dT%H:%M:%SZ", utc=True)
    df.attrs.update(zone=zone, source=f"electricitymaps:{zone}", intensity_basis="lca",
                    path=str(path))
    return df


# --- user CSV files -------------------------------------------------------------------------------

def _norm(column: str) -> str:
    return re.sub(r"\s+", " ", str(column).replace("₂", "2").strip().lower())


# Normalised header -> canonical column. Covers the Electricity Maps data-portal exports (old and new
# column names) and greenstack's canonical `timestamp,carbon_intensity[,...]` format.
_EM_INTENSITY = {
    "carbon intensity gco2eq/kwh (lca)": "carbon_intensity",
    "carbon intensity gco2eq/kwh (direct)": "carbon_intensity_direct",
}
_ALIASES = {
    "timestamp": "timestamp",
    "carbon_intensity": "carbon_intensity",
    "carbon_intensity_g_per_kwh": "carbon_intensity",
    "carbon_intensity_direct": "carbon_intensity_direct",
    "renewable_percent": "renewable_percent",
    "low_carbon_percent": "low_carbon_percent",
    "estimated": "estimated",
    "renewable percentage": "renewable_percent",
    "renewable energy percentage (re%)": "renewable_percent",
    "low carbon percentage": "low_carbon_percent",
    "carbon-free energy percentage (cfe%)": "low_carbon_percent",
    "data estimated": "estimated",
}


def load_csv_trace(path: str | Path | Sequence[str | Path], *, max_gap_hours: float = DEFAULT_MAX_GAP_HOURS,
                   key: str = "path") -> pd.DataFrame:
    """Read and validate a user intensity CSV (or several, concatenated in the order given).

    Accepted: (1) Electricity Maps data-portal exports (`Datetime (UTC)`, `Carbon Intensity
    gCO₂eq/kWh (LCA)`, ...; the LCA column is used when present, else the direct one); (2) the
    canonical `timestamp,carbon_intensity` (g/kWh) with optional `renewable_percent`,
    `low_carbon_percent`, `carbon_intensity_direct`, `estimated`. Timestamps must carry a UTC offset
    or 'Z', unless they are in a column named `Datetime (UTC)`. Raises DataError naming bad rows; a
    missing file is reported under `key`, the setting that named it (e.g. `carbon.path`).
    """
    paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    if not paths:
        raise ConfigError(Problem(key, path, "no CSV file given"))
    frames = [_read_one(p, max_gap_hours, key) for p in paths]
    if len(frames) == 1:
        return frames[0]
    df = pd.concat(frames, ignore_index=True)
    attrs = {**frames[0].attrs, "path": [str(p) for p in paths]}
    out = validate_trace(df, " + ".join(p.name for p in paths), max_gap_hours=max_gap_hours)
    out.attrs.update(attrs)
    return out


def _read_one(path: Path, max_gap_hours: float, key: str) -> pd.DataFrame:
    if not path.is_file():
        raise ConfigError(Problem(key, str(path), "carbon-intensity CSV not found",
                                  "give an existing file (relative paths are from the working directory)"))
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise DataError(Problem(str(path), None, f"cannot read as CSV: {err}")) from err

    by_norm = {_norm(c): c for c in raw.columns}
    out = pd.DataFrame(index=raw.index)
    attrs: dict[str, Any] = {"path": str(path), "source": f"csv:{path.name}"}

    if "datetime (utc)" in by_norm:
        ts, problems = parse_timestamps(raw[by_norm["datetime (utc)"]], name=path.name, assume_utc=True,
                                        first_line=2)
        attrs["format"] = "electricitymaps"
    elif "timestamp" in by_norm:
        ts, problems = parse_timestamps(raw[by_norm["timestamp"]], name=path.name, first_line=2)
        attrs["format"] = "canonical"
    else:
        raise DataError(Problem(f"{path.name}.columns", list(raw.columns), "no timestamp column",
                                "name it 'timestamp' (ISO 8601 with offset, e.g. 2023-01-01T00:00:00Z) "
                                "or 'Datetime (UTC)' as in Electricity Maps exports"))
    if problems:
        raise DataError(problems)
    out["timestamp"] = ts

    for norm, canonical in {**_EM_INTENSITY, **_ALIASES}.items():
        if norm in by_norm and canonical != "timestamp" and canonical not in out.columns:
            out[canonical] = raw[by_norm[norm]]
    if "carbon_intensity" not in out.columns and "carbon_intensity_direct" in out.columns:
        out["carbon_intensity"] = out["carbon_intensity_direct"]
        attrs["intensity_basis"] = "direct"
    else:
        attrs["intensity_basis"] = "lca"
    if "carbon_intensity" not in out.columns:
        raise DataError(Problem(f"{path.name}.columns", list(raw.columns), "no carbon-intensity column",
                                "name it 'carbon_intensity' (gCO2eq/kWh) or use an Electricity Maps export"))
    if "zone id" in by_norm and len(raw):
        attrs["zone"] = str(raw[by_norm["zone id"]].iloc[0]).strip()

    df = validate_trace(out, path.name, max_gap_hours=max_gap_hours, first_line=2)
    df.attrs.update(attrs)
    return df


def trace_arrays(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """A validated trace as numpy arrays (epoch seconds int64, float columns, estimated bool)."""
    n = len(df)
    nan = np.full(n, np.nan)
    return {
        "time_s": df["timestamp"].dt.tz_convert("UTC").dt.as_unit("s").astype("int64").to_numpy(),
        "intensity_g_per_kwh": df["carbon_intensity"].to_numpy(dtype="float64"),
        "renewable_percent": (df["renewable_percent"].to_numpy(dtype="float64")
                              if "renewable_percent" in df.columns else nan),
        "estimated": (df["estimated"].to_numpy().astype(bool) if "estimated" in df.columns
                      else np.zeros(n, dtype=bool)),
    }


def read_weather_columns(path: str | Path) -> pd.DataFrame | None:
    """A CSV's weather-forecast columns (`forecast_*` / `weather_*`) on a UTC index, or None without any.

    Why here: the forecast-eval/backtest commands and `carbon=csv` sources read a trace's weather the same way.
    """
    head = pd.read_csv(path, nrows=0, encoding="utf-8-sig")
    cols = [c for c in head.columns if str(c).lower().startswith(("forecast_", "weather_"))]
    if not cols:
        return None
    tcol = next((c for c in head.columns if str(c).strip().lower() in ("timestamp", "datetime (utc)")), None)
    if tcol is None:
        raise DataError(Problem(Path(path).name, None, "weather columns but no `timestamp` column",
                                "add a UTC `timestamp` column (as `greenstack carbon weather` writes)"))
    raw = pd.read_csv(path, usecols=[tcol, *cols], encoding="utf-8-sig")
    try:
        idx = pd.to_datetime(raw[tcol], utc=True, format="ISO8601")
    except (ValueError, TypeError) as err:
        raise DataError(Problem(f"{Path(path).name}.{tcol}", None, f"unreadable timestamps ({err})",
                                "use ISO 8601 UTC times, e.g. 2024-01-01T00:00:00Z")) from None
    return raw[cols].apply(pd.to_numeric, errors="coerce").set_index(pd.DatetimeIndex(idx))
