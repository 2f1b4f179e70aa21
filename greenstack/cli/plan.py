"""`greenstack plan ...`: planning tools around carbon intensity (forecast-eval here; backtest and
region in `plan_schedule`, start in `plan_start`).

Subcommands are entries of `SUBCOMMANDS` (name -> `Subcommand`): a new tool adds one entry with its
own argument setup and handler.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from greenstack.carbon.inputs import (
    combine_history,
    history_for,
    load_trace,
    load_weather,
    trace_zone,
    weather_columns,
)
from greenstack.cli import plan_schedule, plan_start
from greenstack.cli._common import ArgParser, add_trace_arguments, add_weather_argument, help_exit
from greenstack.cli._common import progress as progress_bar
from greenstack.errors import ConfigError, DataError, Problem


@dataclass(frozen=True)
class Subcommand:
    """One `greenstack plan NAME` tool: its help line, argument setup and handler (returns exit code)."""

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """The `greenstack plan` parser with every registered subcommand."""
    parser = ArgParser(prog="greenstack plan", description="planning tools around grid carbon intensity")
    sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", parser_class=ArgParser)
    for name, spec in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=spec.help, description=spec.help)
        spec.configure(p)
        p.set_defaults(_run=spec.run)
    return parser


def run_plan(argv: list[str]) -> int:
    """Entry point of `greenstack plan ...`; returns the exit code."""
    parser = build_parser()
    if (code := help_exit(argv, parser.print_help)) is not None:
        return code
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
                bucket.append(load_trace(path, args.units, role))
            except ConfigError as err:  # collect every file's problems before failing
                problems += err.problems
    if problems:
        raise DataError(problems)
    weather = load_weather(args.weather, traces_in)

    results = []
    progress = progress_bar(enabled=not args.json)
    with progress:
        for df in traces_in:
            name = Path(df.attrs["path"]).name
            own_history = history_for(df, history, len(traces_in))
            series, exog = combine_history(df, own_history, name, weather)
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


#: every `greenstack plan` subcommand (a constant table: a new tool adds one entry here)
SUBCOMMANDS: Mapping[str, Subcommand] = MappingProxyType({
    "forecast-eval": Subcommand(
        help="rolling-origin evaluation of the 72 h carbon-intensity forecaster vs seasonal-naive",
        configure=_configure_forecast_eval, run=_run_forecast_eval),
    "backtest": Subcommand(help=plan_schedule.BACKTEST_HELP, configure=plan_schedule.configure_backtest,
                           run=plan_schedule.run_backtest_command),
    "region": Subcommand(help=plan_schedule.REGION_HELP, configure=plan_schedule.configure_region,
                         run=plan_schedule.run_region_command),
    "start": Subcommand(help=plan_start.START_HELP, configure=plan_start.configure_start,
                        run=plan_start.run_start_command),
})

__all__ = ["SUBCOMMANDS", "Subcommand", "build_parser", "parse_hours", "print_eval_table", "run_plan"]
