"""`greenstack plan ...`: planning tools around carbon intensity (forecast evaluation first).

Subcommands register themselves in `SUBCOMMANDS` (name -> `Subcommand`), so later tools
(`plan backtest`, `plan region`) add one entry with their own argument setup and handler.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from greenstack.errors import ConfigError, DataError, Problem


@dataclass(frozen=True)
class Subcommand:
    """One `greenstack plan NAME` tool: its help line, argument setup and handler (returns exit code)."""

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, Subcommand] = {}


def register(name: str, subcommand: Subcommand) -> None:
    """Add a `plan` subcommand (used by this module and by later planning tools)."""
    SUBCOMMANDS[name] = subcommand


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as ConfigError (printed by the CLI, exit 2, no traceback)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(Problem(self.prog, None, message, f"see `{self.prog} --help`"))


def build_parser() -> argparse.ArgumentParser:
    """The `greenstack plan` parser with every registered subcommand."""
    parser = _Parser(prog="greenstack plan", description="planning tools around grid carbon intensity")
    sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", parser_class=_Parser)
    for name, spec in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=spec.help, description=spec.help)
        spec.configure(p)
        p.set_defaults(_run=spec.run)
    return parser


def run_plan(argv: list[str]) -> int:
    """Entry point of `greenstack plan ...`; returns the exit code."""
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv)
    return int(args._run(args))


# --- forecast-eval ---------------------------------------------------------------------------------

def parse_hours(text: str, key: str = "--horizon") -> int:
    """'72h', '3d' or '72' -> hours."""
    raw = str(text).strip().lower()
    try:
        hours = float(raw[:-1]) * 24 if raw.endswith("d") else float(raw.removesuffix("h"))
    except ValueError:
        raise ConfigError(Problem(key, text, "not a duration", "e.g. 72h or 3d")) from None
    if hours != int(hours) or not 1 <= hours <= 72:
        raise ConfigError(Problem(key, text, "must be a whole number of hours from 1h to 72h", "e.g. 72h"))
    return int(hours)


def _configure_forecast_eval(p: argparse.ArgumentParser) -> None:
    add_trace_arguments(p, "evaluate on")
    p.add_argument("--horizon", default="72h", help="forecast horizon (default 72h)")
    p.add_argument("--zone", default=None, help="zone id for solar/calendar features if the CSV has none")
    p.add_argument("--origin-hour", type=int, default=0, help="UTC hour of the daily forecast origin (default 0)")
    add_weather_argument(p)
    p.add_argument("--units", choices=("g_per_kwh", "lbs_per_mwh"), default="g_per_kwh",
                   help="unit of the intensity column (lbs_per_mwh is converted)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


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


def _load(path: str, units: str, role: str) -> pd.DataFrame:
    from greenstack.carbon import traces
    from greenstack.carbon.forecast import LBS_PER_MWH_TO_G_PER_KWH, check_units

    shipped = shipped_zone_years(path, f"--{role}")
    if shipped is not None:
        shipped.attrs["role"] = role
        shipped.attrs["exog"] = None
        return shipped
    try:
        df = traces.load_csv_trace(path)
    except DataError as err:
        hint = _lbs_hint(path, err) if units == "g_per_kwh" else None
        raise DataError(([hint] if hint else []) + err.problems) from None
    if units == "lbs_per_mwh":
        df["carbon_intensity"] = df["carbon_intensity"] * LBS_PER_MWH_TO_G_PER_KWH
    else:
        check_units(df["carbon_intensity"].to_numpy(), Path(path).name)
    df.attrs["role"] = role
    df.attrs["exog"] = _read_exog(path)
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


def _canonical_zone(zone: str) -> str:
    from greenstack.carbon.forecast import zone_context

    return zone_context(zone).zone or str(zone)


def trace_zone(trace: pd.DataFrame, history: Sequence[pd.DataFrame]) -> str | None:
    """The trace's zone, else the one zone its history files agree on (for calendar and sun features)."""
    if trace.attrs.get("zone"):
        return str(trace.attrs["zone"])
    zones = {str(h.attrs["zone"]) for h in history if h.attrs.get("zone")}
    return zones.pop() if len(zones) == 1 else None


def _lbs_hint(path: str, err: DataError) -> Problem | None:
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


def _read_exog(path: str) -> pd.DataFrame | None:
    """Optional weather-forecast columns (`forecast_*` / `weather_*`) of a canonical CSV."""
    from greenstack.carbon.traces import read_weather_columns

    return read_weather_columns(path)


WEATHER_HELP = ("CSV of weather-forecast columns (timestamp + weather_*; e.g. from `greenstack carbon weather`) "
                "for the forecaster; applies to every --trace; repeatable")


def add_trace_arguments(p: argparse.ArgumentParser, purpose: str) -> None:
    """`--trace` (what the command `purpose`s) and `--history` (seen by the forecaster only), as files
    or shipped zone-years; shared by forecast-eval and backtest."""
    p.add_argument("--trace", action="append", required=True, metavar="FILE|ZONE:YEAR",
                   help=f"CSV to {purpose} (Electricity Maps export or timestamp,carbon_intensity), or a "
                        "shipped zone-year such as GB:2023; repeatable")
    p.add_argument("--history", action="append", default=[], metavar="FILE|ZONE:YEARS",
                   help="earlier data of the same zone, seen by the forecaster only (a CSV or e.g. "
                        "GB:2021-2022); repeatable")


def add_weather_argument(p: argparse.ArgumentParser) -> None:
    """`--weather FILE` for subcommands that run the forecaster (forecast-eval, backtest)."""
    p.add_argument("--weather", action="append", default=[], metavar="FILE", help=WEATHER_HELP)


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
            ex = _read_exog(path)
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


def _combine(trace: pd.DataFrame, history: list[pd.DataFrame], name: str,
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


def _history_for(trace: pd.DataFrame, history: list[pd.DataFrame], n_traces: int) -> list[pd.DataFrame]:
    """History files that belong to this trace: same zone id, or any when zones are unknown."""
    zone = trace.attrs.get("zone")
    out = []
    for h in history:
        hz = h.attrs.get("zone")
        if zone and hz:
            if hz == zone or _canonical_zone(hz) == _canonical_zone(zone):
                out.append(h)
        elif n_traces == 1 or h["timestamp"].iloc[-1] < trace["timestamp"].iloc[0]:
            out.append(h)
    return out


def _run_forecast_eval(args: argparse.Namespace) -> int:
    from greenstack.carbon.forecast import rolling_evaluate, zone_context

    horizon = parse_hours(args.horizon)
    if not 0 <= args.origin_hour <= 23:
        raise ConfigError(Problem("--origin-hour", args.origin_hour, "must be 0..23"))
    problems: list[Problem] = []
    traces_in, history = [], []
    for role, paths, bucket in (("trace", args.trace, traces_in), ("history", args.history, history)):
        for path in paths:
            try:
                bucket.append(_load(path, args.units, role))
            except ConfigError as err:  # collect every file's problems before failing
                problems += err.problems
    if problems:
        raise DataError(problems)
    weather = load_weather(args.weather, traces_in)

    results = []
    progress = _progress(enabled=not args.json)
    with progress:
        for df in traces_in:
            name = Path(df.attrs["path"]).name
            own_history = _history_for(df, history, len(traces_in))
            series, exog = _combine(df, own_history, name, weather)
            ctx = zone_context(args.zone or trace_zone(df, own_history))
            task = progress.add_task(f"{name}", total=None)
            ev = rolling_evaluate(series, df["timestamp"].iloc[0], horizon_h=horizon, context=ctx,
                                  origin_hour=args.origin_hour, exog=exog,
                                  progress=lambda i, n, task=task: progress.update(task, completed=i, total=n))
            metrics = ev.day_metrics()
            results.append({"trace": str(df.attrs["path"]), "zone": ctx.zone or None,
                            "origins": len(ev.origins), "warmup_origins_skipped": ev.skipped_warmup,
                            "horizon_h": horizon, "mape": metrics["mape"], "mae": metrics["mae"],
                            "interval": {"quantiles": [min(ev.quantiles), max(ev.quantiles)],
                                         "coverage": round(ev.coverage(), 3)},
                            "seconds": round(ev.seconds, 2),
                            "weather_columns": weather_columns(exog)})
    if args.json:
        print(json.dumps({"traces": results}, indent=2))
    else:
        print_eval_table(results)
    return 0


def _progress(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("forecast-eval {task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True), transient=True, disable=not enabled)


def print_eval_table(results: Sequence[dict[str, Any]], file: Any = None) -> None:
    """Day-1/2/3 MAPE and MAE, greenstack vs seasonal-naive, as a rich table."""
    from rich.table import Table

    from greenstack.console import make_console

    table = Table(title="forecast-eval: greenstack vs seasonal-naive (same hour, most recent day)")
    for col in ("trace", "day", "MAPE greenstack %", "MAPE naive %", "ratio", "MAE greenstack", "MAE naive"):
        table.add_column(col, justify="left" if col in ("trace", "day") else "right")
    for r in results:
        for i, day in enumerate(r["mape"]["model"]):
            m, nv = r["mape"]["model"][day], r["mape"]["naive"][day]
            ratio = m / nv if nv else float("nan")
            table.add_row(Path(r["trace"]).name if i == 0 else "", day, f"{m:.2f}", f"{nv:.2f}",
                          f"{ratio:.2f}", f"{r['mae']['model'][day]:.1f}", f"{r['mae']['naive'][day]:.1f}")
        table.add_section()
    console = make_console(file=file or sys.stdout, min_width=120)
    console.print(table)
    for r in results:
        console.print(f"{Path(r['trace']).name}: {r['origins']} daily origins"
                      + (f" ({r['warmup_origins_skipped']} warm-up skipped)" if r["warmup_origins_skipped"] else "")
                      + f", {int(r['interval']['quantiles'][0] * 100)}-{int(r['interval']['quantiles'][1] * 100)}% "
                      f"interval coverage {r['interval']['coverage']:.0%}, {r['seconds']:.1f} s"
                      + (f"; weather: {', '.join(r['weather_columns'])}" if r.get("weather_columns") else ""))


register("forecast-eval", Subcommand(
    help="rolling-origin evaluation of the 72 h carbon-intensity forecaster vs seasonal-naive",
    configure=_configure_forecast_eval, run=_run_forecast_eval))

__all__ = ["SUBCOMMANDS", "Subcommand", "build_parser", "parse_hours", "print_eval_table", "register",
           "run_plan"]


# --- backtest and region (greenstack.scheduling) ----------------------------------------------------

def _register_scheduling() -> None:
    from greenstack.scheduling import commands

    register("backtest", Subcommand(help=commands.BACKTEST_HELP, configure=commands.configure_backtest,
                                    run=commands.run_backtest_command))
    register("region", Subcommand(help=commands.REGION_HELP, configure=commands.configure_region,
                                  run=commands.run_region_command))
    from greenstack.scheduling import start

    register("start", Subcommand(help=start.START_HELP, configure=start.configure_start,
                                 run=start.run_start_command))


_register_scheduling()
