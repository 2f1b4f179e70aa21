"""`greenstack plan backtest` and `greenstack plan region` (registered in greenstack.cli.plan)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from greenstack.cli._common import add_trace_arguments, add_weather_argument
from greenstack.cli._common import progress as progress_bar
from greenstack.errors import ConfigError, DataError, Problem
from greenstack.scheduling.timeparse import parse_hours, parse_time

BACKTEST_HELP = ("backtest carbon-aware start times (greenstack, oracle, seasonal-naive, threshold) for a job "
                 "arriving every hour of a trace")
REGION_HELP = "where and when should a job run: candidate zones scored by carbon and spot discount"


# --- backtest ----------------------------------------------------------------------------------------

def configure_backtest(p: argparse.ArgumentParser) -> None:
    add_trace_arguments(p, "backtest on")
    p.add_argument("--duration", required=True, help="job length, e.g. 4h or 90m")
    p.add_argument("--slack", required=True, help="how long a job may wait to start, whole hours, e.g. 24h")
    p.add_argument("--interruptible", action="store_true",
                   help="jobs may pause and resume (whole-hour slots, see --min-chunk/--resume-overhead)")
    p.add_argument("--forecaster", default="greenstack", choices=("greenstack", "seasonal-naive"),
                   help="what greenstack's policy plans on (default greenstack)")
    p.add_argument("--objective", default="mean",
                   help="mean (default) | point | median | an upper quantile level such as 0.9 (risk-aware)")
    p.add_argument("--replan", action=argparse.BooleanOptionalAction, default=None,
                   help="re-plan every hour while waiting, as scheduler=forecast_window does (default for "
                        "contiguous jobs); --no-replan plans once at arrival")
    p.add_argument("--min-chunk", default="1h", help="interruptible: shortest run between pauses (default 1h)")
    p.add_argument("--resume-overhead", default="0h",
                   help="interruptible: extra run time per resume, e.g. 6m (default 0h)")
    p.add_argument("--threshold-pct", type=float, default=25.0,
                   help="threshold baseline: percentile of the week before arrival (default 25)")
    add_weather_argument(p)
    p.add_argument("--zone", default=None, help="zone id for solar/calendar features if the CSV has none")
    p.add_argument("--units", choices=("g_per_kwh", "lbs_per_mwh"), default="g_per_kwh",
                   help="unit of the intensity column (lbs_per_mwh is converted)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def backtest_config(args: argparse.Namespace) -> Any:
    """The BacktestConfig the flags describe; every bad flag listed at once."""
    from greenstack.scheduling.backtest import BacktestConfig

    problems: list[Problem] = []
    values: dict[str, Any] = {}
    for flag, attr, zero in (("--duration", "duration", False), ("--slack", "slack", True),
                             ("--min-chunk", "min_chunk", False), ("--resume-overhead", "resume_overhead", True)):
        try:
            values[attr] = parse_hours(getattr(args, attr), flag, allow_zero=zero)
        except ConfigError as err:
            problems += err.problems
    slack = values.get("slack")
    if slack is not None and slack != int(slack):
        problems.append(Problem("--slack", args.slack, "backtests run on hourly traces: use whole hours",
                                f"e.g. {math.floor(slack)}h"))
    chunk = values.get("min_chunk")
    if chunk is not None and chunk != int(chunk):
        problems.append(Problem("--min-chunk", args.min_chunk, "use whole hours", "e.g. 1h"))
    objective: str | float = args.objective
    try:
        objective = float(args.objective)
    except ValueError:
        pass
    if problems:
        raise ConfigError(problems)
    return BacktestConfig(duration_h=values["duration"], slack_h=int(values["slack"]),
                          interruptible=args.interruptible, forecaster=args.forecaster, objective=objective,
                          replan=(not args.interruptible) if args.replan is None else args.replan,
                          min_chunk_h=int(values["min_chunk"]),
                          resume_overhead_h=values["resume_overhead"], threshold_pct=args.threshold_pct)


def run_backtest_command(args: argparse.Namespace) -> int:
    from greenstack.carbon import inputs
    from greenstack.carbon.forecast import zone_context
    from greenstack.scheduling.backtest import aggregate, run_backtest

    cfg = backtest_config(args)
    problems: list[Problem] = []
    traces_in, history = [], []
    for role, paths, bucket in (("trace", args.trace, traces_in), ("history", args.history, history)):
        for path in paths:
            try:
                bucket.append(inputs.load_trace(path, args.units, role))
            except ConfigError as err:  # every file's problems before failing
                problems += err.problems
    if problems:
        raise DataError(problems)
    weather = inputs.load_weather(args.weather, traces_in)
    note = cfg.horizon_note()
    if note:
        print(f"note: {note}", file=sys.stderr)
    results, used = [], []
    progress = progress_bar(enabled=not args.json)
    with progress:
        for df in traces_in:
            name = Path(df.attrs["path"]).name
            own_history = inputs.history_for(df, history, len(traces_in))
            series, exog = inputs.combine_history(df, own_history, name, weather)
            used.append(inputs.weather_columns(exog) if cfg.forecaster == "greenstack" else [])
            first = int(round((df["timestamp"].iloc[0].floor("h") - series.index[0]).total_seconds() / 3600))
            task = progress.add_task(name, total=None)
            ctx = zone_context(args.zone or inputs.trace_zone(df, own_history))
            results.append(run_backtest(series.to_numpy(), int(series.index[0].timestamp()), first, cfg,
                                        name=str(df.attrs["path"]), context=ctx, exog=exog,
                                        progress=lambda i, n, task=task: progress.update(task, completed=i, total=n)))
    doc = {"traces": [r.to_dict() for r in results], "aggregate": aggregate(results)}  # the exact keys
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_backtest_table(doc, results, cfg, weather=used)
    return 0


def print_backtest_table(doc: dict[str, Any], results: list[Any], cfg: Any, file: Any = None,
                         weather: list[list[str]] | None = None) -> None:
    """Mean % saved vs starting at arrival, per trace and method, with the capture ratio."""
    from rich.table import Table

    from greenstack.console import make_console, plural

    kind = "interruptible" if cfg.interruptible else "contiguous"
    table = Table(title=f"backtest: {cfg.duration_h:g} h {kind} job arriving every hour, slack {cfg.slack_h} h - "
                        "mean % saved vs starting at arrival")
    for col in ("trace", "jobs", "greenstack %", "oracle %", "seasonal-naive %", "threshold %", "capture"):
        table.add_column(col, justify="left" if col == "trace" else "right")

    def row(name: str, jobs: str, entry: dict[str, Any]) -> None:
        s, cap = entry["saving_pct"], entry["capture"]
        table.add_row(name, jobs, f"{s['policy']:.2f}", f"{s['oracle']:.2f}", f"{s['naive']:.2f}",
                      f"{s['threshold']:.2f}", "-" if cap is None else f"{cap:.3f}")

    for entry in doc["traces"]:
        row(Path(entry["trace"]).name, str(entry["jobs"]), entry)
    if len(doc["traces"]) > 1:
        table.add_section()
        row("aggregate", str(sum(e["jobs"] for e in doc["traces"])), doc["aggregate"])
    console = make_console(file=file or sys.stdout, min_width=120)
    console.print(table)
    for i, r in enumerate(results):
        skipped = [f"{r.skipped_end} at the end (window past the trace)"] * bool(r.skipped_end) + \
                  [f"{r.skipped_warmup} in the forecaster's warm-up"] * bool(r.skipped_warmup)
        cols = weather[i] if weather else []
        console.print(f"{Path(r.name).name}: {plural(r.jobs, 'job')}" + (f", skipped {' and '.join(skipped)}" if skipped else "")
                      + f", {r.seconds:.1f} s" + (f"; weather: {', '.join(cols)}" if cols else ""))
    console.print("capture = greenstack / oracle saving; plans use only data before each arrival "
                  f"(objective {cfg.objective}{', re-planned hourly' if cfg.replan else ''})")


# --- region ----------------------------------------------------------------------------------------

def configure_region(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", required=True, help="job length, e.g. 2h")
    p.add_argument("--candidates", required=True, help="comma-separated zones, e.g. GB,DE-LU,US-CAL-CISO")
    p.add_argument("--start", default=None, help="earliest start, ISO-8601 with offset (default: now)")
    p.add_argument("--slack", default="24h", help="how long the job may wait (default 24h; 0h = now only)")
    p.add_argument("--kind", default="cpu", choices=("cpu", "gpu"), help="instance prices to compare (default cpu)")
    p.add_argument("--catalog", default=None,
                   help="price catalog, JSON as for `report tco` or CSV (default: the shipped, dated snapshot)")
    p.add_argument("--w-carbon", type=float, default=0.6, help="weight of the carbon term (default 0.6)")
    p.add_argument("--w-price", type=float, default=0.4, help="weight of the spot-discount term (default 0.4)")
    p.add_argument("--objective", default="mean", help="mean (default) | point | median | a quantile level")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_region_command(args: argparse.Namespace) -> int:
    from greenstack.scheduling.prices import load_price_catalog
    from greenstack.scheduling.regions import check_weights, choose_region, parse_candidates

    problems: list[Problem] = []
    zones: list[str] = []
    values: dict[str, Any] = {}
    for what, fn in (("zones", lambda: parse_candidates(args.candidates, "--candidates")),
                     ("duration", lambda: parse_hours(args.duration, "--duration")),
                     ("slack", lambda: parse_hours(args.slack, "--slack", allow_zero=True)),
                     ("start", lambda: parse_time(args.start, "--start") if args.start else
                      datetime.now(timezone.utc).replace(second=0, microsecond=0)),
                     ("catalog", lambda: load_price_catalog(args.catalog))):
        try:
            values[what] = fn()
        except ConfigError as err:
            problems += [Problem("--catalog" if p.key == "catalog" else p.key, p.value, p.reason, p.fix)
                         for p in err.problems]
    problems += [Problem(f"--{p.key.replace('_', '-')}", p.value, p.reason, p.fix.replace("_", "-"))
                 for p in check_weights(args.w_carbon, args.w_price)]
    objective: str | float = args.objective
    try:
        objective = float(args.objective)
    except ValueError:
        pass
    zones = values.get("zones", [])
    catalog = values.get("catalog")
    if catalog is not None:
        for zone in zones:
            try:
                catalog.offer(zone, args.kind)
            except ConfigError as err:
                problems += [Problem("--candidates", zone, p.reason, p.fix) for p in err.problems]
    if problems:
        raise ConfigError(problems)
    ranking, notes = choose_region(zones, catalog, kind=args.kind, start=values["start"],
                                   duration_h=values["duration"], slack_h=values["slack"], w_carbon=args.w_carbon,
                                   w_price=args.w_price, objective=objective)
    best = ranking[0]
    doc = {"duration_h": values["duration"], "slack_h": values["slack"], "start": values["start"].isoformat(),
           "kind": args.kind, "weights": {"w_carbon": args.w_carbon, "w_price": args.w_price},
           "catalog": {"path": catalog.path, "as_of": catalog.as_of},
           "choice": {"zone": best.candidate.zone, "start": best.candidate.start,
                      "region": best.candidate.offer.region, "provider": best.candidate.offer.provider,
                      "instance_type": best.candidate.offer.instance_type, "score": round(best.score, 4),
                      "expected_g_per_kwh": round(best.candidate.intensity_g_per_kwh, 2)},
           "candidates": [r.to_dict() for r in ranking], "notes": sorted(set(notes))}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        _print_region(doc)
    return 0


def _print_region(doc: dict[str, Any]) -> None:
    from rich.table import Table

    from greenstack.console import make_console

    table = Table(title=f"region: {doc['duration_h']:g} h {doc['kind']} job from {doc['start']} "
                        f"(slack {doc['slack_h']:g} h), score = {doc['weights']['w_carbon']:g}*(1 - I/I_max) + "
                        f"{doc['weights']['w_price']:g}*(1 - spot/on-demand)")
    for col in ("zone", "cloud region", "instance", "best start (UTC)", "g/kWh then", "g/kWh now",
                "spot/on-demand", "score"):
        table.add_column(col, justify="left" if col in ("zone", "cloud region", "instance", "best start (UTC)")
                         else "right")
    for c in doc["candidates"]:
        o = c["offer"]
        table.add_row(c["zone"], f"{o['provider']} {o['region']}", o["instance_type"], c["start"][:16],
                      f"{c['intensity_g_per_kwh']:.0f}", f"{c['intensity_now_g_per_kwh']:.0f}",
                      "no spot" if o["spot_usd_per_h"] is None else f"{o['spot_ratio']:.2f}", f"{c['score']:.3f}")
    console = make_console(min_width=120)
    console.print(table)
    ch = doc["choice"]
    console.print(f"run in {ch['zone']} ({ch['provider']} {ch['region']}, {ch['instance_type']}) starting "
                  f"{ch['start'][:16]}Z: expected {ch['expected_g_per_kwh']:.0f} g/kWh, score {ch['score']:.3f}")
    console.print(f"prices: {doc['catalog']['path']} (snapshot as of {doc['catalog']['as_of']}); cost a run there "
                  f"with: greenstack report tco RUN_DIR --instance {ch['instance_type']} --region {ch['region']}")
    for note in doc["notes"]:
        console.print(f"note: {note}")
