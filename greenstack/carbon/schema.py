"""Validation of grid carbon-intensity series (shipped traces, user CSVs, live providers).

Why: emissions are energy x intensity summed per hour, so a duplicated hour double-counts, a gap
silently stretches the previous value, and a naive timestamp shifts every hour by the local UTC
offset. `validate_trace` collects every such problem at once (pandera `lazy=True`) and names the
offending rows (row number, timestamp, value) so that a user can fix their file in one pass.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaError, SchemaErrors

from greenstack.errors import DataError, Problem

MAX_INTENSITY_G_PER_KWH = 2000.0
DEFAULT_MAX_GAP_HOURS = 3.0
#: timestamps outside [first, last] year are refused: no grid data predates 1990, and a year like 3023 or
#: 1900 is a typo that would otherwise be replayed (hour-of-week) as if it were real data
PLAUSIBLE_YEARS = (1990, 2099)
MAX_ROWS_PER_PROBLEM = 10  # rows listed individually per kind of failure; the rest are summarised

TIMESTAMP = "timestamp"
INTENSITY = "carbon_intensity"
NUMERIC_COLUMNS = ("carbon_intensity", "carbon_intensity_direct", "renewable_percent", "low_carbon_percent")
TZ_FIX = ("add a UTC offset or 'Z' to every timestamp (e.g. 2023-01-01T00:00:00Z), "
          "or name the column 'Datetime (UTC)' if the times are already UTC")

# Timestamp text that ends in a zone designator: Z, UTC, +01, +0100 or +01:00 after a time of day.
_TZ_SUFFIX = re.compile(r"[T ]\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?\s*(?:Z|UTC|[+-]\d{2}(?::?\d{2})?)$",
                        re.IGNORECASE)


def _is_utc_aware(s: pd.Series) -> bool:
    return isinstance(s.dtype, pd.DatetimeTZDtype) and str(s.dtype.tz) in ("UTC", "utc", "Etc/UTC")


def _not_before_previous(s: pd.Series) -> pd.Series:
    return (s.diff() >= pd.Timedelta(0)) | s.diff().isna()


def _plausible_year(s: pd.Series) -> pd.Series:
    return s.isna() | s.dt.year.between(*PLAUSIBLE_YEARS)


def _gap_ok(max_gap: pd.Timedelta):
    def check(s: pd.Series) -> pd.Series:
        # Measured in sorted order so that one out-of-order row is not also reported as a "gap".
        values = s.to_numpy(dtype="datetime64[ns]") if len(s) else np.array([], "datetime64[ns]")
        order = np.argsort(values, kind="stable")
        steps = np.diff(values[order])
        ok = np.ones(len(values), dtype=bool)
        ok[order[1:]] = steps <= max_gap.to_timedelta64()
        return pd.Series(ok, index=s.index)

    return check


@lru_cache(maxsize=16)
def trace_schema(max_gap_hours: float = DEFAULT_MAX_GAP_HOURS) -> pa.DataFrameSchema:
    """The pandera schema of an intensity series; `max_gap_hours` bounds the step between rows."""
    max_gap = pd.Timedelta(hours=max_gap_hours)
    pct = [pa.Check(lambda s: s.between(0.0, 100.0), name="percent_range")]
    intensity = [pa.Check(lambda s: s.between(0.0, MAX_INTENSITY_G_PER_KWH), name="intensity_range")]
    return pa.DataFrameSchema(
        {
            TIMESTAMP: pa.Column(
                checks=[
                    pa.Check(_is_utc_aware, name="utc_timezone"),  # check names are matched in _REASONS
                    pa.Check(_not_before_previous, name="increasing"),
                    pa.Check(_plausible_year, name="plausible_year"),
                    pa.Check(_gap_ok(max_gap), name="max_gap"),
                ],
                nullable=False, unique=True, report_duplicates="exclude_first",
            ),
            INTENSITY: pa.Column("float64", intensity, nullable=False, coerce=True),
            "carbon_intensity_direct": pa.Column("float64", intensity, nullable=True, coerce=True,
                                                 required=False),
            "renewable_percent": pa.Column("float64", pct, nullable=True, coerce=True, required=False),
            "low_carbon_percent": pa.Column("float64", pct, nullable=True, coerce=True, required=False),
            "estimated": pa.Column("int8", pa.Check.isin([0, 1], name="flag"), nullable=False,
                                   coerce=True, required=False),
        },
        strict=False,
        name="carbon intensity series",
    )


def iso_utc(ts: Any) -> str:
    """Format a timestamp as 2023-01-01T00:00:00Z (or its repr if it is not one)."""
    try:
        t = pd.Timestamp(ts)
    except (TypeError, ValueError):
        return repr(ts)
    if t is pd.NaT:
        return "NaT"
    if t.tzinfo is None:
        return t.strftime("%Y-%m-%dT%H:%M:%S") + " (no timezone)"
    return t.tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamps(values: pd.Series, *, name: str, assume_utc: bool = False,
                     first_line: int | None = None) -> tuple[pd.Series, list[Problem]]:
    """Parse timestamp text to UTC; rows without a zone designator are problems unless `assume_utc`.

    Why strict: `pd.to_datetime(..., utc=True)` would silently read naive local times as UTC.
    """
    text = values.astype(str).str.strip()
    problems: list[Problem] = []
    parsed = pd.to_datetime(text, utc=True, format="ISO8601", errors="coerce")
    if not assume_utc:
        naive = ~text.str.contains(_TZ_SUFFIX) & parsed.notna()
        if naive.any():
            rows = np.flatnonzero(naive.to_numpy())
            problems.append(Problem(
                f"{name}.{TIMESTAMP}", text.iloc[rows[0]],
                f"{len(rows)} timestamp(s) have no timezone ({_rows_text(rows, first_line)})", TZ_FIX))
    bad = parsed.isna().to_numpy()
    for row in np.flatnonzero(bad)[:MAX_ROWS_PER_PROBLEM]:
        problems.append(Problem(_row_key(name, row, first_line, TIMESTAMP), text.iloc[row],
                                "not a timestamp", "use ISO 8601, e.g. 2023-01-01T00:00:00Z"))
    if bad.sum() > MAX_ROWS_PER_PROBLEM:
        problems.append(Problem(f"{name}.{TIMESTAMP}", None,
                                f"{int(bad.sum()) - MAX_ROWS_PER_PROBLEM} more rows are not timestamps"))
    return parsed, problems


def validate_trace(df: pd.DataFrame, name: str = "trace", *, max_gap_hours: float = DEFAULT_MAX_GAP_HOURS,
                   first_line: int | None = None) -> pd.DataFrame:
    """Check an intensity series and return it with UTC timestamps and float columns.

    `df` needs columns `timestamp` (tz-aware; converted to UTC) and `carbon_intensity` (gCO2eq/kWh);
    optional `renewable_percent`, `low_carbon_percent`, `carbon_intensity_direct`, `estimated`.
    A DatetimeIndex is accepted in place of the `timestamp` column. Rows are renumbered 0..n-1;
    `first_line` (e.g. 2 for a CSV with a header) adds file line numbers to the messages.
    Raises DataError listing every problem, each naming its row, timestamp and value.
    """
    if not isinstance(df, pd.DataFrame):
        raise DataError(Problem(name, type(df).__name__, "expected a pandas DataFrame"))
    out = df.copy()
    if TIMESTAMP not in out.columns and isinstance(out.index, pd.DatetimeIndex):
        out = out.rename_axis(TIMESTAMP).reset_index()
    out = out.reset_index(drop=True)
    missing = [c for c in (TIMESTAMP, INTENSITY) if c not in out.columns]
    if missing:
        raise DataError(Problem(f"{name}.columns", list(map(str, out.columns)), f"missing column(s) {missing}",
                                "provide 'timestamp' (ISO 8601 with offset) and 'carbon_intensity' (g/kWh)"))
    if out.empty:
        raise DataError(Problem(name, 0, "the series has no rows"))

    problems: list[Problem] = []
    ts = out[TIMESTAMP]
    if not pd.api.types.is_datetime64_any_dtype(ts.dtype):
        ts, found = parse_timestamps(ts, name=name, first_line=first_line)
        problems += found
    elif not isinstance(ts.dtype, pd.DatetimeTZDtype):
        rows = np.arange(len(ts))
        problems.append(Problem(f"{name}.{TIMESTAMP}", iso_utc(ts.iloc[0]),
                                f"timestamps have no timezone ({_rows_text(rows, first_line)})", TZ_FIX))
        ts = ts.dt.tz_localize("UTC")  # only so that the remaining checks can run
    out[TIMESTAMP] = ts.dt.tz_convert("UTC")
    if out[TIMESTAMP].isna().any():  # unparseable rows were reported above; drop them from the checks
        out = out[out[TIMESTAMP].notna()].copy()

    not_numbers: set[tuple[str, int]] = set()
    for col in NUMERIC_COLUMNS:
        if col in out.columns:
            out[col], found, bad_rows = _to_float(out, col, name, first_line)
            problems += found
            not_numbers |= {(col, int(r)) for r in bad_rows}
    if "estimated" in out.columns:
        out["estimated"] = _to_flag(out["estimated"])

    try:
        out = trace_schema(float(max_gap_hours)).validate(out, lazy=True)
    except SchemaErrors as err:
        problems += _translate(err.failure_cases, out, name, first_line, max_gap_hours, not_numbers)
    except SchemaError as err:  # pragma: no cover - lazy mode raises SchemaErrors
        problems.append(Problem(name, None, str(err)))
    if problems:
        raise DataError(problems)
    return out


def _to_float(df: pd.DataFrame, col: str, name: str,
              first_line: int | None) -> tuple[pd.Series, list[Problem], pd.Index]:
    raw = df[col]
    if pd.api.types.is_numeric_dtype(raw.dtype) and not pd.api.types.is_bool_dtype(raw.dtype):
        return raw.astype("float64"), [], df.index[:0]
    num = pd.to_numeric(raw, errors="coerce").astype("float64")
    bad = (num.isna() & raw.notna()).to_numpy().copy()
    if bad.any():  # only the candidates: blank / "nan" text means missing, anything else is not a number
        text = raw[bad].astype(str).str.strip().str.lower()
        bad[bad] = ~text.isin(["", "nan"]).to_numpy()
    problems = [
        Problem(_row_key(name, row, first_line, col, df[TIMESTAMP].loc[row]), raw.loc[row], "not a number")
        for row in df.index[bad][:MAX_ROWS_PER_PROBLEM]
    ]
    if bad.sum() > MAX_ROWS_PER_PROBLEM:
        problems.append(Problem(f"{name}.{col}", None, f"{int(bad.sum()) - MAX_ROWS_PER_PROBLEM} more rows are not numbers"))
    return num, problems, df.index[bad]


def _to_flag(s: pd.Series) -> pd.Series:
    if pd.api.types.is_bool_dtype(s.dtype) or pd.api.types.is_numeric_dtype(s.dtype):
        return s
    text = s.astype(str).str.strip().str.lower()
    mapped = text.map({"true": 1, "false": 0, "1": 1, "0": 0, "yes": 1, "no": 0, "": 0})
    return mapped.where(mapped.notna(), s)


def _rows_text(rows: np.ndarray, first_line: int | None) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:MAX_ROWS_PER_PROBLEM])
    more = f" and {len(rows) - MAX_ROWS_PER_PROBLEM} more" if len(rows) > MAX_ROWS_PER_PROBLEM else ""
    lines = f"; file lines start at {first_line}" if first_line is not None else ""
    return f"rows {shown}{more}{lines}" if len(rows) > 1 else f"row {shown}{lines}"


def _row_key(name: str, pos: Hashable, first_line: int | None, column: str, ts: Any = None) -> str:
    where = f"row {pos}"
    if first_line is not None and isinstance(pos, (int, np.integer)):
        where += f", line {int(pos) + first_line}"
    if ts is not None:
        where += f", {iso_utc(ts)}"
    return f"{name}[{where}].{column}"


_REASONS = {
    "field_uniqueness": ("duplicate timestamp (same as row {prev})", "remove or merge the duplicated row"),
    "increasing": ("earlier than the previous row {prev} ({prev_ts})", "sort the rows by timestamp"),
    "max_gap": ("{gap} after row {prev} ({prev_ts}); at most {max_gap:g} h allowed",
                "fill the missing hours, or raise max_gap_hours"),
    "plausible_year": (f"dated outside {PLAUSIBLE_YEARS[0]}-{PLAUSIBLE_YEARS[1]}: not grid data (a typo, "
                       "e.g. 3023 for 2023?); it would be replayed as if it were",
                       "fix the year of these timestamps"),
    "intensity_range": (f"outside [0, {MAX_INTENSITY_G_PER_KWH:g}] gCO2eq/kWh", "intensities are non-negative g/kWh"),
    "percent_range": ("outside [0, 100] %", "percentages go from 0 to 100"),
    "not_nullable": ("missing value", "every row needs a value"),
    "flag": ("not 0/1", "use 0/1 or true/false"),
}


def _translate(fc: pd.DataFrame, df: pd.DataFrame, name: str, first_line: int | None,
               max_gap_hours: float, already: set[tuple[str, int]]) -> list[Problem]:
    """Turn pandera failure_cases into one Problem per offending row (capped per kind)."""
    problems: list[Problem] = []
    ts = df[TIMESTAMP]
    for (column, check), group in fc.groupby(["column", "check"], sort=False, dropna=False):
        check = str(check)
        kind = _check_kind(check)
        column = str(column) if column is not None and column == column else name
        rowed = group[group["index"].notna()]
        if rowed.empty:  # column-level failure (dtype, missing column, wrong timezone)
            fix = TZ_FIX if kind == "utc_timezone" else ""
            problems.append(Problem(f"{name}.{column}", group["failure_case"].iloc[0], f"failed {check}", fix))
            continue
        # index labels = original row numbers; a value reported as "not a number" is not also "missing"
        rows = sorted({int(i) for i in rowed["index"]} - {r for c, r in already if c == column})
        for pos in rows[:MAX_ROWS_PER_PROBLEM]:
            value = df[column].loc[pos] if column in df.columns else None
            if isinstance(value, pd.Timestamp):
                value = iso_utc(value)
            elif isinstance(value, (np.floating, np.integer)):
                value = value.item()
            template, fix = _REASONS.get(kind, (f"failed check {check}", ""))
            problems.append(Problem(_row_key(name, pos, first_line, column, ts.loc[pos]), value,
                                    template.format(**_context(kind, pos, ts, max_gap_hours)), fix))
        if len(rows) > MAX_ROWS_PER_PROBLEM:
            problems.append(Problem(f"{name}.{column}", None,
                                    f"{len(rows) - MAX_ROWS_PER_PROBLEM} more rows fail {kind}"))
    return problems


def _check_kind(check: str) -> str:
    for kind in _REASONS:
        if check.startswith(kind):
            return kind
    return check


def _context(kind: str, row: int, ts: pd.Series, max_gap_hours: float) -> dict[str, Any]:
    """Which earlier row a duplicate / order / gap failure relates to (by original row number)."""
    ctx: dict[str, Any] = {"prev": "?", "prev_ts": "?", "gap": "gap", "max_gap": max_gap_hours}
    here = ts.loc[row]
    if kind == "field_uniqueness":
        ctx["prev"] = int(ts.index[(ts == here).to_numpy()][0])
    elif kind == "increasing":
        at = ts.index.get_loc(row)
        if isinstance(at, int) and at > 0:
            prev = ts.index[at - 1]
            ctx.update(prev=int(prev), prev_ts=iso_utc(ts.loc[prev]))
    elif kind == "max_gap":
        earlier = ts[ts < here]
        if not earlier.empty:
            prev = earlier.idxmax()
            hours = (here - ts.loc[prev]) / pd.Timedelta(hours=1)
            ctx.update(prev=int(prev), prev_ts=iso_utc(ts.loc[prev]), gap=f"gap of {hours:g} h")
    return ctx
